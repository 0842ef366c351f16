#!/usr/bin/env python3
"""Writes a randomly initialized DeepseekV3ForCausalLM, made by Hugging Face transformers itself,
as a folder (config.json + model.safetensors, fp32): a model fp8pipe never touched, for checking
that `fp8pipe eval --checkpoint FOLDER` / checkpoint.init_from compute what transformers computes
(hf_export_test.sh). Needs torch and transformers (5.x).

  make_hf_random.py CONFIG_JSON OUT_DIR

CONFIG_JSON is a DeepseekV3 config.json (e.g. one fp8pipe exported for the same model config).
initializer_range 0.1 makes the attention sharp; the RMSNorm weights and the router biases are
perturbed so that every tensor's mapping shows in the loss. transformers builds no MTP layers.
"""
import json
import sys

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

src, out = sys.argv[1], sys.argv[2]
cfg = json.load(open(src))
cfg.pop("architectures", None)
cfg.pop("model_type", None)
cfg["torch_dtype"] = "float32"
c = DeepseekV3Config(**cfg)
c.initializer_range = 0.1
torch.manual_seed(0)
m = DeepseekV3ForCausalLM(c).float()
with torch.no_grad():
    for n, p in m.named_parameters():
        if n.endswith("norm.weight"):
            p.add_(0.1 * torch.randn_like(p))
    for mod in m.modules():
        b = getattr(mod, "e_score_correction_bias", None)
        if b is not None:
            b.copy_(0.05 * torch.randn_like(b))
m.save_pretrained(out, safe_serialization=True)
print(f"made {out}: {sum(p.numel() for p in m.parameters())} parameters")
