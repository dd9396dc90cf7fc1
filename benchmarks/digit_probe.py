"""Can the preset's vision tower learn the digit of the embedded data set at all? A supervised probe: the image
tower + a linear head trained on the digit labels (cross-entropy, AdamW lr 2e-3, batch 128), val accuracy every
100 steps. It separates "the contrastive loss does not ask for the digit" from "the tower cannot see it".

    python benchmarks/digit_probe.py                      # tiny preset, data/digits, 300 steps, 1 thread
    python benchmarks/digit_probe.py --label colour       # any attribute of the data set
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from _common import ROOT


def load_split(pattern: str, tokenizer, image_size: int, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    from neuclip_ds.data.loader import make_eval_loader

    xs, ys = [], []
    for batch in make_eval_loader(pattern, tokenizer=tokenizer, image_size=image_size, batch_size=500):
        xs.append(batch["pixel_values"])
        ys.append(batch["labels"][label])
    return torch.cat(xs), torch.cat(ys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset-dir", default=str(ROOT / "data" / "digits"))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--label", default="digit")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from neuclip_ds.data.embedded import dataset_paths, load_classnames
    from neuclip_ds.data.tokenizer import TextTokenizer
    from neuclip_ds.model import build_model
    from neuclip_ds.presets import get_preset

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    preset = get_preset(args.preset)
    paths = dataset_paths(args.dataset_dir)
    tok = TextTokenizer(paths["tokenizer"], context_length=preset.context_length)
    x_train, y_train = load_split(paths["train"], tok, preset.image_size, args.label)
    x_val, y_val = load_split(paths["val"], tok, preset.image_size, args.label)
    classes = len(load_classnames(args.dataset_dir)[args.label])
    model = build_model(args.preset, vocab_size=tok.vocab_size)
    head = torch.nn.Linear(preset.embed_dim, classes)
    opt = torch.optim.AdamW([*model.visual.parameters(), *head.parameters()], lr=2e-3, weight_decay=0.1)
    scale = 10.0  # the features are L2-normalized: logits of a usable size from the start
    start = time.perf_counter()
    print(f"{args.preset}, {args.label} ({classes} classes), chance {100 / classes:.1f} %")
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(x_train), (128,))
        loss = F.cross_entropy(scale * head(model.encode_image(x_train[rows])), y_train[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps:
            with torch.no_grad():
                acc = (head(model.encode_image(x_val)).argmax(1) == y_val).float().mean()
            print(
                f"step {step:5d}  train loss {float(loss.detach()):.3f}  val top-1 {100 * float(acc):.1f} %  "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
