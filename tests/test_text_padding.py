"""Pad-to-longest text batches (--text-padding longest): trimming the all-padding tail changes nothing the CLIP
text tower computes (causal attention, EOS pooling), so features and gradients match the full-length batch."""

from types import SimpleNamespace

import pytest
import torch

from neuclip_ds.config import ConfigError, TrainConfig
from neuclip_ds.data.tokenizer import trim_text_padding
from neuclip_ds.engine import NeuCLIPEngine
from neuclip_ds.model import build_model

VOCAB, PAD, BOS, EOS, L = 100, 1, 98, 99, 77


def caption_batch(lengths, generator, context_length=L):
    """bos + random tokens + eos, then pad, like TextTokenizer; lengths count the tokens between bos and eos."""
    ids = torch.full((len(lengths), context_length), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n + 1] = BOS, EOS
        ids[i, 1 : n + 1] = torch.randint(2, BOS, (n,), generator=generator)
        mask[i, : n + 2] = 1
    return ids, mask


def test_trim_keeps_the_longest_row():
    ids, mask = caption_batch([3, 9, 5], torch.Generator().manual_seed(0))
    short_ids, short_mask = trim_text_padding(ids, mask)
    assert short_ids.shape == short_mask.shape == (3, 11)  # bos + 9 tokens + eos
    assert torch.equal(short_ids, ids[:, :11]) and torch.equal(short_mask, mask[:, :11])
    assert mask[:, 11:].sum() == 0


def test_trim_leaves_full_and_maskless_batches_alone():
    ids, mask = caption_batch([L - 2, 4], torch.Generator().manual_seed(0))
    out_ids, out_mask = trim_text_padding(ids, mask)
    assert out_ids is ids and out_mask is mask
    out_ids, out_mask = trim_text_padding(ids, None)
    assert out_ids is ids and out_mask is None


def test_trimmed_text_features_and_gradients_match_full_length():
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS).train()
    ids, mask = caption_batch([3, 12, 7, 1, 12, 5], torch.Generator().manual_seed(1), model.context_length)
    target = torch.randn(len(ids), model.text.config.projection_dim, generator=torch.Generator().manual_seed(2))
    results = []
    for batch in ((ids, mask), trim_text_padding(ids, mask)):
        model.zero_grad(set_to_none=True)
        feats = model.encode_text(*batch)
        (feats * target).sum().backward()
        results.append(
            (feats.detach(), {n: p.grad.clone() for n, p in model.text.named_parameters() if p.grad is not None})
        )
    (full, full_grads), (short, short_grads) = results
    assert trim_text_padding(ids, mask)[0].shape[1] == 14 < model.context_length
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-6)
    assert full_grads.keys() == short_grads.keys() and len(full_grads) > 10
    # float32 noise of different matmul shapes, relative to the gradients' scale (a wrong trim is O(scale));
    # one scale for all: some gradients are zero up to noise (k_proj.bias: softmax ignores a shift of all keys)
    scale = max(float(g.abs().max()) for g in full_grads.values())
    for name, grad in full_grads.items():
        torch.testing.assert_close(short_grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("padding, width", [("longest", 9), ("max_length", L)])
def test_engine_pads_text_as_configured(padding, width):
    ids, mask = caption_batch([7, 2], torch.Generator().manual_seed(0))
    fake = SimpleNamespace(cfg=TrainConfig(text_padding=padding), info=SimpleNamespace(device=torch.device("cpu")))
    out = NeuCLIPEngine._to_device(
        fake, {"pixel_values": torch.zeros(2, 3, 4, 4), "input_ids": ids, "attention_mask": mask}
    )
    assert out["input_ids"].shape == out["attention_mask"].shape == (2, width)


def test_text_padding_is_validated():
    with pytest.raises(ConfigError, match="--text-padding"):
        TrainConfig(text_padding="shortest").validate(world_size=1)
