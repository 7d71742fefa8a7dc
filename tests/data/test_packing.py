"""Packing: bin packing, row layout, statistics and collators (no model needed)."""

import json
import random
import time
from pathlib import Path

import datasets
import pytest
import torch

from tests.conftest import DEMO_DATA, needs_full_data, shared_file
from trainer.data.packing import (
    IGNORE_INDEX,
    PackedCollator,
    PackingStats,
    PaddedCollator,
    PaddingFreeCollator,
    pack_best_fit_decreasing,
    pack_bins,
    pack_dataset,
    pack_examples,
    packing_stats,
)


def _example(n: int, start: int = 1, answer_from: int = 0) -> dict:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * answer_from + ids[answer_from:]}


def _check_bins(bins: list[list[int]], lengths: list[int], max_length: int) -> None:
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths))), "every index exactly once"
    assert all(sum(lengths[i] for i in b) <= max_length for b in bins), "no bin over capacity"
    assert all(b == sorted(b) for b in bins), "stable order inside a bin"


# ------------------------------------------------------------------ best-fit-decreasing


def test_bfd_known_cases() -> None:
    # 6 -> new bin (room 4), 5 -> new bin (room 5), 4 -> exact fit in bin 0, 3 and 2 fill bin 1.
    assert pack_best_fit_decreasing([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    # Best fit, not first fit: with rooms 2 (bin 0) and 1 (bin 1) left, the 1 goes to the tighter bin 1.
    assert pack_best_fit_decreasing([8, 6, 3, 1], 10) == [[0], [1, 2, 3]]
    # Decreasing, not input order: the 9 opens a bin before the 1s that would otherwise have taken its room.
    assert pack_best_fit_decreasing([1, 1, 9, 9], 10) == [[0, 2], [1, 3]]
    assert pack_best_fit_decreasing([], 8) == []
    assert pack_best_fit_decreasing([8, 8], 8) == [[0], [1]]


def test_bfd_ties_are_deterministic_by_index() -> None:
    # Equal lengths are placed in index order; equally good bins: the oldest wins.
    assert pack_best_fit_decreasing([2, 2, 2, 2], 4) == [[0, 1], [2, 3]]
    assert pack_best_fit_decreasing([5, 5, 1, 1], 6) == [[0, 2], [1, 3]]


@pytest.mark.parametrize("seed", range(5))
def test_bfd_properties_random(seed: int) -> None:
    rng = random.Random(seed)
    max_length = rng.choice([16, 64, 512])
    lengths = [rng.randint(1, max_length) for _ in range(rng.randint(1, 400))]
    bins = pack_best_fit_decreasing(lengths, max_length)
    _check_bins(bins, lengths, max_length)
    # Best fit never leaves two bins that could be merged while both are at most half full.
    small = [b for b in bins if sum(lengths[i] for i in b) <= max_length // 2]
    assert len(small) <= 1
    assert bins == pack_best_fit_decreasing(lengths, max_length)


@pytest.mark.parametrize("bad", [[3, 11], [0, 2], [-1]])
def test_bfd_rejects_out_of_range_lengths(bad: list[int]) -> None:
    with pytest.raises(ValueError, match="max_length=10"):
        pack_best_fit_decreasing(bad, 10)


def _efficiency(lengths: list[int], max_length: int, pack=pack_best_fit_decreasing) -> float:
    bins = pack(lengths, max_length)
    _check_bins(bins, lengths, max_length)
    return sum(lengths) / (len(bins) * max_length)


def test_bfd_efficiency_on_varied_lengths() -> None:
    # Varied lengths leave small ones to plug the gaps: best fit gets within 0.2% of the lower bound here, where
    # filling rows in input order (next fit) reaches only ~94% at 2048 and ~74% at 512.
    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(5001)]
    assert _efficiency(lengths, 512) > 0.99
    assert _efficiency(lengths, 2048) > 0.99


def _rough_tang_lengths(path: Path) -> list[int]:
    return [2 * len(r["instruction"] + r["input"] + r["output"]) + 10
            for r in json.loads(path.read_text(encoding="utf-8"))]


def test_bfd_efficiency_on_tang_lengths() -> None:
    # The 400 demo records' lengths repeated to the full set's 5,001: the same 4 lengths in nearly the same shares
    # (measured: 95.4% at 512, 94.8% at 2048, 98.3% at 4096), so the full set's bounds below hold for them too.
    demo = _rough_tang_lengths(DEMO_DATA / "tang_train.json")
    _check_tang_efficiency((demo * 13)[:5001])


@needs_full_data
def test_bfd_efficiency_on_the_full_tang_set() -> None:
    lengths = _rough_tang_lengths(shared_file("tang", "Tang_training_data.json"))
    assert len(lengths) == 5001
    _check_tang_efficiency(lengths)


def _check_tang_efficiency(lengths: list[int]) -> None:
    # Rough tokenisation, ~2 tokens per character plus a prompt: lands near the real tokenizer's 153-token mean, but
    # the poems' fixed forms give only 4 distinct lengths (114..194), the hardest case for filling the last gap of a
    # row. Measured: 96.3% at 512 (next fit: 85.6%), 94.7% at 2048, 98.4% at 4096. The end-to-end test checks the
    # real tokenizer, whose lengths vary more.
    start = time.perf_counter()
    assert _efficiency(lengths, 512) > 0.95
    assert _efficiency(lengths, 2048) > 0.94
    assert _efficiency(lengths, 4096) > 0.98
    assert time.perf_counter() - start < 1.0


# ------------------------------------------------------------------ pack_bins (BFD or subset-sum fills)

# Token counts of the 5,001 Tang examples under the test tokenizer and llama2 template, as {length: examples}. With
# the notebook's system prompt every example is 88 tokens longer. Fixed poem forms make the spread narrow (40..94 and
# 128..182), which is where best-fit-decreasing leaves an unusable gap at the end of most rows.
TANG_LENGTHS = {
    40: 2, 41: 9, 42: 32, 43: 59, 44: 92, 45: 110, 46: 124, 47: 151, 48: 136, 49: 154, 50: 161, 51: 137, 52: 124,
    53: 110, 54: 91, 55: 45, 56: 44, 57: 20, 58: 25, 59: 28, 60: 51, 61: 85, 62: 135, 63: 219, 64: 258, 65: 284,
    66: 343, 67: 300, 68: 292, 69: 223, 70: 158, 71: 135, 72: 89, 73: 70, 74: 71, 75: 61, 76: 80, 77: 75, 78: 65,
    79: 64, 80: 55, 81: 64, 82: 43, 83: 36, 84: 24, 85: 21, 86: 12, 87: 13, 88: 5, 89: 8, 90: 4, 91: 2, 93: 1, 94: 1,
}  # fmt: skip
TANG_SYSTEM_PROMPT_TOKENS = 88


def _tang_lengths(system_prompt: bool) -> list[int]:
    extra = TANG_SYSTEM_PROMPT_TOKENS if system_prompt else 0
    lengths = [n + extra for n, count in TANG_LENGTHS.items() for _ in range(count)]
    random.Random(0).shuffle(lengths)  # the packers must not rely on the input order
    return lengths


def _cardinality_bound(lengths: list[int], max_length: int) -> int:
    """Fewest rows possible when no row holds more than k examples (the k shortest fit, k + 1 never do).

    With b rows holding k examples and the rest at most k - 1, ``n <= k * b + (k - 1) * (rows - b)``; the b full rows
    hold at least the ``k * b`` shortest examples, which must fit in ``b * max_length`` tokens.
    """
    ordered = sorted(lengths)
    k = 0
    while k < len(ordered) and sum(ordered[: k + 1]) <= max_length:
        k += 1
    rows = -(-sum(lengths) // max_length)
    while True:
        b = max(0, len(lengths) - (k - 1) * rows)
        if b <= rows and sum(ordered[: k * b]) <= b * max_length:
            return rows
        rows += 1


def test_pack_bins_known_cases() -> None:
    # Best-fit-decreasing is kept when nothing packs tighter (ties go to it).
    assert pack_bins([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    assert pack_bins([], 8) == []
    assert pack_bins([8, 8], 8) == [[0], [1]]
    # BFD puts 5 + 4 together (room 1 left) and needs a third row; 5 + 3 + 2 and 4 + 4 + 2 fill two rows exactly.
    lengths = [5, 4, 4, 3, 2, 2]
    assert len(pack_best_fit_decreasing(lengths, 10)) == 3
    bins = pack_bins(lengths, 10)
    _check_bins(bins, lengths, 10)
    assert len(bins) == 2


@pytest.mark.parametrize("bad", [[3, 11], [0, 2], [-1]])
def test_pack_bins_rejects_out_of_range_lengths(bad: list[int]) -> None:
    with pytest.raises(ValueError, match="max_length=10"):
        pack_bins(bad, 10)


@pytest.mark.parametrize("seed", range(12))
def test_pack_bins_properties_and_never_worse_than_bfd(seed: int) -> None:
    rng = random.Random(seed)
    max_length = rng.choice([16, 64, 512, 1024, 2048])
    lo = rng.randint(1, max_length)
    hi = rng.randint(lo, min(max_length, lo + rng.choice([3, 30, max_length])))  # narrow and wide spreads
    lengths = [rng.randint(lo, hi) for _ in range(rng.randint(1, 3000))]
    bins = pack_bins(lengths, max_length)
    _check_bins(bins, lengths, max_length)
    assert len(bins) <= len(pack_best_fit_decreasing(lengths, max_length))
    assert bins == pack_bins(list(lengths), max_length)


@pytest.mark.parametrize("system_prompt", [False, True])
def test_pack_bins_efficiency_on_tang_lengths(system_prompt: bool) -> None:
    lengths = _tang_lengths(system_prompt)
    for max_length, target in [(256, 0.58), (1024, 0.985), (2048, 0.985)]:
        start = time.perf_counter()
        new = _efficiency(lengths, max_length, pack_bins)
        elapsed = time.perf_counter() - start
        old = _efficiency(lengths, max_length)
        best = sum(lengths) / (_cardinality_bound(lengths, max_length) * max_length)
        print(
            f"system={system_prompt} max_length={max_length}: BFD {old:.2%}, pack_bins {new:.2%} "
            f"(bound {best:.2%}) in {elapsed:.3f}s"
        )
        assert new >= old and new > target
        assert elapsed < 1.0
    if not system_prompt:
        assert _efficiency(lengths, 1024, pack_bins) > 0.99
    else:
        # 7 examples of 128+ tokens fill a 1024 row only if they are the shortest ones: at most 98.70% (745 rows)
        # is possible, and the subset-sum fill gets 746 rows where best-fit-decreasing needs 792 (92.85%).
        assert _cardinality_bound(lengths, 1024) == 745
        assert len(pack_bins(lengths, 1024)) <= 746


def test_pack_bins_scales_to_100k_examples() -> None:
    lengths = _tang_lengths(True) * 20
    start = time.perf_counter()
    bins = pack_bins(lengths, 1024)
    elapsed = time.perf_counter() - start
    _check_bins(bins, lengths, 1024)
    assert sum(lengths) / (len(bins) * 1024) > 0.98
    assert elapsed < 10.0  # ~1.5 s on one CI core


# ------------------------------------------------------------------ rows


def test_pack_examples_row_layout() -> None:
    examples = [_example(4, 10, answer_from=2), _example(3, 20, answer_from=1), _example(2, 30)]
    rows = pack_examples(examples, max_length=9)
    assert len(rows) == 1
    row = rows[0]
    assert row["input_ids"] == [10, 11, 12, 13, 20, 21, 22, 30, 31]
    assert row["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    assert row["labels"] == [-100, -100, 12, 13, -100, 21, 22, -100, 31]


def test_pack_examples_first_label_of_each_example_is_masked_and_the_rest_preserved() -> None:
    rng = random.Random(1)
    examples = []
    for _ in range(60):
        n = rng.randint(1, 40)
        ids = [rng.randint(0, 999) for _ in range(n)]
        examples.append({"input_ids": ids, "labels": [x if rng.random() < 0.5 else -100 for x in ids]})
    rows = pack_examples(examples, max_length=64, seed=3)

    # Rebuild each example from the rows via its position-id restarts.
    seen = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 64
        starts = [t for t, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:], strict=False):
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a] == IGNORE_INDEX
            seen.append((row["input_ids"][a:b], row["labels"][a + 1 : b]))
    expected = [(ex["input_ids"], ex["labels"][1:]) for ex in examples]
    assert sorted(seen) == sorted(expected)


def test_pack_examples_seed_controls_row_order_only() -> None:
    examples = [_example(n, 100 * n) for n in [5, 3, 7, 2, 6, 4, 1, 8, 3, 5]]
    a, b, c = (pack_examples(examples, 10, seed=s) for s in (7, 7, 8))
    assert a == b
    assert a != c
    assert sorted(map(str, a)) == sorted(map(str, c))


def test_pack_examples_rejects_misaligned_labels() -> None:
    with pytest.raises(ValueError, match="aligned"):
        pack_examples([{"input_ids": [1, 2, 3], "labels": [1, 2]}], 8)


def test_packing_stats() -> None:
    rows = pack_examples([_example(n) for n in [6, 5, 4, 3, 2]], max_length=10)
    stats = packing_stats(rows, 10)
    assert stats == PackingStats(examples=5, rows=2, tokens=20, capacity_tokens=20)
    assert stats.efficiency == 1.0
    assert stats.examples_per_row == 2.5
    assert str(stats) == "packed 5 examples into 2 rows: 20 of 20 token slots used (100.00%), 2.5 examples/row"


def test_pack_dataset_matches_pack_examples_and_is_fast() -> None:
    # Tang-sized: 5,001 examples of 110-190 tokens, the last 29 of them labelled.
    rng = random.Random(0)
    examples = []
    for k in range(5001):
        n = rng.randint(110, 190)
        ids = list(range(k, k + n))
        examples.append({"input_ids": ids, "labels": [-100] * (n - 29) + ids[n - 29 :]})
    ds = datasets.Dataset.from_list(examples).add_column("extra", ["x"] * len(examples))

    start = time.perf_counter()
    packed = pack_dataset(ds, max_length=2048, seed=5)
    elapsed = time.perf_counter() - start

    assert packed.column_names == ["input_ids", "labels", "position_ids"]
    assert packed.to_list() == pack_examples(examples, 2048, seed=5)
    assert packing_stats(packed.to_list(), 2048).examples == 5001
    assert packing_stats(packed, 2048) == packing_stats(packed.to_list(), 2048)
    assert elapsed < 5.0  # ~1 s on a CI core


# ------------------------------------------------------------------ collators


def _rows() -> list[dict]:
    return [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [6, 7, 8], "labels": [-100, 7, 8], "position_ids": [0, 1, 2]},
    ]


def test_packed_collator_pads_as_a_separate_sequence() -> None:
    batch = PackedCollator(pad_token_id=0)(_rows())
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5], [-100, 7, 8, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]


def test_packed_collator_pad_to_multiple_of() -> None:
    batch = PackedCollator(pad_token_id=9, pad_to_multiple_of=4)(_rows())
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 9, 9, 9]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert batch["labels"][0, 5:].tolist() == [-100] * 3


def test_packed_collator_flatten_gives_one_row() -> None:
    batch = PackedCollator(pad_token_id=0, flatten=True)(_rows())
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5, -100, 7, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    padded = PackedCollator(pad_token_id=0, flatten=True, pad_to_multiple_of=16)(_rows())
    assert padded["input_ids"].shape == (1, 16)
    assert padded["position_ids"][0, 8:].tolist() == list(range(8))


def test_padding_free_collator() -> None:
    features = [
        {"input_ids": [1, 2, 3], "labels": [1, 2, 3], "attention_mask": [1, 1, 1]},
        {"input_ids": torch.tensor([4, 5]), "labels": torch.tensor([-100, 5])},
    ]
    batch = PaddingFreeCollator()(features)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_padded_collator() -> None:
    features = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    batch = PaddedCollator(pad_token_id=0)(features)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert PaddedCollator(pad_token_id=0, pad_to_multiple_of=8)(features)["input_ids"].shape == (2, 8)
