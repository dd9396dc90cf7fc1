"""neuclip-train with NaN pixels injected into the batches of chosen steps on one rank (fault-injection test).

NAN_STEPS: comma-separated 0-based optimizer steps; NAN_RANK: the rank whose batches are poisoned."""

import os

import torch

from neuclip_ds import synthetic, train

steps = {int(s) for s in os.environ["NAN_STEPS"].split(",")}
poisoned_rank = int(os.environ.get("NAN_RANK", "0"))
original = synthetic.SyntheticStream.next_step


def next_step(self):
    step = self.epoch * self.steps_per_epoch + self.step_in_epoch
    batches = original(self)
    if step in steps and self.rank == poisoned_rank:
        batches[0]["pixel_values"] = batches[0]["pixel_values"].clone()
        batches[0]["pixel_values"][0] = float("nan")
    return batches


synthetic.SyntheticStream.next_step = next_step
torch.manual_seed(0)
train.cli()
