#!/usr/bin/env python3
"""Optional check: an `fp8pipe ckpt export --format hf` folder loads in Hugging Face transformers
(DeepseekV3ForCausalLM.from_pretrained on the local folder) and computes what fp8pipe computes.

Needs torch and transformers (native deepseek_v3: 4.53 or later), which the project does not
install; without them it prints 'skipped: transformers/torch not installed' and exits 0.

  check_hf_transformers.py HF_DIR MODEL.safetensors --fp8pipe BIN --config CONFIG
      [--set=--a.b=v ...] [--hf key=value ...] [--tol 1e-5] [--tokens FILE] [--seed N]
      [--generate N]

MODEL.safetensors is the fp8pipe model-only file of the same checkpoint (train's
<checkpoint.dir>/model.safetensors or `fp8pipe ckpt export DIR OUT.safetensors`); CONFIG plus the
--set overrides must be the model config it was trained with. The check writes a uint16 token file
(an order-1 Markov chain over the vocabulary, or the first ids of --tokens) of 64 windows of
seq_len = config.json's max_position_embeddings, runs `fp8pipe eval CONFIG --checkpoint MODEL`
in FP32 over its held-out half (the last 32 windows: data.heldout_fraction=0.5, one batch of 32
rows, so every held-out window is scored once), computes the same mean next-token cross-entropy
with transformers in FP32 on the same windows, and requires |ce_hf - ce_fp8pipe| <= tol *
ce_fp8pipe. For a bf16 folder fp8pipe evaluates a copy of MODEL rounded to bf16 the way the export
rounds it, so the two still compute on the same weights.

Loading must leave no weight missing (a missing one would be silently random), lm_head untied, and
no unused weights but the MTP layers (model.layers.{L+k}.*), which transformers does not build.
When config.json's group routing cannot match fp8pipe's (fp8pipe scores a group by the sum of its
top topk/topk_group biased affinities, transformers by its top 2), the as-exported CE is only
reported, and the check is run again with group-limited routing off on both sides
(--model.moe.n_groups=1 --model.moe.max_nodes=0; n_group=1 topk_group=1). --hf overrides
config.json fields at load time.

--generate N (fp32 folders): greedy decoding too. transformers' generate (its own per-head
key/value cache) continues an ASCII prompt by N tokens; `fp8pipe generate` in FP32 must give the
same N tokens with the latent cache (MLA's absorbed form), with the per-head cache and, where the
model has an MTP module, with MTP speculative decoding (on the routing setting the CE check runs
exactly).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

try:
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
except ImportError:
    print("skipped: transformers/torch not installed")
    sys.exit(0)


def markov_tokens(n, vocab, seed):
    """n ids of an order-1 Markov chain with 4 random successors per state (Dirichlet weights)."""
    g = np.random.default_rng(seed)
    nxt = g.integers(0, vocab, size=(vocab, 4))
    cdf = np.cumsum(g.dirichlet(np.ones(4), size=vocab), 1)
    u = g.random(n)
    x = np.empty(n, dtype=np.int64)
    x[0] = g.integers(vocab)
    for t in range(1, n):
        s = x[t - 1]
        x[t] = nxt[s][min(3, int(np.searchsorted(cdf[s], u[t])))]
    return x


def fp8pipe_eval(args, tokens_path, seq_len, sets):
    """`fp8pipe eval` in FP32 over the 32 held-out windows of tokens_path (one batch of 32)."""
    cmd = [args.fp8pipe, "eval", args.config, "--checkpoint", args.model, "--batches", "1",
           "--precision.mode=FP32", "--data.source=tokens", f"--data.path={tokens_path}",
           "--data.token_dtype=uint16", "--data.heldout_fraction=0.5",
           f"--train.seq_len={seq_len}", "--train.global_batch=32"] + sets
    r = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"eval loss ([0-9.eE+-]+) nats/token", r.stdout)
    if r.returncode != 0 or not m:
        sys.exit(f"FAIL: {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return float(m.group(1))


def bf16_rounded_copy(model, out):
    """model with every tensor but the router biases rounded to bf16 (nearest even), as the bf16
    export rounds them, so fp8pipe and transformers compute on the same weights."""
    from safetensors import safe_open
    from safetensors.numpy import save_file
    with safe_open(model, framework="numpy") as f:
        meta = f.metadata()
        ts = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in ts.items():
        if v.dtype == np.float32 and not k.endswith("e_score_correction_bias"):
            u = v.view(np.uint32).astype(np.uint64)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
            ts[k] = u.astype(np.uint32).view(np.float32)
    save_file(ts, out, metadata=meta)
    return out


def parse_value(v):
    try:
        return json.loads(v)
    except ValueError:
        return v


def group_score_topn(cfg):
    """Experts summed per group score: fp8pipe's top max(1, topk / topk_group) (core limit_groups)
    and transformers' hard-coded top 2 (DeepseekV3TopkRouter), each capped at the group size."""
    gsize = cfg["n_routed_experts"] // cfg["n_group"]
    ours = min(gsize, max(1, cfg["num_experts_per_tok"] // cfg["topk_group"]))
    return ours, min(gsize, 2)


def hf_mean_ce(hf_dir, cfg, rows, hf_over):
    """Loads hf_dir with transformers (FP32) and returns the mean next-token CE over rows."""
    L, V = cfg["num_hidden_layers"], cfg["vocab_size"]
    model, info = AutoModelForCausalLM.from_pretrained(
        hf_dir, torch_dtype=torch.float32, output_loading_info=True,
        attn_implementation="eager", **hf_over)
    model.eval()
    assert type(model).__name__ == "DeepseekV3ForCausalLM", type(model).__name__
    missing = sorted(info["missing_keys"])
    assert not missing, f"weights missing from the export (would be random): {missing[:8]}"
    mtp = re.compile(r"model\.layers\.(\d+)\.")
    bad = [k for k in info["unexpected_keys"]
           if not (mtp.match(k) and int(mtp.match(k).group(1)) >= L)]
    assert not bad, f"unused weights other than the MTP layers: {bad[:8]}"
    assert not info.get("mismatched_keys"), f"shape mismatches: {info['mismatched_keys'][:8]}"
    sd = model.state_dict()
    assert not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]), "head tied"
    x = torch.from_numpy(rows[:, :-1].astype(np.int64))
    y = torch.from_numpy(rows[:, 1:].astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).item()
    return ce, len(info["unexpected_keys"])


def hf_greedy(hf_dir, over, prompt, n):
    """transformers' greedy continuation of the byte ids of `prompt` by exactly n tokens."""
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, torch_dtype=torch.float32, attn_implementation="eager", **over)
    model.eval()
    x = torch.tensor([list(prompt)], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             use_cache=True, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def fp8pipe_greedy(args, sets, prompt, n, extra):
    """`fp8pipe generate` (FP32) continuing `prompt` by n tokens; the new byte ids."""
    cmd = [args.fp8pipe, "generate", args.config, "--checkpoint", args.model,
           "--precision.mode=FP32", "--prompt", prompt.decode("ascii"),
           "--max-new-tokens", str(n)] + extra + sets
    r = subprocess.run(cmd, capture_output=True)
    if r.returncode != 0 or not r.stdout.startswith(prompt):
        sys.exit(f"FAIL: {' '.join(cmd)}\n{r.stdout!r}{r.stderr.decode(errors='replace')}")
    return list(r.stdout[len(prompt):].rstrip(b"\n")), r.stderr.decode(errors="replace")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("hf_dir")
    p.add_argument("model", help="fp8pipe model-only safetensors (train's or `ckpt export`'s)")
    p.add_argument("--fp8pipe", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], help="fp8pipe override --a.b=v")
    p.add_argument("--hf", action="append", default=[], help="config.json override key=value")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also compare N greedy tokens (fp32 folders)")
    p.add_argument("--tokens", help="uint16 token file to use (its first 64*seq_len+1 ids) "
                   "instead of a generated Markov chain")
    args = p.parse_args()
    transformers.logging.set_verbosity_error()  # not the table of unused MTP weights
    transformers.utils.logging.disable_progress_bar()

    cfg = json.load(open(os.path.join(args.hf_dir, "config.json")))
    T, V = cfg["max_position_embeddings"], cfg["vocab_size"]
    windows = 64  # W = (size - 1) / T; heldout_fraction 0.5 holds out the last 32
    if args.tokens:
        tokens = np.fromfile(args.tokens, dtype="<u2")[:windows * T + 1].astype(np.int64)
        assert len(tokens) == windows * T + 1, f"{args.tokens}: fewer than {windows * T + 1} ids"
    else:
        tokens = markov_tokens(windows * T + 1, V, args.seed)
    rows = np.stack([tokens[w * T:w * T + T + 1] for w in range(windows // 2, windows)])
    hf_over = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in args.hf)}
    # transformers 5 writes "dtype" where 4.x (and fp8pipe's export) wrote "torch_dtype"
    folder_dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"

    # Runs: the folder as exported; and, when the group scores differ (fp8pipe sums the top
    # topk/topk_group of a group, transformers the top 2), also with group-limited routing off on
    # both sides, which must agree exactly. The as-exported run is then informational.
    runs = [("as exported", args.set, hf_over)]
    ours_n, hf_n = group_score_topn(cfg) if cfg.get("n_routed_experts") else (2, 2)
    exact_as_exported = ours_n == hf_n or cfg["topk_group"] == cfg["n_group"]
    if not exact_as_exported:
        runs.append(("group routing off", args.set + ["--model.moe.n_groups=1",
                                                      "--model.moe.max_nodes=0"],
                     dict(hf_over, n_group=1, topk_group=1)))
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokens.bin")
        tokens.astype("<u2").tofile(path)
        if folder_dtype == "bfloat16":
            args.model = bf16_rounded_copy(args.model, os.path.join(tmp, "model_bf16.safetensors"))
        for i, (label, sets, over) in enumerate(runs):
            ce_ours = fp8pipe_eval(args, path, T, sets)
            ce_hf, unused = hf_mean_ce(args.hf_dir, cfg, rows, over)
            rel = abs(ce_hf - ce_ours) / ce_ours
            checked = i > 0 or exact_as_exported
            note = (f"tol {args.tol:.0e}" if checked else
                    f"not checked: group score sums the top {ours_n} here, the top {hf_n} there")
            print(f"{label}: mean CE over {len(rows)}x{T} held-out tokens: transformers "
                  f"{ce_hf:.6f}, fp8pipe {ce_ours:.6f}, rel diff {rel:.2e} ({note})")
            failed |= checked and rel > args.tol
            if args.generate and checked and folder_dtype != "float32":
                print(f"{label}: greedy decoding not compared: a {folder_dtype} folder's weights "
                      f"round differently from the fp32 model fp8pipe decodes")
            if args.generate and checked and folder_dtype == "float32":
                prompt = b"fp8pipe "
                want = hf_greedy(args.hf_dir, over, prompt, args.generate)
                ways = [[], ["--kv-cache", "heads"]]
                if (cfg.get("num_nextn_predict_layers", 0) > 0 and
                        "--model.mtp_depth=0" not in sets):
                    ways.append(["--speculative", "mtp"])
                else:
                    print(f"{label}: speculative decoding not compared: the model has no MTP module")
                for extra in ways:
                    got, log = fp8pipe_greedy(args, sets, prompt, args.generate, extra)
                    same = got == want
                    acc = re.search(r"MTP drafts accepted \d+ of \d+", log)
                    print(f"{label}: greedy {args.generate} tokens after {prompt!r}, fp8pipe "
                          f"{' '.join(extra) or '--kv-cache latent'}"
                          f"{' (' + acc.group(0) + ')' if acc else ''}: "
                          f"{'the same as' if same else 'DIFFERENT from'} transformers")
                    if not same:
                        print(f"  transformers {want}\n  fp8pipe      {got}")
                    failed |= not same
    print(f"transformers {transformers.__version__}, torch {torch.__version__}: {args.hf_dir} "
          f"({folder_dtype}) loads as DeepseekV3ForCausalLM, no weight missing, "
          f"{unused} MTP tensors unused")
    if failed:
        sys.exit("FAIL: transformers and fp8pipe disagree")
    print("OK")


if __name__ == "__main__":
    main()
