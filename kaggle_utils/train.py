"""Stage 3 (and the teacher of stage 2): LoRA training of a sequence classifier on hard and soft labels.

The base is loaded 4-bit nf4 (QLoRA) or in full precision; LoRA goes on every linear layer and the 2-way
head is trained in full, both kept in fp32. Batches are length-sorted under a token budget and shuffled; half
the rows are A/B-swapped each epoch. The loss mixes cross-entropy on human labels with distillation from a
teacher's logits, softened by a temperature on both sides (:mod:`kaggle_utils.models.losses`), per-row weighted.
Half precision: bf16 on compute capability >= 8.0, else fp16 under autocast with loss scaling; a non-finite
loss stops the run (naming the step and the rows) before anything is saved from it.
A wall-clock budget is checked before every step; a checkpoint every ``save_every`` steps makes the run
resumable: run the same command again and it continues where it stopped. Every ``eval_every_steps`` steps and
at the end the model is evaluated on the held-out fold (both A/B orientations); the best evaluation by
``best_metric`` is the adapter that is saved.

``train`` is the driver: ``setup`` (rows, model, optimiser, resume), ``train_step`` per optimiser step,
``evaluate_run`` every ``eval_every_steps``, ``save_checkpoint``, then ``save_adapter`` (weights, tokenizer and
this config), ``keep_best`` (the last evaluation, the best adapter, its predictions and calibration) and
``save_outputs``.

Memory: the first step is made of the epoch's largest micro-batches, so a run that does not fit fails in its first
minute; a micro-batch that runs out of GPU memory later is split in halves and retried (the step's gradient is
unchanged), and a single row that does not fit stops the run naming what to change. ``batch_tokens = 0`` measures
the budget once the model is loaded (:mod:`kaggle_utils.training.memory`: forwards and backwards of the longest
rows against the free GPU memory) and builds the schedule from it; the resolved budget is saved with the config.

Several GPUs (data-parallel, DDP): ``accelerate launch --config_file kaggle_utils/recipes/accelerate/ddp.yaml
--num_processes N -m kaggle_utils.train --recipe ...``. A step is ``grad_accum x N`` micro-batches, the processes
taking ``grad_accum`` each; rank 0 writes every file (:mod:`kaggle_utils.training.parallel`,
:mod:`kaggle_utils.training.step`).
Sharded (FSDP2, a 70B/72B whose training does not fit one GPU): the same with ``--config_file
kaggle_utils/recipes/accelerate/fsdp.yaml``; evaluation and the adapter's gathering are then done by every rank,
and no checkpoint is written (a run cannot be resumed).

``python -m kaggle_utils.train --train-file demo/work/prepared/train.parquet --out-dir demo/work/student``

The loop's parts live in :mod:`kaggle_utils.training` (config, rows, schedule, precision, step, memory probe,
evaluation, checkpoints, outputs, the multi-process launch); this module is the recipe that puts them together.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kaggle_utils.config.cli import parse_config, save_config
from kaggle_utils.inputs.formatter import PromptFormatter
from kaggle_utils.models.fused import apply_fused_kernels, compile_decoder_layers
from kaggle_utils.models.fused_lora import apply_fused_lora
from kaggle_utils.models.loading import (
    ModelConfig,
    check_model_dir,
    compute_dtype,
    load_classifier,
    load_tokenizer,
    model_device,
    pick_device,
)
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.training.checkpoints import load_checkpoint, refuse_fsdp_resume, resumed_batch_tokens, save_checkpoint
from kaggle_utils.training.config import TrainConfig
from kaggle_utils.training.eval_cost import fit_evaluation
from kaggle_utils.training.evaluation import eval_due, eval_seconds, evaluate_run, keep_best
from kaggle_utils.training.memory import measured_batch_tokens, refuse_measured_budget_under_fsdp
from kaggle_utils.training.outputs import save_adapter, save_outputs
from kaggle_utils.training.parallel import Parallel
from kaggle_utils.training.precision import Precision, trainable_in_fp32
from kaggle_utils.training.rows import training_rows
from kaggle_utils.training.run import Run
from kaggle_utils.training.schedule import lr_lambda, schedule, steps_per_epoch
from kaggle_utils.training.step import train_step

__all__ = ["TrainConfig", "TrainResult", "main", "setup", "train"]


@dataclass
class TrainResult:
    adapter_dir: Path
    history: pd.DataFrame
    metrics: dict
    # one row per evaluation (step, accuracy, log_loss, ...): what evals.csv holds
    evals: pd.DataFrame = field(default_factory=pd.DataFrame)
    # per-language accuracy of the kept adapter (metrics.by_language)
    languages: pd.DataFrame = field(default_factory=pd.DataFrame)


def setup(cfg: TrainConfig) -> Run:
    """Rows, model, optimiser and schedule of a run, at the step its checkpoint reached (0 without one).

    In a launch of several processes every process builds the same run (same rows, same seed: the same LoRA
    initialisation) on its own device, and its model is wrapped for data-parallel training (``run.wrapped``).
    """
    parallel = Parallel.from_env(cfg.model)
    refuse_measured_budget_under_fsdp(cfg.optim, parallel)
    torch.manual_seed(cfg.schedule.seed)  # before the model is built: it draws the LoRA initialisation
    # a folder without weights or tokenizer fails here, named (the weights' headers: by the ranks that read them)
    check_model_dir(cfg.model.model_path, "base model", read_weights=parallel.reads_weights)
    cfg.data.out_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.model.model_path)
    fmt = PromptFormatter(tok, cfg.inputs)
    data, val_df = training_rows(cfg, fmt)
    cfg = resumed_batch_tokens(cfg, parallel)
    if cfg.optim.batch_tokens:  # checked before the model loads, so a bad config fails fast; 0 is measured after it
        steps_per_epoch(cfg.batching, data.lengths, parallel.world)
    refuse_fsdp_resume(cfg, parallel)

    model = _load_model(cfg, parallel, tok.pad_token_id)
    # a rank receiving rank 0's full-precision weights holds its parameters on meta until parallel.wrap fills them
    device = model_device(model) if parallel.reads_weights else pick_device(_here(cfg.model, parallel))
    precision = Precision.choose(device, cfg.model.dtype)
    params = trainable_in_fp32(model)  # cast before DDP wraps the model: it registers the parameters as they are
    if not cfg.optim.batch_tokens:  # before DDP wraps the model: the probe's backwards must not synchronise processes
        cfg = measured_batch_tokens(cfg, model, data, tok.pad_token_id, device, precision, parallel)
    wrapped = parallel.wrap(model)
    if parallel.fsdp:  # fully_shard replaced every parameter by a sharded one (a DTensor): optimise those
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=0.0)
    per_epoch = steps_per_epoch(cfg.batching, data.lengths, parallel.world)
    total_steps = max(1, math.ceil(cfg.optim.epochs * per_epoch))
    warmup_steps = max(1, int(cfg.optim.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup_steps))
    run = Run(
        cfg=cfg,
        tok=tok,
        fmt=fmt,
        data=data,
        val_df=val_df,
        model=model,
        device=device,
        precision=precision,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=precision.scaler(device),
        total_steps=total_steps,
        parallel=parallel,
        wrapped=wrapped,
    )
    _describe(run, per_epoch)
    load_checkpoint(run)
    # written only once the checkpoint's config guard passed: a refused rerun leaves the run's record intact
    if parallel.is_main:
        save_config(cfg, cfg.data.out_dir / "train_config.json")
    return run


def _load_model(cfg: TrainConfig, parallel: Parallel, pad_id: int) -> torch.nn.Module:
    """The base with its LoRA (fresh or ``init_adapter``'s) and head, on this process's device. Under FSDP a rank
    other than 0 reads no weight file (:attr:`Parallel.load_once`): full precision, its model stays on meta until
    rank 0's weights arrive while sharding; 4-bit, rank 0's quantised model arrives whole while loading."""
    here = _here(cfg.model, parallel)
    model = load_classifier(
        replace(cfg.model, device=here),
        pad_id,
        lora=cfg.lora.settings,
        gradient_checkpointing=cfg.optim.gradient_checkpointing,
        packing=cfg.optim.packing,
        # FSDP shards the packed nf4 weights only as floating tensors: packed into the compute dtype's storage
        quant_storage=compute_dtype(pick_device(here), cfg.model.dtype) if parallel.fsdp else None,
        # FSDP, full precision, rank > 0: parameters on meta, filled with rank 0's by parallel.wrap
        on_meta=not parallel.reads_weights and not cfg.model.load_in_4bit,
        # FSDP, 4-bit: rank 0 reads the weight files and sends its quantised model to the other ranks
        read_once=parallel.load_once and cfg.model.load_in_4bit,
        fp32_residual=cfg.optim.fp32_residual,
        recompute_every=cfg.optim.recompute_every,
    )
    if cfg.optim.fused_kernels:  # per module instance, LoRA-safe (kaggle_utils.models.fused); a printed no-op off CUDA
        apply_fused_kernels(model, pick_device(here))
    if cfg.optim.fused_lora:
        apply_fused_lora(model)
    if cfg.optim.compile_layers:
        compile_decoder_layers(model, pick_device(here))
    return model


def _here(model: ModelConfig, parallel: Parallel) -> str:
    """This process's device: ``model.device``, or cuda:LOCAL_RANK in a launch of several processes on GPUs."""
    return parallel.shard.device(model.device, torch.cuda.is_available())


def _describe(run: Run, per_epoch: int) -> None:
    """One line of the run's derived numbers (rank 0 only)."""
    cfg, parallel, data, precision = run.cfg, run.parallel, run.data, run.precision
    if not parallel.is_main:
        return
    n_trainable = sum(p.numel() for p in run.params)
    n_taught = int(np.isfinite(data.teacher).all(1).sum())
    per_step = cfg.optim.grad_accum * parallel.world
    processes = (
        f" · {parallel.world} processes x {cfg.optim.grad_accum} micro-batch(es)/step" if parallel.world > 1 else ""
    )
    print(
        f"train rows {len(data):,} ({n_taught:,} with a teacher) · val rows {len(run.val_df):,} · "
        f"tokens/epoch {int(data.lengths.sum()):,} · steps {run.total_steps} ({per_epoch}/epoch) · "
        f"≤{cfg.optim.batch_tokens * per_step:,} {'packed' if cfg.optim.packing else 'padded'} "
        f"tokens/step{processes} · trainable params {n_trainable:,} · "
        f"device {run.device} · autocast {precision.autocast} · loss scaling {precision.scale_loss}"
    )


def train(cfg: TrainConfig) -> TrainResult | None:
    """Train (or resume) until the last step or the time budget, evaluating on the way; save the best adapter.

    Under a time budget the whole run ends inside it: the evaluation is priced before step 1
    (:func:`~kaggle_utils.training.eval_cost.fit_evaluation`), and a step or an evaluation starts only if it and
    the final evaluation still fit. In a launch of several processes (``accelerate launch --num_processes N -m
    kaggle_utils.train ...``) each process trains its share of every step and evaluates its share of the
    held-out rows; rank 0 takes the decisions that hang on a clock, writes every file and returns the result,
    the other ranks return None.
    """
    run = setup(cfg)
    par, t_start = run.parallel, time.monotonic()
    deadline = Deadline(
        cfg.schedule.time_budget_minutes * 60
    )  # counts from here: encoding and model loading are not in it
    fit_evaluation(run, cfg.schedule.time_budget_minutes * 60)
    epoch, stopped_by_budget = _loop(run, deadline)
    # the adapter is saved before the final evaluation, so a run killed while evaluating still leaves one
    adapter_dir = save_adapter(run)
    metrics = {
        "steps": run.step,
        "total_steps": run.total_steps,
        "stopped_by_budget": stopped_by_budget,
        # steps whose gradient was not finite: not applied (fp16 loss scaling finding its scale skips a few)
        "skipped_steps": sum(bool(row.get("skipped")) for row in run.history),
        "train_rows": len(run.data),
        "val_rows": len(run.val_df),
        "eval_priced_seconds": round(run.eval_estimate, 1),  # 0 without a time budget
    }
    languages = pd.DataFrame()
    if len(run.val_df):
        adapter_dir, val_metrics = keep_best(run, epoch, adapter_dir)
        metrics |= val_metrics
        languages = pd.DataFrame(run.best["languages"])
    metrics["seconds"] = round(time.monotonic() - t_start, 1)
    if not par.is_main:
        par.barrier()  # exits once rank 0 has written everything
        return None
    history, evals = save_outputs(run, metrics)
    par.barrier()
    return TrainResult(adapter_dir, history, metrics, evals, languages)


def _loop(run: Run, deadline: Deadline) -> tuple[int, bool]:
    """The optimiser steps from the checkpoint's on, with the evaluations due; returns the last epoch and whether
    the time budget stopped it. Every step is checkpointed every ``save_every`` steps and at the end."""
    cfg, par = run.cfg, run.parallel  # run.cfg: batch_tokens=0 resolved to the measured budget
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", disable=not par.is_main)
    run.model.train()
    steps = itertools.islice(schedule(cfg.batching, run.data.lengths, par.world), run.total_steps)
    epoch, step_seconds, stopped = 0, 0.0, False
    for step, (epoch, swapped, micro_batches) in enumerate(steps):
        if step < run.step:  # taken before the checkpoint: replay the schedule up to it
            continue
        # start a step only if it and the final evaluation end in time: the last step's duration plus 50%
        # estimates it, the last evaluation's (or, before one ran, its price) the final one
        if not par.agree(deadline.allows(step_seconds * 1.5 + eval_seconds(run))):
            if par.is_main:
                print(
                    f"time budget of {cfg.schedule.time_budget_minutes} min reached at step "
                    f"{run.step}/{run.total_steps}; "
                    "stopping"
                )
            stopped = True
            break
        row = train_step(run, epoch, micro_batches, swapped)
        step_seconds = row["seconds"]
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if par.agree(eval_due(run, deadline)):
            evaluate_run(run, epoch)
        if cfg.schedule.save_every and run.step % cfg.schedule.save_every == 0:
            save_checkpoint(run)
    bar.close()
    save_checkpoint(run)
    return epoch, stopped


def main(argv: list[str] | None = None) -> None:
    result = train(parse_config(TrainConfig, argv))
    if result is not None:  # None on the ranks other than 0 of a launch
        print(json.dumps(result.metrics, indent=2))


if __name__ == "__main__":
    main()
