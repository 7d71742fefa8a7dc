"""Packing: many short examples per row, each one still seeing only itself.

A packed row concatenates whole examples and carries ``position_ids`` that restart at 0 at each example::

    tokens        a0 a1 a2 a3 | b0 b1 b2 | c0 c1     <- three examples, one row, no padding
    position_ids   0  1  2  3 |  0  1  2 |  0  1
    labels        -- a1 a2 a3 | -- b1 b2 | -- c1     <- "--" is -100: the first token of an example is never a target

transformers (sdpa, eager and flex backends) turns the restarts into a block-diagonal causal mask; each ``x`` below is
a key a query may attend to, and the cross-example blocks stay empty::

              a0 a1 a2 a3 b0 b1 b2 c0 c1
         a0 [ x                          ]
         a1 [ x  x                       ]
         a2 [ x  x  x                    ]
         a3 [ x  x  x  x                 ]
         b0 [             x              ]
         b1 [             x  x           ]
         b2 [             x  x  x        ]
         c0 [                      x     ]
         c1 [                      x  x  ]

It does so ONLY when the forward gets no 2-D ``attention_mask`` and builds no KV cache. An all-ones mask, or
``use_cache=True`` (the config default outside the HF Trainer), silently yields the full lower triangle instead: ``b0``
then attends to ``a0..a3`` and the loss is that of a different, longer sequence. Hence the collators here never emit
an ``attention_mask`` for packed data, and :func:`install_isolation_guard` turns the trap into an error.

The label of ``b0`` is set to -100 because the causal-LM loss predicts ``labels[t + 1]`` from position ``t``: a label
on ``b0`` would make ``a3`` (end of example a) predict the first token of an unrelated example b.
"""

from __future__ import annotations

import bisect
import heapq
import inspect
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.hooks import RemovableHandle
from transformers import DataCollatorWithFlattening

from trainer.data.gather import ChunkedRows, FileRows
from trainer.data.templates import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "PackedCollator",
    "PaddedCollator",
    "PaddingFreeCollator",
    "PackingStats",
    "block_causal_mask",
    "install_isolation_guard",
    "pack_best_fit_decreasing",
    "pack_bins",
    "pack_dataset",
    "pack_examples",
    "packed_row_batches",
    "packing_stats",
    "row_order",
]


# --------------------------------------------------------------------------------------------------------------------
# Bin packing and row building
# --------------------------------------------------------------------------------------------------------------------


def pack_best_fit_decreasing(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into bins of at most ``max_length`` tokens, best-fit-decreasing.

    Longest examples go first, each into the open bin whose remaining room is the smallest that still fits it (a new bin
    when none fits). Long examples thus claim bins early and the many short ones fill the gaps, which is what keeps
    padding near zero on real SFT length distributions.

    Open bins are kept in buckets keyed by remaining room, with a sorted list of the distinct rooms: finding the best
    fit is one bisect. There are at most ``max_length + 1`` distinct rooms, so the whole run is O(n log n) for the
    sort plus O(n log max_length) for the searches (list inserts move at most ``max_length`` machine words).

    Deterministic: equal lengths are taken in index order, among equally good bins the oldest wins, and the indices
    inside a bin are returned in ascending order. Bins are returned in the order they were opened.

    Raises:
        ValueError: a length is < 1 or > ``max_length`` (truncate and drop empty examples before packing).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    for i, n in enumerate(lengths):
        if n < 1 or n > max_length:
            raise ValueError(
                f"example {i} has {n} tokens; packing needs 1 <= length <= max_length={max_length} "
                "(truncate long examples and drop empty ones first)"
            )

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct remaining capacities of open bins
    bins_by_room: dict[int, list[int]] = {}  # room -> min-heap of bin ids (oldest bin first)

    def _open(bin_id: int, room: int) -> None:
        if room == 0:
            return  # a full bin can take nothing more
        heap = bins_by_room.get(room)
        if heap is None:
            bins_by_room[room] = [bin_id]
            bisect.insort(rooms, room)
        else:
            heapq.heappush(heap, bin_id)

    for i in order:
        n = lengths[i]
        pos = bisect.bisect_left(rooms, n)
        if pos == len(rooms):
            bins.append([i])
            _open(len(bins) - 1, max_length - n)
            continue
        room = rooms[pos]
        heap = bins_by_room[room]
        bin_id = heapq.heappop(heap)
        if not heap:
            del bins_by_room[room]
            del rooms[pos]
        bins[bin_id].append(i)
        _open(bin_id, room - n)

    for b in bins:
        b.sort()
    return bins


def pack_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group example indices into as few bins of at most ``max_length`` tokens as three packers manage.

    Best-fit-decreasing alone is near optimal when lengths vary widely: short examples plug the gaps the long ones
    leave. It fails on narrow distributions such as fixed-form poems (lengths 128..182 at ``max_length`` 1024): bins
    opened while the long examples are placed fill up with examples of one size until the gap (1024 - 5 * 182 = 114)
    is smaller than every example, and no later example can ever use it; 7% of the tokens end up as padding. Filling
    a row well needs a *combination* of lengths that sums to the row size, which a one-item-at-a-time greedy never
    looks for. So besides :func:`pack_best_fit_decreasing` this runs :func:`_pack_subset_sum` twice:

    - anchored: each bin starts with the longest example left and is filled by a subset-sum search preferring long
      examples ("minimum bin slack"); best when lengths vary;
    - balanced: each bin takes as many examples as still fit, chosen near the mean that count implies. When every bin
      holds k or k + 1 examples, the bin count is decided by how many bins get k + 1, and those need the short
      examples spread evenly over them instead of used up early as fillers.

    The packing with the fewest bins wins (ties: the earlier one in that order), so the result is never worse than
    best-fit-decreasing. BFD within 0.5% of a lower bound (``ceil(sum / max_length)``, or ``ceil(n / k)`` when no bin
    can hold more than ``k`` examples) is kept as is: that is the wide-distribution case, where the searches would
    cost seconds on 100k examples (large bit sets, few exact fills) to save a row or two.
    Deterministic: equal lengths are used in index order and indices inside a bin are ascending.

    Raises:
        ValueError: a length is < 1 or > ``max_length`` (truncate and drop empty examples before packing).
    """
    best = pack_best_fit_decreasing(lengths, max_length)  # also validates the lengths
    # Lower bounds: the tokens, and the most examples a bin can hold (the shortest ones that fit together).
    fit, total = 0, 0
    for n in sorted(lengths):
        if total + n > max_length:
            break
        fit, total = fit + 1, total + n
    bound = max(-(-sum(lengths) // max_length), -(-len(lengths) // max(fit, 1)))
    if (len(best) - bound) * 200 > len(best):
        for anchored in (True, False):
            bins = _pack_subset_sum(lengths, max_length, anchored)
            if len(bins) < len(best):
                best = bins
    return best


def _pack_subset_sum(lengths: Sequence[int], max_length: int, anchored: bool) -> list[list[int]]:
    """Fill one bin after another with a subset of the examples left whose total comes closest to the room.

    The subset-sum search works on distinct lengths, not examples: the sums reachable so far are the bits of one
    Python int, and ``c`` examples of length ``v`` are added as binary chunks (1, 2, 4, ... copies), so each chunk
    costs a shift and an or. Lengths are tried from the preferred one outwards (the longest when ``anchored``, else
    the mean ``room / k`` of the largest count ``k`` that fits). The search stops at an exact fill, or after a budget
    of chunks that shrinks as rows (hence bit sets) grow, which bounds the cost of a bin that no subset fills exactly.
    Walking the chunks backwards then picks a subset reaching the best sum, preferring the chunks tried first.
    """
    budget = max(16, min(256, 2**19 // max_length))  # chunks per bin: about 2**19 bits of shifting at most
    by_len: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        by_len.setdefault(lengths[i], []).append(i)
    used = dict.fromkeys(by_len, 0)  # examples of each length already placed (taken in index order)
    avail = sorted(by_len)  # distinct lengths with examples left

    def left(v: int) -> int:
        return len(by_len[v]) - used[v]

    def take(v: int, k: int) -> list[int]:
        out = by_len[v][used[v] : used[v] + k]
        used[v] += k
        if not left(v):
            del avail[bisect.bisect_left(avail, v)]
        return out

    bins: list[list[int]] = []
    while avail:
        bin_ = take(avail[-1], 1) if anchored else []
        room = max_length - sum(lengths[i] for i in bin_)
        hi = bisect.bisect_right(avail, room)  # avail[:hi] fit in the room
        if anchored:
            target = float(room)
        else:  # the mean length of the largest number of examples that still fit
            count, total = 0, 0
            for v in avail[:hi]:
                k = min(left(v), (room - total) // v)
                count, total = count + k, total + k * v
                if k < left(v):
                    break
            target = room / max(count, 1)
        reach, mask, chunks = 1, (1 << (room + 1)) - 1, []
        below = bisect.bisect_left(avail, target, 0, hi) - 1
        above = below + 1
        while (below >= 0 or above < hi) and len(chunks) < budget and not reach >> room & 1:
            if above < hi and (below < 0 or avail[above] - target <= target - avail[below]):
                v, above = avail[above], above + 1
            else:
                v, below = avail[below], below - 1
            copies, k = min(left(v), room // v), 1
            while copies:
                k = min(k, copies)
                chunks.append((v, k, reach))
                reach = (reach | reach << (v * k)) & mask
                copies -= k
                k *= 2
        total = reach.bit_length() - 1
        for v, k, before in reversed(chunks):
            if not before >> total & 1:  # this sum needs the chunk
                bin_.extend(take(v, k))
                total -= v * k
        bins.append(sorted(bin_))
    return bins


def row_order(lengths: Sequence[int], max_length: int, seed: int = 0) -> list[list[int]]:
    """The packed rows as lists of example indices, in training order.

    Rows are shuffled with ``seed``: bin packing sorts by length, and without the shuffle the first steps would see
    only rows of the longest examples. The same lengths and seed always give the same rows.
    """
    bins = pack_bins(lengths, max_length)
    random.Random(seed).shuffle(bins)
    return bins


def pack_examples(examples: Sequence[Mapping[str, Sequence[int]]], max_length: int, seed: int = 0) -> list[dict]:
    """Pack tokenised examples (``input_ids`` + aligned ``labels``) into rows of at most ``max_length`` tokens.

    Each row is ``{"input_ids", "labels", "position_ids"}`` (lists): whole examples concatenated, position ids
    restarting at 0 per example, and the first label of every example forced to -100 (see the module docstring), in
    the order of :func:`row_order`. The list version of :func:`packed_row_batches`, for small data and tests.
    """
    lengths = []
    for i, ex in enumerate(examples):
        if len(ex["input_ids"]) != len(ex["labels"]):
            raise ValueError(
                f"example {i}: {len(ex['input_ids'])} input_ids but {len(ex['labels'])} labels (they must be aligned)"
            )
        lengths.append(len(ex["input_ids"]))

    rows = []
    for bin_ in row_order(lengths, max_length, seed):
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for i in bin_:
            ids, lab = examples[i]["input_ids"], examples[i]["labels"]
            input_ids.extend(ids)
            labels.append(IGNORE_INDEX)
            labels.extend(lab[1:])
            position_ids.extend(range(len(ids)))
        rows.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    return rows


ROW_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        ("position_ids", pa.list_(pa.int32()))])


def packed_row_batches(source: ChunkedRows | FileRows, rows: Sequence[Sequence[int]], rows_per_batch: int = 2048
                       ) -> Iterator[pa.RecordBatch]:
    """Build packed rows by gathering their examples (``input_ids``, ``labels``) from ``source``.

    ``rows`` lists example indices (rows of the source) per packed row, e.g. from :func:`row_order`. Rows are made
    ``rows_per_batch`` at a time with a gather (:mod:`trainer.data.gather`: from an Arrow table chunk by chunk, or
    from an examples file by positional reads) and numpy, never as Python ints, so examples of any number pack in
    bounded memory. Same rows as :func:`pack_examples` for the same examples and order.
    """
    for first in range(0, len(rows), rows_per_batch):
        chunk = rows[first : first + rows_per_batch]
        counts = np.fromiter((len(r) for r in chunk), dtype=np.int64, count=len(chunk))
        index = np.fromiter((i for r in chunk for i in r), dtype=np.int64, count=int(counts.sum()))
        taken = source.take(index)
        ids = pc.list_flatten(taken.column("input_ids")).to_numpy().astype(np.int32, copy=False)
        labels = pc.list_flatten(taken.column("labels")).to_numpy().astype(np.int32, copy=True)
        lengths = pc.list_value_length(taken.column("input_ids")).to_numpy().astype(np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        labels[starts] = IGNORE_INDEX
        positions = (np.arange(len(ids), dtype=np.int64) - np.repeat(starts, lengths)).astype(np.int32)
        example_ends = np.cumsum(lengths)
        row_offsets = np.concatenate([[0], example_ends[np.cumsum(counts) - 1]]).astype(np.int32)
        offsets = pa.array(row_offsets, type=pa.int32())
        yield pa.RecordBatch.from_arrays(
            [pa.ListArray.from_arrays(offsets, pa.array(column)) for column in (ids, labels, positions)],
            schema=ROW_SCHEMA,
        )


def pack_dataset(ds: datasets.Dataset, max_length: int, seed: int) -> datasets.Dataset:
    """Pack a tokenised ``Dataset`` (columns ``input_ids`` and ``labels``) into a new, in-memory one of packed rows.

    Other columns are dropped: they describe single examples and have no meaning for a row of several. Bins are
    chosen from the example lengths alone, computed in Arrow (which honours ``select``/``shuffle`` index mappings).
    """
    table = ds.select_columns(["input_ids", "labels"]).with_format("arrow")[:]
    _check_aligned(table)
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy().tolist()
    rows = ChunkedRows(table, ["input_ids", "labels"])
    batches = list(packed_row_batches(rows, row_order(lengths, max_length, seed)))
    return datasets.Dataset(pa.Table.from_batches(batches, schema=ROW_SCHEMA))


def _check_aligned(table: pa.Table) -> None:
    ids = pc.list_value_length(table.column("input_ids"))
    labels = pc.list_value_length(table.column("labels"))
    bad = pc.indices_nonzero(pc.not_equal(ids, labels))
    if len(bad):
        i = bad[0].as_py()
        raise ValueError(f"example {i}: {ids[i].as_py()} input_ids but {labels[i].as_py()} labels (they must be "
                         "aligned)")


@dataclass(frozen=True)
class PackingStats:
    """How full the packed rows are: what the packing saved, for the data report and the log."""

    examples: int
    rows: int
    tokens: int
    capacity_tokens: int

    @property
    def efficiency(self) -> float:
        """Real tokens / (rows * max_length); 1.0 means no padding at all."""
        return self.tokens / self.capacity_tokens if self.capacity_tokens else 0.0

    @property
    def examples_per_row(self) -> float:
        return self.examples / self.rows if self.rows else 0.0

    def __str__(self) -> str:
        return (
            f"packed {self.examples:,} examples into {self.rows:,} rows: {self.tokens:,} of {self.capacity_tokens:,} "
            f"token slots used ({self.efficiency:.2%}), {self.examples_per_row:.1f} examples/row"
        )


def packing_stats(rows: datasets.Dataset | Sequence[Mapping[str, Sequence[int]]], max_length: int) -> PackingStats:
    """Measure packed rows; examples are counted by their position-id restarts.

    Counted in Arrow, not by reading every token back into Python (seconds on 100k examples, at every start-up).
    """
    if not isinstance(rows, datasets.Dataset):
        rows = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "position_ids": r["position_ids"]}
                                           for r in rows])
    table = rows.select_columns(["input_ids", "position_ids"]).with_format("arrow")[:]
    tokens = pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0
    examples = pc.sum(pc.equal(pc.list_flatten(table.column("position_ids")), 0).cast("int64")).as_py() or 0
    return PackingStats(examples=examples, rows=len(rows), tokens=tokens, capacity_tokens=len(rows) * max_length)


# --------------------------------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------------------------------


def _as_list(x: Any) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


class PackedCollator:
    """Batch packed rows (from :func:`pack_examples`) without ever emitting an ``attention_mask``.

    ``flatten=False``: rows are right-padded to the longest row (rounded up to ``pad_to_multiple_of``). The padding
    gets ``pad_token_id``, labels -100, and position ids that restart at 0, so it is one more "example" of its own:
    real tokens never attend to it, and it never changes their loss::

        row 0   input_ids  a a a b b P P      position_ids 0 1 2 0 1 0 1     labels - a a - b - -
        row 1   input_ids  c c c c d d d      position_ids 0 1 2 3 0 1 2     labels - c c c - d d

    This is exact on sdpa, eager and flex. It is NOT on flash_attention_2/3: transformers only switches flash
    attention to its varlen kernel (one causal block per example, ``_is_packed_sequence`` in
    ``modeling_flash_attention_utils``) when the batch size is 1. With more rows and no mask it runs the plain causal
    kernel over the whole row and the examples see each other.

    ``flatten=True``: the whole micro-batch becomes one row of batch size 1 (position ids kept as packed, so every
    example still restarts at 0). That is the layout flash attention needs: it derives ``cu_seqlens`` from the
    positions equal to 0 and runs varlen attention. It is exact on sdpa/eager/flex too, and wastes no padding unless
    ``pad_to_multiple_of`` asks for some.
    """

    def __init__(self, pad_token_id: int, flatten: bool = False, pad_to_multiple_of: int | None = None,
                 mechanism: str = "position_ids", mask_dtype: torch.dtype | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.flatten = flatten
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mechanism = mechanism  # "position_ids", or "mask4d": also a 4-D block mask (see block_causal_mask)
        self.mask_dtype = mask_dtype

    def _pad(self, ids: list[int], labels: list[int], positions: list[int], length: int) -> tuple[list, list, list]:
        n = length - len(ids)
        return ids + [self.pad_token_id] * n, labels + [IGNORE_INDEX] * n, positions + list(range(n))

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [(_as_list(f["input_ids"]), _as_list(f["labels"]), _as_list(f["position_ids"])) for f in features]
        if self.flatten:
            rows = [tuple(sum((list(r[k]) for r in rows), []) for k in range(3))]
        length = _round_up(max(len(r[0]) for r in rows), self.pad_to_multiple_of)
        padded = [self._pad(*r, length) for r in rows]
        batch = {
            key: torch.tensor([p[k] for p in padded], dtype=torch.long)
            for k, key in enumerate(("input_ids", "labels", "position_ids"))
        }
        return with_mask(batch, self.mechanism, self.mask_dtype)


class PaddingFreeCollator:
    """Flatten a micro-batch of unpacked examples into one row: packing done per batch, at collate time.

    Delegates to transformers' ``DataCollatorWithFlattening`` with its defaults, which (checked in the installed
    version) returns only ``input_ids``, ``labels`` (first label of each example replaced by -100) and ``position_ids``
    restarting at 0 per example — no ``attention_mask`` and no flash-attention kwargs, so the same batch is exact on
    sdpa, eager, flex and flash attention.
    """

    def __init__(self, mechanism: str = "position_ids", mask_dtype: torch.dtype | None = None) -> None:
        self._flatten = DataCollatorWithFlattening(return_tensors="pt", separator_id=IGNORE_INDEX)
        self.mechanism = mechanism  # as for PackedCollator
        self.mask_dtype = mask_dtype

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        features = [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features]
        return with_mask(dict(self._flatten(features)), self.mechanism, self.mask_dtype)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 4-D mask ``(batch, 1, length, length)`` of packed rows: a query sees the keys of its own example
    (a new one starts wherever the position ids restart at 0) up to itself.

    ``dtype`` None gives a boolean mask (True = attend), which sdpa takes; otherwise an additive float mask (0 or
    the dtype's minimum), which eager attention adds to its scores. transformers passes a 4-D mask through as it is.
    """
    segment = torch.cumsum(position_ids == 0, dim=-1)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    if dtype is None:
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def with_mask(batch: dict[str, torch.Tensor], mechanism: str, mask_dtype: torch.dtype | None) -> dict:
    if mechanism == "mask4d":
        batch["attention_mask"] = block_causal_mask(batch["position_ids"], mask_dtype)
    elif mechanism != "position_ids":
        raise ValueError(f"unknown packing mechanism {mechanism!r}")
    return batch


class PaddedCollator:
    """Classic right-padded batches of unpacked examples, with an ``attention_mask`` that zeroes the padding.

    The baseline the packed paths are measured against (and the safe choice when a model's attention cannot take
    packed rows). ``labels`` are padded with -100 so padding never counts in the loss.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [(_as_list(f["input_ids"]), _as_list(f["labels"])) for f in features]
        length = _round_up(max(len(ids) for ids, _ in rows), self.pad_to_multiple_of)
        input_ids, labels, attention_mask = [], [], []
        for ids, lab in rows:
            n = length - len(ids)
            input_ids.append(ids + [self.pad_token_id] * n)
            labels.append(lab + [IGNORE_INDEX] * n)
            attention_mask.append([1] * len(ids) + [0] * n)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        }


# --------------------------------------------------------------------------------------------------------------------
# Guard
# --------------------------------------------------------------------------------------------------------------------


def _restarts_inside_rows(position_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """True when some row holds several sequences, i.e. its position ids do not simply count up by one.

    With a 2-D mask only pairs of attended neighbours count: left-padded generation batches have position ids like
    ``1 1 0 1 2`` under a mask ``0 0 1 1 1``, which is one sequence, not a packed row.
    """
    if position_ids.shape[-1] < 2:
        return False
    breaks = torch.diff(position_ids, dim=-1) != 1
    if attention_mask is not None:
        attended = attention_mask.bool()
        breaks = breaks & attended[..., 1:] & attended[..., :-1]
    return bool(breaks.any())


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # PeftModel.forward -> LoraModel.forward -> self.model(**kwargs): the transformers model receives the caller's
    # kwargs through a regular __call__, so a hook on it fires for plain and PEFT-wrapped models alike.
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def install_isolation_guard(model: torch.nn.Module) -> RemovableHandle:
    """Make a packed batch that would leak attention across examples fail loudly instead of training on it.

    Registers a forward pre-hook on the transformers model (for a ``PeftModel``: on ``model.get_base_model()``, the
    module that receives the caller's kwargs unchanged). When a row's position ids restart (a packed row), the call
    raises ``RuntimeError`` if it also carries

    - a 2-D ``attention_mask`` (transformers then skips the block-diagonal mask; 4-D masks are taken as the caller's
      own and let through),
    - a cache: ``past_key_values``, ``use_cache=True``, or no ``use_cache`` with ``config.use_cache`` true,
    - a flash-attention backend with more than one row (varlen is only detected at batch size 1).

    Cost when the call is safe: a few dict look-ups, plus one ``diff`` over the position ids only when one of the
    conditions above holds. Calls without ``position_ids`` are never inspected. Meant for training; left-padded
    generation with a mask is recognised as unpacked and passes.

    Returns the hook handle (``.remove()`` uninstalls it).
    """
    target = _unwrap(model)
    params = list(inspect.signature(target.forward).parameters)

    def _arg(name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        idx = params.index(name) if name in params else len(args)
        return args[idx] if idx < len(args) else None

    def _hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        position_ids = _arg("position_ids", args, kwargs)
        if position_ids is None:
            return
        config = getattr(module, "config", None)
        attention_mask = _arg("attention_mask", args, kwargs)
        mask_2d = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
        use_cache = _arg("use_cache", args, kwargs)
        if use_cache is None:
            use_cache = bool(getattr(config, "use_cache", False))
        has_cache = use_cache or _arg("past_key_values", args, kwargs) is not None
        attn = str(getattr(config, "_attn_implementation", "") or "")
        rows = position_ids.shape[-2] if position_ids.dim() >= 2 else 1
        flash_multi_row = "flash" in attn and rows > 1
        if mask_2d is None and not has_cache and not flash_multi_row:
            return  # the training path: nothing to read from the tensors
        if not _restarts_inside_rows(position_ids, mask_2d):
            return
        if mask_2d is not None:
            raise RuntimeError(
                "packed batch (position_ids restart inside a row) passed together with a 2-D attention_mask: "
                "transformers then ignores the example boundaries and every example attends to the ones before "
                "it. Drop the attention_mask for packed data (PackedCollator / PaddingFreeCollator never emit one)."
            )
        if has_cache:
            raise RuntimeError(
                "packed batch (position_ids restart inside a row) with a KV cache enabled (use_cache=True, or "
                "config.use_cache=True and no use_cache argument): with a cache transformers builds a plain causal "
                "mask and the examples attend to each other. Pass use_cache=False or set model.config.use_cache=False."
            )
        raise RuntimeError(
            f"packed rows in a batch of {rows} on {attn}: transformers uses the varlen (per-example) flash kernel "
            "only at batch size 1, so these examples would attend to each other. "
            "Use PackedCollator(flatten=True) or PaddingFreeCollator."
        )

    return target.register_forward_pre_hook(_hook, with_kwargs=True)
