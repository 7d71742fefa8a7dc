"""Packed rows must train exactly like their examples run one by one, and the known traps must be caught.

Tiny random models (fp32, fixed seed), per-token cross-entropy computed here from the logits, so the comparison sees
every position rather than one averaged loss.
"""

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from trainer.data.packing import (
    IGNORE_INDEX,
    PackedCollator,
    PaddedCollator,
    PaddingFreeCollator,
    install_isolation_guard,
    pack_examples,
)

VOCAB = 128
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128)
ARCHS = {"llama": lambda: LlamaConfig(**SHAPE), "qwen2": lambda: Qwen2Config(**SHAPE)}
BACKENDS = ["sdpa", "eager"]
TOL = 1e-5

_models: dict[tuple[str, str], torch.nn.Module] = {}


def _model(arch: str, attn: str) -> torch.nn.Module:
    if (arch, attn) not in _models:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(ARCHS[arch](), attn_implementation=attn).eval()
        model.config.use_cache = False
        _models[arch, attn] = model
    return _models[arch, attn]


def _examples(lengths: list[int], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(1, VOCAB) for _ in range(n)]
        prompt = n // 2
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def _token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """CE of predicting token t+1 from position t, for every position of every row: shape (batch, length - 1)."""
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), input_ids[:, 1:], reduction="none")


def _segments(position_ids: list[int]) -> list[tuple[int, int]]:
    starts = [t for t, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(zip(starts, starts[1:], strict=False))


@torch.no_grad()
def _max_diff_to_alone(model: torch.nn.Module, batch: dict[str, torch.Tensor], n_real: list[int], **kwargs) -> float:
    """Largest per-token loss difference between each example inside ``batch`` and the same example run alone.

    ``n_real[r]`` is the number of real (non-padding) tokens of row ``r``; padding segments are not compared.
    """
    losses = _token_losses(model(**batch, **kwargs).logits, batch["input_ids"])
    worst, compared = 0.0, 0
    for r, row_positions in enumerate(batch["position_ids"].tolist()):
        for a, b in _segments(row_positions[: n_real[r]]):
            ids = batch["input_ids"][r : r + 1, a:b]
            alone = _token_losses(model(input_ids=ids, use_cache=False).logits, ids)
            # Positions a..b-2 predict tokens inside the example; b-1 would predict the next example's first token.
            worst = max(worst, (losses[r, a : b - 1] - alone[0]).abs().max().item())
            compared += 1
    assert compared >= 3
    return worst


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_row_equals_examples_alone(arch: str, attn: str) -> None:
    model = _model(arch, attn)
    rows = pack_examples(_examples([7, 4, 11]), max_length=22)
    assert len(rows) == 1
    batch = PackedCollator(pad_token_id=0)(rows)
    assert _max_diff_to_alone(model, batch, [22]) < TOL

    # The HF loss (mean over labelled tokens) also equals that of the examples alone, first labels excluded.
    with torch.no_grad():
        packed_loss = model(**batch).loss
        total, count = 0.0, 0
        for a, b in _segments(rows[0]["position_ids"]):
            ids = batch["input_ids"][:, a:b]
            labels = batch["labels"][:, a:b]
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += model(input_ids=ids, labels=labels, use_cache=False).loss.item() * n
            count += n
    assert abs(packed_loss.item() - total / count) < TOL


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("flatten", [False, True])
def test_batch_of_packed_rows_with_padding(arch: str, attn: str, flatten: bool) -> None:
    model = _model(arch, attn)
    rows = pack_examples(_examples([9, 8, 5, 4, 3], seed=1), max_length=16, seed=0)
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(rows) == 2 and lengths[0] != lengths[1], "the test needs padding"
    batch = PackedCollator(pad_token_id=0, flatten=flatten, pad_to_multiple_of=8)(rows)
    assert "attention_mask" not in batch
    n_real = [sum(lengths)] if flatten else lengths
    assert batch["input_ids"].shape[0] == (1 if flatten else 2)
    assert _max_diff_to_alone(model, batch, n_real) < TOL


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_padding_free_and_padded_collators_equal_examples_alone(arch: str, attn: str) -> None:
    model = _model(arch, attn)
    examples = _examples([6, 10, 3], seed=2)
    flat = PaddingFreeCollator()(examples)
    assert _max_diff_to_alone(model, flat, [20]) < TOL

    padded = PaddedCollator(pad_token_id=0)(examples)
    with torch.no_grad():
        losses = _token_losses(model(**padded, use_cache=False).logits, padded["input_ids"])
        for r, ex in enumerate(examples):
            ids = torch.tensor([ex["input_ids"]])
            alone = _token_losses(model(input_ids=ids, use_cache=False).logits, ids)
            assert (losses[r, : ids.shape[1] - 1] - alone[0]).abs().max().item() < TOL


# ------------------------------------------------------------------ the trap and the guard


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_mask_or_cache_breaks_isolation(arch: str) -> None:
    """Negative control: proves the equality tests above can fail, i.e. that the trap is real."""
    model = _model(arch, "sdpa")
    batch = PackedCollator(pad_token_id=0)(pack_examples(_examples([7, 4, 11]), max_length=22))
    ones = torch.ones_like(batch["input_ids"])
    assert _max_diff_to_alone(model, batch, [22], attention_mask=ones) > 1e-3
    assert _max_diff_to_alone(model, batch, [22], use_cache=True) > 1e-3


@pytest.fixture
def guarded():
    model = _model("llama", "sdpa")
    handle = install_isolation_guard(model)
    yield model
    handle.remove()
    model.config.use_cache = False


def _packed_batch() -> dict[str, torch.Tensor]:
    return PackedCollator(pad_token_id=0)(pack_examples(_examples([7, 4, 11]), max_length=22))


def test_guard_raises_on_packed_batch_with_attention_mask(guarded) -> None:
    batch = _packed_batch()
    with pytest.raises(RuntimeError, match="attention_mask"):
        guarded(**batch, attention_mask=torch.ones_like(batch["input_ids"]))
    with pytest.raises(RuntimeError, match="attention_mask"):  # positional arguments are seen too
        guarded(batch["input_ids"], torch.ones_like(batch["input_ids"]), batch["position_ids"])


def test_guard_raises_on_packed_batch_with_cache(guarded) -> None:
    batch = _packed_batch()
    with pytest.raises(RuntimeError, match="use_cache"):
        guarded(**batch, use_cache=True)
    guarded.config.use_cache = True
    with pytest.raises(RuntimeError, match="use_cache"):
        guarded(**batch)
    guarded(**batch, use_cache=False)  # an explicit False wins over the config


def test_guard_lets_safe_calls_through(guarded) -> None:
    batch = _packed_batch()
    assert torch.isfinite(guarded(**batch).loss)  # packed, no mask, config.use_cache False
    ids = batch["input_ids"]
    guarded(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)  # unpacked: no position_ids
    # A left-padded generation-style batch: positions restart only under the padding, which the mask hides.
    guarded(
        input_ids=torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 8, 9]]),
        attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]),
        position_ids=torch.tensor([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]),
        use_cache=True,
    )


def test_guard_works_through_peft() -> None:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(ARCHS["qwen2"](), attn_implementation="sdpa")
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    install_isolation_guard(model)
    batch = _packed_batch()
    assert torch.isfinite(model(**batch).loss)
    with pytest.raises(RuntimeError, match="attention_mask"):
        model(**batch, attention_mask=torch.ones_like(batch["input_ids"]))
    with pytest.raises(RuntimeError, match="use_cache"):
        model(**batch, use_cache=True)


class _FlashStub(torch.nn.Module):
    """Stands in for a flash-attention model (flash-attn cannot be installed on CPU); the guard only reads kwargs."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(use_cache=False, _attn_implementation="flash_attention_2")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, **kwargs):
        return input_ids


def test_guard_rejects_multi_row_packed_batches_on_flash_attention() -> None:
    model = _FlashStub()
    install_isolation_guard(model)
    rows = pack_examples(_examples([9, 8, 5, 4, 3], seed=1), max_length=16)
    with pytest.raises(RuntimeError, match="batch size 1"):
        model(**PackedCollator(pad_token_id=0)(rows))
    model(**PackedCollator(pad_token_id=0, flatten=True)(rows))
    model(**PaddedCollator(pad_token_id=0)(_examples([3, 5])))
