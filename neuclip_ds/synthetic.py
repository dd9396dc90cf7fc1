"""A deterministic synthetic image-text set for tests and benchmarks (no files, no tokenizer).

Sample i belongs to class i % num_classes: its image is the class's fixed pattern plus noise, its caption the
class's token sequence with one noisy token, so the task is learnable. The stream is exactly reproducible:
epoch e visits a permutation seeded by (seed, e); optimizer step s takes the global batch perm[s*B:(s+1)*B];
rank r takes the contiguous block [r*A*b, (r+1)*A*b) of it and splits it into A micro-batches of b. The global
batch of a step is therefore the same for every (world size, accumulation) split, which the 1-rank vs 2-rank and
accumulation tests rely on. The position is (epoch, step_in_epoch).
"""

from __future__ import annotations

import torch


class SyntheticPairs:
    def __init__(
        self,
        num_samples: int,
        *,
        image_size: int,
        context_length: int,
        vocab_size: int,
        eos_token_id: int,
        bos_token_id: int,
        pad_token_id: int = 0,
        num_classes: int = 16,
        seed: int = 0,
    ) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples: must be > 0, got {num_samples}")
        g = torch.Generator().manual_seed(seed)
        self.num_samples, self.seed = num_samples, seed
        labels = torch.arange(num_samples) % num_classes
        patterns = torch.randn(num_classes, 3, image_size, image_size, generator=g)
        self.images = patterns[labels] + 0.5 * torch.randn(num_samples, 3, image_size, image_size, generator=g)
        words = min(8, context_length - 2)
        special = {eos_token_id, bos_token_id, pad_token_id}
        vocab = torch.tensor([t for t in range(vocab_size) if t not in special])
        class_tokens = vocab[torch.randint(0, len(vocab), (num_classes, words), generator=g)]
        tokens = class_tokens[labels].clone()
        noisy = torch.randint(0, words, (num_samples,), generator=g)
        tokens[torch.arange(num_samples), noisy] = vocab[torch.randint(0, len(vocab), (num_samples,), generator=g)]
        self.input_ids = torch.full((num_samples, context_length), pad_token_id, dtype=torch.long)
        self.input_ids[:, 0] = bos_token_id
        self.input_ids[:, 1 : words + 1] = tokens
        self.input_ids[:, words + 1] = eos_token_id
        self.attention_mask = (torch.arange(context_length) < words + 2).long().expand(num_samples, -1).clone()

    def batch(self, index: torch.Tensor) -> dict:
        return {
            "pixel_values": self.images[index],
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "index": index.clone(),
        }


class SyntheticStream:
    """Yields, per optimizer step, this rank's list of A micro-batches (see module doc for the layout)."""

    def __init__(
        self,
        data: SyntheticPairs,
        *,
        global_batch_size: int,
        rank: int,
        world_size: int,
        accumulation: int,
        seed: int = 0,
    ) -> None:
        self.data, self.B, self.rank, self.world, self.A = data, global_batch_size, rank, world_size, accumulation
        self.seed = seed
        self.steps_per_epoch = data.num_samples // global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"global_batch_size: {global_batch_size} exceeds the {data.num_samples} samples")
        self.epoch, self.step_in_epoch = 0, 0

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.data.num_samples, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))

    def check_bad_samples(self) -> int:
        """Synthetic data has no bad samples (the trainer asks every stream, see data/stream.py)."""
        return 0

    def next_step(self) -> list[dict]:
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        s = self.step_in_epoch
        batch = self._perm(self.epoch)[s * self.B : (s + 1) * self.B]
        local = batch.view(self.world, -1)[self.rank]
        self.step_in_epoch += 1
        return [self.data.batch(chunk) for chunk in local.view(self.A, -1)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
