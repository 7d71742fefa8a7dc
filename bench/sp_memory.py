"""Per-process peak memory of one optimizer step on one long row: sequence parallel 1 vs 2 (vs 4), loss hf / chunked,
tiled MLP, gradient checkpointing.

Run from the repo root (on a shared machine, under a lock such as ``flock /tmp/heavy.lock``)::

    python bench/sp_memory.py                          # 16,384 tokens, SP 1/2, the four contenders: ~5 min
    python bench/sp_memory.py --tokens 4096 --sp 1,2,4 --contenders hf
    python bench/sp_memory.py --quick                  # 1,024 tokens, a smoke test
    python bench/sp_memory.py --layers 2 --name 2026-12-07-cpu-sp-memory-2layers   # writes bench/results/NAME.json/.md

Why: a long row's activations, not the weights, set the memory of a step; Ulysses sequence parallelism gives each of
N ranks 1/N of the row's tokens (attention sees the whole row through an all-to-all over heads), so per-rank
activation memory should fall about N-fold, minus what every rank still holds whole.

Each contender runs in fresh processes (``torch.distributed.run``, gloo, N processes for SP N), alternating
contenders. A run builds a Llama-shaped model that is wide but short and has a small vocabulary (activations
dominate; fp32, sdpa, random weights, seed 0), registers DeepSpeed's Ulysses attention through
``trainer.sequence_parallel`` when N > 1, and does a warm-up step on a short row (so gradients and AdamW's state exist),
then measures the step on the long row: forward and backward of this rank's shard + ``AdamW.step``. The figure is
the peak resident memory during that step minus the resident memory just before it (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``, minus ``VmRSS``): what the step adds to weights, gradients and optimizer state,
i.e. activation memory and transients. torch's CPU allocator keeps no statistics, so RSS it is. The gradient
all-reduce of data parallelism is not run (it adds no activation memory); losses are printed per rank.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WIDE = dict(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=1, num_attention_heads=8,
            num_key_value_heads=8, max_position_embeddings=131072, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
            use_cache=False, tie_word_embeddings=False, attention_dropout=0.0)
CONTENDERS = {
    "hf": dict(loss="hf", tiled=False, checkpointing=False),
    "chunked": dict(loss="chunked", tiled=False, checkpointing=False),
    "chunked+tiled": dict(loss="chunked", tiled=True, checkpointing=False),
    "chunked+tiled+gc": dict(loss="chunked", tiled=True, checkpointing=True),
}


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(1)
    sp = int(os.environ.get("WORLD_SIZE", "1"))
    spec = CONTENDERS[args.child]
    if sp > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    shape = {**WIDE, "num_hidden_layers": args.layers}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **shape), attn_implementation="sdpa")
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec["tiled"]:
        from trainer.memory.tiled_mlp import apply_tiled_mlp

        apply_tiled_mlp(model)
    model.train()
    group = None
    if sp > 1:
        from trainer.sequence_parallel.attention import enable_ulysses

        group = enable_ulysses(model, "sdpa", sp, 1, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    saved_mib = [0.0]

    def step(tokens: int) -> float:
        from trainer.loss import causal_lm_loss
        from trainer.sequence_parallel.shard import shard_batch

        g = torch.Generator().manual_seed(tokens)
        ids = torch.randint(3, WIDE["vocab_size"], (1, tokens), generator=g)
        batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(tokens)[None]}
        shard = shard_batch(batch, sp, dist.get_rank() if sp > 1 else 0, 0)
        context = group.active() if group is not None else torch.enable_grad()
        storages: dict[int, int] = {}

        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t):  # what autograd keeps for the backward, by storage (views share one), weights left out
            storage = t.untyped_storage()
            if storage.data_ptr() in weights:
                return t
            storages[storage.data_ptr()] = storage.nbytes()
            return t
        with context:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if spec["loss"] == "chunked":
                    loss = causal_lm_loss(model, shard, tokens - 1)
                else:
                    loss = model(**shard).loss * (shard["labels"] != -100).sum() / (tokens - 1)
            loss.backward()
        saved_mib[0] = sum(storages.values()) / 2**20
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as between the Trainer's steps
        return float(loss)

    step(64 * sp)  # warm-up: gradients and AdamW state exist before the measured step
    before = memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    loss = step(args.tokens)
    seconds = time.perf_counter() - start
    peak = memory_kib("VmHWM")
    result = {"rank": dist.get_rank() if sp > 1 else 0, "loss_part": loss, "seconds": round(seconds, 2),
              "rss_before_mib": round(before / 1024, 1), "step_peak_mib": round((peak - before) / 1024, 1),
              "saved_mib": round(saved_mib[0], 1)}
    print("RESULT " + json.dumps(result), flush=True)
    if sp > 1:
        dist.destroy_process_group()


def run_one(contender: str, sp: int, tokens: int, layers: int = WIDE["num_hidden_layers"]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(sp),
           str(Path(__file__).resolve()), "--child", contender, "--tokens", str(tokens), "--layers", str(layers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    # The ranks print at once: their lines can interleave, so results are found anywhere in the output.
    ranks = [json.loads(found) for found in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)]
    if proc.returncode or len(ranks) != sp:
        return {"contender": contender, "sp": sp, "tokens": tokens, "failed": proc.stderr[-1500:]}
    return {"contender": contender, "sp": sp, "tokens": tokens,
            "peak_mib": max(r["step_peak_mib"] for r in ranks), "seconds": max(r["seconds"] for r in ranks),
            "saved_mib": max(r.get("saved_mib", float("nan")) for r in ranks),
            "loss": round(sum(r["loss_part"] for r in ranks), 6), "ranks": ranks}


def longest_row(contender: str, sp: int, budget_mib: float, start: int, limit: int) -> int:
    """The longest row (a multiple of 1,024 tokens, doubling then bisecting) whose step adds at most the budget."""
    good, bad = 0, None
    tokens = start
    while bad is None and tokens <= limit:
        result = run_one(contender, sp, tokens)
        print(f"  budget search {contender} SP{sp} {tokens} tokens: {result.get('peak_mib', 'failed')} MiB", flush=True)
        if "failed" not in result and result["peak_mib"] <= budget_mib:
            good, tokens = tokens, tokens * 2
        else:
            bad = tokens
    while bad is not None and bad - good > 1024:
        mid = (good + bad) // 2 // 1024 * 1024
        result = run_one(contender, sp, mid)
        print(f"  budget search {contender} SP{sp} {mid} tokens: {result.get('peak_mib', 'failed')} MiB", flush=True)
        if "failed" not in result and result["peak_mib"] <= budget_mib:
            good = mid
        else:
            bad = mid
    return good


def markdown(report: dict) -> str:
    """The results as a table: per-rank peak added by the step, SP N / SP 1, seconds; then the longest rows."""
    runs = {(r["contender"], r["sp"]): r for r in report["runs"]}
    sizes = sorted({r["sp"] for r in report["runs"]})
    model = report["model"]
    lines = [f"# Sequence-parallel memory, {report['date']} ({report['device']})", "",
             f"One optimizer step (forward, backward, AdamW) on one row of {report['tokens']:,} tokens, per process: "
             f"{report['measure']}. Model: Llama-shaped, {model['num_hidden_layers']} layer(s), hidden "
             f"{model['hidden_size']}, intermediate {model['intermediate_size']}, {model['num_attention_heads']} "
             f"heads, vocabulary {model['vocab_size']:,}, fp32, sdpa; random weights, seed 0. SP N = N gloo processes "
             "with DeepSpeed's Ulysses attention (`trainer.sequence_parallel`), each holding 1/N of the row. "
             "Command: `python bench/sp_memory.py " + report.get("command", "") + "`.", "",
             "Saved = bytes autograd keeps for the backward from the forward (saved-tensor hooks, by storage, weights "
             "excluded; what "
             "gradient checkpointing recomputes is not in it): activation memory proper.", "",
             "| contender | " + " | ".join(f"SP{n} MiB/rank" for n in sizes) + " | "
             + " | ".join(f"SP{n} saved MiB" for n in sizes) + " | "
             + " | ".join(f"SP{n}/SP1" for n in sizes[1:]) + " | " + " | ".join(f"SP{n} s" for n in sizes) + " |",
             "|---|" + "---:|" * (3 * len(sizes) + len(sizes) - 1)]
    for contender in dict.fromkeys(r["contender"] for r in report["runs"]):
        cells = [f"{runs[contender, n]['peak_mib']:,.0f}" if "peak_mib" in runs.get((contender, n), {}) else "failed"
                 for n in sizes]
        saved = [f"{runs[contender, n].get('saved_mib', float('nan')):,.0f}" if (contender, n) in runs else "-"
                 for n in sizes]
        ratio = [f"{report['ratios'].get(f'{contender} SP{n}/SP1', float('nan')):.2f}" for n in sizes[1:]]
        secs = [f"{runs[contender, n]['seconds']:.1f}" if "seconds" in runs.get((contender, n), {}) else "-"
                for n in sizes]
        lines.append(f"| {contender} | " + " | ".join(cells + saved + ratio + secs) + " |")
    losses = {f"{c} SP{n}": r["loss"] for (c, n), r in runs.items() if "loss" in r}
    lines += ["", "Losses of the measured step (sum of the ranks' parts; SP must not change them): "
              + ", ".join(f"{k} {v}" for k, v in losses.items()), ""]
    if report.get("longest_row"):
        lines += [f"Longest row whose step adds at most {report['budget_mib']:.0f} MiB per rank:", ""]
        lines += [f"- {k}: {v:,} tokens" for k, v in report["longest_row"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=WIDE["num_hidden_layers"], help="decoder layers (default 1)")
    parser.add_argument("--sp", default="1,2", help="comma list of sequence-parallel sizes (default 1,2)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list of {', '.join(CONTENDERS)}")
    parser.add_argument("--budget-mib", type=float, default=0, help="also find the longest row within this many MiB "
                        "added by the step, per contender in --budget-contenders and SP size (0: skip)")
    parser.add_argument("--budget-contenders", default="chunked")
    parser.add_argument("--quick", action="store_true", help="1,024 tokens: a smoke test")
    parser.add_argument("--name", default=None, help="results file stem (default: none written)")
    parser.add_argument("--from-json", help="rewrite the .md of a saved results .json and exit")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.from_json:
        path = Path(args.from_json)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        print(path.with_suffix(".md").read_text())
        return
    tokens = 1024 if args.quick else args.tokens
    sizes = [int(s) for s in args.sp.split(",")]
    contenders = args.contenders.split(",")
    runs = []
    for contender in contenders:  # alternating SP sizes within a contender: fresh processes each
        for sp in sizes:
            result = run_one(contender, sp, tokens, args.layers)
            runs.append(result)
            print(f"{contender:18s} SP{sp}: " + (f"{result['peak_mib']:8.1f} MiB per rank (saved for backward "
                                                 f"{result['saved_mib']:.0f}), {result['seconds']:6.1f} s, "
                                                 f"loss {result['loss']}" if "failed" not in result
                                                 else "FAILED " + result["failed"][-400:]), flush=True)
    table = {(r["contender"], r["sp"]): r for r in runs if "failed" not in r}
    ratios = {}
    for contender in contenders:
        base = table.get((contender, 1))
        for sp in sizes[1:]:
            other = table.get((contender, sp))
            if base and other:
                ratios[f"{contender} SP{sp}/SP1"] = round(other["peak_mib"] / base["peak_mib"], 3)
                print(f"{contender}: SP{sp} / SP1 = {ratios[f'{contender} SP{sp}/SP1']:.3f} "
                      f"({ratios[f'{contender} SP{sp}/SP1'] - 1:+.0%} per rank)")
    longest = {}
    if args.budget_mib:
        for contender in args.budget_contenders.split(","):
            for sp in sizes:
                longest[f"{contender} SP{sp}"] = longest_row(contender, sp, args.budget_mib, 2048, 262144)
                print(f"longest row within {args.budget_mib:.0f} MiB, {contender} SP{sp}: "
                      f"{longest[f'{contender} SP{sp}']} tokens", flush=True)
    if args.name:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from harness import machine

        report = {"date": dt.date.today().isoformat(), "device": "CPU, 2 cores", "machine": machine(),
                  "model": {**WIDE, "num_hidden_layers": args.layers}, "tokens": tokens,
                  "measure": "VmHWM - VmRSS around the step (peak RSS added)",
                  "runs": runs, "ratios": ratios, "budget_mib": args.budget_mib, "longest_row": longest,
                  "command": " ".join(sys.argv[1:])}
        (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
        (RESULTS / f"{args.name}.md").write_text(markdown(report))
        print(f"wrote {RESULTS / args.name}.json")


if __name__ == "__main__":
    main()
