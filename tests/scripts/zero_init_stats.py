"""Build the tiny preset under deepspeed.zero.Init on every rank (as neuclip-train does for large presets) and
compare per-parameter init statistics with a plain build: exit 1 with the offending parameter if they differ."""

import sys

import deepspeed
import torch

from neuclip_ds.engine import init_distributed
from neuclip_ds.model import build_model, reinitialize_partitioned

info = init_distributed()
torch.manual_seed(0)
ref = dict(build_model("tiny").named_parameters())
with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 8, "zero_optimization": {"stage": 3}}):
    model = build_model("tiny")
reinitialize_partitioned(model)
bad = []
with deepspeed.zero.GatheredParameters(list(model.parameters())):
    for name, p in model.named_parameters():
        q = ref[name]
        assert p.shape == q.shape, name
        if p.numel() > 64:
            if abs(p.std().item() - q.std().item()) > 0.15 * q.std().item() + 1e-6:
                bad.append((name, p.std().item(), q.std().item()))
            if abs(p.mean().item() - q.mean().item()) > 0.05 + 0.1 * q.std().item():
                bad.append((name, "mean", p.mean().item(), q.mean().item()))
        elif p.numel() <= 2 and not torch.equal(p, q):  # tau (and bias): exact values
            bad.append((name, p.tolist(), q.tolist()))
if bad:
    print("init differs under zero.Init:", bad[:5], file=sys.stderr)
    sys.exit(1)
print(f"rank {info.rank}: zero.Init statistics match ({len(ref)} parameters)")
