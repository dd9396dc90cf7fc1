"""neuclip-train (MBCL) with an extra term c * sign * tau in the loss: for optimizer steps < TAU_FLIP_STEP the
objective wants tau smaller (sign +1: it is driven onto --tau-min), from then on larger (sign -1).

c = 100 makes the term dominate MBCL's own tau-gradient, so the direction is known at every step."""

import os

from neuclip_ds import engine, losses, train

FLIP = int(os.environ["TAU_FLIP_STEP"])
current = {"step": 0}
original_step = engine.NeuCLIPEngine.train_step
original_loss = losses.ClipLoss.forward


def train_step(self, micro_batches, *, step, epoch):
    current["step"] = step
    return original_step(self, micro_batches, step=step, epoch=epoch)


def forward(self, feats, tau):
    sign = 1.0 if current["step"] < FLIP else -1.0
    return original_loss(self, feats, tau) + 100.0 * sign * tau.sum()


engine.NeuCLIPEngine.train_step = train_step
losses.ClipLoss.forward = forward
train.cli()
