"""Peak memory and speed of one training step: the model's own causal-LM loss vs ``trainer.loss.causal_lm_loss``.

Run from the repo root::

    python bench/memory.py                      # Qwen2.5-0.5B-shaped, 2 layers, rows of 4096 + 8192: ~35 min on 2 cores
    python bench/memory.py --quick              # small shapes, a smoke test: exit 1 if the losses or peaks disagree
    python bench/memory.py --tokens 4096 --labels answers --repeats 3
    python bench/memory.py --from-json a.json,b.json    # pool saved runs (e.g. re-timed on a quieter machine)

Why: with a 151,936-token vocabulary the logits of one 8,192-token row are 5 GB in fp32, and the model's own loss
holds several tensors of that size at its peak (logits, log-softmax, their gradient), so the LM head and not the
decoder sets the memory a step needs. The chunked loss never holds more than ``--chunk-tokens`` rows of logits.

Each run is a fresh subprocess (its peak RSS, ``ru_maxrss``, is its own), alternating hf, chunked, hf, chunked, ...
over ``--repeats``; medians are reported. A run builds the model (random weights, fp32, sdpa, seed 0: identical in every
run), makes one packed row (examples of 64-1024 tokens, position ids restarting per example, no attention mask, as
this project's packing feeds the model), and trains two steps (forward, backward, AdamW step); the second is timed.
``--labels all`` labels every token (the worst case for the chunked loss: the head runs on every position either
way); ``answers`` labels the last third of each example, as an SFT row whose prompts are masked.

Peak RSS does not depend on other load; step times on a small shared machine do: the load average before and after
each run and its CPU utilisation (process CPU s / wall s of the timed step; about 2 on 2 free cores) are recorded.
A run that would exceed ``--mem-limit-gib`` of address space fails its allocation instead of pushing the machine into
the OOM killer, and is reported as such.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import add_quiet_options, machine, wait_for_quiet

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
IGNORE_INDEX = -100
IMPLS = ("hf", "chunked")

# Qwen2.5-0.5B's published shape (tied embeddings), 2 of its 24 layers: the head is as large as in the real model.
QWEN = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2, num_attention_heads=14,
            num_key_value_heads=2, tie_word_embeddings=True)
QUICK = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, tie_word_embeddings=True)
COMMON = dict(max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, use_cache=False,
              hidden_act="silu", attention_dropout=0.0)


# --------------------------------------------------------------------------------------------------------------------
# Child: one run
# --------------------------------------------------------------------------------------------------------------------


def packed_row(tokens: int, vocab: int, labels: str, seed: int) -> dict:
    """One row of exactly ``tokens``: random examples of 64-1024 tokens, the last one cut to fit."""
    import torch

    rng = random.Random(seed)
    ids, lab, pos = [], [], []
    while len(ids) < tokens:
        n = min(rng.randint(64, 1024), tokens - len(ids))
        example = [rng.randrange(10, vocab) for _ in range(n)]
        prompt = 0 if labels == "all" else n - n // 3
        ids += example
        lab += [IGNORE_INDEX] * prompt + example[prompt:]
        pos += list(range(n))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([lab]), "position_ids": torch.tensor([pos])}


def rss_mib() -> tuple[float, float]:
    """(current, peak so far) resident memory of this process in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: dict) -> dict:
    if spec["mem_limit_gib"]:
        limit = int(spec["mem_limit_gib"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from trainer.loss import causal_lm_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**spec["shape"], **COMMON), attn_implementation="sdpa",
                                             dtype=torch.float32)
    model.train()
    inputs = packed_row(spec["tokens"], spec["shape"]["vocab_size"], spec["labels"], seed=1)
    label_tokens = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    marks: list[dict] = [{"phase": "model built", **dict(zip(("rss_mib", "peak_mib"), rss_mib()))}]

    def mark(phase: str) -> None:
        marks.append({"phase": phase, **dict(zip(("rss_mib", "peak_mib"), rss_mib()))})

    losses, wall, cpu = [], [], []
    for step in (1, 2):
        start, start_cpu = time.perf_counter(), time.process_time()
        if spec["impl"] == "hf":  # as the Trainer calls it: the outputs (and their logits) are dropped at once
            loss = model(**inputs, num_items_in_batch=label_tokens).loss
        else:
            loss = causal_lm_loss(model, inputs, label_tokens, chunk_tokens=spec["chunk_tokens"])
        mark(f"step {step} forward")
        loss.backward()
        mark(f"step {step} backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark(f"step {step} optimizer")
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        losses.append(float(loss))
    return {"impl": spec["impl"], "tokens": spec["tokens"], "label_tokens": label_tokens, "losses": losses,
            "step_s": wall[1], "warmup_step_s": wall[0], "cpu_utilisation": cpu[1] / wall[1], "marks": marks,
            "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------------------------------
# Parent: alternate the runs, summarise, report
# --------------------------------------------------------------------------------------------------------------------


def mem_available_gib() -> float:
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable"))
    return int(line.split()[1]) / 2**20


def run_child(spec: dict, work: Path, run_id: str, load_before: float) -> dict:
    """One run in a fresh process; peak RSS from ``wait4`` is that child's alone."""
    spec_file, result_file = work / f"{run_id}.spec.json", work / f"{run_id}.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false"}
    with (work / f"{run_id}.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec_file), str(result_file)], cwd=REPO,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    base = {"impl": spec["impl"], "tokens": spec["tokens"], "peak_rss_mib": usage.ru_maxrss / 1024,
            "load_before": load_before, "load_after": round(os.getloadavg()[0], 2)}
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (work / f"{run_id}.log").read_text()[-2000:]
        oom = "can't allocate memory" in tail or "MemoryError" in tail or "DefaultCPUAllocator" in tail
        return {**base, "failed": "out of memory under the address-space limit" if oom else tail}
    return {**base, **json.loads(result_file.read_text())}


def summarise(runs: list[dict], min_cpu: float) -> list[dict]:
    """Medians per (tokens, impl) over the runs that finished, and the chunked/hf ratios per size.

    Peak RSS: over all finished runs (other load does not change it). Step times: over the runs that had the cores
    (CPU utilisation >= ``min_cpu``), or all of them when none had: a run competing with other work is slower by an
    arbitrary factor.
    """
    rows = []
    for tokens in sorted({r["tokens"] for r in runs}):
        per = {}
        for impl in IMPLS:
            done = [r for r in runs if r["tokens"] == tokens and r["impl"] == impl and "failed" not in r]
            failed = [r for r in runs if r["tokens"] == tokens and r["impl"] == impl and "failed" in r]
            if not done:
                per[impl] = {"failed": failed[0]["failed"] if failed else "not run",
                             "peak_rss_mib_at_least": max((r["peak_rss_mib"] for r in failed), default=None)}
                continue
            timed = [r for r in done if r["cpu_utilisation"] >= min_cpu] or done
            step_s = statistics.median(r["step_s"] for r in timed)
            per[impl] = {"peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in done), "step_s": step_s,
                         "tokens_per_s": tokens / step_s, "label_tokens": done[0]["label_tokens"],
                         "label_tokens_per_s": done[0]["label_tokens"] / step_s,
                         "cpu_utilisation": statistics.median(r["cpu_utilisation"] for r in timed),
                         "loss": done[0]["losses"][0],
                         "peak_range_mib": [min(r["peak_rss_mib"] for r in done), max(r["peak_rss_mib"] for r in done)],
                         "step_range_s": [min(r["step_s"] for r in timed), max(r["step_s"] for r in timed)],
                         "runs": len(done), "timed_runs": len(timed), "failed_runs": len(failed)}
        row = {"tokens": tokens, **per}
        if all("peak_rss_mib" in per[i] for i in IMPLS):
            hf, ch = per["hf"], per["chunked"]
            row["ratios"] = {"peak_rss": ch["peak_rss_mib"] / hf["peak_rss_mib"],
                             "tokens_per_s": ch["tokens_per_s"] / hf["tokens_per_s"],
                             "loss_relative_difference": abs(ch["loss"] - hf["loss"]) / abs(hf["loss"])}
        rows.append(row)
    return rows


def _cell(per: dict, key: str, fmt: str) -> str:
    if "failed" in per:
        at_least = per.get("peak_rss_mib_at_least")
        return f"> {at_least:,.0f} (failed)" if key == "peak_rss_mib" and at_least else "failed"
    return format(per[key], fmt)


def markdown(report: dict) -> str:
    m, cfg = report["machine"], report["config"]
    shape = cfg["shape"]
    pooled = f" (pooled from {cfg['pooled_from']} invocations)" if cfg.get("pooled_from", 1) > 1 else ""
    lines = [
        f"# CPU memory of one training step: model's own loss vs chunked, {report['date']}",
        "",
        f"Machine: {m['nproc']} cores, {m['cpu']}, {m['memory_gib']} GiB; torch {m['torch']}, transformers "
        f"{m['transformers']}. Load average before/after: {report['load_before']} / {report['load_after']}.",
        f"Setup: Qwen2-shaped model, vocab {shape['vocab_size']:,}, hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads / {shape['num_key_value_heads']} "
        f"kv heads, intermediate {shape['intermediate_size']}, tied embeddings, random weights, fp32, sdpa; one packed "
        f"row per step (examples of 64-1024 tokens, position ids restarting), labels: {cfg['labels']}; forward + "
        f"backward + AdamW step, the second step timed; chunked: `trainer.loss.causal_lm_loss`, chunk_tokens "
        f"{cfg['chunk_tokens']}; OMP_NUM_THREADS={cfg['threads']}; up to {cfg['repeats']} alternated runs per row and "
        f"loss{pooled}, medians "
        f"(step times from the runs with CPU utilisation >= {cfg['min_cpu']} when there are any).",
        "",
        "| row tokens | label tokens | loss | peak RSS MiB | step s | tokens/s | label tokens/s | CPU util | load at "
        "start | runs: timed / done / all |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["summary"]:
        for impl in IMPLS:
            per = row[impl]
            mine = [r for r in report["runs"] if r["tokens"] == row["tokens"] and r["impl"] == impl]
            loads = [r["load_before"] for r in mine]
            lines.append(
                f"| {row['tokens']:,} | {per.get('label_tokens', '')} | {impl} | {_cell(per, 'peak_rss_mib', ',.0f')} "
                f"| {_cell(per, 'step_s', '.1f')} | {_cell(per, 'tokens_per_s', ',.0f')} | "
                f"{_cell(per, 'label_tokens_per_s', ',.0f')} | {_cell(per, 'cpu_utilisation', '.2f')} | "
                f"{min(loads):.2f}-{max(loads):.2f} | {per.get('timed_runs', 0)} / {per.get('runs', 0)} / "
                f"{len(mine)} |")
    lines += ["", "| row tokens | chunked / hf peak RSS | peak RSS saved | chunked / hf tokens/s | loss rel. diff |",
              "|---:|---:|---:|---:|---:|"]
    for row in report["summary"]:
        r = row.get("ratios")
        if r:
            lines.append(f"| {row['tokens']:,} | {r['peak_rss']:.2f}x | {1 - r['peak_rss']:.0%} | "
                         f"{r['tokens_per_s']:.2f}x | {r['loss_relative_difference']:.1e} |")
    lines += ["", "Where the memory goes (median run; MiB resident after a phase, or the peak up to its end):", "",
              "| row tokens | loss | after model built | peak in step 1 forward | peak in step 1 backward | "
              "after step 1 (weights + AdamW state) | peak |", "|---:|---|---:|---:|---:|---:|---:|"]
    for tokens in sorted({r["tokens"] for r in report["runs"]}):
        for impl in IMPLS:
            done = [r for r in report["runs"] if r["tokens"] == tokens and r["impl"] == impl and "failed" not in r]
            if not done:
                continue
            run = sorted(done, key=lambda r: r["peak_rss_mib"])[len(done) // 2]
            at = {mk["phase"]: mk for mk in run["marks"]}
            lines.append(f"| {tokens:,} | {impl} | {at['model built']['rss_mib']:,.0f} | "
                         f"{at['step 1 forward']['peak_mib']:,.0f} | {at['step 1 backward']['peak_mib']:,.0f} | "
                         f"{at['step 1 optimizer']['rss_mib']:,.0f} | {run['peak_rss_mib']:,.0f} |")
    failed = [r for r in report["runs"] if "failed" in r]
    if failed:
        lines += ["", f"Failed runs (address-space limit {cfg['mem_limit_gib']:.1f} GiB, set below the machine's "
                  "free memory so that a run fails its allocation instead of invoking the OOM killer):"]
        lines += [f"- {r['tokens']:,} tokens, {r['impl']}: {r['failed'][:200]}" for r in failed]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="4096,8192", help="row lengths, comma list")
    p.add_argument("--labels", choices=("all", "answers"), default="all",
                   help="all: every token labelled; answers: the last third of each example")
    p.add_argument("--repeats", type=int, default=2, help="alternated runs per row length and loss")
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the runs")
    add_quiet_options(p)
    p.add_argument("--min-cpu", type=float, default=1.8,
                   help="step times only from runs with at least this CPU utilisation (when any has it)")
    p.add_argument("--mem-limit-gib", type=float, default=None,
                   help="address-space limit of a run (default: free memory now minus 1 GiB; 0: none)")
    p.add_argument("--quick", action="store_true",
                   help="small model (hidden 64, 1 layer, same vocab), one row of 1024, one repeat: seconds; exit 1 "
                   "unless the losses agree and chunked peaks lower. Writes no results unless --out is given")
    p.add_argument("--out", help=f"folder for the JSON + markdown (default {RESULTS.relative_to(REPO)}/)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        Path(args.child[1]).write_text(json.dumps(child(json.loads(Path(args.child[0]).read_text()))))
        return 0
    report = pool(args.from_json.split(",")) if args.from_json else measure(args)
    report["config"]["min_cpu"] = args.min_cpu
    report["summary"] = summarise(report["runs"], args.min_cpu)
    text = markdown(report)
    print(text)
    out = Path(args.out) if args.out else (None if report["config"]["quick"] else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        labels, quick = report["config"]["labels"], report["config"]["quick"]
        stem = out / f"{report['date']}-cpu-memory{'' if labels == 'all' else '-' + labels}{'-quick' if quick else ''}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
        stem.with_suffix(".md").write_text(text, encoding="utf-8")
        print(f"written: {stem}.json, {stem}.md")
    if report["config"]["quick"]:
        row = report["summary"][0]
        ok = "ratios" in row and row["ratios"]["loss_relative_difference"] < 1e-5 and row["ratios"]["peak_rss"] < 1
        print("quick check:", "ok" if ok else "FAILED (losses differ, a run failed, or chunked did not peak lower)")
        return 0 if ok else 1
    return 0


def measure(args: argparse.Namespace) -> dict:
    """All runs, alternating the two losses; the raw report (summarised by the caller)."""
    shape = QUICK if args.quick else QWEN
    sizes = [1024] if args.quick else [int(t) for t in args.tokens.split(",")]
    repeats = 1 if args.quick else args.repeats
    limit = args.mem_limit_gib if args.mem_limit_gib is not None else max(1.0, mem_available_gib() - 1)
    config = {"shape": shape, "tokens": sizes, "labels": args.labels, "repeats": repeats,
              "chunk_tokens": 256 if args.quick else args.chunk_tokens, "threads": args.threads,
              "mem_limit_gib": limit, "max_load": args.max_load, "quick": args.quick}
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs = []
    with tempfile.TemporaryDirectory(prefix="sft-memory-") as work:
        for tokens in sizes:
            for repeat in range(repeats):
                for impl in IMPLS:
                    spec = {"impl": impl, "tokens": tokens, "shape": shape, "labels": args.labels,
                            "chunk_tokens": config["chunk_tokens"], "threads": args.threads, "mem_limit_gib": limit}
                    load = wait_for_quiet(0 if args.quick else args.max_load, args.max_wait)
                    result = run_child(spec, Path(work), f"{impl}-{tokens}-{repeat}", load)
                    runs.append(result)
                    print(f"{tokens:>6} {impl:>8} #{repeat}: " + (f"FAILED ({result['failed'][:80]})" if "failed"
                          in result else f"peak {result['peak_rss_mib']:8,.0f} MiB, step {result['step_s']:7.1f} s, "
                          f"{tokens / result['step_s']:6.0f} tok/s, loss {result['losses'][0]:.6f}, cpu "
                          f"{result['cpu_utilisation']:.2f}") + f", load {result['load_before']}->"
                          f"{result['load_after']}", flush=True)
    return {"date": dt.date.today().isoformat(), "machine": machine(), "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()], "config": config, "runs": runs}


def pool(files: list[str]) -> dict:
    """Saved reports of the same setup as one: their runs together (e.g. more repeats taken on a quieter machine)."""
    reports = [json.loads(Path(f).read_text()) for f in files]
    report = reports[0]
    for other in reports[1:]:
        same = ("shape", "labels", "chunk_tokens", "threads")
        if any(other["config"][k] != report["config"][k] for k in same):
            raise SystemExit(f"cannot pool reports of different setups ({', '.join(same)} must match)")
        report["runs"] += other["runs"]
        report["load_after"] = other["load_after"]
    report["config"]["tokens"] = sorted({r["tokens"] for r in report["runs"]})
    report["config"]["repeats"] = max(sum(1 for r in report["runs"] if (r["tokens"], r["impl"]) == key)
                                      for key in {(r["tokens"], r["impl"]) for r in report["runs"]})
    report["config"]["pooled_from"] = len(reports)
    return report


if __name__ == "__main__":
    sys.exit(main())
