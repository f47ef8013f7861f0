"""One optimiser step: micro-batches in this epoch's A/B orientation, forward, loss, backward, clipping, update.

A micro-batch that runs out of GPU memory is split in halves and retried (the step's gradient is unchanged); a
single row that does not fit stops the run naming what to change; a non-finite loss stops it naming the rows.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from kaggle_utils.inputs.batching import pad
from kaggle_utils.models.losses import preference_loss, term_totals
from kaggle_utils.models.packing import pack, packed_logits
from kaggle_utils.scoring.predict import _is_oom
from kaggle_utils.training.config import ObjectiveConfig, TrainConfig
from kaggle_utils.training.errors import NonFiniteLossError, TrainMemoryError
from kaggle_utils.training.rows import TrainRows
from kaggle_utils.training.run import Run


def objective_loss(
    objective: ObjectiveConfig,
    logits: torch.Tensor,
    hard: torch.Tensor,
    teacher: torch.Tensor,
    weight: torch.Tensor | None,
    totals: tuple[float, float, float] | None = None,
) -> torch.Tensor:
    """The run's loss of ``logits`` (B, 2): :func:`~kaggle_utils.models.losses.preference_loss` with the objective's
    kind, KL weight, temperature and cosine weight."""
    return preference_loss(
        logits,
        hard,
        teacher,
        objective.loss,
        objective.kl_weight,
        objective.temperature,
        objective.cos_weight,
        row_weight=weight,
        totals=totals,
    )


def micro_batch(
    cfg: TrainConfig, d: TrainRows, pad_id: int, dev: torch.device, idx: np.ndarray, swapped: np.ndarray
) -> tuple[dict, np.ndarray | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model inputs, packed rows' last positions (None: padded), human labels, teacher logits and row weights of
    rows ``idx``, in this epoch's orientation (the token budget's probe calls it before a :class:`Run` exists).

    A swapped row shows B first: its label flips and its teacher logits swap with it.
    """
    rows = d.tokens.rows(idx, swapped[idx])
    ends = None
    if cfg.optim.packing:  # input_ids, position_ids: (1, T), T = the rows' tokens; row bounds stay on the CPU
        enc, ends = pack(rows)
    else:  # input_ids, attention_mask: (B, T), T = the longest row
        enc = pad(rows, pad_id)
    hard = np.where((d.hard[idx] >= 0) & swapped[idx], 1 - d.hard[idx], d.hard[idx])  # (B,), -1 stays -1
    teacher = np.where(swapped[idx, None], d.teacher[idx, ::-1], d.teacher[idx])  # (B, 2)
    return (
        {k: v.to(dev) if k in ("input_ids", "attention_mask", "position_ids") else v for k, v in enc.items()},
        ends,
        torch.from_numpy(hard).to(dev),
        torch.from_numpy(np.ascontiguousarray(teacher)).to(dev),
        torch.from_numpy(d.weight[idx]).to(dev),
    )


def _check_finite(run: Run, loss: torch.Tensor, idx: np.ndarray) -> None:
    """Stop the run on an inf/NaN loss, before its gradients reach the weights and before any adapter is saved."""
    if torch.isfinite(loss):
        return
    ids = [str(i) for i in run.data.row_ids[idx]]
    raise NonFiniteLossError(
        f"step {run.step + 1}: the loss is {loss.item()} on the rows with id {ids}; stopped without saving an "
        f"adapter (the checkpoint of step {run.step} or earlier is kept). Check these rows' labels and teacher "
        f"logits; else lower lr, or train in bf16/fp32 (--dtype) if this is fp16 on a {run.device} device"
    )


def _backward(run: Run, idx: np.ndarray, swapped: np.ndarray, totals: tuple[float, float, float], sync: bool) -> float:
    """Forward and backward of rows ``idx``: their share of the step's loss, each term over the step's ``totals``.

    Returns that share. A micro-batch that runs out of memory is split in halves, each retried (its rows keep
    their weights and the step its totals, so the gradient is the unsplit one). Gradients are kept across
    processes only where ``sync`` (the process's last micro-batch of the step).
    """
    cfg, par = run.cfg, run.parallel
    enc, ends, hard, teacher, weight = micro_batch(cfg, run.data, run.tok.pad_token_id, run.device, idx, swapped)
    width = enc["input_ids"].shape[1]
    shape = f"{len(idx)} packed row(s), {width} tokens" if cfg.optim.packing else f"{len(idx)} row(s) x {width} tokens"
    # what a backward that dies half-way (having added part of its gradient) is rolled back to
    grads = [None if p.grad is None else p.grad.clone() for p in run.params]
    in_backward = False
    try:
        with par.no_sync(run.wrapped, skip=not sync):
            with run.precision.context(run.device):
                if cfg.optim.packing:
                    logits = packed_logits(run.wrapped, run.head, enc, ends)  # (B, 2)
                else:
                    logits = run.wrapped(**enc).logits  # (B, 2)
            # the loss itself in fp32, outside autocast (losses.preference_loss upcasts the logits)
            loss = objective_loss(cfg.objective, logits, hard, teacher, weight, totals)
            _check_finite(run, loss, idx)
            in_backward = True
            # x world: DDP averages the processes' gradients, where the step's gradient is their sum
            run.scaler.scale(loss * par.world).backward()
        return loss.item()
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err):
            raise
    # out of memory: outside the except block, so the failed attempt's activations are freed with its traceback
    del enc, ends, hard, teacher, weight
    for p, g in zip(run.params, grads, strict=True):
        p.grad = g
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    where = f"step {run.step + 1}: out of memory in the {'backward' if in_backward else 'forward'} of {shape}"
    _refuse_retry(run, idx, where, in_backward and sync)
    half = (len(idx) + 1) // 2
    print(f"{where}; retrying it as {half} + {len(idx) - half} rows (lower batch_tokens to avoid the retries)")
    first = _backward(run, idx[:half], swapped, totals, sync=False)
    return first + _backward(run, idx[half:], swapped, totals, sync=sync)


def _refuse_retry(run: Run, idx: np.ndarray, where: str, syncing: bool) -> None:
    """Stop the run where a micro-batch that ran out of memory cannot be split and retried, naming what to change."""
    cfg, par = run.cfg, run.parallel
    if len(idx) == 1:
        raise TrainMemoryError(
            f"{where} (the row with id {run.data.row_ids[idx[0]]}): one row alone does not fit. Set "
            f"gradient_checkpointing = true (now {cfg.optim.gradient_checkpointing}), lower max_length (now "
            f"{cfg.inputs.max_length}), or load the base in 4-bit; "
            f"batch_tokens={cfg.optim.batch_tokens} only bounds batches"
        )
    if par.fsdp:  # every forward all-gathers layers from every rank: a retry on this rank alone would hang the rest
        raise TrainMemoryError(
            f"{where} under FSDP, where a micro-batch cannot be split and retried: lower batch_tokens (now "
            f"{cfg.optim.batch_tokens}) or set gradient_checkpointing = true (now {cfg.optim.gradient_checkpointing})"
        )
    if syncing and par.world > 1:
        # the gradient all-reduce had started with the other processes: it cannot be taken back and redone
        raise TrainMemoryError(
            f"{where}, while its gradients were being synchronised across processes: lower batch_tokens (now "
            f"{cfg.optim.batch_tokens}) or set gradient_checkpointing = true (now {cfg.optim.gradient_checkpointing})"
        )


def train_step(run: Run, epoch: int, micro_batches: list[np.ndarray], swapped: np.ndarray) -> dict:
    """One optimiser step over its micro-batches; its history row is appended to ``run.history``.

    A step is ``grad_accum`` micro-batches per process. Every process knows the whole step (the schedule is the
    same everywhere) and takes micro-batches ``rank::world`` of it; each loss term of a micro-batch is divided by
    the row weight behind that term in the whole step (:func:`~kaggle_utils.models.losses.term_totals`), so the
    synchronised gradient is the one a single process would get from all of them. The gradients are synchronised
    once, in the backward of the process's last micro-batch. A step whose gradient is not finite is skipped
    (:func:`_update`); the schedule goes on.
    """
    par, t0 = run.parallel, time.monotonic()
    d, rows = run.data, np.concatenate(micro_batches)
    totals = term_totals(d.hard[rows] >= 0, np.isfinite(d.teacher[rows]).all(1), d.weight[rows])
    mine = micro_batches[par.shard.rank :: par.world]
    if not mine:  # a process without a backward would never join the gradient all-reduce: the others would hang
        raise ValueError(f"a step of {len(micro_batches)} micro-batch(es) for {par.world} processes leaves one idle")
    loss_sum = 0.0
    if totals[1] > 0:  # every process sees the same step: all of them skip a weightless one alike
        for i, idx in enumerate(mine):
            loss_sum += _backward(run, idx, swapped, totals, sync=i == len(mine) - 1)
    loss_sum = par.sum(loss_sum)  # the step's loss over every process's rows
    grad_norm, skipped = _update(run, weightless=totals[1] <= 0)
    row = {
        "step": run.step,
        "epoch": epoch,
        "loss": loss_sum,
        "lr": run.scheduler.get_last_lr()[0],
        "rows": len(rows),
        "tokens": int(d.lengths[rows].sum()),
        # sum of squared row lengths: attention's share of the step's work (benchmarks/bench_train.py's FLOPs)
        "tokens_sq": int((d.lengths[rows].astype(np.int64) ** 2).sum()),
        "grad_norm": grad_norm,
        "skipped": skipped,
        "seconds": time.monotonic() - t0,
    }
    run.history.append(row)
    return row


# non-finite gradients in a row after which the run stops: a few are fp16 loss scaling finding its scale
MAX_SKIPPED_IN_A_ROW = 20


def _update(run: Run, weightless: bool = False) -> tuple[float, bool]:
    """Clip and apply the step's gradient, unless it is not finite; advance the schedule either way.

    Returns the gradient norm and whether the update was skipped. fp16 loss scaling skips an overflowing step
    itself (and lowers the scale); in bf16/fp32 a non-finite gradient is never applied here, so no weight and no
    checkpoint holds it. ``MAX_SKIPPED_IN_A_ROW`` skipped steps in a row stop the run naming the step.
    """
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = float(run.parallel.clip_grad_norm(run.params, 1.0))  # under FSDP the whole, sharded gradient's
    skipped = weightless or not math.isfinite(grad_norm)
    if run.scaler.is_enabled():
        run.scaler.step(run.optimizer)  # skipped when fp16 gradients overflowed (the scale is then lowered)
        run.scaler.update()
    elif not skipped:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.skipped_in_a_row = run.skipped_in_a_row + 1 if skipped and not weightless else 0
    if run.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
        raise NonFiniteLossError(
            f"step {run.step}: the gradient was not finite at {run.skipped_in_a_row} steps in a row (skipped, "
            f"nothing saved from them). Likely causes: lr too high (now {run.cfg.optim.lr}), rows whose inputs "
            f"overflow in {run.precision.autocast or 'the weights dtype'}; lower lr, or train in bf16/fp32 (--dtype)"
        )
    return grad_norm, skipped
