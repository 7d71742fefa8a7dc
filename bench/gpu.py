"""GPU training throughput and MFU of packed SFT on Qwen2-shaped models: full / LoRA / QLoRA x attention backends.

CUDA only (it refuses to run without a GPU, but ``--help`` works anywhere). Nothing is downloaded: the models are
Qwen2.5-0.5B- and 1.5B-shaped ``Qwen2Config``s with random weights, the data are synthetic examples packed into rows of
``--seq-len`` with this project's packer (position ids restart per example, no attention mask), so the attention
pattern is the one real packed training has::

    python bench/gpu.py                                   # everything, results in bench/results/
    python bench/gpu.py --models qwen2.5-0.5b --modes full --attn sdpa,flash_attention_2 --steps 30
    python bench/gpu.py --liger --peak-tflops 989

Each combination runs in its own subprocess (clean peak-memory figures; Liger's patches stay in that process).
Reported per combination: real tokens/s (padding excluded), peak allocated memory, and MFU =
6 * N * tokens/s / peak, where N counts the parameters of the matmuls a token goes through (every linear layer and the
LM head; the embedding lookup is free). Attention score/value FLOPs are not in 6N: they are given separately
(causal, per packed example: 6 * layers * hidden * sum(L_i^2) per step) and as MFU including them. For LoRA/QLoRA the
frozen weights get no weight gradient, so the real work is nearer 4N; MFU still uses 6N so that the modes compare on
the same scale (it then reads as "speed relative to full fine-tuning's work").

Peak bf16 dense FLOP/s defaults by device name (H100 SXM and H200: 989e12, A100: 312e12); set ``--peak-tflops`` for
anything else (an H100 PCIe is 756).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
IGNORE_INDEX = -100

# Shapes of the published Qwen2.5 configs (random weights here).
MODELS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
COMMON_CONFIG = dict(max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, use_cache=False,
                     hidden_act="silu", attention_dropout=0.0)
MODES = ("full", "lora", "qlora")
BACKENDS = ("sdpa", "flash_attention_2", "flex_attention")
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


# --------------------------------------------------------------------------------------------------------------------
# Pieces a child uses
# --------------------------------------------------------------------------------------------------------------------


def default_peak(device_name: str) -> float | None:
    """Dense bf16 peak by device name; ``None`` when unknown (MFU is then left out unless --peak-tflops is given)."""
    for key, peak in PEAK_BF16.items():
        if key in device_name:
            return peak
    return None


def synthetic_rows(n_rows: int, seq_len: int, vocab: int, seed: int) -> list[dict]:
    """``n_rows`` packed rows of random examples (lengths 64..1024, answer = the last third), packed best-fit.

    Examples are generated until the packer yields at least ``n_rows`` rows, so rows are as full as real packing
    makes them, not artificially perfect.
    """
    from trainer.data.packing import pack_examples

    rng = random.Random(seed)
    examples: list[dict] = []
    rows: list[dict] = []
    while len(rows) < n_rows:
        for _ in range(max(8, n_rows * seq_len // 400)):
            n = rng.randint(64, min(1024, seq_len))
            ids = [rng.randrange(10, vocab) for _ in range(n)]
            prompt = n - n // 3
            examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
        rows = pack_examples(examples, seq_len, seed=seed)
    return rows[:n_rows]


def matmul_params(model) -> int:
    """Parameters of every ``nn.Linear`` (incl. a tied LM head, once): the 6N of the MFU formula."""
    import torch

    seen, total = set(), 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and weight is not None and id(weight) not in seen:
            seen.add(id(weight))
            total += module.in_features * module.out_features  # 4-bit weights report packed shapes: use the layer's
    return total


def attention_flops(batch_positions, layers: int, hidden: int) -> float:
    """Causal attention FLOPs of one training step (fwd + bwd = 3x fwd) over per-example blocks, not whole rows."""
    total = 0
    for row in batch_positions:
        starts = (row == 0).nonzero().flatten().tolist() + [row.numel()]
        total += sum((b - a) ** 2 for a, b in zip(starts[:-1], starts[1:]))
    return 6.0 * layers * hidden * total


def build_model(name: str, mode: str, attn: str, tmp: Path):
    """Random-init Qwen2 of the given shape; QLoRA goes through a saved bf16 copy (bnb quantises on load)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Qwen2Config

    config = Qwen2Config(**MODELS[name], **COMMON_CONFIG)
    torch.manual_seed(0)
    if mode != "qlora":
        dtype = torch.float32 if mode == "full" else torch.bfloat16  # full: fp32 master weights + bf16 autocast
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
        return model.cuda()
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, attn_implementation=attn,
                                                dtype=torch.bfloat16, device_map={"": 0})


def add_lora(model, mode: str, rank: int, gradient_checkpointing: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if mode == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def child(spec: dict) -> dict:
    """Train ``steps`` steps of one combination and measure it; returns the figures as a dict."""
    import torch

    from trainer.data.packing import PackedCollator

    if spec["liger"]:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2()  # patches the Qwen2 classes: must precede model creation
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(spec["model"], spec["mode"], spec["attn"], Path(tmp))
    n_matmul = matmul_params(model)
    if spec["mode"] != "full":
        model = add_lora(model, spec["mode"], spec["lora_rank"], spec["gradient_checkpointing"])
    if spec["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    cfg = MODELS[spec["model"]]
    rows = synthetic_rows(spec["rows"] * (spec["steps"] + spec["warmup"]), spec["seq_len"], cfg["vocab_size"], 0)
    # flash attention needs the micro-batch flattened to one row (varlen kernel); the others take rows as they are
    collate = PackedCollator(pad_token_id=0, flatten=spec["attn"].startswith("flash"))
    batches = [collate(rows[i : i + spec["rows"]]) for i in range(0, len(rows), spec["rows"])]
    torch.cuda.reset_peak_memory_stats()
    tokens = labels = 0
    attn_flops = 0.0
    for step, batch in enumerate(batches):
        if step == spec["warmup"]:
            torch.cuda.synchronize()
            start = time.perf_counter()
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= spec["warmup"]:
            tokens += int((batch["input_ids"] != 0).sum())  # real tokens: synthetic ids are >= 10, padding is 0
            labels += int((batch["labels"] != IGNORE_INDEX).sum())
            attn_flops += attention_flops(batch["position_ids"].cpu(), cfg["num_hidden_layers"], cfg["hidden_size"])
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = spec["peak_flops"]
    out = {
        **spec, "device": torch.cuda.get_device_name(), "matmul_params": n_matmul, "seconds": elapsed,
        "tokens_per_s": tokens / elapsed, "label_tokens_per_s": labels / elapsed,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "attention_tflops_per_s": attn_flops / elapsed / 1e12, "final_loss": float(loss),
    }
    if peak:
        out["mfu_6n"] = 6 * n_matmul * tokens / elapsed / peak
        out["mfu_6n_plus_attention"] = (6 * n_matmul * tokens + attn_flops) / elapsed / peak
    return out


# --------------------------------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------------------------------


def available_backends(requested: list[str]) -> tuple[list[str], list[str]]:
    """Backends that can run here, and notes on the ones skipped (flash_attn is an optional extra)."""
    import importlib.util

    keep, notes = [], []
    for name in requested:
        if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            notes.append("flash_attention_2 skipped: flash_attn not installed (pip install '.[flash]')")
            continue
        keep.append(name)
    return keep, notes


def run_one(spec: dict, work: Path) -> dict:
    spec_file = work / "spec.json"
    result_file = work / "result.json"
    spec_file.write_text(json.dumps(spec))
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(spec_file), "--child-out", str(result_file)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # an OOM or a backend that cannot run this shape is a result too
        lines = proc.stderr.strip().splitlines()
        return {**spec, "error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(result_file.read_text())


def markdown(report: dict) -> str:
    lines = [f"# GPU packed-SFT throughput, {report['date']}", "",
             f"Device: {report['device']}; peak bf16 {report['peak_flops'] / 1e12 if report['peak_flops'] else '?'} "
             f"TFLOP/s; seq {report['seq_len']} x {report['rows']} rows per step, {report['steps']} timed steps.", "",
             "| model | mode | attention | liger | tokens/s | MFU (6N) | MFU (+attn) | attn TFLOP/s | peak GiB |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['attn']} | {r['liger']} | error: {r['error'][:80]} "
                         "| | | | |")
            continue
        mfu = f"{r['mfu_6n']:.1%}" if "mfu_6n" in r else "n/a"
        mfu_a = f"{r['mfu_6n_plus_attention']:.1%}" if "mfu_6n_plus_attention" in r else "n/a"
        lines.append(f"| {r['model']} | {r['mode']} | {r['attn']} | {r['liger']} | {r['tokens_per_s']:,.0f} | {mfu} | "
                     f"{mfu_a} | {r['attention_tflops_per_s']:.1f} | {r['peak_memory_gib']:.1f} |")
    lines += [""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of full, lora, qlora")
    p.add_argument("--attn", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    p.add_argument("--liger", action="store_true", help="also run every combination with Liger kernels (if installed)")
    p.add_argument("--seq-len", type=int, default=2048, help="packed row length")
    p.add_argument("--rows", type=int, default=4, help="packed rows per step (flash: flattened into one)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (kernel selection, flex compilation)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s (default: by device name)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON/markdown results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(json.loads(Path(args.child).read_text()))))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device (use bench/throughput.py on CPU)", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else default_peak(device)
    backends, notes = available_backends(args.attn.split(","))
    liger_options = [False]
    if args.liger:
        import importlib.util

        if importlib.util.find_spec("liger_kernel") is None:
            notes.append("--liger ignored: liger_kernel not installed")
        else:
            liger_options.append(True)
    if peak is None:
        notes.append(f"MFU omitted: unknown peak for {device!r}; pass --peak-tflops")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for mode in args.modes.split(","):
                for attn in backends:
                    for liger in liger_options:
                        spec = dict(model=model, mode=mode, attn=attn, liger=liger, seq_len=args.seq_len,
                                    rows=args.rows, steps=args.steps, warmup=args.warmup, lora_rank=args.lora_rank,
                                    gradient_checkpointing=args.gradient_checkpointing, peak_flops=peak)
                        result = run_one(spec, Path(tmp))
                        results.append(result)
                        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}), flush=True)
    report = {"date": dt.date.today().isoformat(), "device": device, "peak_flops": peak, "seq_len": args.seq_len,
              "rows": args.rows, "steps": args.steps, "torch": torch.__version__, "notes": notes, "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = device.lower().replace(" ", "-")
    stem = out / f"{report['date']}-gpu-{slug}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(REPO))
    sys.exit(main())
