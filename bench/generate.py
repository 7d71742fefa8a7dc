"""Batched generation vs one prompt at a time, on the same prompts, the same model, the same decoding.

``trainer/evaluate.py`` and ``--eval_generate`` answer prompts ``--batch_size`` at a time (left-padded, similar
lengths together: ``trainer.sampling.generate_replies``). This measures what that buys: each setting runs in a fresh
subprocess, alternating (1, B, 1, B, ...), greedy decoding of ``--max-new-tokens``, and the replies of every
setting are compared with those of batch size 1 (they must be the same).

    python bench/generate.py                      # the built-in tiny model, 64 Tang prompts, batch 1 vs 16 vs 32
    python bench/generate.py --model outputs/tiny-tang --batch-sizes 1,8 --repeats 5

Results: ``bench/results/<date>-cpu-generate.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "demo" / "tang_train.json"


def child(spec: dict) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from trainer.data.prompts import read_prompts, to_prompt
    from trainer.inference import load_for_inference
    from trainer.merge import stop_token_ids
    from trainer.sampling import default_generation_config, generate_replies

    torch.set_num_threads(spec["threads"])
    model, tokenizer = load_for_inference(spec["model"])
    prompts = [to_prompt(p.messages) for p in read_prompts(DATA, limit=spec["prompts"])]
    config = default_generation_config(tokenizer, spec["max_new_tokens"])
    generate_replies(model, tokenizer, prompts[:2], config, stop_token_ids(tokenizer), batch_size=2)  # warm-up
    start = time.perf_counter()
    replies = generate_replies(model, tokenizer, prompts, config, stop_token_ids(tokenizer),
                               batch_size=spec["batch_size"])
    seconds = time.perf_counter() - start
    tokens = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
    return {"batch_size": spec["batch_size"], "seconds": seconds, "prompts_per_s": len(prompts) / seconds,
            "reply_tokens": tokens, "replies": replies}


def tiny_model() -> str:
    sys.path.insert(0, str(REPO))
    from trainer.data.formats import read_conversations
    from trainer.tiny import build_tiny_model

    texts = [m["content"] for c in read_conversations(DATA).conversations for m in c]
    return str(build_tiny_model("builtin:tiny-llama", texts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model or run folder (default: the built-in tiny model)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts from data/demo/tang_train.json")
    parser.add_argument("--batch-sizes", default="1,16,32")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(Path(args.child).read_text())
        Path(spec["result"]).write_text(json.dumps(child(spec)))
        return 0
    model = args.model or tiny_model()
    model_name = args.model or "the built-in tiny Llama (tokenizer trained on the demo set)"
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    runs: dict[int, list[dict]] = {b: [] for b in sizes}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(args.repeats):
            for b in sizes if repeat % 2 == 0 else sizes[::-1]:
                spec_file = Path(work) / f"{b}-{repeat}.json"
                spec = {"model": model, "prompts": args.prompts, "batch_size": b, "threads": args.threads,
                        "max_new_tokens": args.max_new_tokens, "result": str(spec_file.with_suffix(".out"))}
                spec_file.write_text(json.dumps(spec))
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
                subprocess.run([sys.executable, __file__, "--child", str(spec_file)], check=True, env=env,
                               capture_output=True, text=True)
                result = json.loads(Path(spec["result"]).read_text())
                runs[b].append(result)
                print(f"batch {b:>3}: {result['seconds']:7.2f} s, {result['prompts_per_s']:6.2f} prompts/s",
                      flush=True)
    load.append(os.getloadavg()[0])
    reference = runs[sizes[0]][0]["replies"]
    summary = {}
    for b in sizes:
        seconds = statistics.median(r["seconds"] for r in runs[b])
        summary[b] = {"median_s": seconds, "prompts_per_s": args.prompts / seconds,
                      "same_replies_as_batch_1": all(r["replies"] == reference for r in runs[b])}
    base = summary[sizes[0]]["median_s"]
    date = dt.date.today().isoformat()
    lines = [f"# Batched generation, {date}", "",
             f"{os.cpu_count()} CPU cores, {args.threads} threads; model {model_name}; {args.prompts} Tang prompts, "
             "greedy, "
             f"{args.max_new_tokens} new tokens at most; {args.repeats} alternated repeats in fresh processes, "
             f"medians; load {load[0]:.2f} -> {load[1]:.2f}.", "",
             "| batch size | seconds | prompts/s | speed-up vs batch 1 | replies equal to batch 1 |",
             "|---:|---:|---:|---:|---|"]
    for b, s in summary.items():
        lines.append(f"| {b} | {s['median_s']:.2f} | {s['prompts_per_s']:.2f} | {base / s['median_s']:.1f}x | "
                     f"{'yes' if s['same_replies_as_batch_1'] else 'NO'} |")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "child")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{date}-cpu-generate"
    stem.with_suffix(".json").write_text(json.dumps({"date": date, "model": model_name, "args": settings,
                                                     "summary": summary, "load": load,
                                                     "runs": {b: [{k: v for k, v in r.items() if k != "replies"}
                                                                  for r in rs] for b, rs in runs.items()}},
                                                    indent=2, ensure_ascii=False))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
