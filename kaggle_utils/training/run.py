"""The state of one training run: rows, model, optimiser, schedule position, history and the best evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from kaggle_utils.inputs.formatter import PromptFormatter
from kaggle_utils.models.packing import classifier_head
from kaggle_utils.training.config import TrainConfig
from kaggle_utils.training.parallel import Parallel
from kaggle_utils.training.precision import Precision
from kaggle_utils.training.rows import TrainRows


@dataclass
class Run:
    """One training run: built by ``setup`` (resumed from its checkpoint if any), advanced by ``train_step``."""

    cfg: TrainConfig
    tok: Any  # the transformers tokenizer: its pad id pads batches, and it is saved beside the adapter
    fmt: PromptFormatter
    data: TrainRows
    val_df: pd.DataFrame
    model: torch.nn.Module
    device: torch.device
    precision: Precision
    params: list[torch.nn.Parameter]  # the trainable ones (LoRA and the head), fp32: optimised and clipped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # loss scaling for fp16; a pass-through when disabled
    total_steps: int
    # this process's place in a data-parallel launch (one process: rank 0 of 1)
    parallel: Parallel = field(default_factory=Parallel)
    # what the training step calls: DDP around ``model`` in a launch, else ``model`` itself (also under FSDP2,
    # which shards it in place); evaluation and saving use ``model`` (the peft model), which holds the same parameters
    wrapped: torch.nn.Module | None = None
    # the classifier's head, whose output at every position gives packed rows their logits (packing only)
    head: torch.nn.Module | None = None
    step: int = 0  # optimiser steps taken; a resumed run starts at its checkpoint's
    skipped_in_a_row: int = 0  # the latest steps whose gradient was not finite (not applied)
    # seconds one evaluation is priced at before the first one ran (training.eval_cost; 0 without a time budget)
    eval_estimate: float = 0.0
    history: list[dict] = field(default_factory=list)  # one row per step taken: what history.csv holds
    evals: list[dict] = field(default_factory=list)  # one row per evaluation: what evals.csv holds
    # the best evaluation so far: step, its metrics, per-language table, predictions and adapter weights (CPU)
    best: dict | None = None

    def __post_init__(self) -> None:
        if self.wrapped is None:
            self.wrapped = self.model
        if self.cfg.optim.packing and self.head is None:
            self.head = classifier_head(self.model)

    @property
    def checkpoint_path(self) -> Path:
        return self.cfg.data.out_dir / "checkpoint.pt"
