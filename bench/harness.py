"""What every CPU benchmark here does the same way: wait for a quiet machine, say which machine it was, pool saved runs.

The benchmarks run contenders in fresh processes, alternating, and a run that shared the two cores with something
else measures that something. Each therefore waits for a low load average before a run and records the load
around it; ``--from-json`` pools the runs of several saved reports (e.g. more repeats on a quieter machine) into one.
Imported by the scripts beside it (``python bench/<script>.py`` puts this folder first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path


def add_quiet_options(parser: argparse.ArgumentParser) -> None:
    """``--max-load`` / ``--max-wait`` / ``--from-json``, with the same meaning in every benchmark."""
    parser.add_argument("--max-load", type=float, default=1.5,
                        help="before each run wait until the 1-min load average is below this (0: never wait)")
    parser.add_argument("--max-wait", type=float, default=90, help="longest wait for --max-load, seconds (default 90)")
    parser.add_argument("--from-json",
                        help="rebuild the report from saved results JSON(s), comma list: runs are pooled")


def wait_for_quiet(max_load: float, max_wait_s: float) -> float:
    """Wait (up to ``max_wait_s``) until the 1-minute load average is below ``max_load`` (0: do not wait); return
    the load then, for the report."""
    deadline = time.monotonic() + max_wait_s
    while max_load and os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(5)
    return round(os.getloadavg()[0], 2)


def pooled_report(files: str, same: tuple[str, ...] = ()) -> dict:
    """The first saved report of the comma list ``files`` with the runs of the others added, contender by contender.

    ``same`` names ``config`` keys that must agree (e.g. the corpus size and seed): runs of different setups are
    refused, not averaged. ``config["repeats"]`` becomes the most runs any contender now has.
    """
    reports = [json.loads(Path(f).read_text()) for f in files.split(",")]
    report = reports[0]
    for other in reports[1:]:
        for key in same:
            if other["config"].get(key) != report["config"].get(key):
                raise SystemExit(f"--from-json: the results differ in {key!r}: "
                                 f"{report['config'].get(key)!r} vs {other['config'].get(key)!r}")
        for name, repeats in other["runs"].items():
            report["runs"].setdefault(name, []).extend(repeats)
        report["load_after"] = other["load_after"]
    report["config"]["repeats"] = max(len(r) for r in report["runs"].values())
    return report


def machine(packages: tuple[str, ...] = ("torch", "transformers")) -> dict:
    """Where the numbers come from; versions read from package metadata, so nothing heavy is imported."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    memory_gib = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": memory_gib, "python": platform.python_version(),
            "platform": platform.platform(), **versions}
