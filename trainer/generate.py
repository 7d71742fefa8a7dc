"""Talk to a trained model with the prompt format it was trained on: interactively, over a test file, or side
by side with its base model.

``python trainer/generate.py --model OUTPUT_DIR [--checkpoint latest|N|PATH] [--input_file tests.json
--output_file results.txt] [--compare base|MODEL]``

``--model`` is a model folder, an adapter folder, or a run's output folder; ``--checkpoint`` picks one of that
run's checkpoints like the Tang notebook's checkpoint picker (an unknown one lists those available). Prompts are
rendered by the chat template saved with the tokenizer at training time, and generation stops at the
end-of-turn token training labelled, so the replies are what the fine-tune learnt, not a formatting accident.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package from the repo root, not from trainer/
    sys.path[0] = str(Path(__file__).resolve().parents[1])
if sys.argv[1:] in (["-h"], ["--help"]):  # the rendered help, before the heavy imports (trainer/console/fast_help.py)
    from trainer.console.fast_help import serve_help

    serve_help("trainer/generate.py", "trainer.generate:build_parser")

import argparse
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.trainer_utils import set_seed

from trainer import markdown
from trainer.checkpoints import complete_checkpoints
from trainer.console.errors import report_user_error
from trainer.data.formats import iter_records
from trainer.data.prompts import Prompt, read_prompts, to_prompt
from trainer.data.templates import resolve_template
from trainer.errors import UserError
from trainer.inference import adapter_base, is_adapter, is_model, load_for_inference
from trainer.merge import DTYPES, stop_token_ids
from trainer.model import resize_for_tokenizer
from trainer.run_config import read_run_config
from trainer.sampling import NO_REPEAT_NGRAM_SIZE, default_generation_config, generate_replies

logger = logging.getLogger("generate")

DEFAULT_MAX_NEW_TOKENS = 128  # for a model that no run of this trainer wrote (no run_config.json)


class GenerateError(UserError, ValueError):
    pass


# ------------------------------------------------------------------ which model


def _checkpoint_listing(run_dir: Path) -> str:
    complete = [p.name for p in complete_checkpoints(run_dir)]
    incomplete = sorted(
        (p.name for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name not in complete),
        key=lambda name: int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else -1,
    )
    text = f"complete checkpoints in {run_dir}: {', '.join(complete) or 'none'}"
    if incomplete:
        text += f" (incomplete, not used: {', '.join(incomplete)})"
    return text


def resolve_model_path(model: str | Path, checkpoint: str | None = None) -> Path:
    """The folder to load: ``model`` itself, or the checkpoint of the run in ``model`` that ``checkpoint`` names.

    ``latest`` is the newest complete checkpoint (one the trainer finished writing), ``N`` is ``checkpoint-N``,
    anything else a path (relative to ``model`` unless absolute).
    """
    run_dir = Path(model)
    if checkpoint is None:
        if is_adapter(run_dir) or is_model(run_dir):
            return run_dir
        if run_dir.is_dir() and complete_checkpoints(run_dir):
            raise GenerateError(f"--model {run_dir}: no final model there (unfinished run?); pass --checkpoint "
                                f"latest or one of them; {_checkpoint_listing(run_dir)}")
        raise GenerateError(f"--model {run_dir}: neither a model folder (config.json) nor an adapter folder "
                            "(adapter_config.json)")
    if checkpoint == "latest":
        found = complete_checkpoints(run_dir)
        if not found:
            raise GenerateError(f"--checkpoint latest: {_checkpoint_listing(run_dir)}")
        return found[-1]
    candidate = run_dir / f"checkpoint-{checkpoint}" if checkpoint.isdigit() else run_dir / checkpoint
    if not (is_adapter(candidate) or is_model(candidate)):
        raise GenerateError(f"--checkpoint {checkpoint}: no model or adapter at {candidate}; "
                            f"{_checkpoint_listing(run_dir)}")
    return candidate


def load_base_for_comparison(spec: str, finetuned_path: Path, tokenizer: PreTrainedTokenizerBase,
                             dtype: torch.dtype | None) -> tuple[PreTrainedModel, str]:
    """The "before" model: ``base`` = the adapter's own base, else a model or adapter folder / hub id.

    It is grown to the fine-tuned tokenizer exactly as training grew it at step 0, so both models answer the same
    token ids, rendered by the same (training) chat template. Returns the model and what it was loaded from.
    """
    if spec == "base":
        recorded = (read_run_config(finetuned_path) or {}).get("base_model")
        if is_adapter(finetuned_path):
            spec = adapter_base(finetuned_path)
        elif recorded:
            spec = recorded  # the run's own record of its base (the folder a built-in model was built in)
        else:
            raise GenerateError("--compare base: neither an adapter nor a run folder recording its base model; pass "
                                "the base model's folder or hub id instead")
    if is_adapter(spec):
        model, _ = load_for_inference(spec, dtype=dtype)
        return model, spec
    model = AutoModelForCausalLM.from_pretrained(spec, dtype="auto" if dtype is None else dtype)
    resize_for_tokenizer(model, tokenizer)
    return model.eval(), spec


# ------------------------------------------------------------------ prompts and outputs


@dataclass
class Item:
    prompt: Prompt
    label: str  # what a results.txt line shows before the prediction: the record's "input", else the user message


def read_items(path: Path, system: str | None, limit: int | None) -> list[Item]:
    prompts = read_prompts(path, system, limit)
    records = [record for _, record in iter_records(path)]
    labels = [r.get("input") if isinstance(r, dict) and r.get("input") else None for r in records]
    return [Item(p, labels[i] or p.text) for i, p in enumerate(prompts)]


def one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


def write_results(items: list[Item], predictions: list[str], output_file: Path,
                  base_predictions: list[str] | None = None) -> list[Path]:
    """``results.txt`` lines ``N. <input><prediction>`` (as the Tang notebook writes) plus a JSON-lines twin.

    The text file keeps one line per prompt (newlines in a reply become spaces); the ``.jsonl`` keeps the exact
    prompt messages, prediction and reference. A ``.jsonl`` output_file gets only the JSON lines.
    """
    output_file.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if output_file.suffix != ".jsonl":
        lines = [f"{i + 1}. {one_line(item.label)}{one_line(pred)}" for i, (item, pred) in
                 enumerate(zip(items, predictions))]
        output_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(output_file)
    jsonl = output_file.with_suffix(".jsonl")
    with jsonl.open("w", encoding="utf-8") as f:
        for i, (item, pred) in enumerate(zip(items, predictions)):
            row = {"index": i + 1, "prompt": item.prompt.messages, "input": item.label, "prediction": pred}
            if base_predictions is not None:
                row["base"] = base_predictions[i]
            row["reference"] = item.prompt.reference
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    written.append(jsonl)
    return written


def comparison_table(items: list[Item], base: list[str], tuned: list[str], base_name: str, tuned_name: str) -> str:
    """Markdown: prompt, base model's reply, fine-tuned reply (and the reference where the data has one)."""
    has_reference = any(item.prompt.reference for item in items)
    header = ["#", "prompt", "before (base)", "after (fine-tuned)"] + (["reference"] if has_reference else [])
    rows = [[str(i + 1), item.prompt.text, base[i], tuned[i], *([item.prompt.reference] if has_reference else [])]
            for i, item in enumerate(items)]
    lines = ["# Before / after fine-tuning", "", f"- before: `{base_name}`", f"- after: `{tuned_name}`", "",
             *markdown.table(header, rows)]
    return "\n".join(lines) + "\n"


def stdin_prompts(stream: Iterable[str], system: str | None) -> Iterable[Item]:
    for line in stream:
        line = line.strip()
        if line:
            yield Item(to_prompt([{"role": "user", "content": line}], system), line)


# ------------------------------------------------------------------ command line


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which model answers (shared with ``evaluate.py``)."""
    which = parser.add_argument_group("model")
    which.add_argument("--model", required=True,
                       help="Model folder, adapter folder, or a training run's output_dir.")
    which.add_argument("--checkpoint", default=None,
                       help="Use a checkpoint of the run in --model: latest (newest complete one), N (checkpoint-N) "
                       "or a path relative to --model. An unknown one lists those available.")
    which.add_argument("--base_model", default=None,
                       help="Base model for an adapter, instead of the one recorded in adapter_config.json.")
    which.add_argument("--compare", default=None, metavar="BASE",
                       help="Before/after comparison against BASE: 'base' (the base model an adapter or a training run "
                       "recorded), or a model folder / hub id. Both models see the same prompts, rendered by the "
                       "fine-tuned tokenizer.")
    which.add_argument("--template", default="auto",
                       help="Chat template: auto (the one saved at training time) | chatml | llama2.")
    which.add_argument("--dtype", default="auto", choices=list(DTYPES),
                       help="Weights dtype. auto = as saved.")
    which.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """How replies are generated (transformers GenerationConfig; shared with ``evaluate.py``)."""
    gen = parser.add_argument_group("generation (transformers GenerationConfig)")
    gen.add_argument("--max_new_tokens", type=int, default=None,
                     help="Longest reply in tokens (default: the run's --sample_max_new_tokens, as its samples.md; "
                     f"{DEFAULT_MAX_NEW_TOKENS} for a model without a run_config.json).")
    gen.add_argument("--batch_size", type=int, default=16,
                     help="Prompts generated together (left-padded, similar lengths batched together).")
    gen.add_argument("--do_sample", action=argparse.BooleanOptionalAction, default=None,
                     help="Sample instead of greedy/beam decoding. Default: on when --temperature, --top_p or --top_k "
                     "is given, else off.")
    gen.add_argument("--temperature", type=float, default=None, help="Sampling temperature (notebook: 0.1).")
    gen.add_argument("--top_p", type=float, default=None, help="Nucleus sampling threshold (notebook: 0.3).")
    gen.add_argument("--top_k", type=int, default=None, help="Sample among the k likeliest tokens.")
    gen.add_argument("--no_repeat_ngram_size", type=int, default=None,
                     help=f"Never repeat an n-gram of this size (default {NO_REPEAT_NGRAM_SIZE}, as the notebook and "
                     "the run's samples; 0: off).")
    gen.add_argument("--repetition_penalty", type=float, default=None, help="Penalty > 1 discourages repeats.")
    gen.add_argument("--num_beams", type=int, default=None, help="Beam search width (1 = none).")
    gen.add_argument("--seed", type=int, default=42,
                     help="Seed set before each model generates, so sampled runs repeat and compare fairly.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer/generate.py",
        description="Generate with a fine-tuned model using its training chat template. Without --input_file or "
        "--prompt, reads one user message per line from stdin (interactive, or a pipe) and prints one reply per "
        "message. With --input_file, answers every record of a .json/.jsonl file (alpaca, sharegpt or messages) "
        "and writes results.txt-style lines plus a .jsonl. With --compare, the base model answers the same "
        "prompts first and a markdown before/after table is written. To score replies, see trainer/evaluate.py.",
    )
    add_model_options(parser)
    io = parser.add_argument_group("prompts and outputs")
    io.add_argument("--input_file", default=None, type=Path,
                    help="Prompts: .json/.jsonl records (e.g. Tang_testing_data.json); answers are kept as references.")
    io.add_argument("--output_file", default=None, type=Path,
                    help="results.txt: lines 'N. <input><prediction>' plus results.jsonl beside it; with --compare "
                    "also results_compare.md. Without it, replies go to stdout.")
    io.add_argument("--prompt", action="append", default=None,
                    help="A user message to answer (repeatable), instead of --input_file or stdin.")
    io.add_argument("--max_prompts", type=int, default=None, help="Use only the first N prompts of --input_file.")
    io.add_argument("--system", default=None,
                    help="System prompt for prompts that have none (default: the one training used, from the run's "
                    "run_config.json).")
    add_generation_options(parser)
    return parser


def generation_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """The settings of :func:`~trainer.sampling.default_generation_config` (those of the run's samples) with the
    options given; ``--max_new_tokens`` defaults to the run's ``sample_max_new_tokens``."""
    max_new_tokens = args.max_new_tokens or training_max_new_tokens(args.model)
    return default_generation_config(
        tokenizer, max_new_tokens, do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, no_repeat_ngram_size=args.no_repeat_ngram_size, num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty,
    )


class Generator:
    """One loaded model (+ optional base for comparison) answering prompts with a fixed configuration."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.path = resolve_model_path(args.model, args.checkpoint)
        dtype = DTYPES[args.dtype]
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        logger.info("loading %s", self.path)
        self.model, self.tokenizer = load_for_inference(self.path, device=device, dtype=dtype,
                                                        base_model=args.base_model)
        self.tokenizer.chat_template = resolve_template(args.template, self.tokenizer)
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.config = generation_config(args, self.tokenizer)
        self.base, self.base_name = None, None
        if args.compare:
            set_seed(args.seed)  # new embedding rows of a grown base are drawn at random
            self.base, self.base_name = load_base_for_comparison(args.compare, self.path, self.tokenizer, dtype)
            self.base.to(device)
            logger.info("comparing with %s", self.base_name)

    def answer(self, model: PreTrainedModel, items: list[Item]) -> list[str]:
        set_seed(self.args.seed)
        return generate_replies(model, self.tokenizer, [i.prompt for i in items], self.config, self.stop_ids,
                                batch_size=self.args.batch_size)

    def run_file(self, items: list[Item]) -> int:
        base = self.answer(self.base, items) if self.base is not None else None
        tuned = self.answer(self.model, items)
        output = self.args.output_file
        if output is not None:
            for path in write_results(items, tuned, output, base):
                print(path)
        else:
            for i, (item, pred) in enumerate(zip(items, tuned)):
                print(f"{i + 1}. {one_line(item.label)}{one_line(pred)}")
        if base is not None:
            table = comparison_table(items, base, tuned, self.base_name, str(self.path))
            if output is not None:
                compare = output.with_name(output.stem + "_compare.md")
                compare.write_text(table, encoding="utf-8")
                print(compare)
            else:
                print(table)
        return 0

    def run_interactive(self) -> int:
        """One user message per stdin line. From a pipe, each reply is one line too (newlines become spaces),
        so replies line up with the input lines."""
        tty = sys.stdin.isatty()
        show = (lambda text: text) if tty else one_line
        if tty:
            print(f"{self.path}: type a message, Enter to send, Ctrl-D to quit.", file=sys.stderr)
        while True:
            if tty:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return 0
            items = list(stdin_prompts([line], self.args.system))
            if not items:
                continue
            if self.base is not None:
                print(f"[before] {show(self.answer(self.base, items)[0])}")
                print(f"[after] {show(self.answer(self.model, items)[0])}", flush=True)
            else:
                print(show(self.answer(self.model, items)[0]), flush=True)


def training_max_new_tokens(model: str | Path) -> int:
    """The ``--sample_max_new_tokens`` a run's before/after samples were generated with, else the default."""
    config = read_run_config(model) or {}
    return int(config.get("data", {}).get("sample_max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)


def training_system_prompt(model: str | Path) -> str | None:
    """The ``--system`` a run was trained with: prompts should look as they did in training."""
    config = read_run_config(model)
    system = (config or {}).get("data", {}).get("system")
    if system:
        logging.getLogger(__name__).info("system prompt from the training run: %r", system)
    return system


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO,
                        stream=sys.stderr)
    try:
        if args.input_file is not None and args.prompt:
            raise GenerateError("give --input_file or --prompt, not both")
        if args.system is None:
            args.system = training_system_prompt(args.model)
        items = None
        if args.input_file is not None:
            items = read_items(args.input_file, args.system, args.max_prompts)
        elif args.prompt:
            items = [Item(to_prompt([{"role": "user", "content": p}], args.system), p) for p in args.prompt]
        generator = Generator(args)
        return generator.run_file(items) if items is not None else generator.run_interactive()
    except (UserError, OSError) as error:
        return report_user_error(error)


if __name__ == "__main__":
    sys.exit(main())
