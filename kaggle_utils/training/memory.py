"""The memory probe of ``batch_tokens = 0``: the padded tokens per micro-batch a training step fits on this GPU."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from kaggle_utils.scoring.memory import CudaGauge, MemoryGauge, TokenBudget, probe_token_budget
from kaggle_utils.scoring.predict import _is_oom
from kaggle_utils.training.config import OptimConfig, TrainConfig
from kaggle_utils.training.parallel import Parallel
from kaggle_utils.training.precision import Precision
from kaggle_utils.training.rows import TrainRows
from kaggle_utils.training.step import micro_batch, objective_loss

# batch_tokens=0 where there is no GPU memory to measure (the CPU): the field's default
FALLBACK_BATCH_TOKENS = 8192


def refuse_measured_budget_under_fsdp(optim: OptimConfig, parallel: Parallel) -> None:
    """Under FSDP every forward is a collective of every rank: a probe batch that runs out of memory on one rank
    cannot be dropped there alone, so the budget is not measured."""
    if parallel.fsdp and not optim.batch_tokens:
        raise ValueError(
            "batch_tokens=0 (measured from free GPU memory) is not available under FSDP: give batch_tokens (e.g. "
            "what a probe of this model on one GPU printed, divided by the processes if it had to be sharded)"
        )


def measured_batch_tokens(
    cfg: TrainConfig, model, data: TrainRows, pad_id: int, device: torch.device, precision: Precision, par: Parallel
) -> TrainConfig:
    """``cfg`` with batch_tokens=0 replaced by the measured budget, the same on every process (their smallest)."""
    log = print if par.is_main else (lambda line: None)  # the other processes probe alike; rank 0 speaks for them
    budget = probe_batch_tokens(cfg, model, data, pad_id, device, precision, log=log)
    tokens = par.min(budget.tokens)  # one schedule for every process: the budget of the tightest device
    if par.is_main:
        smallest = f" (the smallest of {par.world} processes')" if par.world > 1 else ""
        print(
            f"batch_tokens=0: {tokens:,} padded tokens per micro-batch{smallest}, from {budget.describe()}; "
            f"saved in {cfg.data.out_dir / 'train_config.json'}"
        )
    return cfg.replace(batch_tokens=tokens)


def probe_batch_tokens(
    cfg: TrainConfig,
    model: torch.nn.Module,
    data: TrainRows,
    pad_id: int,
    device: torch.device,
    precision: Precision,
    *,
    gauge: MemoryGauge | None = None,
    log=print,
) -> TokenBudget:
    """Padded tokens per micro-batch that fit a training forward and backward of ``model`` on ``device``.

    :func:`~kaggle_utils.scoring.memory.probe_token_budget` on the longest training rows, each probe a real
    micro-batch (the step's inputs, autocast and loss) and its backward: the activations kept for backward bound
    training memory (far fewer with gradient checkpointing). The optimiser's state, two fp32 moments per trainable
    weight allocated at the first step, is kept off the limit. The weights, their gradients, the train/eval mode
    and the random state are left as they were. Without ``gauge`` a CUDA device is read by :class:`CudaGauge`;
    elsewhere the budget is ``FALLBACK_BATCH_TOKENS``. Call it on the unwrapped model: a DDP backward would
    synchronise processes that probe different batches.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    reserve = 2 * sum(p.numel() * p.element_size() for p in params)
    fits = _probe_step(cfg, model, data, pad_id, device, precision, params)
    if gauge is None and device.type == "cuda":
        gauge = CudaGauge(device)
    was_training = model.training
    model.train()  # dropout masks and checkpointing are kept as in training
    forked = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=forked):  # the probe's dropout draws leave training's random stream
            return probe_token_budget(
                model,
                data.tokens,
                data.lengths,
                pad_id,
                device,
                gauge=gauge,
                max_rows=cfg.optim.max_rows,
                fallback=max(FALLBACK_BATCH_TOKENS, cfg.inputs.max_length),
                log=log,
                run_batch=fits,
                reserve=reserve,
            )
    finally:
        model.train(was_training)


def _probe_step(
    cfg: TrainConfig,
    model: torch.nn.Module,
    data: TrainRows,
    pad_id: int,
    device: torch.device,
    precision: Precision,
    params: list[torch.nn.Parameter],
) -> Callable[[np.ndarray], bool]:
    """The probe's test of a micro-batch: a training forward and backward of rows ``idx``; False if out of memory.

    The gradients are put back as they were after every probe.
    """
    unswapped = np.zeros(len(data), dtype=bool)  # (N,): memory is the same in either orientation

    def fits(idx: np.ndarray) -> bool:
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        try:
            enc, _, hard, teacher, weight = micro_batch(cfg, data, pad_id, device, idx, unswapped)
            with precision.context(device):
                logits = model(**enc).logits  # (B, 2)
            loss = objective_loss(cfg.objective, logits, hard, teacher, weight)
            loss.backward()  # unscaled: loss scaling changes the gradients' values, not their memory
            return True
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
            return False  # the failed batch's activations are freed with this frame, before the gauge clears
        finally:
            for p, g in zip(params, grads, strict=True):
                p.grad = g

    return fits
