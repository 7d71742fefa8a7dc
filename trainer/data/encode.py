"""Items → token ids and labels, a batch at a time, as flat arrays: the hot loop of data preparation.

Each chat is rendered into its training examples (:meth:`ChatRenderer.examples`), each document or plain
completion into one (:class:`trainer.data.documents.PlainText`); the texts of a whole batch
are tokenised in one call of the Rust tokenizer, and labels are copied from the ids over the token range of each
trained character span. For a byte-level BPE tokenizer the range comes from the byte length of each token
(:mod:`trainer.data.token_bytes`: the tokenizer then skips tracking offsets, a quarter of its time); for any other,
from two ``char_to_token`` look-ups per span (widened to every token that overlaps it). Neither reads every token's
offsets back into Python: that is where a per-token loop would spend most of its time. A document longer than
``max_length`` is then cut into consecutive chunks (:func:`trainer.data.documents.chunk_bounds`). Results travel as
numpy arrays (ids, labels, per-example lengths), which cost nothing to send from a worker process and turn into
Arrow columns without a copy.

With ``num_proc`` > 1, :func:`encode_batches` runs the encoder in worker processes, a bounded number of batches in
flight, results in input order; memory stays flat whatever the size of the data.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2
import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.data.documents import PlainText, chunk_bounds
from trainer.data.items import Chat, Document, Item
from trainer.data.templates import IGNORE_INDEX, ChatRenderer, TemplateError, label_tokens
from trainer.data.token_bytes import TokenBytes


@dataclass
class EncodedBatch:
    """The examples of a batch of conversations, concatenated; per-example arrays are aligned."""

    input_ids: np.ndarray  # int32, every example's ids one after another
    labels: np.ndarray  # int32, aligned with input_ids; IGNORE_INDEX where nothing is trained
    lengths: np.ndarray  # int32, tokens per example (after truncation)
    conversation: np.ndarray  # int32, index in the batch of the conversation each example comes from
    truncated: np.ndarray  # bool, the example was longer than max_length
    label_counts: np.ndarray  # int32, trained tokens per example (after truncation)
    document: np.ndarray  # bool, the example is (a chunk of) a document
    tool_tokens: np.ndarray  # int32, tokens of tool results in the example (context, never trained)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (conversation index, why it cannot be rendered)


@dataclass
class _Rendered:
    texts: list[str]
    spans: list[tuple[tuple[int, int], ...]]
    owner: list[int]  # conversation index of each example
    errors: list[tuple[int, str]]
    document: list[bool] = field(default_factory=list)
    tool_spans: list[tuple[tuple[int, int], ...]] = field(default_factory=list)


class ConversationEncoder:
    """Ids and labels for batches of items (chats, documents, plain completions), with one tokenizer, template and
    length limit. ``split_documents``: a document longer than ``max_length`` becomes consecutive chunks (else it is
    truncated like any example, and flagged so). ``missing_reasoning``: see :class:`ChatRenderer`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str,
                 template_kwargs: Mapping[str, Any] | None = None, max_length: int | None = None,
                 missing_reasoning: str = "error", split_documents: bool = True) -> None:
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(tokenizer, template, template_kwargs, missing_reasoning)
        self.plain = PlainText(tokenizer)
        self.max_length = max_length
        self.split_documents = split_documents
        backend = getattr(tokenizer, "_tokenizer", None)
        # The Rust tokenizer itself, when there is one: what the transformers wrapper calls for a batch, minus the
        # conversion of every encoding into Python lists.
        self._backend = backend if hasattr(backend, "encode_batch") else None
        # Byte-level BPE: token positions from the ids alone, without the offsets tracking (see token_bytes).
        self._bytes = TokenBytes.of(backend) if self._backend is not None else None

    def encode(self, items: Sequence[Item | Sequence[Mapping[str, Any]]]) -> EncodedBatch:
        return self.tokenize(self.render(items))

    def render(self, items: Sequence[Item | Sequence[Mapping[str, Any]]]) -> _Rendered:
        """The examples of each item as text and trained spans (Python: the Jinja templates); a bare list of
        messages is a chat."""
        rendered = _Rendered([], [], [], [])
        for index, item in enumerate(items):
            try:
                if isinstance(item, Chat):
                    examples = self.renderer.examples(item.messages, item.tools, item.first_trained)
                elif isinstance(item, list):
                    examples = self.renderer.examples(item)
                else:
                    examples = [self.plain.example(item)]
            except (TemplateError, jinja2.TemplateError) as error:  # raise_exception() in a template, or ours
                rendered.errors.append((index, f"chat template: {error}"))
                continue
            document = isinstance(item, Document)
            for example in examples:
                rendered.texts.append(example.text)
                rendered.spans.append(example.spans)
                rendered.owner.append(index)
                rendered.document.append(document)
                rendered.tool_spans.append(example.tool_spans)
        return rendered

    def tokenize(self, rendered: _Rendered) -> EncodedBatch:
        """Ids and labels of rendered examples (mostly Rust, which lets go of the GIL while it tokenises)."""
        owner, errors = rendered.owner, rendered.errors
        document = rendered.document or [False] * len(owner)
        encoded = self._tokenize(rendered.texts, rendered.spans)
        tool_tokens = [self._count_tokens(text, ids, spans) if spans else 0
                       for text, (ids, _), spans in zip(rendered.texts, encoded,
                                                        rendered.tool_spans or [()] * len(owner))]
        if self.max_length is not None and self.split_documents and any(document):
            encoded, owner, document, tool_tokens = self._chunk_documents(encoded, owner, document, tool_tokens)
        lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int32)
        truncated = np.zeros(len(lengths), dtype=bool)
        if self.max_length is not None:
            truncated = lengths > self.max_length
            if truncated.any():
                encoded = [(i[: self.max_length], lab[: self.max_length]) for i, lab in encoded]
                lengths = np.minimum(lengths, self.max_length)
        empty = np.zeros(0, dtype=np.int32)
        labels = np.concatenate([lab for _, lab in encoded]) if encoded else empty
        counts = np.add.reduceat(labels != IGNORE_INDEX, np.r_[0, np.cumsum(lengths)[:-1]]) if len(lengths) else empty
        return EncodedBatch(
            input_ids=np.concatenate([i for i, _ in encoded]) if encoded else empty,
            labels=labels,
            lengths=lengths,
            conversation=np.array(owner, dtype=np.int32),
            truncated=truncated,
            label_counts=np.where(lengths > 0, counts, 0).astype(np.int32),
            document=np.array(document, dtype=bool),
            tool_tokens=np.array(tool_tokens, dtype=np.int32),
            errors=errors,
        )

    def _chunk_documents(self, encoded: list, owner: list[int], document: list[bool], tool_tokens: list[int]
                         ) -> tuple[list, list[int], list[bool], list[int]]:
        """Documents longer than ``max_length`` as consecutive chunks; the first token of a later chunk is the last
        of the one before, context only (see :func:`chunk_bounds`)."""
        assert self.max_length is not None
        out, out_owner, out_document, out_tools = [], [], [], []
        for (ids, labels), who, is_document, tools in zip(encoded, owner, document, tool_tokens):
            if not is_document or len(ids) <= self.max_length:
                out.append((ids, labels))
                out_owner.append(who)
                out_document.append(is_document)
                out_tools.append(tools)
                continue
            for start, end in chunk_bounds(len(ids), self.max_length):
                chunk_labels = labels[start:end].copy()
                if start > 0:
                    chunk_labels[0] = IGNORE_INDEX
                out.append((ids[start:end], chunk_labels))
                out_owner.append(who)
                out_document.append(True)
                out_tools.append(0)
        return out, out_owner, out_document, out_tools

    def _count_tokens(self, text: str, ids: np.ndarray, spans: tuple[tuple[int, int], ...]) -> int:
        """Tokens of ``text`` (tokenised as ``ids``) that overlap ``spans``, by the labelling rule, within the first
        ``max_length`` (what truncation keeps)."""
        if self._bytes is not None and bool(self._bytes.spells([text], [ids])[0]):
            inside = self._bytes.labels(text, ids, spans, -1) != -1
        elif self._backend is not None:
            inside = self._with_offsets(self._backend.encode(text, add_special_tokens=False), spans)[1] != IGNORE_INDEX
        else:
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            inside = np.asarray(label_tokens(offsets, spans), dtype=bool)
        return int(np.sum(inside[: self.max_length]))

    def _tokenize(self, texts: list[str], spans: list[tuple[tuple[int, int], ...]]
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
        if not texts:
            return []
        if self._backend is None:  # a Python tokenizer: offsets from the wrapper (slow, but exact)
            encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            out = []
            for ids, offsets, text_spans in zip(encoded["input_ids"], encoded["offset_mapping"], spans):
                ids = np.asarray(ids, dtype=np.int32)
                trained = np.asarray(label_tokens(offsets, text_spans), dtype=bool)
                out.append((ids, np.where(trained, ids, IGNORE_INDEX).astype(np.int32)))
            return out
        if self._bytes is not None:
            return self._tokenize_bytes(texts, spans)
        return [self._with_offsets(encoding, text_spans)
                for encoding, text_spans in zip(self._backend.encode_batch(texts, add_special_tokens=False), spans)]

    def _tokenize_bytes(self, texts: list[str], spans: list[tuple[tuple[int, int], ...]]
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
        assert self._bytes is not None and self._backend is not None
        encodings = self._backend.encode_batch_fast(texts, add_special_tokens=False)
        ids = [np.asarray(encoding.ids, dtype=np.int32) for encoding in encodings]
        spelled = self._bytes.spells(texts, ids)
        return [(example, self._bytes.labels(text, example, text_spans, IGNORE_INDEX)) if ok
                else self._with_offsets(self._backend.encode(text, add_special_tokens=False), text_spans)
                for text, example, text_spans, ok in zip(texts, ids, spans, spelled)]

    @staticmethod
    def _with_offsets(encoding: Any, text_spans: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(encoding.ids, dtype=np.int32)
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
        ranges = [_token_range(encoding, start, end) for start, end in text_spans]
        if any(r is None for r in ranges):  # a span edge on a character no token covers: use the offsets
            trained = np.asarray(label_tokens(encoding.offsets, text_spans), dtype=bool)
            labels[trained] = ids[trained]
        else:
            for first, last in ranges:
                labels[first:last] = ids[first:last]
        return ids, labels


def _token_range(encoding: Any, start: int, end: int) -> tuple[int, int] | None:
    """``[first, last)``: every token whose characters overlap ``[start, end)``, as :func:`label_tokens` decides."""
    first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
    if first is None or last is None:
        return None
    # Byte-level tokenizers can split one character over several tokens: take all that touch the span.
    while first > 0 and (chars := encoding.token_to_chars(first - 1)) is not None and chars[1] > start:
        first -= 1
    while last + 1 < len(encoding.ids) and (chars := encoding.token_to_chars(last + 1)) is not None \
            and chars[0] < end:
        last += 1
    return first, last + 1


# ------------------------------------------------------------------------------------------------ worker processes

_worker_encoder: ConversationEncoder | None = None


def _start_worker(encoder: ConversationEncoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(conversations: list) -> EncodedBatch:
    assert _worker_encoder is not None
    return _worker_encoder.encode(conversations)


@contextlib.contextmanager
def _rust_threads() -> Iterator[None]:
    """Let the Rust tokenizer use every core (``TOKENIZERS_PARALLELISM``) while this process tokenises alone."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def encode_batches(encoder: ConversationEncoder, batches: Iterable[list], num_proc: int = 1
                   ) -> Iterator[EncodedBatch]:
    """Encode each batch of conversations, in order; with ``num_proc`` > 1 in that many worker processes.

    In one process, batch k is tokenised in a thread (the Rust tokenizer, on all cores) while batch k + 1 is
    rendered (Python): on 2 cores 1.8x the throughput of rendering and tokenising in turn on one, without the
    start-up and the copies of worker processes. With workers, at most two batches per worker are in flight, so a
    fast reader never piles up conversations in memory; they are started with "spawn": the caller may hold threads
    (gloo, OpenMP) that a fork would copy mid-state.
    """
    if num_proc <= 1:
        with _rust_threads(), concurrent.futures.ThreadPoolExecutor(1) as tokenizer_thread:
            pending = None
            for batch in batches:
                rendered = encoder.render(batch)
                if pending is not None:
                    yield pending.result()
                pending = tokenizer_thread.submit(encoder.tokenize, rendered)
            if pending is not None:
                yield pending.result()
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_proc, mp_context=context, initializer=_start_worker,
                                                initargs=(encoder,)) as pool:
        pending: collections.deque = collections.deque()
        for batch in batches:
            pending.append(pool.submit(_encode_in_worker, batch))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
