"""Prepare the data of a run once, ahead of it: ``python trainer/prepare.py [RECIPE.yaml] [--option value ...]``.

Takes the same recipe and options as ``sft.py`` and does the whole data half — read, validate (file:line errors),
template, tokenise, filter, mix, pack, report — into a content-addressed folder of memory-mapped Arrow files (see
``trainer/data/prepared.py``). ``sft.py`` with the same options finds that folder and uses it without
re-tokenising; on a cluster, run this once in the job (or before it) on a filesystem every node sees, then ``srun``
the training (docs/slurm.md). The last line printed is the folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package from the repo root, not from trainer/
    sys.path[0] = str(Path(__file__).resolve().parents[1])
if sys.argv[1:] in (["-h"], ["--help"]):  # the rendered help, before the heavy imports (trainer/console/fast_help.py)
    from trainer.console.fast_help import serve_help

    serve_help("trainer/prepare.py", "trainer.args:build_parser")

import logging
import os

from trainer.args import ConfigError, parse_config
from trainer.console.errors import report_user_error
from trainer.errors import UserError
from trainer.preparation import prepare, setup_data

logger = logging.getLogger("sft")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv, prog="trainer/prepare.py")
    except ConfigError as error:
        return report_user_error(error)
    logging.basicConfig(format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        setup = setup_data(cfg)
        prepared = prepare(cfg, setup, show_progress=True)
    except UserError as error:
        return report_user_error(error)
    logger.info("%s", prepared.report.summary())
    print(prepared.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
