"""Every command of README.md and docs/ works when pasted, after the README's set-up, in order, on a CPU machine.

The static check reads each command as the shell would and takes it through the real parsers: our entry points'
(``trainer.args.parse_config``, the ``build_parser`` of evaluate/generate/merge), ``accelerate launch``'s own
parser and config validation, the global-batch arithmetic for the number of processes launched. It follows the
commands in order (README.md first, then each file of docs/ from the README's end state): a model, run or file a
command reads must be in the repository or made by an earlier command, and every training command writes a folder
of its own. A command that needs a GPU, network, Slurm, root or Chromium must say so (``# needs …``), and the check
derives what it needs (a GPU launch config, a hub model, a registered set that is downloaded, a Slurm tool) to hold
the docs to it. A cheap subset then really runs, as pasted, in a scratch copy of the repository.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import pytest

from tests.conftest import REPO
from tests.docs.commands import NEEDS, Command, commands_in, documented_files, inline_spans, simple_commands

VENV_TOOLS = {".venv/bin/python", ".venv/bin/accelerate", ".venv/bin/swanlab", ".venv/bin/pip"}
NOT_ON_PATH = {"python", "python3", "accelerate", "swanlab", "pip", "pip3", "pytest", "ruff", "torchrun", "deepspeed"}
SYSTEM_TOOLS = {"bash", "mkdir", "printf", "echo", "export", "eval", "cd", "cat", "ls", "head", "tail", "uptime",
                "curl", "nvidia-smi", "ssh", "source"}
SLURM_TOOLS = {"sbatch", "srun", "salloc", "scancel", "scontrol", "squeue", "sinfo"}
REPO_DIRS = {"trainer", "recipes", "launch", "ds_configs", "slurm", "scripts", "data", "tests", "docs", "bench"}
# The launch files that run without a GPU (docs/distributed.md's table); the others need one.
CPU_LAUNCH_CONFIGS = {"launch/single_gpu.yaml", "launch/cpu_ddp.yaml", "launch/cpu_zero2.yaml",
                      "launch/cpu_zero3.yaml"}
# What the repository's own scripts need beyond a CPU machine, by sub-command ("*": any).
SCRIPT_NEEDS = {"scripts/swanlab_screenshot.sh": {"*": {"Chromium"}},
                "tests/slurm/cluster.sh": {"up": {"root"}, "*": {"Slurm"}},
                "scripts/install.sh": {"*": set()}}


@dataclass
class State:
    """What exists after the commands so far: folders and files they made, training folders and who wrote them."""

    made: set[str] = field(default_factory=set)
    runs: dict[str, str] = field(default_factory=dict)

    def copy(self) -> State:
        return State(set(self.made), dict(self.runs))

    def has(self, path: str) -> bool:
        parts = PurePosixPath(path.removeprefix("./")).parts
        if any(str(PurePosixPath(*parts[:n])) in self.made for n in range(1, len(parts) + 1)):
            return True
        return bool(parts) and parts[0] in REPO_DIRS and (REPO / path).exists()


@dataclass
class Check:
    """The checks of one command: the problems found and what the command turns out to need."""

    command: Command
    state: State
    all_runs: dict[str, str]
    problems: list[str] = field(default_factory=list)
    needs: set[str] = field(default_factory=set)

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.command.where}: {text}")

    def needs_input(self, path: str | None, what: str) -> None:
        """A file or folder the command reads: in the repo or made earlier (unless the network supplies it)."""
        if path and not self.state.has(str(path)) and not {"network", "data"} & self.command.needs:
            self.problem(f"{what} {path} is neither in the repository nor made by an earlier command")

    def model(self, name: str, what: str) -> None:
        if name.startswith("builtin:") or name == "base":
            return
        if self.state.has(name):
            return
        if name.startswith(("outputs/", "./", "../", "/", "~")) or PurePosixPath(name).parts[0] in REPO_DIRS:
            self.needs_input(name, what)
        else:
            self.needs.add("network")  # a hub id


def check_documents(documents: list[tuple[str, str]]) -> list[str]:
    """All problems of the commands of ``(name, markdown)`` documents, the first one being the README."""
    readme_state, all_runs, problems = State(), {}, []
    for index, (name, markdown) in enumerate(documents):
        state = readme_state if index == 0 else readme_state.copy()
        for command in commands_in(name, markdown):
            check = Check(command, state, all_runs)
            check_command(check)
            problems += check.problems
            unknown = sorted(set(command.needs) - set(NEEDS))
            if unknown:
                problems.append(f"{command.where}: '# needs {', '.join(unknown)}': say needs {' / '.join(NEEDS)}")
            missing = sorted(check.needs - command.needs)
            if missing:
                problems.append(f"{command.where}: needs {', '.join(missing)}, which its comment does not say "
                                f"('# needs {', '.join(sorted(check.needs | command.needs))}')")
        for line, span in inline_spans(markdown):  # a runnable command in the text: a tool and a path or install
            words = span.split()
            if words[0] in NOT_ON_PATH and (any("/" in w for w in words[1:]) or words[1:2] == ["install"]):
                problems.append(f"{name}:{line}: `{span}`: `{span.split()[0]}` is not on PATH after "
                                "scripts/install.sh; write .venv/bin/" + span.split()[0])
    return problems


def check_command(check: Check) -> None:
    for call in simple_commands(check.command.text):
        check_call(check, call.argv, call.env)


def check_call(check: Check, argv: list[str], env: dict[str, str]) -> None:
    tool, args = argv[0], argv[1:]
    if "CUDA_VISIBLE_DEVICES" in env:
        check.needs.add("GPU")
    if tool in NOT_ON_PATH:
        check.problem(f"`{tool}` is not on PATH after scripts/install.sh: write .venv/bin/{tool}")
    elif tool == ".venv/bin/python":
        check_python(check, args, env)
    elif tool == ".venv/bin/accelerate":
        check_accelerate(check, args, env)
    elif tool == ".venv/bin/swanlab":
        check_swanlab(check, args)
    elif tool == ".venv/bin/pip":
        check.needs.add("network")
    elif tool in SLURM_TOOLS:
        check.needs.add("Slurm")
        if tool == "sbatch":
            check_sbatch(check, args, env)
        elif tool == "srun" and "-c" in args:
            check_nested(check, args[args.index("-c") + 1])
    elif tool == "bash" and args[:1] == ["-c"]:
        check_nested(check, args[1])
    elif tool == "bash" and args:
        check_script(check, args[0], args[1:])
    elif "/" in tool:
        check_script(check, tool, args)
        if (REPO / tool).is_file() and not os.access(REPO / tool, os.X_OK):
            check.problem(f"{tool} is not executable: run it with bash or chmod +x it")
    elif tool == "mkdir":
        check.state.made.update(a for a in args if not a.startswith("-"))
    elif tool not in SYSTEM_TOOLS:
        check.problem(f"`{tool}`: not a tool the README's set-up or a usual machine provides")


def check_nested(check: Check, text: str) -> None:
    for call in simple_commands(text):
        check_call(check, call.argv, call.env)


def check_script(check: Check, script: str, args: list[str]) -> None:
    if not (REPO / script).is_file():
        check.problem(f"{script}: no such file in the repository")
        return
    needs = SCRIPT_NEEDS.get(script, {})
    check.needs |= needs.get(args[0] if args else "", needs.get("*", set()))
    if script == "scripts/swanlab_screenshot.sh" and args:
        check.needs_input(args[0], "SwanLab folder")


def check_python(check: Check, args: list[str], env: dict[str, str]) -> None:
    if args[:2] == ["-m", "pytest"]:
        return
    script, rest = args[0], args[1:]
    if script in ("trainer/sft.py", "trainer/prepare.py"):
        check_sft(check, script, rest, processes=1, env=env)
    elif script in ("trainer/evaluate.py", "trainer/generate.py", "trainer/merge.py"):
        check_tool(check, script, rest)
    else:
        check_script(check, script, rest)


def check_accelerate(check: Check, args: list[str], env: dict[str, str]) -> None:
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    if args[:1] != ["launch"]:
        check.problem(f"accelerate {' '.join(args[:1])}: the docs only use `accelerate launch`")
        return
    for flag, value in zip(args, args[1:]):
        if flag in ("--config_file", "--deepspeed_config_file"):
            check.needs_input(value, flag)
            if flag == "--config_file" and value not in CPU_LAUNCH_CONFIGS:
                check.needs.add("GPU")
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
            launch, _, _ = _validate_launch_command(launch_command_parser().parse_args(args[1:]))
    except SystemExit:
        check.problem(f"accelerate launch refuses its options: {err.getvalue().strip().splitlines()[-1]}")
        return
    except Exception as error:  # accelerate's own validation (config file contents, incompatible options)
        check.problem(f"accelerate launch: {type(error).__name__}: {error}")
        return
    if launch.multi_gpu and "--config_file" not in args and not launch.cpu:
        check.needs.add("GPU")
    if launch.training_script not in ("trainer/sft.py", "trainer/prepare.py"):
        check.problem(f"accelerate launch {launch.training_script}: not one of our training entry points")
        return
    check_sft(check, launch.training_script, launch.training_script_args, max(launch.num_processes or 1, 1), env)


def check_sft(check: Check, script: str, args: list[str], processes: int, env: dict[str, str],
              record: bool = True) -> None:
    """Our real option parser, the files it names, what it needs, the batch arithmetic, and its output folder."""
    from trainer.args import ConfigError, parse_config
    from trainer.batch import BatchSizeError, gradient_accumulation_for
    from trainer.data.registry import load_registry

    if "--help" in args or "-h" in args:
        return
    try:
        cfg = parse_config(list(args), prog=script)
    except ConfigError as error:
        check.problem(f"{script}: {error}")
        return
    check.model(cfg.model.model_name_or_path, "model")
    registry = load_registry()
    for item in (cfg.data.dataset or "").split(","):
        name = item.strip().rsplit(":", 1)[0] if ":" in item and item.rsplit(":", 1)[1].replace(".", "").isdigit() \
            else item.strip()
        if name in registry:
            if any("url" in split for split in registry[name]["splits"].values()):  # a download, or your copy
                check.needs.add("data" if cfg.data.data_dir or "SFT_DATA_DIR" in env else "network")
        elif name:
            check.needs_input(name, "data")
    if cfg.data.sample_prompts not in (None, "auto", "none"):
        check.needs_input(cfg.data.sample_prompts, "sample prompts")
    if "swanlab" in (cfg.training.report_to or []) and cfg.tracking.swanlab_mode == "cloud":
        check.needs.add("network")
    global_batch = cfg.finetune.global_batch_size
    if global_batch and cfg.sources.get("gradient_accumulation_steps") != "command line":
        try:
            gradient_accumulation_for(global_batch, cfg.training.per_device_train_batch_size, processes)
        except BatchSizeError as error:
            check.problem(f"with {processes} processes: {error}")
    if script != "trainer/sft.py" or cfg.data.preview or not record:
        return
    out = str(PurePosixPath(cfg.training.output_dir))
    reused = out in check.all_runs and not (cfg.training.resume_from_checkpoint or "--overwrite_output_dir" in args)
    if reused:
        check.problem(f"trains into {out}, which {check.all_runs[out]} trained into: give it an --output_dir of "
                      "its own")
    check.all_runs.setdefault(out, check.command.where)
    check.state.made.add(out)


def check_tool(check: Check, script: str, args: list[str]) -> None:
    """evaluate.py, generate.py, merge.py: their real argument parsers, what they read, what they write."""
    from trainer import evaluate, generate, merge

    module = {"trainer/evaluate.py": evaluate, "trainer/generate.py": generate, "trainer/merge.py": merge}[script]
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            parsed = module.build_parser().parse_args(args)
    except SystemExit:
        check.problem(f"{script} refuses its options: {err.getvalue().strip().splitlines()[-1]}")
        return
    if script == "trainer/merge.py":
        check.model(parsed.adapter, "adapter")
        if check.state.has(parsed.output) and not parsed.force:
            check.problem(f"merge.py --output {parsed.output} exists already (an earlier command made it): "
                          "merge.py refuses it without --force; give another folder")
        check.state.made.add(parsed.output)
        return
    check.model(parsed.model, "model")
    if parsed.compare:
        check.model(parsed.compare, "--compare model")
    for name in ("input_file", "references"):
        if getattr(parsed, name, None):
            check.needs_input(str(getattr(parsed, name)), f"--{name}")
    for name in ("output_file", "metrics_file"):
        if getattr(parsed, name, None):
            check.state.made.add(str(getattr(parsed, name)))


def check_swanlab(check: Check, args: list[str]) -> None:
    if args[:1] in (["login"], ["sync"]):
        check.needs.add("network")
    elif args[:1] == ["watch"] and len(args) > 1:
        check.needs_input(args[1], "SwanLab folder")
    else:
        check.problem(f"swanlab {' '.join(args[:1])}: not a sub-command the docs explain")


def check_sbatch(check: Check, args: list[str], env: dict[str, str]) -> None:
    """sbatch options, then the script, then the trainer's options (the Tang script puts its recipe first)."""
    options: dict[str, str] = {}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        key, _, value = args[i].partition("=")
        if not value and key not in ("--parsable", "--requeue") and i + 1 < len(args):
            i += 1
            value = args[i]
        options[key] = value
        i += 1
    if i == len(args):
        check.problem("sbatch without a script")
        return
    script, trainer_args = args[i], args[i + 1:]
    check_script(check, script, trainer_args)
    gpus = int(options.get("--gpus-per-node", 8))
    if gpus:
        check.needs.add("GPU")
    if script == "slurm/tang.sh" and not (trainer_args and trainer_args[0].endswith((".yaml", ".yml"))):
        trainer_args = ["recipes/tang_breeze_qlora.yaml", *trainer_args]
    per_node = gpus or int(env.get("PROCS_PER_NODE", 1))
    processes = int(options.get("--nodes", 1)) * per_node
    check_sft(check, "trainer/sft.py", trainer_args, processes, env, record=False)


# ------------------------------------------------------------------------------------------------ the docs as shipped


@pytest.fixture
def at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # the docs' commands run from the repository root


def shipped_documents() -> list[tuple[str, str]]:
    return [(str(path.relative_to(REPO)), path.read_text(encoding="utf-8")) for path in documented_files(REPO)]


def test_every_documented_command_would_run_as_pasted(at_repo_root):
    documents = shipped_documents()
    assert sum(len(commands_in(name, text)) for name, text in documents) > 50  # the extraction found them
    problems = check_documents(documents)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------- the check itself: what it catches

SETUP = "```bash\nbash scripts/install.sh && .venv/bin/accelerate launch trainer/sft.py\n```\n"


@pytest.mark.parametrize(("doc", "expected"), [
    ("python trainer/sft.py --help", "`python` is not on PATH"),
    ("Run `swanlab watch outputs/tiny-tang/swanlog` to see it.", "`swanlab` is not on PATH"),
    (".venv/bin/accelerate launch trainer/sft.py recipes/tiny_tang.yaml", "which README.md:2 trained into"),
    (".venv/bin/python trainer/sft.py recipes/nope.yaml --output_dir outputs/x", "recipe file not found"),
    (".venv/bin/python trainer/sft.py recipes/tiny_tang.yaml --learn 1 --output_dir outputs/x", "unrecognised"),
    (".venv/bin/accelerate launch --config_file launch/ddp.yaml trainer/sft.py recipes/tiny_tang.yaml "
     "--output_dir outputs/x", "needs GPU, which its comment does not say"),
    (".venv/bin/accelerate launch --config_file launch/cpu_ddp.yaml --num_processes 3 trainer/sft.py "
     "recipes/tiny_tang.yaml --output_dir outputs/x", "is not a multiple of"),
    (".venv/bin/accelerate launch --config_file launch/nope.yaml trainer/sft.py --output_dir outputs/x",
     "launch/nope.yaml is neither in the repository"),
    (".venv/bin/python trainer/sft.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset tang-demo "
     "--output_dir outputs/x   # needs GPU", "needs network, which its comment does not say"),
    (".venv/bin/python trainer/generate.py --model outputs/elsewhere", "outputs/elsewhere is neither"),
    (".venv/bin/python trainer/evaluate.py --model outputs/tiny-tang", "refuses its options"),
    (".venv/bin/python trainer/merge.py --adapter outputs/tiny-tang --output outputs/tiny-tang", "refuses it"),
    ("sbatch slurm/train.sh recipes/tiny_tang.yaml   # needs GPU, network", "needs Slurm"),
    ("scripts/swanlab_screenshot.sh outputs/tiny-tang/swanlog x.png", "needs Chromium"),
    (".venv/bin/python trainer/prepare.py recipes/tiny_tang.yaml --dataset tang --data_dir ~/copies",
     "needs data, which its comment does not say"),
    ("tiny-tool --go   # needs GPU", "not a tool"),
    (".venv/bin/python trainer/sft.py --help   # needs GPUs", "'# needs GPUs'"),
])
def test_the_check_catches_what_would_fail_when_pasted(at_repo_root, doc, expected):
    text = f"```bash\n{doc}\n```\n" if not doc.startswith("Run") else doc + "\n"
    problems = check_documents([("README.md", SETUP), ("docs/x.md", text)])
    assert any(expected in p for p in problems), problems


def test_the_check_accepts_marked_and_ordered_commands(at_repo_root):
    doc = """```bash
.venv/bin/accelerate launch --config_file launch/ddp.yaml trainer/sft.py recipes/huanhuan_lora.yaml \\
    --output_dir outputs/h   # needs GPU, network: 8 of them
.venv/bin/python trainer/generate.py --model outputs/h --prompt "床前明月光"   # needs GPU, network
.venv/bin/python trainer/evaluate.py --model outputs/tiny-tang --input_file data/demo/tang_test.json \\
    --references data/demo/tang_test_gt.txt --metrics_file outputs/tiny-tang/eval/metrics.json
```
"""
    assert check_documents([("README.md", SETUP), ("docs/x.md", doc)]) == []


# ------------------------------------------------------------------------------------- a cheap subset, really run

# Appended to the training commands that run here: the command line wins over the recipe, so the same command
# trains 2 steps instead of ~180.
CHEAP_TRAINING = " --max_steps 2 --save_steps 1 --num_sample_prompts 1 --sample_max_new_tokens 4"
CHEAP_GENERATION = " --max_new_tokens 4"
RUN = [  # (document, the start of the command as documented, what makes it cheap)
    ("README.md", "bash scripts/install.sh && .venv/bin/accelerate launch trainer/sft.py", CHEAP_TRAINING),
    ("README.md", ".venv/bin/python trainer/evaluate.py --model outputs/tiny-tang --compare base", CHEAP_GENERATION),
    ("docs/inference.md", "printf '床前明月光\\n春眠不覺曉\\n' | .venv/bin/python trainer/generate.py",
     CHEAP_GENERATION),
]


@pytest.mark.slow
def test_the_demo_and_what_follows_it_run_as_pasted(tmp_path):
    """The README's demo command, its evaluation and a piped generation, run by bash in a copy of the repository."""
    commands = {name: commands_in(name, text) for name, text in shipped_documents()}
    copy = tmp_path / "repo"
    for part in ("trainer", "recipes", "data", "launch", "ds_configs"):
        shutil.copytree(REPO / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / ".venv").symlink_to(REPO / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWANLAB_")}
    env.update(OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    outputs = {}
    for name, start, cheap in RUN:
        (command,) = [c for c in commands[name] if c.text.startswith(start)]
        text = command.text.split("&&")[-1].strip()  # the set-up line: the install has been done
        result = subprocess.run(["bash", "-c", text + cheap], cwd=copy, env=env, capture_output=True, text=True,
                                timeout=400)
        assert result.returncode == 0, f"{command.where}: {text}\n{result.stderr[-4000:]}"
        outputs[start] = result.stdout
    run = copy / "outputs" / "tiny-tang"
    assert (run / "model.safetensors").is_file() and (run / "samples.md").is_file()
    assert json.loads((run / "run_config.json").read_text())  # the demo's own record of its options
    assert list((run / "swanlog").iterdir()), "the demo's SwanLab run (local mode)"
    assert (run / "eval" / "metrics.json").is_file() and (run / "eval" / "metrics.md").is_file()
    replies = outputs[RUN[2][1]].splitlines()
    assert len(replies) == 2, replies  # one reply per piped line (an empty reply is an empty line)
