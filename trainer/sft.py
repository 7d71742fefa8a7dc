"""Supervised fine-tuning: ``accelerate launch trainer/sft.py [RECIPE.yaml] [--option value ...]``.

Reads top to bottom like the data flow: config → data (validated, tokenised and packed once into a memory-mapped
folder, before any model is loaded) → model (+ LoRA/QLoRA) → packing isolation proven on it → Trainer → saved
model, report, plot, samples. ``--preview N`` stops after showing what would be trained.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package from the repo root, not from trainer/
    sys.path[0] = str(Path(__file__).resolve().parents[1])
if sys.argv[1:] in (["-h"], ["--help"]):  # the rendered help, before the heavy imports (trainer/console/fast_help.py)
    from trainer.console.fast_help import serve_help

    serve_help("trainer/sft.py", "trainer.args:build_parser")

import logging
import os

import torch
import transformers
from transformers.trainer_utils import set_seed

from trainer import outputs
from trainer.args import Config, ConfigError, parse_config
from trainer.batch import gradient_accumulation_for, world_size_from_env
from trainer.callbacks.checkpoints import CheckpointCallback
from trainer.callbacks.console_log import use_compact_log
from trainer.callbacks.eval_generation import EvalGenerationCallback
from trainer.callbacks.isolation import PackingIsolationCallback
from trainer.callbacks.preemption import PREEMPTED_EXIT_CODE, PreemptionCallback
from trainer.console.errors import report_user_error
from trainer.data.packing import PackedCollator, PaddedCollator, PaddingFreeCollator, install_isolation_guard
from trainer.data.prompts import to_prompt
from trainer.data.templates import end_of_turn_token_id
from trainer.errors import UserError
from trainer.model import load_model, resize_for_tokenizer
from trainer.preparation import prepare, setup_data
from trainer.preview import preview
from trainer.run.folder import RunFolder
from trainer.run.settings import check_resume, run_settings
from trainer.run_config import write_run_config
from trainer.samples import SampleRecorder, load_sample_prompts
from trainer.sampling import default_generation_config
from trainer.sequence_parallel.layout import check_launch, check_model, describe
from trainer.sft_trainer import SFTTrainer

logger = logging.getLogger("sft")


def setup_logging(cfg: Config) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(format=f"[%(asctime)s rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S", level=level)
    # transformers at INFO prints whole model and generation configs and every file it loads: keep its warnings,
    # and the Trainer's own progress lines (examples, epochs, steps).
    transformers.logging.set_verbosity(logging.WARNING)
    transformers.logging.get_logger("transformers.trainer").setLevel(level)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def apply_global_batch(cfg: Config, world_size: int) -> None:
    """Set gradient accumulation from ``--global_batch_size`` for this many processes, unless the user fixed it.

    An explicit ``--gradient_accumulation_steps`` on the command line wins over a recipe's global batch; the two
    given on the same level (both flags, or both in the recipe) must agree.
    """
    args = cfg.training
    if args.world_size != world_size:
        raise ConfigError(
            f"the launcher started {world_size} processes but the trainer sees {args.world_size}: each process "
            f"would train alone. On CPU, launch with --multi_gpu (or launch/cpu_*.yaml) and keep --use_cpu true"
        )
    global_batch = cfg.finetune.global_batch_size
    sequence_parallel = cfg.finetune.sequence_parallel_size
    data_parallel = world_size // sequence_parallel  # the rows of a step are shared by the data-parallel ranks
    batch_from = cfg.sources.get("global_batch_size")
    accumulation_from = cfg.sources.get("gradient_accumulation_steps")
    per_step = args.per_device_train_batch_size * data_parallel
    if global_batch and accumulation_from:
        if accumulation_from == "command line" and batch_from != "command line":
            logger.info("--gradient_accumulation_steps %d (command line) wins over global_batch_size %d (%s)",
                        args.gradient_accumulation_steps, global_batch, batch_from)
            global_batch = None
        elif accumulation_from == batch_from and per_step * args.gradient_accumulation_steps != global_batch:
            raise ConfigError(
                f"--global_batch_size {global_batch} and --gradient_accumulation_steps "
                f"{args.gradient_accumulation_steps} ({batch_from}) disagree: {args.per_device_train_batch_size} "
                f"per device x {data_parallel} data-parallel processes x {args.gradient_accumulation_steps} "
                f"accumulation = "
                f"{per_step * args.gradient_accumulation_steps}; give only one of them"
            )
    if global_batch:
        args.gradient_accumulation_steps = gradient_accumulation_for(
            global_batch, args.per_device_train_batch_size, data_parallel
        )
    global_batch = per_step * args.gradient_accumulation_steps
    # Every rank says who it is (not only the main one): a launch that silently started one process, or two
    # processes that each train alone, shows at once in the job log.
    print(f"[rank{os.environ.get('RANK', '0')}] world size {world_size}, rank {os.environ.get('RANK', '0')}, "
          f"local rank {os.environ.get('LOCAL_RANK', '0')}, node rank {os.environ.get('GROUP_RANK', '0')}, "
          f"device {args.device}", file=sys.stderr, flush=True)
    processes = (f"{data_parallel} data-parallel ranks ({world_size} processes / sequence parallel "
                 f"{sequence_parallel})" if sequence_parallel > 1 else f"{world_size} processes")
    logger.info("global batch %d = %d per device x %s x %d accumulation", global_batch,
                args.per_device_train_batch_size, processes, args.gradient_accumulation_steps)


def collator_for(cfg: Config, attn: str, pad_token_id: int):
    if cfg.data.packing:
        # flash attention only isolates the examples of a packed row at batch size 1: one flattened row per batch.
        return PackedCollator(pad_token_id, flatten=attn.startswith("flash_attention"))
    if cfg.data.padding_free:
        return PaddingFreeCollator()
    return PaddedCollator(pad_token_id)


def run(cfg: Config) -> int:
    args = cfg.training
    if cfg.data.preview:  # what would be trained, before anything heavy: no model, no distributed set-up
        setup = setup_data(cfg)
        preview(setup, cfg.data.preview, args.output_dir)
        return 0
    if args.use_liger_kernel and not torch.cuda.is_available():
        raise ConfigError("--use_liger_kernel: Liger's kernels are Triton programs for CUDA GPUs and cannot run on "
                          "this machine; leave it off (or use --loss_impl chunked for the memory of the LM head)")
    world_size = world_size_from_env()
    check_launch(cfg, world_size)
    apply_global_batch(cfg, world_size)
    with RunFolder(cfg, is_main=args.process_index == 0) as folder:  # one run per folder, from here to the end
        return train(cfg, folder, world_size)


def train(cfg: Config, folder: RunFolder, world_size: int) -> int:
    args = cfg.training
    resume = folder.resume
    if resume:
        logger.info("resuming from %s", resume)
    elif args.resume_from_checkpoint == "latest":
        logger.info("no complete checkpoint in %s yet: starting fresh", args.output_dir)
    set_seed(args.seed)

    # Data first: a broken record must fail in seconds, before gigabytes of weights are loaded. Every rank takes
    # the same prepared folder; one prepares it (or a `trainer/prepare.py` run did), the others wait on the disk.
    setup = setup_data(cfg)
    data = prepare(cfg, setup, show_progress=args.process_index == 0)
    logger.info("%s", data.report.summary())
    sequence_parallel = cfg.finetune.sequence_parallel_size
    settings = run_settings(cfg, setup, world_size // sequence_parallel)
    accepted = check_resume(resume, settings, cfg.finetune.allow_resume_changes) if resume else []
    if data.eval is None and args.eval_strategy != "no":
        raise ConfigError(f"--eval_strategy {args.eval_strategy} needs evaluation data: --val_size or --eval_dataset")
    if cfg.data.eval_generate and (data.eval is None or args.eval_strategy == "no"):
        raise ConfigError("--eval_generate scores generations at each evaluation: it needs evaluation data "
                          "(--val_size or --eval_dataset) and --eval_strategy steps or epoch")
    tokenizer, template = setup.tokenizer, setup.template

    check_model(setup.model_path, cfg.model.attn_implementation, sequence_parallel, cfg.model.trust_remote_code,
                cfg.data.max_length)
    model = load_model(setup.model_path, finetuning_type=cfg.finetune.finetuning_type,
                       attn_implementation=cfg.model.attn_implementation, dtype=cfg.model.dtype,
                       trust_remote_code=cfg.model.trust_remote_code)
    resized = resize_for_tokenizer(model, tokenizer)
    stop_ids = sorted({tokenizer.eos_token_id,
                       end_of_turn_token_id(tokenizer, template, setup.options.template_kwargs)} - {None})
    model.generation_config.eos_token_id = stop_ids
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if cfg.finetune.finetuning_type in ("lora", "qlora"):
        from trainer.lora import apply_lora

        model = apply_lora(model, cfg.finetune, seed=args.seed, gradient_checkpointing=args.gradient_checkpointing,
                           train_embeddings=bool(setup.added_tokens) or resized)
    if cfg.finetune.tiled_mlp:
        from trainer.memory.tiled_mlp import apply_tiled_mlp

        apply_tiled_mlp(model)
    logger.info("model %s: attention %s, dtype %s, %s fine-tuning", cfg.model.model_name_or_path,
                model.config._attn_implementation, model.dtype, cfg.finetune.finetuning_type)

    ulysses = None
    if sequence_parallel > 1:
        from trainer.sequence_parallel.attention import enable_ulysses

        attn = model.config._attn_implementation
        flattened = cfg.data.padding_free or (cfg.data.packing and attn.startswith("flash_attention"))
        ulysses = enable_ulysses(model, attn, sequence_parallel, 1 if flattened else args.per_device_train_batch_size,
                                 tokenizer.pad_token_id)
        logger.info("%s", describe(sequence_parallel, world_size, args.deepspeed_plugin.zero_stage))

    samples = SampleRecorder(load_sample_prompts(cfg), tokenizer, stop_ids, cfg.data.sample_max_new_tokens,
                             cfg.data.eval_metrics)
    if args.process_index == 0 and not resume and samples.can_generate():
        samples.record("before", model)

    collator = collator_for(cfg, model.config._attn_implementation, tokenizer.pad_token_id)
    preemption = PreemptionCallback()
    callbacks = [CheckpointCallback(args.save_total_limit, settings, folder), preemption, *samples.callbacks()]
    if cfg.data.packing or cfg.data.padding_free:
        install_isolation_guard(model)
        callbacks.append(PackingIsolationCallback(collator, cfg.data.packing, len(tokenizer)))
    generations = None
    if cfg.data.eval_generate:
        prompts = [to_prompt(c) for c in data.eval_conversations(cfg.data.eval_generate)]
        config = default_generation_config(tokenizer, cfg.data.sample_max_new_tokens)
        generations = EvalGenerationCallback(prompts, tokenizer, config, stop_ids, cfg.data.eval_metrics)
        callbacks.append(generations)
    if "swanlab" in (args.report_to or []):
        from trainer.callbacks.swanlab import make_swanlab_callback

        args.report_to = [r for r in args.report_to if r != "swanlab"]
        callbacks.append(make_swanlab_callback(cfg, data.report, world_size, samples, generations))

    logger.info("batches: %s %s", type(collator).__name__, vars(collator) if hasattr(collator, "__dict__") else "")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, data_collator=collator,
        processing_class=tokenizer, callbacks=callbacks, loss_impl=cfg.finetune.loss_impl,
        tokens_per_micro_batch=args.per_device_train_batch_size * cfg.data.max_length, sequence_parallel=ulysses,
    )
    use_compact_log(trainer)
    if generations is not None:
        generations.trainer = trainer
    folder.begin()  # configuration, data and model checked: only now may a replaced run be moved aside
    if args.process_index == 0:
        data.report.write(args.output_dir)
        write_run_config(cfg, data.report, world_size, setup.model_path, folder.start_record(accepted))
    result = trainer.train(resume_from_checkpoint=resume)
    if preemption.preempted:
        logger.warning("preempted: checkpoint saved in %s; resume with --resume_from_checkpoint latest",
                       args.output_dir)
        return PREEMPTED_EXIT_CODE

    if ulysses is not None:
        logger.info("%s", ulysses.padding_summary())
    trainer.save_model()
    trainer.save_state()
    trainer.log_metrics("train", result.metrics)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(args.output_dir)
        if samples.prompts:
            samples.record("after", outputs.model_for_generation(trainer, args.output_dir))
            samples.write(args.output_dir)
        outputs.plot_loss(trainer.state.log_history, Path(args.output_dir) / "loss.png")
        trainer.save_metrics("train", result.metrics)  # written last: marks the run finished
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as error:
        return report_user_error(error)
    setup_logging(cfg)
    finished = False
    try:
        code = run(cfg)
        finished = code == 0
        return code
    except UserError as error:
        return report_user_error(error)
    finally:
        shut_down_distributed(wait_for_the_others=finished)


def shut_down_distributed(wait_for_the_others: bool) -> None:
    """Leave together, then tear the process group down before the interpreter does.

    After training, rank 0 still saves, writes samples and plots while the others are done. A rank that tore its
    process group down (or let interpreter exit do it) meanwhile sometimes died with SIGABRT ("terminate called
    without an active exception"), failing a job after everything was saved. So a rank that finished waits at a
    barrier for the others, and only then destroys the group. A rank that failed does not wait: the others' barrier
    then fails and the job reports the failure, instead of hanging.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if wait_for_the_others:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
