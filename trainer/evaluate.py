"""Score what a fine-tune learned on a test set: predictions, task metrics, and the base model beside it.

``python trainer/evaluate.py --model OUT [--checkpoint latest|N] --input_file test.json[l] [--references gt.txt]
--output_file preds.jsonl --metrics_file metrics.json [--metrics exact_match,rouge_l,bleu4,chrf,accuracy]
[--labels a,b,c] [--compare base|MODEL]``

Prompts come from any of the training record formats; the reference of a prompt is its final assistant turn (an
alpaca ``output``), or the matching entry of ``--references`` (one per line, or blocks separated by blank lines —
the Tang test set's ``Tang_testing_gt.txt``). Replies are generated in batches with the chat template and stop
token of training (``trainer/generate.py``'s machinery), then scored by :mod:`trainer.metrics`. Written:

- ``--output_file``: one JSON line per example: ``prompt``, ``prediction``, ``reference``, per-example ``scores``
  (and ``base_prediction`` / ``base_scores`` with ``--compare``);
- ``--metrics_file``: each metric's corpus value in [0, 1] and the count (and the base model's, and the deltas);
  beside it a markdown table (``.md``) and, for ``accuracy``, a confusion-matrix PNG.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package from the repo root, not from trainer/
    sys.path[0] = str(Path(__file__).resolve().parents[1])
if sys.argv[1:] in (["-h"], ["--help"]):  # the rendered help, before the heavy imports (trainer/console/fast_help.py)
    from trainer.console.fast_help import serve_help

    serve_help("trainer/evaluate.py", "trainer.evaluate:build_parser")

import argparse
import json
import logging

from trainer import markdown
from trainer.console.errors import report_user_error
from trainer.data.prompts import read_references
from trainer.errors import UserError
from trainer.generate import (
    GenerateError,
    Generator,
    Item,
    add_generation_options,
    add_model_options,
    read_items,
    training_system_prompt,
)
from trainer.metrics import (
    MetricsResult,
    compute_metrics,
    metrics_table,
    plot_confusion_matrix,
    resolve_metric_names,
    side_by_side,
)

logger = logging.getLogger("evaluate")

DEFAULT_METRICS = "exact_match,rouge_l,bleu4,chrf"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer/evaluate.py",
        description="Generate answers for a test set with a fine-tuned model and score them against references: "
        "exact match, accuracy over a label set, ROUGE-L (character-level for CJK), BLEU-4 and chrF. With "
        "--compare, the base model answers too and the table shows before, after and the difference.",
    )
    add_model_options(parser)
    io = parser.add_argument_group("test set and outputs")
    io.add_argument("--input_file", required=True, type=Path,
                    help="Test prompts: .json/.jsonl/.parquet records in any training format; the final answer of "
                    "a record (alpaca 'output', last assistant turn) is its reference.")
    io.add_argument("--references", default=None, type=Path,
                    help="References for prompts without answers: one per line, or blocks separated by blank lines, "
                    "in the order of --input_file (e.g. Tang_testing_gt.txt).")
    io.add_argument("--output_file", default=None, type=Path,
                    help="Predictions, one JSON line per example (default: predictions.jsonl beside --metrics_file).")
    io.add_argument("--metrics_file", default=Path("metrics.json"), type=Path,
                    help="Metric values (JSON); a markdown table and, for accuracy, a confusion-matrix PNG go "
                    "beside it.")
    io.add_argument("--metrics", default=None,
                    help=f"Comma list of exact_match, accuracy, rouge_l, bleu4, chrf (default: {DEFAULT_METRICS}, "
                    "plus accuracy when --labels is given).")
    io.add_argument("--labels", default=None,
                    help="Comma list of class labels for accuracy (default: the distinct references).")
    io.add_argument("--max_prompts", type=int, default=None, help="Use only the first N prompts.")
    io.add_argument("--system", default=None,
                    help="System prompt for prompts that have none (default: the one training used).")
    add_generation_options(parser)
    return parser


def _rows(items: list[Item], references: list[str], tuned: list[str], scored: MetricsResult,
          base: list[str] | None, base_scored: MetricsResult | None) -> list[dict]:
    rows = []
    for i, (item, reference, prediction) in enumerate(zip(items, references, tuned)):
        row = {"index": i + 1, "prompt": item.prompt.messages, "prediction": prediction, "reference": reference,
               "scores": scored.per_example[i]}
        if base is not None and base_scored is not None:
            row.update(base_prediction=base[i], base_scores=base_scored.per_example[i])
        rows.append(row)
    return rows


def _report(args: argparse.Namespace, generator: Generator, items: list[Item], references: list[str],
            tuned: list[str], scored: MetricsResult, base: list[str] | None,
            base_scored: MetricsResult | None) -> str:
    metrics_file = args.metrics_file
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    output = args.output_file or metrics_file.with_name("predictions.jsonl")
    with output.open("w", encoding="utf-8") as f:
        for row in _rows(items, references, tuned, scored, base, base_scored):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = {"model": str(generator.path), "input_file": str(args.input_file), "count": len(items),
               "metrics": scored.values(), "details": scored.to_dict()["metrics"]}
    if base_scored is not None:
        summary["base"] = {"model": generator.base_name, "metrics": base_scored.values(),
                           "details": base_scored.to_dict()["metrics"]}
        summary["delta"] = {k: v - base_scored.values()[k] for k, v in scored.values().items()}
        table = metrics_table(side_by_side(before=base_scored.values(), after=scored.values()))
    else:
        table = metrics_table(scored.values())
    metrics_file.write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    header = ["#", "prompt", "reference", *(["before (base)"] if base else []), "prediction"]
    examples = [[str(i + 1), item.prompt.text, reference, *([base[i]] if base else []), tuned[i]]
                for i, (item, reference) in enumerate(zip(items, references))]
    page = [f"# Evaluation of `{generator.path}` on `{args.input_file}` ({len(items)} examples)", ""]
    if base is not None:
        page += [f"before: `{generator.base_name}`, after: `{generator.path}`", ""]
    page += [table, "", *markdown.table(header, examples)]
    metrics_file.with_suffix(".md").write_text("\n".join(page) + "\n", encoding="utf-8")
    for result, suffix in ((scored, "confusion"), (base_scored, "confusion_base")):
        if result is not None and result.confusion is not None:
            plot_confusion_matrix(result.confusion, metrics_file.with_name(f"{metrics_file.stem}_{suffix}.png"))
    logger.info("wrote %s, %s and %s", output, metrics_file, metrics_file.with_suffix(".md"))
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO,
                        stream=sys.stderr)
    try:
        names = args.metrics or DEFAULT_METRICS + (",accuracy" if args.labels else "")
        labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
        try:
            resolve_metric_names(names)  # unknown metric names fail before the model loads
        except ValueError as error:
            raise GenerateError(f"--metrics: {error}") from None
        if args.system is None:
            args.system = training_system_prompt(args.model)
        items = read_items(args.input_file, args.system, args.max_prompts)
        if args.references is not None:
            references = read_references(args.references, len(items))
        else:
            missing = [i + 1 for i, item in enumerate(items) if item.prompt.reference is None]
            if missing:
                raise GenerateError(f"{args.input_file}: prompt(s) {missing[:10]} have no answer to score against; "
                                    "give --references")
            references = [item.prompt.reference for item in items]
        generator = Generator(args)
        base = generator.answer(generator.base, items) if generator.base is not None else None
        tuned = generator.answer(generator.model, items)
        try:
            scored = compute_metrics(names, tuned, references, labels)
            base_scored = compute_metrics(names, base, references, labels) if base is not None else None
        except ValueError as error:  # e.g. a reference outside --labels
            raise GenerateError(str(error)) from None
        print(_report(args, generator, items, references, tuned, scored, base, base_scored))
        return 0
    except (UserError, OSError) as error:
        return report_user_error(error)


if __name__ == "__main__":
    sys.exit(main())
