"""neuclip-train where rank POISON_RANK's weights turn non-finite right after optimizer step POISON_STEP (0-based),
before the save of that step (fault-injection test: a state that must not become a checkpoint)."""

import os

import torch

from neuclip_ds import engine, train

POISON_STEP = int(os.environ["POISON_STEP"])
POISON_RANK = int(os.environ["POISON_RANK"])
original = engine.NeuCLIPEngine.train_step


def train_step(self, micro_batches, *, step, epoch):
    metrics = original(self, micro_batches, step=step, epoch=epoch)
    if step == POISON_STEP and self.info.rank == POISON_RANK:
        with torch.no_grad():
            next(self.model.parameters()).view(-1)[0] = float("inf")
    return metrics


engine.NeuCLIPEngine.train_step = train_step
train.cli()
