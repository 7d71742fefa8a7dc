"""What a run leaves in its output folder: the finished marker, the model to sample from, the loss plot.

A finished run is marked by ``train_results.json`` (written last). The rules that keep two runs from mixing in one
folder are in :mod:`trainer.run.folder`.
"""

from __future__ import annotations

from pathlib import Path

FINISHED_MARKER = "train_results.json"


def model_for_generation(trainer, output_dir: str):
    """The trained model for sampling on the main process: in memory, or reloaded where ZeRO-3 shards it.

    The reload runs on the main process alone, so it must not go through DeepSpeed's ZeRO-3 initialisation: while the
    run's DeepSpeed configuration is registered with transformers, ``from_pretrained`` partitions the new model with a
    broadcast to every rank, which the others (done, waiting to leave) never join, and the run hangs after saving.
    """
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

        from trainer.inference import load_for_inference

        registered = getattr(trainer.args, "hf_deepspeed_config", None)
        unset_hf_deepspeed_config()
        try:
            model, _ = load_for_inference(output_dir, device=trainer.args.device)
        finally:
            if registered is not None:
                set_hf_deepspeed_config(registered)
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
