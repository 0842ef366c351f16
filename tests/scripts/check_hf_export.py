#!/usr/bin/env python3
"""Checks a `fp8pipe ckpt export --format hf` folder against the DeepseekV3 schema.

The expected tensor names and shapes are derived here from config.json alone (DeepSeek-V3's
released layout, MTP as layer num_hidden_layers + k), not from fp8pipe's mapping code; values are
compared with the consolidated fp8pipe export (`ckpt export DIR OUT.safetensors`), read with the
standard safetensors package. Usage: check_hf_export.py HF_DIR CONSOLIDATED.safetensors.
"""
import json
import os
import struct
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

REQUIRED_CONFIG = [
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "first_k_dense_replace", "num_attention_heads", "num_key_value_heads",
    "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
    "routed_scaling_factor", "topk_method", "scoring_func", "norm_topk_prob",
    "num_nextn_predict_layers", "rope_theta", "rms_norm_eps", "max_position_embeddings",
    "tie_word_embeddings", "torch_dtype", "hidden_act", "rope_interleave",
]


def check_config(c):
    missing = [k for k in REQUIRED_CONFIG if k not in c]
    assert not missing, f"config.json lacks {missing}"
    assert c["model_type"] == "deepseek_v3", c["model_type"]
    assert c["architectures"] == ["DeepseekV3ForCausalLM"], c["architectures"]
    assert c["topk_method"] == "noaux_tc" and c["scoring_func"] == "sigmoid"
    assert c["norm_topk_prob"] is True and c["tie_word_embeddings"] is False
    assert c["hidden_act"] == "silu" and c["rope_interleave"] is True
    assert c["num_key_value_heads"] == c["num_attention_heads"]
    assert c["torch_dtype"] in ("bfloat16", "float32")
    assert c["n_routed_experts"] % c["n_group"] == 0 and c["topk_group"] <= c["n_group"]
    # rope_scaling: null, or YaRN with DeepSeek-V3's keys (its released config.json)
    r = c.get("rope_scaling", "absent")
    assert r is None or (isinstance(r, dict) and r.get("type") == "yarn" and
                         r.get("rope_type") == "yarn" and r["factor"] > 1 and
                         isinstance(r["original_max_position_embeddings"], int) and
                         r["beta_fast"] > r["beta_slow"] > 0 and
                         r["mscale"] >= 0 and r["mscale_all_dim"] >= 0), f"rope_scaling {r}"


def expected_layer(c, i, moe):
    """name -> shape for decoder layer i of a DeepseekV3 checkpoint."""
    d, H = c["hidden_size"], c["num_attention_heads"]
    q, kv = c["q_lora_rank"], c["kv_lora_rank"]
    nope, rope, v = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    p = f"model.layers.{i}"
    t = {f"{p}.input_layernorm.weight": [d], f"{p}.post_attention_layernorm.weight": [d]}
    a = f"{p}.self_attn"
    if q:
        t[f"{a}.q_a_proj.weight"] = [q, d]
        t[f"{a}.q_a_layernorm.weight"] = [q]
        t[f"{a}.q_b_proj.weight"] = [H * (nope + rope), q]
    else:
        t[f"{a}.q_proj.weight"] = [H * (nope + rope), d]
    t[f"{a}.kv_a_proj_with_mqa.weight"] = [kv + rope, d]
    t[f"{a}.kv_a_layernorm.weight"] = [kv]
    t[f"{a}.kv_b_proj.weight"] = [H * (nope + v), kv]
    t[f"{a}.o_proj.weight"] = [d, H * v]

    def mlp(prefix, inter):
        t[f"{prefix}.gate_proj.weight"] = [inter, d]
        t[f"{prefix}.up_proj.weight"] = [inter, d]
        t[f"{prefix}.down_proj.weight"] = [d, inter]

    if not moe:
        mlp(f"{p}.mlp", c["intermediate_size"])
        return t
    E = c["n_routed_experts"]
    t[f"{p}.mlp.gate.weight"] = [E, d]
    t[f"{p}.mlp.gate.e_score_correction_bias"] = [E]
    for j in range(E):
        mlp(f"{p}.mlp.experts.{j}", c["moe_intermediate_size"])
    if c["n_shared_experts"]:
        mlp(f"{p}.mlp.shared_experts", c["moe_intermediate_size"] * c["n_shared_experts"])
    return t


def expected_tensors(c):
    d, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    moe_from = c["first_k_dense_replace"] if c["n_routed_experts"] else 1 << 30
    t = {"model.embed_tokens.weight": [V, d], "model.norm.weight": [d], "lm_head.weight": [V, d]}
    for i in range(L):
        t.update(expected_layer(c, i, i >= moe_from))
    for k in range(c["num_nextn_predict_layers"]):
        p = f"model.layers.{L + k}"
        t.update(expected_layer(c, L + k, L + k >= moe_from))
        t[f"{p}.embed_tokens.weight"] = [V, d]
        t[f"{p}.enorm.weight"] = [d]
        t[f"{p}.hnorm.weight"] = [d]
        t[f"{p}.eh_proj.weight"] = [d, 2 * d]
        t[f"{p}.shared_head.norm.weight"] = [d]
        t[f"{p}.shared_head.head.weight"] = [V, d]
    return t


def ours_for(c, name, ours):
    """The fp8pipe value an HF tensor must hold (fp8pipe names per docs/HF_EXPORT.md)."""
    L = c["num_hidden_layers"]
    top = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "head.weight"}
    if name in top:
        return ours[top[name]]
    parts = name.split(".")
    i, rest = int(parts[2]), ".".join(parts[3:])
    prefix = f"layers.{i}" if i < L else f"mtp.{i - L}.block"
    if i >= L:
        m = f"mtp.{i - L}"
        mtp = {"embed_tokens.weight": "embed.weight", "enorm.weight": f"{m}.enorm.weight",
               "hnorm.weight": f"{m}.hnorm.weight", "shared_head.norm.weight": f"{m}.norm.weight",
               "shared_head.head.weight": "head.weight"}
        if rest in mtp:
            return ours[mtp[rest]]
        if rest == "eh_proj.weight":  # [enorm(emb); hnorm(h)]: embedding half first
            return np.concatenate([ours[f"{m}.eh_proj_e.weight"], ours[f"{m}.eh_proj_h.weight"]], 1)
    subs = [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
            ("self_attn.q_a_proj", "attn.wq_a"), ("self_attn.q_a_layernorm", "attn.q_norm"),
            ("self_attn.q_b_proj", "attn.wq_b"), ("self_attn.q_proj", "attn.wq"),
            ("self_attn.kv_a_proj_with_mqa", "attn.wkv_a"),
            ("self_attn.kv_a_layernorm", "attn.kv_norm"), ("self_attn.kv_b_proj", "attn.wkv_b"),
            ("self_attn.o_proj", "attn.wo"), ("mlp.", "ffn."), ("gate_proj", "w1"),
            ("up_proj", "w3"), ("down_proj", "w2")]
    for a, b in subs:
        rest = rest.replace(a, b)
    return ours[f"{prefix}.{rest}"]


LINEAR = (".q_a_proj.weight", ".q_b_proj.weight", ".q_proj.weight", ".kv_a_proj_with_mqa.weight",
          ".kv_b_proj.weight", ".o_proj.weight", ".gate_proj.weight", ".up_proj.weight",
          ".down_proj.weight")


def e4m3_values():
    """The 256 E4M3 codes as float32 (OCP FP8: bias 7, subnormals, 0x7F/0xFF NaN), written from
    the format's definition."""
    out = np.empty(256, np.float32)
    for b in range(256):
        s, e, m = b >> 7, (b >> 3) & 15, b & 7
        v = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        out[b] = np.nan if (e == 15 and m == 7) else (-v if s else v)
    return out


def check_fp8(name, codes, scale, ref, pow2):
    """A Linear weight stored as E4M3 with 128x128 block dequant scales: every block's scale is
    positive (a power of two with power-of-two scales) and decode(code) x scale lies within half
    an E4M3 step of the trained value: |err| <= 2^-4 |value| + the block's subnormal step."""
    R, C = ref.shape
    deq = e4m3_values()[codes.astype(np.int64)].reshape(R, C)
    for rb in range((R + 127) // 128):
        for cb in range((C + 127) // 128):
            s = scale[rb, cb]
            assert s > 0, f"{name}: scale {s} of block ({rb}, {cb})"
            if pow2:
                assert np.log2(s) == np.round(np.log2(s)), f"{name}: scale {s} is not a power of 2"
            blk = np.s_[rb * 128:(rb + 1) * 128, cb * 128:(cb + 1) * 128]
            err = np.abs(deq[blk] * s - ref[blk])
            bound = 2.0 ** -4 * np.abs(ref[blk]) + 2.0 ** -10 * s
            assert np.all(err <= bound), f"{name}: block ({rb}, {cb}) off by {err.max()}"


def raw_tensors(path):
    """name -> (dtype, shape, raw bytes) straight from the file layout (for BF16 values)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    assert header.get("__metadata__", {}).get("format") == "pt", f"{path}: metadata format != pt"
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def bf16_round(x):
    """float32 -> bfloat16 values (round to nearest even) as float32."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def shard_files(hf):
    idx = os.path.join(hf, "model.safetensors.index.json")
    if not os.path.exists(idx):
        return {os.path.join(hf, "model.safetensors")}, None
    index = json.load(open(idx))
    files = {os.path.join(hf, f) for f in index["weight_map"].values()}
    return files, index


def check_rope_equivalence(rope_dim, theta):
    """Our RoPE (interleaved pairs, DeepSeek's inference code) vs transformers' path with
    rope_interleave=True (de-interleave, then rotate_half): equal attention scores."""
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal(rope_dim), rng.standard_normal(rope_dim)
    inv = theta ** (-np.arange(0, rope_dim, 2) / rope_dim)

    def ours(x, pos):
        a, b = x[0::2], x[1::2]
        c, s = np.cos(pos * inv), np.sin(pos * inv)
        out = np.empty_like(x)
        out[0::2], out[1::2] = a * c - b * s, a * s + b * c
        return out

    def hf(x, pos):
        x = x.reshape(-1, 2).T.reshape(-1)  # view(d/2, 2).transpose -> [evens | odds]
        emb = np.concatenate([pos * inv, pos * inv])
        rot = np.concatenate([-x[rope_dim // 2:], x[:rope_dim // 2]])
        return x * np.cos(emb) + rot * np.sin(emb)

    for pq, pk in [(5, 2), (17, 17), (40, 3)]:
        a, b = ours(q, pq) @ ours(k, pk), hf(q, pq) @ hf(k, pk)
        assert abs(a - b) < 1e-9, f"rope scores differ: {a} vs {b}"


def main():
    hf, consolidated = sys.argv[1], sys.argv[2]
    c = json.load(open(os.path.join(hf, "config.json")))
    check_config(c)
    want = expected_tensors(c)
    q = c.get("quantization_config")  # DeepSeek-V3's FP8 release format (--dtype fp8)
    fp8 = q is not None
    if fp8:
        assert q == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                     "weight_block_size": [128, 128]}, f"quantization_config {q}"
        for name in [n for n in want if n.endswith(LINEAR)]:
            R, C = want[name]
            want[name + "_scale_inv"] = [(R + 127) // 128, (C + 127) // 128]
    files, index = shard_files(hf)
    got, raw = {}, {}
    for path in sorted(files):
        with safe_open(path, framework="numpy") as f:  # the standard reader: names and shapes
            for k in f.keys():
                assert k not in got, f"{k} in two shards"
                got[k] = (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape()), path)
        raw.update(raw_tensors(path))
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"missing {missing[:8]} extra {extra[:8]}"
    bad = [(k, got[k][1], s) for k, s in want.items() if got[k][1] != s]
    assert not bad, f"shape mismatches (name, got, want): {bad[:8]}"
    if index is not None:
        wm = index["weight_map"]
        assert set(wm) == set(want), "index weight_map does not list exactly the tensors"
        assert all(os.path.join(hf, wm[k]) == got[k][2] for k in wm), "index names a wrong shard"
        assert index["metadata"]["total_size"] == sum(len(r[2]) for r in raw.values())
    ours = load_file(consolidated)
    bf16 = c["torch_dtype"] == "bfloat16"
    pow2 = True  # the run's precision.pow2_scales (the default; tiny keeps it)
    for name in want:
        if name.endswith("_scale_inv"):
            assert got[name][0] == "F32", f"{name}: dtype {got[name][0]}"
            continue
        ref = ours_for(c, name, ours).astype(np.float32)
        if fp8 and name.endswith(LINEAR):
            assert got[name][0] == "F8_E4M3", f"{name}: dtype {got[name][0]}, expected F8_E4M3"
            codes = np.frombuffer(raw[name][2], dtype=np.uint8).reshape(want[name])
            scale = np.frombuffer(raw[name + "_scale_inv"][2], dtype="<f4").reshape(
                want[name + "_scale_inv"])
            check_fp8(name, codes, scale, ref, pow2)
            continue
        keep_f32 = name.endswith("e_score_correction_bias")
        dtype = "F32" if keep_f32 or not bf16 else "BF16"
        assert got[name][0] == dtype, f"{name}: dtype {got[name][0]}, expected {dtype}"
        if dtype == "F32":
            val = np.frombuffer(raw[name][2], dtype="<f4").reshape(want[name])
            if not bf16:  # also through the standard reader
                with safe_open(got[name][2], framework="numpy") as f:
                    assert np.array_equal(f.get_tensor(name), val)
        else:
            u = np.frombuffer(raw[name][2], dtype="<u2").astype(np.uint32) << 16
            val, ref = u.view(np.float32).reshape(want[name]), bf16_round(ref)
        assert np.array_equal(val, ref), f"{name}: values differ from the fp8pipe export"
    check_rope_equivalence(c["qk_rope_head_dim"], c["rope_theta"])
    print(f"OK {hf}: {len(want)} tensors in {len(files)} file(s), {c['torch_dtype']}"
          f"{' with FP8 128x128-block Linear weights (within half an E4M3 step)' if fp8 else ''}, "
          f"names/shapes per the DeepseekV3 schema, values equal to the fp8pipe export")


if __name__ == "__main__":
    main()
