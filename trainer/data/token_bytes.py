"""Where each token of a byte-level tokenizer sits in its text, from the token ids alone.

Labels need, for every trained character span, the tokens that overlap it. The Rust tokenizer can say so through
the offsets of each token, but tracking offsets through normalisation and pre-tokenisation is a quarter of its
time (``encode_batch`` against ``encode_batch_fast``, measured on the benchmark corpus). A byte-level BPE tokenizer
(GPT-2, Llama-3, Qwen, DeepSeek…) needs none of it: every id stands for a fixed byte string, and
the byte strings of a text's ids spelled one after another *are* the text's UTF-8 bytes. The position of each
token is then the running sum of their lengths::

    text     "<|im_start|>assistant\\nHi 你好<|im_end|>"         (UTF-8: 你 and 好 are 3 bytes each)
    ids       [1]            [771] [198] [12] [88] [412]  [2]
    bytes     12             9     1     2    4    3      10    → ends 12 21 22 24 28 31 41
    span "Hi 你好<|im_end|>" = bytes [22, 41)  → the tokens ending after 22 and starting before 41: ids 12 .. 2

That this holds is checked, not assumed: :meth:`TokenBytes.spells` compares the bytes the ids spell with the text,
a whole batch in a few numpy operations, and an example where they differ (an added token that strips the spaces
around it, an unknown-token id, a text that the tokenizer's Unicode normal form changes) goes through the offsets
instead. Either way the labels are those of :func:`trainer.data.templates.label_tokens`; only the cost differs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np


def _byte_of_char() -> dict[str, int]:
    """The byte-level alphabet: the printable character GPT-2's byte-level BPE writes for each of the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


UNICODE_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}


def _is_byte_level(config: dict) -> bool:
    """A BPE model over bytes: a byte-level pre-tokenizer (alone or in a sequence) that adds no space, and at most a
    Unicode normal form (Qwen's NFC) or an empty sequence (DeepSeek's) as normaliser.

    A normal form can change a text (a decomposed "é"), so the ids of such a text no longer spell it and it takes
    the offsets path (see :meth:`TokenBytes.spells`); texts already in that form, nearly all, take the byte path.
    """
    if (config.get("model") or {}).get("type") != "BPE":
        return False
    normalizer = config.get("normalizer") or {}
    forms = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    if any(n and n.get("type") not in UNICODE_FORMS for n in forms):
        return False
    pre = config.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    levels = [p for p in parts if p.get("type") == "ByteLevel"]
    return bool(levels) and not any(p.get("add_prefix_space") for p in levels)


class TokenBytes:
    """The byte string of every token id of one tokenizer, flattened for numpy gathers."""

    def __init__(self, table: Sequence[bytes]) -> None:
        self.lengths = np.array([len(b) for b in table], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.flat = np.frombuffer(b"".join(table), dtype=np.uint8)
        self._table = list(table)

    @classmethod
    def of(cls, backend: Any) -> TokenBytes | None:
        """The table of a ``tokenizers.Tokenizer`` that is byte-level BPE, else None (it keeps the offsets path)."""
        if not hasattr(backend, "encode_batch_fast"):
            return None
        try:
            config = json.loads(backend.to_str())
        except Exception:  # a tokenizer that cannot describe itself is not one this shortcut can vouch for
            return None
        if not _is_byte_level(config):
            return None
        byte_of = _byte_of_char()
        added = {i: t.content.encode("utf-8") for i, t in backend.get_added_tokens_decoder().items()}
        table = []
        for i in range(backend.get_vocab_size(with_added_tokens=True)):
            if i in added:
                table.append(added[i])
                continue
            token = backend.id_to_token(i)
            if token is None or any(c not in byte_of for c in token):
                return None  # a hole in the ids, or a token not written in the byte alphabet
            table.append(bytes(byte_of[c] for c in token))
        return cls(table)

    def spells(self, texts: Sequence[str], ids: Sequence[np.ndarray]) -> np.ndarray:
        """Per example: do its ids, spelled out, give exactly its text's UTF-8 bytes?"""
        encoded = [t.encode("utf-8") for t in texts]
        every = np.concatenate(ids) if len(ids) else np.zeros(0, dtype=np.int64)
        lengths = self.lengths[every]
        spelled_end = np.concatenate([[0], np.cumsum(lengths)])  # bytes spelled up to each token of the batch
        bounds = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64)
        per_example = spelled_end[bounds[1:]] - spelled_end[bounds[:-1]]
        wanted = np.array([len(b) for b in encoded], dtype=np.int64)
        if np.array_equal(per_example, wanted):
            written = spelled_end[:-1]  # where each token's bytes start in the spelled batch
            position = np.repeat(self.starts[every] - written, lengths) + np.arange(int(spelled_end[-1]))
            if np.array_equal(self.flat[position], np.frombuffer(b"".join(encoded), dtype=np.uint8)):
                return np.ones(len(texts), dtype=bool)
        return np.array([b"".join(self._table[i] for i in example) == text
                         for example, text in zip(ids, encoded)], dtype=bool)

    def labels(self, text: str, ids: np.ndarray, spans: Sequence[tuple[int, int]], ignore_index: int) -> np.ndarray:
        """``ids`` where the token overlaps a trained character span, else ``ignore_index`` (``ids`` must spell
        ``text``: see :meth:`spells`)."""
        lengths = self.lengths[ids]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        labels = np.full(len(ids), ignore_index, dtype=np.int32)
        ascii_only = text.isascii()
        for start, end in spans:
            if not ascii_only:  # character positions → byte positions
                start, end = len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))
            first = int(np.searchsorted(ends, start, side="right"))  # the first token ending after the span starts
            last = int(np.searchsorted(starts, end, side="left"))  # the first token starting at or after its end
            labels[first:last] = ids[first:last]
        return labels
