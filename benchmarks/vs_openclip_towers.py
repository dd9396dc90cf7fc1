"""The bare towers of neuclip_ds (HF CLIP vision + text with projections) vs open_clip's ViT-B-32: fwd+bwd times
side by side in one process, no DeepSpeed, no data loader (where benchmarks/vs_openclip.py's gap does NOT come
from). Needs open_clip: `make openclip-venv`, then

    .venv-openclip/bin/python benchmarks/vs_openclip_towers.py      # batch 32, 3 timed repeats, ~2 min on 2 cores

Prints the median seconds per fwd+bwd of both full models and of each tower alone, then our text tower's fwd+bwd
when the batch's longest caption has L tokens (what --text-padding longest runs; open_clip always runs 77)."""

import statistics
import time

import open_clip
import torch
import torch.nn.functional as F

from neuclip_ds.model import build_model

torch.manual_seed(0)
B = 32
ours = build_model("ViT-B-32")
theirs, _, _ = open_clip.create_model_and_transforms("ViT-B-32")
print("params", sum(p.numel() for p in ours.parameters()), sum(p.numel() for p in theirs.parameters()))
img = torch.randn(B, 3, 224, 224)
ids = torch.randint(1, 1000, (B, 77))
mask = torch.ones(B, 77, dtype=torch.long)


def clip_loss(i, t, scale):
    logits = scale * i @ t.T
    lab = torch.arange(B)
    return (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab)) / 2


def step_ours(opt):
    out = ours(pixel_values=img, input_ids=ids, attention_mask=mask)
    loss = clip_loss(out["img"], out["txt"], 1 / out["tau"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_theirs(opt):
    i, t, s = theirs(img, ids)
    loss = clip_loss(i, t, s)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def fwdbwd_ours():
    out = ours(pixel_values=img, input_ids=ids, attention_mask=mask)
    clip_loss(out["img"], out["txt"], 1 / out["tau"]).backward()


def fwdbwd_theirs():
    i, t, s = theirs(img, ids)
    clip_loss(i, t, s).backward()


o1 = torch.optim.AdamW(ours.parameters(), lr=1e-5)
o2 = torch.optim.AdamW(theirs.parameters(), lr=1e-5)
ours.train()
theirs.train()
res = {k: [] for k in ("ours_fb", "theirs_fb", "ours_vis", "theirs_vis", "ours_txt", "theirs_txt")}
for r in range(4):
    for name, fn in (
        ("ours_fb", fwdbwd_ours),
        ("theirs_fb", fwdbwd_theirs),
        ("ours_vis", lambda: ours.visual(pixel_values=img).image_embeds.sum().backward()),
        ("theirs_vis", lambda: theirs.encode_image(img).sum().backward()),
        ("ours_txt", lambda: ours.text(input_ids=ids, attention_mask=mask).text_embeds.sum().backward()),
        ("theirs_txt", lambda: theirs.encode_text(ids).sum().backward()),
    ):
        t = time.perf_counter()
        fn()
        el = time.perf_counter() - t
        if r:
            res[name].append(el)
        for m in (ours, theirs):
            m.zero_grad(set_to_none=True)
for k, v in res.items():
    print(k, f"{statistics.median(v):.3f}")
step_ours(o1)  # untimed: the first AdamW step allocates the moments
step_theirs(o2)
steps = {"ours step+adamw": lambda: step_ours(o1), "theirs step+adamw": lambda: step_theirs(o2)}
step_times = {k: [] for k in steps}
for r in range(4):  # ours, theirs, theirs, ours, ...: a steady drift hits both alike
    for name in list(steps)[:: 1 if r % 2 == 0 else -1]:
        t = time.perf_counter()
        steps[name]()
        step_times[name].append(time.perf_counter() - t)
for k, v in step_times.items():
    print(k, f"{statistics.median(v):.3f}")
for L in (10, 20, 40, 77):
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        ours.text(input_ids=ids[:, :L], attention_mask=mask[:, :L]).text_embeds.sum().backward()
        ts.append(time.perf_counter() - t)
        ours.zero_grad(set_to_none=True)
    print(f"ours_txt longest={L}", f"{statistics.median(ts[1:]):.3f}")
