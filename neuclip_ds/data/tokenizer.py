"""Offline text tokenization for CLIP training: a small caption tokenizer and a CLIP-style wrapper.

``train_caption_tokenizer(captions, out_dir)`` trains a small lowercase BPE tokenizer (HF ``tokenizers``,
CLIP-like: whitespace/punctuation pre-tokenization, ``</w>`` end-of-word suffix, full printable-ASCII alphabet
so unseen words still encode) and saves it as a HF tokenizer directory loadable offline with
``transformers.PreTrainedTokenizerFast.from_pretrained`` / ``AutoTokenizer.from_pretrained``. Special tokens:
``<unk>`` (id 0), ``<pad>`` (id 1), ``<|startoftext|>`` and ``<|endoftext|>`` as the two LAST ids, like
OpenAI CLIP, so the eos id is the largest id and is never 2 (HF ``CLIPTextModel`` uses legacy argmax pooling
when ``eos_token_id == 2``, otherwise it pools at the first eos position; both work with eos = max id).
Round trip: for captions made of lowercase words separated by single spaces (all embedded captions),
``decode(encode(c)) == c`` exactly; in general text is lowercased, whitespace runs collapse to one space and
punctuation comes back space-separated (``"a cat, big"`` -> ``"a cat , big"``).

``TextTokenizer(path, context_length)`` wraps any local HF tokenizer directory (ours, or a user's CLIP
tokenizer dir passed as ``--tokenizer PATH``). ``tok(list_of_str)`` returns
``{"input_ids": LongTensor[b, context_length], "attention_mask": LongTensor[b, context_length]}`` with
``bos + tokens + eos`` then padding with ``pad_token_id`` (mask 0). Over-long texts are truncated keeping eos
as the last token; ``truncated_count`` counts truncated texts (per process: inside dataloader workers the
loader reports it per batch instead, see loader.py). A missing directory or one without a usable
tokenizer raises ``ValueError`` naming the path.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"


def train_caption_tokenizer(
    captions: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 512, model_max_length: int = 77
) -> str:
    """Train a small lowercase BPE tokenizer on ``captions``; save a HF tokenizer dir at ``out_dir``.

    Deterministic for identical input. Returns ``out_dir`` as a string.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN, end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    alphabet = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[UNK_TOKEN, PAD_TOKEN],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(list(captions), trainer=trainer)
    # The trainer's merges are deterministic but its id assignment is not (hash-map order): renumber the vocab
    # canonically (specials, then base symbols sorted, then merge results in merge order) and rebuild the model.
    trained = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    merged = [a + b for a, b in merges]
    merged_set = set(merged)
    base = {t for t in trained["vocab"] if t not in merged_set and t not in (UNK_TOKEN, PAD_TOKEN)}
    base = sorted(base | set(alphabet) | {c + "</w>" for c in alphabet})  # every char, also word-final
    vocab: dict[str, int] = {}
    for t in [UNK_TOKEN, PAD_TOKEN, *base, *merged]:
        vocab.setdefault(t, len(vocab))
    tok.model = models.BPE(vocab=vocab, merges=list(merges), unk_token=UNK_TOKEN, end_of_word_suffix="</w>")
    # bos/eos appended after training -> the two largest ids (eos is the max id, as in OpenAI CLIP).
    tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # Normalize the json files (stable key order) so two builds are byte-identical.
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = out / name
        if p.is_file():
            p.write_text(
                json.dumps(json.loads(p.read_text(encoding="utf-8")), indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
    return str(out)


def load_hf_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a local HF tokenizer directory offline; ValueError naming the path if it is not one."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(
            f"tokenizer: {str(path)!r} is not a directory (expected a HF tokenizer directory with "
            f"tokenizer.json or vocab.json+merges.txt)"
        )
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:
        fast_file = p / "tokenizer.json"
        if fast_file.is_file():
            try:
                from transformers import PreTrainedTokenizerFast

                tok = PreTrainedTokenizerFast(tokenizer_file=str(fast_file))
            except Exception:
                raise ValueError(f"tokenizer: cannot load a tokenizer from {str(path)!r}: {exc}") from exc
        else:
            raise ValueError(f"tokenizer: {str(path)!r} is not a HF tokenizer directory: {exc}") from exc
    if isinstance(tok, bool) or not hasattr(tok, "convert_tokens_to_ids"):
        raise ValueError(f"tokenizer: {str(path)!r} did not load as a tokenizer")
    return tok


def trim_text_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop the trailing columns that are padding in every row ("pad to longest", like HF's collators).

    Exact for the CLIP text tower: its attention is causal and it pools the EOS position (first eos, or the
    largest id, which is eos too, see the module doc), so no position up to a row's EOS attends to a later
    column, and position embeddings are indexed from 0. The text tower's work shrinks by about
    1 - longest/context_length (OpenCLIP always runs all 77 positions). Call it on CPU tensors, before the copy
    to the device: finding the longest row reads the mask (on a GPU that would be a synchronization)."""
    if attention_mask is None:
        return input_ids, None
    used = attention_mask.bool().any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    if length == input_ids.shape[1]:
        return input_ids, attention_mask
    return input_ids[:, :length], attention_mask[:, :length]


class TextTokenizer:
    """CLIP-style fixed-length tokenization on top of a local HF tokenizer directory.

    ``__call__(texts) -> {"input_ids": LongTensor[b, L], "attention_mask": LongTensor[b, L]}``, L =
    ``context_length``: ``[bos] + tokens + [eos] + [pad] * k``; too long -> tokens cut so eos stays last
    (``truncated_count`` += 1). If the tokenizer has no pad token, eos is used as pad (OpenAI CLIP style);
    a tokenizer without an eos token is rejected; without bos, none is added.
    """

    def __init__(self, path: str | os.PathLike, context_length: int = 77) -> None:
        self.path = str(path)
        self.tokenizer = load_hf_tokenizer(path)
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer: {self.path!r} has no eos token; CLIP text pooling needs one")
        self._eos = int(tok.eos_token_id)
        self._bos = None if tok.bos_token_id is None else int(tok.bos_token_id)
        self._pad = self._eos if tok.pad_token_id is None else int(tok.pad_token_id)
        n_special = 1 + (self._bos is not None)
        if context_length < n_special + 1:
            raise ValueError(f"tokenizer: context_length {context_length} too small")
        self._context_length = int(context_length)
        self.truncated_count = 0

    # -- properties ------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of embedding rows needed: ``len(tokenizer)`` (includes added special tokens)."""
        return len(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        return self._eos

    @property
    def bos_token_id(self) -> int | None:
        return self._bos

    @property
    def pad_token_id(self) -> int:
        return self._pad

    @property
    def context_length(self) -> int:
        return self._context_length

    # -- encoding --------------------------------------------------------------------------------------------
    def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids without special tokens, not truncated."""
        enc = self.tokenizer(
            list(texts),
            add_special_tokens=False,
            truncation=False,
            padding=False,
            return_attention_mask=False,
            verbose=False,
        )
        return [list(ids) for ids in enc["input_ids"]]

    def encode_batch(self, texts: Sequence[str]) -> tuple[dict[str, torch.Tensor], int]:
        """Like ``__call__`` but returns (batch, number of truncated texts) without touching the counter."""
        if isinstance(texts, str):
            texts = [texts]
        L = self._context_length
        room = L - 1 - (self._bos is not None)
        ids = torch.full((len(texts), L), self._pad, dtype=torch.long)
        mask = torch.zeros((len(texts), L), dtype=torch.long)
        truncated = 0
        for i, toks in enumerate(self.encode_ids(texts)):
            if len(toks) > room:
                toks = toks[:room]
                truncated += 1
            row = ([self._bos] if self._bos is not None else []) + toks + [self._eos]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}, truncated

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        batch, truncated = self.encode_batch(texts)
        self.truncated_count += truncated
        return batch

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """Text of one row of ids (special tokens and padding dropped)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def batch_decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return [self.decode(row) for row in ids]

    def __repr__(self) -> str:
        return (
            f"TextTokenizer({self.path!r}, context_length={self._context_length}, vocab_size={self.vocab_size},"
            f" bos={self._bos}, eos={self._eos}, pad={self._pad})"
        )
