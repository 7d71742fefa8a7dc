"""What the data guards cost, and what the record-size limit prevents.

``python bench/data_guards.py [--mb 400] [--record-mb 2,8]`` prints one JSON report:

- ``write``: seconds to write an Arrow stream of ``--mb`` MB of packed-like rows through ``pyarrow.OSFile`` and
  through the hashing writer that prepared data now uses (its sha256 computed while writing);
- ``check``: seconds for :func:`trainer.data.prepared.check_prepared` on that folder — with the writer's digests
  remembered (what every start pays), with an empty digest cache (a cache that never saw the folder: one full read,
  paid once), and again after (remembered);
- ``record``: peak RSS growth of a process preparing one alpaca record of each ``--record-mb`` MiB (tiny byte-level
  BPE, ``--max_length 64``): what one oversized record costs to tokenise, and so what ``--max_record_mb`` (default
  8) refuses to spend. Each size runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rows(mb: int):
    import numpy as np
    import pyarrow as pa

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
    rows, row_len = 4096, 2048
    values = pa.array(np.random.default_rng(0).integers(0, 32000, rows * row_len, dtype=np.int32))
    column = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * row_len + 1, row_len, dtype=np.int32)), values)
    batch = pa.RecordBatch.from_arrays([column, column], schema=schema)
    return schema, [batch] * max(1, (mb << 20) // batch.nbytes)


def check_costs(mb: int, root: Path) -> dict:
    import pyarrow as pa

    from trainer.data import digests, prepared
    from trainer.data.digests import WrittenFiles

    schema, batches = _rows(mb)
    started = time.perf_counter()
    with pa.OSFile(str(root / "plain.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    plain_s = time.perf_counter() - started
    folder = root / "prepared"
    folder.mkdir()
    written = WrittenFiles()
    started = time.perf_counter()
    with written.binary(folder / "train.arrow") as raw, pa.PythonFile(raw, mode="w") as sink, \
            pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    hashed_s = time.perf_counter() - started
    manifest = {"key": folder.name, "files": written.files}
    manifest["sha256"] = prepared._manifest_digest(manifest)
    (folder / prepared.MANIFEST).write_text(json.dumps(manifest))
    written.remember(folder)

    def timed() -> float:
        started = time.perf_counter()
        assert prepared.check_prepared(folder) is None
        return time.perf_counter() - started

    remembered_s = min(timed() for _ in range(5))
    os.environ["SFT_CACHE_DIR"] = str(root / "other-cache")
    time.sleep(digests.SETTLED_S)  # a file this fresh is hashed but not remembered
    first_s = timed()
    again_s = min(timed() for _ in range(5))
    size = (folder / "train.arrow").stat().st_size
    return {"file_mb": round(size / 1e6, 1),
            "write": {"osfile_s": round(plain_s, 3), "hashing_writer_s": round(hashed_s, 3)},
            "check": {"remembered_s": round(remembered_s, 6), "new_cache_first_s": round(first_s, 3),
                      "new_cache_again_s": round(again_s, 6),
                      "first_gb_per_s": round(size / 1e9 / first_s, 2)}}


def record_memory(mib: float, root: Path) -> dict:
    """One record of ``mib`` MiB prepared in this (fresh) process; peak RSS before and after."""
    from trainer.data.build import DataOptions
    from trainer.data.prepared import prepare_data
    from trainer.data.sources import resolve_sources
    from trainer.model import load_tokenizer
    from trainer.tiny import build_tiny_model

    os.environ["SFT_CACHE_DIR"] = str(root / "cache")
    poem = "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。"
    model = build_tiny_model("builtin:tiny-llama", [poem * 50, "hello world " * 200], seed=0)
    tokenizer = load_tokenizer(str(model))
    text = poem * int(mib * 2**20 / len(poem.encode()) + 1)
    data = root / f"record-{mib}.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": text}, ensure_ascii=False) + "\n", encoding="utf-8")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    options = DataOptions(max_length=64, max_record_bytes=int(mib * 2**20) * 2)
    prepare_data(resolve_sources(str(data)), [], tokenizer, tokenizer.chat_template, options, root / "prepared",
                 show_progress=False)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"record_mib": round(len(text.encode()) / 2**20, 2), "seconds": round(time.perf_counter() - started, 2),
            "peak_rss_gib_before": round(before / 2**20, 3), "peak_rss_gib_after": round(after / 2**20, 3),
            "growth_gib": round((after - before) / 2**20, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=400, help="size of the Arrow file whose check is timed")
    parser.add_argument("--record-mb", default="2,8", help="comma list of record sizes (MiB) to tokenise")
    parser.add_argument("--one-record", type=float, help=argparse.SUPPRESS)  # the child process of a record run
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.one_record is not None:
            print(json.dumps(record_memory(args.one_record, Path(tmp))))
            return
        os.environ["SFT_CACHE_DIR"] = str(Path(tmp) / "cache")
        report = {"check": check_costs(args.mb, Path(tmp)), "records": []}
    for mib in (float(m) for m in args.record_mb.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one-record", str(mib)], capture_output=True, text=True,
                             check=True).stdout
        report["records"].append(json.loads(out.strip().splitlines()[-1]))
    from harness import machine

    report["machine"] = machine()
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
