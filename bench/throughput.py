"""Useful-token throughput on CPU: our packed pipeline vs the notebook-style padded trainer vs TRL's packed SFT.

Run from the repo root (about 8 minutes on 2 cores with the defaults)::

    python bench/throughput.py                      # data from ../shared/data/tang/ (or $SFT_DATA_DIR/tang/)
    python bench/throughput.py --data PATH.json --repeats 5 --contenders ours,baseline

Why "useful tokens": the contenders do different amounts of work per optimizer step. A padded row of 256 holds one
~153-token example, a packed row ~1.7 of them; and the notebook's collator trains on the prompt as well as the answer.
So the headline figure is *answer tokens trained per second*: positions whose label is an answer token (the
assistant's text and its end-of-turn marker) and is not -100 in the batch that reaches the model. All tokens with a
label, real tokens, and slots incl. padding are reported beside it.

Every contender trains the same tiny Llama (built once from the Tang texts, loaded from one folder), on the same first
``--examples`` records, for the same number of optimizer steps with the same per-device batch (rows), optimizer, lr and
seed, in its own fresh subprocess (peak RSS is that child's alone), alternately, ``--repeats`` times; medians are
reported. Timing excludes the first ``--warmup-steps`` steps (allocator and thread-pool warm-up).

Contenders:

* ``ours``: ``trainer.sft.main`` with the llama2 template and the Tang system prompt, packing into rows of 256.
* ``ours-1024``: the same with rows of 1024 and one row per step (the same 1024 token slots per step).
* ``baseline``: the notebook's data path: ``tokenizer(prompt + " " + output + "</s>", truncation=True,
  max_length=257, padding="max_length")[:-1]``, pad = eos, ``DataCollatorForLanguageModeling(mlm=False)`` (which
  recomputes labels from ``input_ids``: prompt tokens are trained and every eos, the real one included, is not),
  plain ``transformers.Trainer``.
* ``trl``: ``trl.SFTTrainer`` with ``packing=True, max_length=256`` (best-fit decreasing, padding-free: each micro-batch
  flattened into one row with position ids) on a conversational prompt/completion dataset, so its loss is on the
  completion only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness import add_quiet_options, machine, pooled_report, wait_for_quiet

PACKAGES = ("torch", "transformers", "datasets", "trl")  # whose versions the report records
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SYSTEM = "You are a helpful assistant and good at writing Tang poem. 你是一個樂於助人的助手且擅長寫唐詩。"
CONTENDERS = ("ours", "baseline", "trl", "ours-1024")
IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------------------------------
# What every child measures
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StepCounts:
    """Token counts of one optimizer step, read from the tensors the model is called with."""

    slots: int = 0  # input_ids.numel(): what the hardware computes on
    tokens: int = 0  # real tokens (slots minus padding)
    label_tokens: int = 0  # labels != -100
    answer_tokens: int = 0  # labels != -100 on answer positions: the useful work
    rows: int = 0

    def add(self, other: StepCounts) -> None:
        for name in ("slots", "tokens", "label_tokens", "answer_tokens", "rows"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class ChildResult:
    contender: str
    steps: int
    timed_steps: int
    train_s: float
    prep_s: float
    counts: StepCounts
    examples_in_data: int
    rows_in_data: int
    final_loss: float | None
    isolation_max_abs_logit_diff: float | None
    isolation_check_s: float
    cpu_utilisation: float  # process CPU seconds / wall seconds over the timed window: ~2 on 2 free cores
    notes: list[str] = field(default_factory=list)


def data_file(explicit: str | None) -> Path:
    """``--data``, else ``$SFT_DATA_DIR/tang/``, else ``../shared/data/tang/`` next to the repo."""
    if explicit:
        return Path(explicit)
    base = Path(os.environ["SFT_DATA_DIR"]) if os.environ.get("SFT_DATA_DIR") else REPO.parent / "shared" / "data"
    return base / "tang" / "Tang_training_data.json"


def trailing_padding(input_ids, pad_id: int, eos_id: int):
    """Padding positions per row: the trailing run of ``pad_id``; when pad is eos, the first of the run is real."""
    import torch

    is_pad = (input_ids == pad_id).flip(-1).int()
    run = torch.cumprod(is_pad, dim=-1).sum(-1)  # length of the trailing run of pad ids
    if pad_id == eos_id:
        run = (run - 1).clamp(min=0)
    return run


def count_batch(kwargs: dict, pad_id: int, eos_id: int, answer_mask: Callable | None) -> StepCounts:
    """Counts for one forward call; ``answer_mask(input_ids)`` marks answer positions when labels cover more."""
    input_ids, labels = kwargs["input_ids"], kwargs["labels"]
    labelled = labels != IGNORE_INDEX
    answers = labelled & answer_mask(input_ids) if answer_mask is not None else labelled
    padding = int(trailing_padding(input_ids, pad_id, eos_id).sum())
    return StepCounts(slots=input_ids.numel(), tokens=input_ids.numel() - padding, label_tokens=int(labelled.sum()),
                      answer_tokens=int(answers.sum()), rows=input_ids.shape[0])


def isolation_check(model, kwargs: dict) -> float:
    """Max |logit difference| between a packed batch and its examples run one by one (0 = perfectly isolated).

    Only rows with position ids are checked; every example restarts its position ids at 0.
    """
    import torch

    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return float("nan")
    inputs = {k: v for k, v in kwargs.items() if k not in ("labels", "fused_lm_head")}
    inputs["use_cache"] = False
    with torch.no_grad():
        packed = model(**inputs).logits
        worst = 0.0
        for r in range(position_ids.shape[0]):
            starts = (position_ids[r] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
            for a, b in zip(starts[:-1], starts[1:]):
                alone = model(input_ids=kwargs["input_ids"][r : r + 1, a:b], use_cache=False).logits
                worst = max(worst, float((alone[0] - packed[r, a:b]).abs().max()))
    return worst


class Meter:
    """Counts tokens at the model's forward and timestamps every optimizer step (a TrainerCallback + a hook).

    Counting at the forward, not in the collator, matters: accelerate's data loader fetches one batch ahead, so
    collator-side counts would belong to the wrong step.
    """

    def __init__(self, pad_id: int, eos_id: int, answer_mask: Callable | None = None, check_isolation: bool = True):
        self.pad_id, self.eos_id, self.answer_mask = pad_id, eos_id, answer_mask
        self.check_isolation = check_isolation
        self.pending = StepCounts()
        self.steps: list[tuple[float, float, StepCounts]] = []
        self.isolation: float | None = None
        self.isolation_s = 0.0
        self._busy = False

    def hook(self, module, args: tuple, kwargs: dict) -> None:
        if self._busy or not module.training or "labels" not in kwargs:
            return
        self.pending.add(count_batch(kwargs, self.pad_id, self.eos_id, self.answer_mask))
        if self.check_isolation and self.isolation is None:
            self._busy = True  # the check calls the model again: do not count those calls
            start = time.perf_counter()
            try:
                self.isolation = isolation_check(module, kwargs)
            finally:
                self._busy = False
                self.isolation_s = time.perf_counter() - start

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _StepClock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                meter.steps.append((time.perf_counter(), time.process_time(), meter.pending))
                meter.pending = StepCounts()

        return _StepClock()

    def window(self, warmup: int) -> tuple[float, StepCounts, int, float]:
        """Seconds, counts, number and CPU utilisation of the steps after ``warmup``."""
        if len(self.steps) <= warmup:
            raise RuntimeError(f"only {len(self.steps)} steps ran; need more than --warmup-steps {warmup}")
        total = StepCounts()
        for _, _, counts in self.steps[warmup + 1 :]:
            total.add(counts)
        (wall0, cpu0, _), (wall1, cpu1, _) = self.steps[warmup], self.steps[-1]
        return wall1 - wall0, total, len(self.steps) - warmup - 1, (cpu1 - cpu0) / (wall1 - wall0)


def instrument(trainer_cls: type, meter: Meter) -> type:
    """A subclass of ``trainer_cls`` that registers the meter's hook and callback; behaviour is otherwise unchanged."""

    class Instrumented(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model.register_forward_pre_hook(meter.hook, with_kwargs=True)
            self.add_callback(meter.callback())

    Instrumented.__name__ = trainer_cls.__name__
    return Instrumented


def final_loss(log_history: list[dict]) -> float | None:
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return losses[-1] if losses else None


def timed(fn: Callable, clock: list[float]) -> Callable:
    """Wrap ``fn`` so that its run time is added to ``clock[0]``."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[0] += time.perf_counter() - start

    return wrapper


# --------------------------------------------------------------------------------------------------------------------
# Contenders (each runs in its own child process)
# --------------------------------------------------------------------------------------------------------------------


def training_options(spec: dict) -> dict:
    """The hyper-parameters every contender shares: they make the step comparable, not the data per step."""
    return dict(
        max_steps=spec["steps"], per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1,
        learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        seed=42, logging_steps=10, save_strategy="no", report_to="none", dataloader_num_workers=0,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, disable_tqdm=True,
    )


def run_ours(spec: dict) -> ChildResult:
    """Our real entry point, ``trainer.sft.main``, with an instrumented ``SFTTrainer`` swapped in."""
    import yaml

    import trainer.sft as sft

    tokenizer = _load_tokenizer(spec["model"])
    meter = Meter(tokenizer.pad_token_id, tokenizer.eos_token_id)
    sft.SFTTrainer = instrument(sft.SFTTrainer, meter)
    prep = [0.0]
    built = {}
    prepare = timed(sft.prepare, prep)  # the whole data half: read, template, tokenise, pack (in a fresh cache)

    def prepare_and_keep(*args, **kwargs):
        built["data"] = prepare(*args, **kwargs)
        return built["data"]

    sft.prepare = prepare_and_keep
    options = training_options(spec)
    recipe = {
        "model_name_or_path": spec["model"], "dataset": spec["data"], "template": "llama2", "system": SYSTEM,
        "max_length": spec["max_length"], "packing": True, "finetuning_type": "full", "attn_implementation": "sdpa",
        "output_dir": spec["output_dir"], "overwrite_output_dir": True, "sample_prompts": "none",
        "prepared_data_dir": str(Path(spec["output_dir"]).with_suffix(".prepared")),
        "global_batch_size": spec["batch_size"], **options,
    }
    recipe.pop("use_cpu")  # a CPU-only machine: the entry point picks the device itself
    recipe_file = Path(spec["output_dir"]).with_suffix(".yaml")
    recipe_file.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    if sft.main([str(recipe_file)]) != 0:
        raise RuntimeError("trainer.sft.main failed")
    data = built["data"]
    state = json.loads((Path(spec["output_dir"]) / "trainer_state.json").read_text())
    return _result(spec, meter, prep[0], data.report.train_examples, len(data.train), final_loss(state["log_history"]))


def _load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _load_model(folder: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)


def _result(spec: dict, meter: Meter, prep_s: float, examples: int, rows: int, loss: float | None,
            notes: list[str] | None = None) -> ChildResult:
    train_s, counts, timed_steps, cpu = meter.window(spec["warmup_steps"])
    return ChildResult(spec["contender"], len(meter.steps), timed_steps, train_s, prep_s, counts, examples, rows, loss,
                       meter.isolation, meter.isolation_s, cpu, notes or [])


def notebook_prompt(record: dict) -> str:
    """The notebook's prompt, verbatim (``[INST] <<SYS>>`` block, instruction and input on their own lines)."""
    return f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{record['instruction']}\n{record['input']}\n[/INST]"


def notebook_example(record: dict, tokenizer, cutoff: int) -> dict:
    """``generate_training_data`` of the notebook, including its quirks (see the module docstring)."""
    prompt = notebook_prompt(record)
    len_user_prompt_tokens = len(
        tokenizer(prompt, truncation=True, max_length=cutoff + 1, padding="max_length")["input_ids"]
    ) - 1  # always == cutoff: the padded length, not the prompt's (the notebook's bug; its collator hides it)
    full_tokens = tokenizer(prompt + " " + record["output"] + "</s>", truncation=True, max_length=cutoff + 1,
                            padding="max_length")["input_ids"][:-1]
    return {
        "input_ids": full_tokens,
        "labels": [IGNORE_INDEX] * len_user_prompt_tokens + full_tokens[len_user_prompt_tokens:],
        "attention_mask": [1] * len(full_tokens),
    }


def prompt_end_marker(tokenizer) -> list[int]:
    """Token ids of ``[/INST]`` as they appear at the end of the notebook prompt."""
    probe = tokenizer("x\n[/INST]", add_special_tokens=False)["input_ids"]
    alone = tokenizer("x\n", add_special_tokens=False)["input_ids"]
    return probe[len(alone) :]


def answer_mask_after(marker: list[int]) -> Callable:
    """Positions after the first ``marker`` in each row: the answer of a notebook-style (one example per row) row."""
    import torch

    def mask(input_ids):
        out = torch.zeros_like(input_ids, dtype=torch.bool)
        m = len(marker)
        for r, row in enumerate(input_ids.tolist()):
            for i in range(len(row) - m + 1):
                if row[i : i + m] == marker:
                    out[r, i + m :] = True
                    break
        return out

    return mask


def run_baseline(spec: dict) -> ChildResult:
    """The notebook's data path with a plain ``transformers.Trainer``."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    start = time.perf_counter()
    tokenizer = _load_tokenizer(spec["model"])
    tokenizer.pad_token = tokenizer.eos_token  # as in the notebook
    records = json.loads(Path(spec["data"]).read_text(encoding="utf-8"))
    dataset = Dataset.from_list(records).map(
        notebook_example, fn_kwargs={"tokenizer": tokenizer, "cutoff": spec["max_length"]},
        remove_columns=["instruction", "input", "output"],
    )
    prep_s = time.perf_counter() - start
    marker = prompt_end_marker(tokenizer)
    meter = Meter(tokenizer.pad_token_id, tokenizer.eos_token_id, answer_mask_after(marker), check_isolation=False)
    trainer = instrument(Trainer, meter)(
        model=_load_model(spec["model"]),
        args=TrainingArguments(output_dir=spec["output_dir"], **training_options(spec)),
        train_dataset=dataset, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    notes = [f"prompt end marker [/INST] = ids {marker}"]
    return _result(spec, meter, prep_s, len(dataset), len(dataset), final_loss(trainer.state.log_history), notes)


def trl_record(record: dict) -> dict:
    """Conversational prompt/completion: TRL then masks the prompt (completion-only loss) by itself."""
    user = record["instruction"] + (f"\n{record['input']}" if record["input"] else "")
    return {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        "completion": [{"role": "assistant", "content": record["output"]}],
    }


def run_trl(spec: dict) -> ChildResult:
    """``trl.SFTTrainer`` with packing on the same tokenizer, chat template (llama2) and model."""
    import trl
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trainer.data.templates import BUILTIN_TEMPLATES

    prep = [0.0]
    start = time.perf_counter()
    tokenizer = _load_tokenizer(spec["model"])
    tokenizer.chat_template = BUILTIN_TEMPLATES["llama2"]
    records = json.loads(Path(spec["data"]).read_text(encoding="utf-8"))
    dataset = Dataset.from_list([trl_record(r) for r in records])
    prep[0] += time.perf_counter() - start
    SFTTrainer._prepare_dataset = timed(SFTTrainer._prepare_dataset, prep)
    meter = Meter(tokenizer.pad_token_id, tokenizer.eos_token_id)
    config = SFTConfig(output_dir=spec["output_dir"], packing=True, max_length=spec["max_length"],
                       **training_options(spec))
    trainer = instrument(SFTTrainer, meter)(model=_load_model(spec["model"]), args=config, train_dataset=dataset,
                                             processing_class=tokenizer)
    trainer.train()
    notes = [f"trl {trl.__version__}: packing_strategy={config.packing_strategy}, padding_free={trainer.padding_free},"
             f" completion_only_loss={trainer.completion_only_loss}"]
    return _result(spec, meter, prep[0], len(records), len(trainer.train_dataset),
                   final_loss(trainer.state.log_history), notes)


def child_main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    runner = {"ours": run_ours, "ours-1024": run_ours, "baseline": run_baseline, "trl": run_trl}[spec["contender"]]
    result = runner(spec)
    Path(spec["result"]).write_text(json.dumps(asdict(result)))


# --------------------------------------------------------------------------------------------------------------------
# Parent: build the shared model and data once, run the children alternately, summarise
# --------------------------------------------------------------------------------------------------------------------


def prepare(data: Path, examples: int, work: Path) -> tuple[Path, Path]:
    """The first ``examples`` records as one file, and the tiny model (shared by all).

    Its tokenizer is trained on the whole file, as a run on the full data set would build it: a tokenizer trained on
    a small subset fits those texts unusually well, which makes examples shorter and padding larger than real.
    """
    records = json.loads(data.read_text(encoding="utf-8"))
    subset = work / "tang_subset.json"
    subset.write_text(json.dumps(records[:examples], ensure_ascii=False), encoding="utf-8")
    os.environ["SFT_CACHE_DIR"] = str(work / "model-cache")
    from trainer.tiny import build_tiny_model

    texts = [SYSTEM]
    for r in records:
        texts += [r["instruction"] + (f"\n{r['input']}" if r["input"] else ""), r["output"]]
    return subset, build_tiny_model("builtin:tiny-llama", texts, seed=42)


def contender_spec(name: str, args: argparse.Namespace, model: Path, subset: Path, work: Path, run_id: str) -> dict:
    wide = name == "ours-1024"  # one row of 1024 per step: the same token slots per step as 4 rows of 256
    return {
        "contender": name, "model": str(model), "data": str(subset), "steps": args.steps,
        "warmup_steps": args.warmup_steps, "batch_size": 1 if wide else args.batch_size,
        "max_length": 1024 if wide else args.max_length, "output_dir": str(work / run_id),
        "result": str(work / f"{run_id}.json"),
    }


def run_child(spec: dict, work: Path, run_id: str) -> dict:
    """One contender in a fresh process; peak RSS from ``wait4`` is that child's alone."""
    spec_file = work / f"{run_id}.spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0",
           "SFT_CACHE_DIR": str(work / f"{run_id}-cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work / f"{run_id}-hf"), "PYTHONPATH": str(REPO)}
    log = (work / f"{run_id}.log").open("w")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec_file)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    log.close()
    if proc.returncode != 0:
        tail = (work / f"{run_id}.log").read_text()[-3000:]
        raise RuntimeError(f"{run_id} exited {proc.returncode}:\n{tail}")
    result = json.loads(Path(spec["result"]).read_text())
    # the isolation check (packed contenders only) is ours, not the contender's: keep it out of the wall time
    result.update(wall_s=wall - result["isolation_check_s"], peak_rss_mib=usage.ru_maxrss / 1024,
                  load_after=os.getloadavg()[0])
    return result


def rates(run: dict) -> dict:
    """Per-second figures and the padding share of one run."""
    c, t = run["counts"], run["train_s"]
    return {
        "answer_tokens_per_s": c["answer_tokens"] / t, "label_tokens_per_s": c["label_tokens"] / t,
        "tokens_per_s": c["tokens"] / t, "slots_per_s": c["slots"] / t,
        "padding_share": 1 - c["tokens"] / c["slots"], "answer_share_of_slots": c["answer_tokens"] / c["slots"],
        "peak_rss_mib": run["peak_rss_mib"], "wall_s": run["wall_s"], "train_s": t, "prep_s": run["prep_s"],
        "cpu_utilisation": run["cpu_utilisation"], "load_before": run["load_before"], "load_after": run["load_after"],
    }


def clean(repeats: list[dict], min_cpu: float) -> list[dict]:
    """The runs that had both cores (CPU utilisation >= ``min_cpu``); all of them when none did.

    A run that competed with other processes is slower by an arbitrary factor (2-5x seen on 2 cores): mixing it into a
    median of three moves the median. Such runs stay in the JSON, listed, but out of the medians.
    """
    good = [r for r in repeats if r["cpu_utilisation"] >= min_cpu]
    return good or repeats


def summarise(runs: dict[str, list[dict]], min_cpu: float) -> dict[str, dict]:
    """Medians (and min/max) over the uncontended repeats for every figure."""
    out = {}
    for name, all_repeats in runs.items():
        repeats = clean(all_repeats, min_cpu)
        per_run = [rates(r) for r in repeats]
        out[name] = {key: {"median": statistics.median(p[key] for p in per_run), "min": min(p[key] for p in per_run),
                           "max": max(p[key] for p in per_run)} for key in per_run[0]}
        first = repeats[0]
        out[name]["info"] = {"examples_in_data": first["examples_in_data"], "rows_in_data": first["rows_in_data"],
                             "steps": first["steps"], "timed_steps": first["timed_steps"],
                             "final_loss": [r["final_loss"] for r in repeats],
                             "isolation_max_abs_logit_diff": first["isolation_max_abs_logit_diff"],
                             "runs_in_median": len(repeats), "runs": len(all_repeats),
                             "notes": first["notes"]}
    return out


def ratios(summary: dict[str, dict]) -> list[dict]:
    """ours*/baseline and ours*/trl on medians; prep time as ours over other (lower is better there)."""
    rows = []
    for ours in (n for n in summary if n.startswith("ours")):
        for other in (n for n in ("baseline", "trl") if n in summary):
            med = {k: summary[n] for k, n in (("a", ours), ("b", other))}
            rows.append({
                "pair": f"{ours} / {other}",
                **{key: med["a"][key]["median"] / med["b"][key]["median"]
                   for key in ("answer_tokens_per_s", "label_tokens_per_s", "tokens_per_s", "prep_s", "peak_rss_mib")},
            })
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    s, cfg, m = report["summary"], report["config"], report["machine"]
    lines = [
        f"# CPU throughput, {report['date']}",
        "",
        f"Machine: {m['nproc']} cores, {m['cpu']}; torch {m['torch']}, transformers {m['transformers']}, "
        f"datasets {m['datasets']}, trl {m['trl']}. Load average before/after: {report['load_before']} / "
        f"{report['load_after']}.",
        f"Setup: tiny Llama built from the Tang texts, first {cfg['examples']} Tang records, {cfg['steps']} optimizer "
        f"steps ({cfg['warmup_steps']} warm-up steps not timed), {cfg['batch_size']} rows per step "
        f"(ours-1024: 1 row of 1024), OMP_NUM_THREADS=2, {cfg['repeats']} alternated repeats; medians over the runs "
        f"that had both cores (CPU util >= {cfg['min_cpu']}; 'runs' column: used/all).",
        "",
        "| contender | answer tok/s | label tok/s | real tok/s | slots/s | padding | peak RSS MiB | train s | wall s "
        "| data prep s | isolation | CPU util | load at start | runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in s.items():
        iso = row["info"]["isolation_max_abs_logit_diff"]
        lines.append(
            f"| {name} | {row['answer_tokens_per_s']['median']:,.0f} | {row['label_tokens_per_s']['median']:,.0f} | "
            f"{row['tokens_per_s']['median']:,.0f} | {row['slots_per_s']['median']:,.0f} | "
            f"{row['padding_share']['median']:.1%} | {row['peak_rss_mib']['median']:,.0f} | "
            f"{row['train_s']['median']:.1f} | {row['wall_s']['median']:.1f} | {row['prep_s']['median']:.2f} | "
            f"{'n/a' if iso is None else f'{iso:.1e}'} | {row['cpu_utilisation']['median']:.2f} | "
            f"{row['load_before']['min']:.2f}-{row['load_before']['max']:.2f} | "
            f"{row['info']['runs_in_median']}/{row['info']['runs']} |"
        )
    lines += ["", "| ratio | answer tok/s | label tok/s | real tok/s | data prep time (lower = faster) | peak RSS |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in report["ratios"]:
        lines.append(f"| {r['pair']} | {r['answer_tokens_per_s']:.2f}x | {r['label_tokens_per_s']:.2f}x | "
                     f"{r['tokens_per_s']:.2f}x | {r['prep_s']:.2f}x | {r['peak_rss_mib']:.2f}x |")
    lines += ["", "answer tok/s: labelled answer tokens (answer text + end-of-turn) trained per second, the useful "
              "work. label tok/s: every position with a label (the notebook's collator also labels the prompt). "
              "isolation: max |logit| difference between a packed batch and its examples run alone. "
              "CPU util: process CPU s / wall s while training (about 2 when both cores were free; lower: the run "
              "was competing).", ""]
    for name, row in s.items():
        for note in row["info"]["notes"]:
            lines.append(f"- {name}: {note}")
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    """Bars of useful (answer) and all real tokens per second, medians with min-max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    names = list(s)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "answer_tokens_per_s", "answer tokens trained / s (useful)"),
                           (axes[1], "tokens_per_s", "real tokens / s (excl. padding)")):
        med = [s[n][key]["median"] for n in names]
        err = [[m - s[n][key]["min"] for n, m in zip(names, med)], [s[n][key]["max"] - m for n, m in zip(names, med)]]
        colors = ["#2a7" if n.startswith("ours") else "#999" for n in names]
        bars = ax.bar(names, med, yerr=err, capsize=4, color=colors)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"tiny Llama on Tang, CPU ({report['machine']['nproc']} cores), {report['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="alpaca JSON (default: $SFT_DATA_DIR/tang/ or ../shared/data/tang/"
                   "Tang_training_data.json)")
    p.add_argument("--examples", type=int, default=2000, help="first N records used by every contender")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--batch-size", type=int, default=4, help="rows per step (the notebook's MICRO_BATCH_SIZE)")
    p.add_argument("--max-length", type=int, default=256, help="row length (the notebook's CUTOFF_LEN)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma list of {', '.join(CONTENDERS)}")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON/markdown/PNG results")
    add_quiet_options(p)
    p.add_argument("--min-cpu", type=float, default=1.8,
                   help="runs below this CPU utilisation (process CPU s / wall s) were competing: out of the medians")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, outputs) for inspection")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    if args.from_json:
        report = pooled_report(args.from_json)  # same setup, more repeats
        report["config"]["min_cpu"] = args.min_cpu
        write_report(report, Path(args.out))
        return 0
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; choose from {CONTENDERS}")
    work = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    try:
        return _bench(args, names, work)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _bench(args: argparse.Namespace, names: list[str], work: Path) -> int:
    load_before = [round(x, 2) for x in os.getloadavg()]
    subset, model = prepare(data_file(args.data), args.examples, work)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for repeat in range(args.repeats):
        for name in names:
            run_id = f"{name}-{repeat}"
            load = wait_for_quiet(args.max_load, args.max_wait)
            result = run_child(contender_spec(name, args, model, subset, work, run_id), work, run_id)
            result["load_before"] = load
            runs[name].append(result)
            r = rates(result)
            print(f"{run_id:>12}: {r['answer_tokens_per_s']:8.0f} answer tok/s {r['label_tokens_per_s']:8.0f} label "
                  f"tok/s {r['tokens_per_s']:8.0f} tok/s, padding {r['padding_share']:.1%}, train {r['train_s']:.1f}s,"
                  f" wall {r['wall_s']:.1f}s, rss {r['peak_rss_mib']:.0f} MiB, load {r['load_before']:.2f}->"
                  f"{r['load_after']:.2f}, cpu {r['cpu_utilisation']:.2f}",
                  flush=True)
    report = {"date": dt.date.today().isoformat(), "machine": machine(PACKAGES), "load_before": load_before,
              "load_after": [round(x, 2) for x in os.getloadavg()],
              "config": {k: v for k, v in vars(args).items() if k not in ("child", "out", "keep", "data", "from_json")},
              "runs": runs}
    write_report(report, Path(args.out))
    return 0


def write_report(report: dict, out: Path) -> None:
    """Summary, ratios, JSON, markdown and chart from the raw runs (also used by --from-json to redo a report)."""
    report["summary"] = summarise(report["runs"], report["config"]["min_cpu"])
    report["ratios"] = ratios(report["summary"])
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{report['date']}-cpu-throughput"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    text = markdown(report)
    stem.with_suffix(".md").write_text(text, encoding="utf-8")
    chart(report, out / "throughput.png")
    print(text)


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(REPO))
    sys.exit(main())
