"""The GPU check: every GPU figure this project reports, measured in one call of under 8 minutes.

Run through ``bash bench/gpu_check.sh [RESULTS_DIR]`` on a machine with a CUDA GPU (it installs the carried wheels
first), or ``bash bench/gpu_check.sh --dry-run DIR`` anywhere: the same code paths end to end on CPU with tiny shapes
(CI runs it). Parts, in order of priority, each in its own subprocess with a time budget (a part that runs out of
time or memory is recorded as such and the next one starts):

1. ``isolation``: packing isolation of a Qwen2.5-0.5B-shaped model (bf16) on every attention backend present
   (flash_attention_3 / _2 when installed, sdpa, eager) — :func:`trainer.isolation.check_isolation`, the run's own
   check — and the bf16 matmul ceiling of the device (8192³ products).
2. ``throughput-<model>``: full fine-tuning (fp32 master weights, bf16 autocast, fused AdamW) of Qwen2.5-0.5B and
   -1.5B shapes (random weights) on packed rows of 2,048 and 8,192 tokens, with the HF loss and the chunked loss
   (``trainer.loss``): tokens/s, MFU (6N, against the datasheet peak and the measured ceiling) and peak memory.
3. ``qlora-7b``: one QLoRA step on a Breeze/Mistral-7B shape (4-bit NF4, bf16 compute, gradient checkpointing):
   load time, step time, peak memory.
4. ``liger``: Qwen2.5-0.5B at 8,192 tokens with Liger's kernels off and on (``_apply_liger_kernel_to_instance``,
   as ``--use_liger_kernel`` applies them): tokens/s, peak memory, first-step loss difference.
5. ``long_rows``: long-context memory on one GPU: Qwen2.5-0.5B, one row of 8k/16k/32k tokens, chunked loss and
   gradient checkpointing, ``--tiled_mlp`` off and on: peak memory and step time per row length (the per-GPU curve
   that sequence parallelism moves along; see docs/long_context.md).

Results: ``RESULTS_DIR/<date>-gpu-check-<device>.json`` and ``.md`` (a dry run names itself ``dry-run-cpu``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from gpu import COMMON_CONFIG, MODELS, default_peak, matmul_params, synthetic_rows  # noqa: E402

BUDGET_S = 450  # the whole check, start-up of each part included; the device call allows 8 minutes
MODELS_7B = {"breeze-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=8, vocab_size=61952, tie_word_embeddings=False)}
TINY = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True)}


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _qwen(shape: dict, attn: str, dtype):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**shape, **COMMON_CONFIG)
    torch.manual_seed(0)
    with _device():
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)


# ------------------------------------------------------------------------------------------------ parts (children)


def part_isolation(spec: dict) -> dict:
    import importlib.util

    import torch

    from trainer.data.packing import PackedCollator
    from trainer.isolation import check_isolation, probe_batch_makers

    shape = (TINY if spec["dry_run"] else MODELS)[spec["model"]]
    dtype = torch.float32 if spec["dry_run"] else torch.bfloat16
    backends = ["sdpa", "eager"]
    if torch.cuda.is_available():
        if importlib.util.find_spec("flash_attn_interface") is not None:
            backends.insert(0, "flash_attention_3")
        if importlib.util.find_spec("flash_attn") is not None:
            backends.insert(0, "flash_attention_2")
    out = {"backends": {}, "notes": []}
    if "flash_attention_2" not in backends:
        out["notes"].append("flash_attention_2/3 not measured: flash-attn is not installed here")
    for attn in backends:
        model = _qwen(shape, attn, dtype)
        model.config.use_cache = False
        collator = PackedCollator(pad_token_id=0, flatten=attn.startswith("flash"))
        mechanisms = ["position_ids"] + (["mask4d"] if attn in ("sdpa", "eager") else [])
        try:
            measured = check_isolation(model, probe_batch_makers(collator, True, mechanisms), shape["vocab_size"])
            out["backends"][attn] = {"mechanism": measured.mechanism, "vs_alone": measured.alone,
                                     "leak": measured.leak, "noise": measured.noise}
        except Exception as error:  # a refusal is a result
            out["backends"][attn] = {"error": str(error)[:300]}
        del model
    if torch.cuda.is_available():  # the device's bf16 matmul ceiling, the honest denominator of MFU
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        _sync()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        _sync()
        out["matmul_tflops"] = 10 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12
    return out


def _train_steps(model, batches, loss_impl: str, autocast: bool) -> tuple[float, float, int]:
    """Seconds of the timed steps, the last loss, and the real tokens they held (first 2 steps are warm-up)."""
    import torch

    from trainer.loss import causal_lm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=torch.cuda.is_available())
    device = _device()
    tokens, start, loss = 0, None, None
    for step, batch in enumerate(batches):
        if step == 2:
            _sync()
            start = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss if loss_impl == "hf" else causal_lm_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            tokens += int((batch["input_ids"] != 0).sum())
    _sync()
    del optimizer
    return time.perf_counter() - start, float(loss), tokens


def part_throughput(spec: dict) -> dict:
    import torch

    from trainer.data.packing import PackedCollator

    shapes = TINY if spec["dry_run"] else MODELS
    shape = shapes[spec["model"]]
    on_gpu = torch.cuda.is_available()
    peak = default_peak(torch.cuda.get_device_name()) if on_gpu else None
    results = []
    for seq_len in spec["seq_lens"]:
        rows = synthetic_rows(spec["steps"] + 2, seq_len, shape["vocab_size"], seed=0)
        batches = [PackedCollator(0, flatten=True)([row]) for row in rows[: spec["steps"] + 2]]
        for loss_impl in ("hf", "chunked"):
            model = _qwen(shape, "sdpa", torch.float32)
            model.config.use_cache = False
            n_matmul = matmul_params(model)
            _reset_peak()
            try:
                seconds, loss, tokens = _train_steps(model, batches, loss_impl, autocast=on_gpu)
            except torch.OutOfMemoryError as error:
                results.append({"seq_len": seq_len, "loss_impl": loss_impl, "error": f"out of memory: {error}"[:200]})
                del model
                continue
            result = {"seq_len": seq_len, "loss_impl": loss_impl, "tokens_per_s": tokens / seconds,
                      "peak_memory_gib": _peak_gib(), "loss": loss, "matmul_params": n_matmul}
            if peak:
                result["mfu_6n"] = 6 * n_matmul * tokens / seconds / peak
            results.append(result)
            del model
    return {"model": spec["model"], "peak_flops": peak, "results": results}


def part_qlora(spec: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, MistralConfig

    from trainer.data.packing import PackedCollator

    shape = (TINY if spec["dry_run"] else MODELS_7B)[spec["model"]]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=spec.get("tmp")) as tmp:
        config = MistralConfig(**shape, max_position_embeddings=32768, use_cache=False)
        torch.manual_seed(0)
        with _device():
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
        saved = time.perf_counter()
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        _reset_peak()
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": 0} if torch.cuda.is_available() else "cpu")
    loaded = time.perf_counter()
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = synthetic_rows(4, spec["seq_len"], shape["vocab_size"], seed=0)
    batches = [PackedCollator(0, flatten=True)([row]) for row in rows[:4]]
    seconds, loss, tokens = _train_steps(model, batches, "hf", autocast=False)
    return {"model": spec["model"], "seq_len": spec["seq_len"], "save_s": saved - started, "load_s": loaded - saved,
            "step_s": seconds / 2, "tokens_per_s": tokens / seconds, "peak_memory_gib": _peak_gib(), "loss": loss}


def part_liger(spec: dict) -> dict:
    import importlib.util

    import torch

    from trainer.data.packing import PackedCollator

    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        return {"skipped": "Liger's kernels are Triton/CUDA only" if not torch.cuda.is_available()
                else "liger_kernel not installed"}
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    shape = MODELS[spec["model"]]
    rows = synthetic_rows(spec["steps"] + 2, spec["seq_len"], shape["vocab_size"], seed=0)
    batches = [PackedCollator(0, flatten=True)([row]) for row in rows[: spec["steps"] + 2]]
    out = {}
    for liger in (False, True):
        model = _qwen(shape, "sdpa", torch.float32)
        model.config.use_cache = False
        if liger:
            _apply_liger_kernel_to_instance(model=model)
        _reset_peak()
        seconds, loss, tokens = _train_steps(model, batches, "hf", autocast=True)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            first = {k: v.cuda() for k, v in batches[0].items()}
            model.train()
            first_loss = float(model(**first).loss)
        out["on" if liger else "off"] = {"tokens_per_s": tokens / seconds, "peak_memory_gib": _peak_gib(),
                                         "first_batch_loss": first_loss}
        del model
    out["loss_difference"] = abs(out["on"]["first_batch_loss"] - out["off"]["first_batch_loss"])
    return out


def part_long_rows(spec: dict) -> dict:
    """The single-GPU memory curve vs row length for long-context training (docs/long_context.md): one step
    (chunked loss, gradient checkpointing, bf16 autocast) per row length, tiled MLP off and on. Sequence
    parallelism divides the row over N GPUs, so the SP N point of a row of L tokens is about this curve at L / N.
    (Several GPUs: the SP case itself is bench/sp_memory.py's, which runs gloo on CPU and is not CUDA-ready yet.)"""
    import torch

    from trainer.data.packing import PackedCollator
    from trainer.memory.tiled_mlp import apply_tiled_mlp

    shape = MODELS[spec["model"]] if spec["model"] in MODELS else TINY[spec["model"]]
    device = _device()
    results = []
    for seq_len in spec["seq_lens"]:
        rows = synthetic_rows(1, seq_len, shape["vocab_size"], seed=0)
        batch = {k: v.to(device) for k, v in PackedCollator(0, flatten=True)(rows[:1]).items()}
        for tiled in (False, True):
            model = _qwen(shape, "sdpa", torch.float32)
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if tiled:
                apply_tiled_mlp(model)
            _reset_peak()
            try:
                seconds, loss, tokens = _train_steps(model, [batch] * 3, "chunked",
                                                     autocast=torch.cuda.is_available())
                results.append({"seq_len": seq_len, "tiled_mlp": tiled, "step_s": seconds,
                                "peak_memory_gib": _peak_gib(), "loss": loss})
            except torch.OutOfMemoryError:
                results.append({"seq_len": seq_len, "tiled_mlp": tiled, "error": "out of memory"})
            del model
    return {"results": results, "gpus": torch.cuda.device_count()}


PARTS = {"isolation": part_isolation, "throughput": part_throughput, "qlora": part_qlora, "liger": part_liger,
         "long_rows": part_long_rows}


# ------------------------------------------------------------------------------------------------ orchestration


def plan(dry_run: bool, tmp: str) -> list[tuple[str, dict, float]]:
    """(part, spec, seconds) in order of priority."""
    if dry_run:
        return [("isolation", {"model": "tiny", "dry_run": True}, 120),
                ("throughput", {"model": "tiny", "seq_lens": [256, 512], "steps": 3, "dry_run": True}, 120),
                ("qlora", {"model": "tiny", "seq_len": 128, "dry_run": True, "tmp": tmp}, 120),
                ("liger", {"model": "tiny", "seq_len": 256, "steps": 3, "dry_run": True}, 60),
                ("long_rows", {"model": "tiny", "seq_lens": [256, 512], "dry_run": True}, 90)]
    return [("isolation", {"model": "qwen2.5-0.5b", "dry_run": False}, 70),
            ("throughput", {"model": "qwen2.5-0.5b", "seq_lens": [2048, 8192], "steps": 8, "dry_run": False}, 80),
            ("qlora", {"model": "breeze-7b", "seq_len": 2048, "dry_run": False, "tmp": tmp}, 150),
            ("liger", {"model": "qwen2.5-0.5b", "seq_len": 8192, "steps": 8, "dry_run": False}, 60),
            ("throughput", {"model": "qwen2.5-1.5b", "seq_lens": [2048, 8192], "steps": 8, "dry_run": False}, 90),
            ("long_rows", {"model": "qwen2.5-0.5b", "seq_lens": [8192, 16384, 32768], "dry_run": False}, 90)]


def run_part(name: str, spec: dict, seconds: float, work: Path) -> dict:
    spec_file, out_file = work / f"{name}-{spec['model']}.spec.json", work / f"{name}-{spec['model']}.json"
    spec_file.write_text(json.dumps({"part": name, **spec}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec_file), "--child-out", str(out_file)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        return {"part": name, **spec, "error": f"timed out after {seconds:.0f} s"}
    result = {"part": name, **spec, "wall_s": round(time.perf_counter() - started, 1)}
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {**result, "error": " | ".join(lines[-3:])[-600:] or f"exit {proc.returncode}"}
    return {**result, **json.loads(out_file.read_text())}


def markdown(report: dict) -> str:
    lines = [f"# GPU check, {report['date']}", "", f"Device: {report['device']}; torch {report['torch']}, "
             f"transformers {report['transformers']}; {'DRY RUN (CPU, tiny shapes)' if report['dry_run'] else ''}",
             ""]
    for part in report["parts"]:
        title = f"## {part['part']} ({part['model']})"
        if "error" in part:
            lines += [title, "", f"error: {part['error']}", ""]
            continue
        lines += [title, ""]
        if part["part"] == "isolation":
            lines += ["| backend | mechanism | vs alone | leak |", "|---|---|---:|---:|"]
            for backend, r in part["backends"].items():
                lines.append(f"| {backend} | {r.get('mechanism', 'refused: ' + r.get('error', '')[:60])} | "
                             f"{r.get('vs_alone', float('nan')):.1e} | {r.get('leak', float('nan')):.1e} |")
            if "matmul_tflops" in part:
                lines.append(f"\nbf16 matmul ceiling: {part['matmul_tflops']:.0f} TFLOP/s")
            lines += [f"- {n}" for n in part["notes"]]
        elif part["part"] == "throughput":
            lines += ["| row tokens | loss | tokens/s | MFU (6N) | peak GiB |", "|---:|---|---:|---:|---:|"]
            for r in part["results"]:
                if "error" in r:
                    lines.append(f"| {r['seq_len']} | {r['loss_impl']} | {r['error'][:60]} | | |")
                    continue
                mfu = f"{r['mfu_6n']:.1%}" if "mfu_6n" in r else "n/a"
                lines.append(f"| {r['seq_len']} | {r['loss_impl']} | {r['tokens_per_s']:,.0f} | {mfu} | "
                             f"{r['peak_memory_gib']:.2f} |")
        elif part["part"] == "qlora":
            lines.append(f"save {part['save_s']:.0f} s, 4-bit load {part['load_s']:.0f} s, step {part['step_s']:.2f} s "
                         f"at {part['seq_len']} tokens ({part['tokens_per_s']:,.0f} tokens/s), peak "
                         f"{part['peak_memory_gib']:.2f} GiB")
        elif part["part"] == "long_rows":
            lines += ["| row tokens | tiled MLP | step s | peak GiB |", "|---:|---|---:|---:|"]
            for r in part["results"]:
                tail = r["error"] if "error" in r else f"{r['step_s']:.2f} | {r['peak_memory_gib']:.2f}"
                lines.append(f"| {r['seq_len']} | {'on' if r['tiled_mlp'] else 'off'} | {tail} |")
        elif part["part"] == "liger":
            if "skipped" in part:
                lines.append(f"skipped: {part['skipped']}")
            else:
                for key in ("off", "on"):
                    r = part[key]
                    lines.append(f"- liger {key}: {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_memory_gib']:.2f} "
                                 f"GiB, first-batch loss {r['first_batch_loss']:.5f}")
                lines.append(f"- loss difference {part['loss_difference']:.2e}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results"), help="results folder")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the code paths, not figures")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(args.child_out).write_text(json.dumps(PARTS[spec.pop("part")](spec)))
        return 0
    import torch
    import transformers

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the code paths on CPU", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.dry_run else "cpu"
    report = {"date": dt.date.today().isoformat(), "device": device, "dry_run": args.dry_run,
              "torch": torch.__version__, "transformers": transformers.__version__, "parts": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "dry-run-cpu" if args.dry_run else device.lower().replace(" ", "-")
    stem = out / f"{report['date']}-gpu-check-{slug}"
    with tempfile.TemporaryDirectory() as work:
        for name, spec, seconds in plan(args.dry_run, work):
            left = deadline - time.monotonic()
            if left < 20:
                report["parts"].append({"part": name, **spec, "error": "not run: the time budget is spent"})
                continue
            result = run_part(name, spec, min(seconds, left), Path(work))
            report["parts"].append(result)
            print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}), flush=True)
            stem.with_suffix(".json").write_text(json.dumps(report, indent=2))  # partial results survive a kill
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
