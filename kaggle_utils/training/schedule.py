"""The order of training: token-budget micro-batches per epoch, optimiser steps, and the learning-rate curve.

Everything here depends on the config, the row lengths and the world size alone, so a resumed run replays the
schedule up to its checkpoint and goes on with the very batches the uninterrupted run would have seen. The train
stage and the multiple-choice baseline share it (:class:`Batching`: the fields it reads of their configs).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from kaggle_utils.inputs.batching import packed_batches, token_budget_batches


class Batching(Protocol):
    """What the schedule reads of a stage's config (``TrainConfig``, ``MultipleChoiceConfig``)."""

    train_file: Path  # named when the rows cannot fill a step
    seed: int  # the shuffles and the A/B swaps
    swap_fraction: float  # share of rows shown A/B-swapped each epoch
    batch_tokens: int  # padded (or packed) tokens per micro-batch
    max_rows: int  # most rows in one micro-batch
    grad_accum: int  # micro-batches per optimiser step and process
    packing: bool  # rows packed end to end instead of padded


@dataclass(frozen=True)
class BatchSettings:
    """A :class:`Batching` gathered from a sectioned config's sections (``TrainConfig.batching``)."""

    train_file: Path
    seed: int
    swap_fraction: float
    batch_tokens: int
    max_rows: int
    grad_accum: int
    packing: bool


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def epoch_batches(
    cfg: Batching, lengths: np.ndarray, epoch: int, per_step: int = 1
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Which rows are swapped, and the shuffled token-budget batches, for one epoch (deterministic).

    The first epoch opens with its ``per_step`` largest micro-batches (most tokens held, then the longest row):
    a run that does not fit in memory fails in its first step, not hours in, and a resumed run replays the same
    order.
    """
    rng = np.random.default_rng([cfg.seed, epoch])
    swapped = rng.random(len(lengths)) < cfg.swap_fraction
    batcher = packed_batches if cfg.packing else token_budget_batches
    batches = batcher(lengths, cfg.batch_tokens, cfg.max_rows, shuffle=True, seed=cfg.seed + epoch)
    if epoch == 0 and batches:
        longest = np.array([int(lengths[b].max()) for b in batches])
        # the tokens the GPU holds: a pack's own, a padded batch's rows x its longest row
        rows = np.array([len(b) for b in batches])
        size = np.array([int(lengths[b].sum()) for b in batches]) if cfg.packing else longest * rows
        first = np.lexsort((-np.arange(len(batches)), longest, size))[::-1][:per_step]  # largest first, ties in order
        rest = np.setdiff1d(np.arange(len(batches)), first)  # the others keep their shuffled order
        batches = [batches[i] for i in [*first, *rest]]
    return swapped, batches


def steps_per_epoch(cfg: Batching, lengths: np.ndarray, world: int = 1) -> int:
    """Optimiser steps in one epoch; the same every epoch, since shuffling reorders batches but never regroups them."""
    n_batches = len(epoch_batches(cfg, lengths, 0)[1])
    per_step = cfg.grad_accum * world
    if n_batches < per_step:
        # an epoch would hold no complete optimiser step, and the schedule would never yield one
        processes = f" x {world} processes = {per_step}" if world > 1 else ""
        raise ValueError(
            f"{cfg.train_file}: {len(lengths)} training rows make {n_batches} micro-batch(es) under "
            f"batch_tokens={cfg.batch_tokens} and max_rows={cfg.max_rows}, fewer than the grad_accum={cfg.grad_accum}"
            f"{processes} one optimiser step needs; lower grad_accum (or max_rows / batch_tokens: smaller "
            f"micro-batches, more of them){', or launch fewer processes' if world > 1 else ''}, or train on more rows"
        )
    return n_batches // per_step


def schedule(cfg: Batching, lengths: np.ndarray, world: int = 1) -> Iterator[tuple[int, np.ndarray, list[np.ndarray]]]:
    """``(epoch, swapped, micro_batches)`` of every optimiser step in order, epoch after epoch without end.

    A step is ``grad_accum x world`` micro-batches, which the ``world`` processes of a data-parallel launch share
    (:func:`train_step`): 2 processes at grad_accum=1 train exactly what 1 process does at grad_accum=2.
    It depends on the config, the row lengths and the world size alone, so a resumed run replays it up to its
    checkpoint and goes on with the very batches the uninterrupted run would have seen. An epoch's last
    micro-batches that cannot fill a step are left out.
    """
    per_step = cfg.grad_accum * world
    for epoch in itertools.count():
        swapped, batches = epoch_batches(cfg, lengths, epoch, per_step)
        for i in range(0, len(batches) - per_step + 1, per_step):
            yield epoch, swapped, batches[i : i + per_step]
