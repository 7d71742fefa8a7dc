"""What a run leaves in its output folder, and the rules that keep two runs from mixing in one folder.

A finished run is marked by ``train_results.json`` (written last). A folder holding a finished run, or
checkpoints of an unfinished one, is refused unless the user says what to do: ``--resume_from_checkpoint
latest`` to continue, ``--overwrite_output_dir`` to start over.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from trainer.checkpoints import complete_checkpoints
from trainer.errors import UserError

FINISHED_MARKER = "train_results.json"


class OutputDirError(UserError, ValueError):
    pass


def check_output_dir(output_dir: str, resume: str | None, overwrite: bool, is_main: bool = True) -> str | None:
    """Validate the folder against the resume request; with ``overwrite`` the old run is cleared (main process)."""
    folder = Path(output_dir)
    finished = (folder / FINISHED_MARKER).is_file()
    checkpoints = [p.name for p in folder.glob("checkpoint-*")] if folder.is_dir() else []
    if overwrite:
        if is_main:
            for name in checkpoints:
                shutil.rmtree(folder / name, ignore_errors=True)
            (folder / FINISHED_MARKER).unlink(missing_ok=True)
        return None
    if finished:
        raise OutputDirError(
            f"{output_dir} already holds a finished run ({FINISHED_MARKER}); choose another --output_dir or pass "
            f"--overwrite_output_dir to replace it"
        )
    if checkpoints and not resume:
        found = [p.name for p in complete_checkpoints(folder)]
        raise OutputDirError(
            f"{output_dir} holds checkpoints of an unfinished run ({', '.join(found) or 'none complete'}); pass "
            f"--resume_from_checkpoint latest to continue it or --overwrite_output_dir to start over"
        )
    return resume


def model_for_generation(trainer, output_dir: str):
    """The trained model for sampling on the main process: in memory, or reloaded where ZeRO-3 shards it."""
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        from trainer.inference import load_for_inference

        model, _ = load_for_inference(output_dir, device=trainer.args.device)
        return model
    return trainer.accelerator.unwrap_model(trainer.model)


def plot_loss(log_history: list[dict], path: Path) -> Path | None:
    """Training (and evaluation) loss against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list] = {"train loss": [(h["step"], h["loss"]) for h in log_history if "loss" in h]}
    for h in log_history:  # eval_loss, or one eval_<source>_loss per source when the eval data has several
        for key, value in h.items():
            if key.startswith("eval_") and key.endswith("loss"):
                curves.setdefault(key.removesuffix("_loss").replace("_", " ") + " loss", []).append((h["step"], value))
    if not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per label token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
