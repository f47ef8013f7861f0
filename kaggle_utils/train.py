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
the budget once the model is loaded (:func:`probe_batch_tokens`: forwards and backwards of the longest rows against
the free GPU memory) and builds the schedule from it; the resolved budget is saved with the config.

Several GPUs (data-parallel, DDP): ``accelerate launch --config_file kaggle_utils/recipes/accelerate/ddp.yaml
--num_processes N -m kaggle_utils.train --recipe ...``. A step is ``grad_accum x N`` micro-batches, the processes
taking ``grad_accum`` each; rank 0 writes every file (:class:`~kaggle_utils.parallel.Parallel`, :func:`train_step`).
Sharded (FSDP2, a 70B/72B whose training does not fit one GPU): the same with ``--config_file
kaggle_utils/recipes/accelerate/fsdp.yaml``; evaluation and the adapter's gathering are then done by every rank,
and no checkpoint is written (a run cannot be resumed).

``python -m kaggle_utils.train --train-file demo/work/prepared/train.parquet --out-dir demo/work/student``
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kaggle_utils.config.cli import config_to_dict, parse_config, save_config
from kaggle_utils.data import schema
from kaggle_utils.data.mixing import MixConfig, mix_extras, read_extras
from kaggle_utils.inputs.batching import packed_batches, pad, token_budget_batches
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.inputs.tokens import PairTokens
from kaggle_utils.models.loading import (
    LoraSettings,
    ModelConfig,
    compute_dtype,
    load_classifier,
    load_tokenizer,
    model_device,
    pick_device,
)
from kaggle_utils.models.losses import LOSSES, preference_loss
from kaggle_utils.models.packing import classifier_head, pack, packed_logits
from kaggle_utils.parallel import Parallel
from kaggle_utils.scoring import calibration
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.scoring.memory import CudaGauge, MemoryGauge, TokenBudget, probe_token_budget
from kaggle_utils.scoring.metrics import SELECTABLE, by_language, evaluate_pairs
from kaggle_utils.scoring.predict import _is_oom
from kaggle_utils.store import write_atomic


@dataclass
class TrainConfig(ModelConfig, InputConfig, MixConfig):
    """LoRA training of one model; every field is also a ``--flag`` of ``python -m kaggle_utils.train``."""

    # the stage its recipes name (``stage = "train"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "train"

    # prepared training file with a ``fold`` column (stage 1 output); may carry teacher ``p_a``/``p_b``
    train_file: Path = Path("demo/work/prepared/train.parquet")
    # extra pseudo-labelled files (stage 2 output: ``logit_a``/``logit_b`` and/or ``p_a``/``p_b``), added to the
    # training rows; files labelling the same ids (one per teacher) are merged, their logits averaged
    extra_files: list[str] = field(default_factory=list)
    # folder that receives adapter/, metrics.json, history.csv, evals.csv, val_predictions.parquet and the config
    out_dir: Path = Path("demo/work/model")
    # rows of this fold are held out for validation; -1 trains on every row
    val_fold: int = 0
    # "ce" (human labels only), "kl" (distillation only) or "mixed" (both, weighted by kl_weight)
    loss: str = "ce"
    # weight of the distillation term in the "mixed" loss; cross-entropy gets 1 - kl_weight
    kl_weight: float = 0.5
    # temperature T of the distillation term: teacher and student logits are both divided by it (x T^2)
    temperature: float = 1.0
    # weight of an extra 1 - cosine(student, teacher) term on the softened distributions (0: off)
    cos_weight: float = 0.0
    # row weight per value of the rows' ``source`` column (unlisted sources weigh 1); a ``weight`` column wins
    source_weights: dict[str, float] = field(default_factory=dict)
    # LoRA rank
    lora_r: int = 16
    # LoRA scale numerator: updates are scaled by lora_alpha / lora_r
    lora_alpha: int = 32
    # dropout on the LoRA branch
    lora_dropout: float = 0.05
    # adapter folder of an earlier run (its ``out_dir/adapter``) to continue from: its LoRA weights (lora_r and
    # lora_alpha must be its own) instead of a fresh LoRA; empty: a fresh LoRA
    init_adapter: Path | None = None
    # with init_adapter: keep that adapter's trained head; false: the head a run without init_adapter starts from
    init_head: bool = False
    # train on the extra_files alone (e.g. pseudo-labels before competition rows): train_file's rows then serve
    # only as the validation fold val_fold
    extras_only: bool = False
    # peak learning rate (linear warm-up, then cosine decay to 10%)
    lr: float = 1e-4
    # share of the steps spent warming up
    warmup_fraction: float = 0.05
    # passes over the training rows (fractions allowed)
    epochs: float = 1.0
    # padded tokens per micro-batch (rows x longest row): the memory knob. 0: measured once the model is loaded, by
    # forwards and backwards of the longest training rows (the smallest budget of a launch's processes; 8192 on the
    # CPU; not with packing or FSDP); a resumed run keeps its first budget. The resolved number is saved in the configs
    batch_tokens: int = 8192
    # most rows in one micro-batch
    max_rows: int = 16
    # pack a micro-batch's rows end to end into one sequence of at most batch_tokens real tokens (no padding;
    # attention stays inside each row): kaggle_utils.models.packing. Needs sdpa or eager attention
    packing: bool = False
    # micro-batches per optimiser step
    grad_accum: int = 1
    # share of rows shown A/B-swapped each epoch (labels swap with them)
    swap_fraction: float = 0.5
    # recompute activations in backward to fit long rows in memory (slower)
    gradient_checkpointing: bool = False
    # wall-clock limit in minutes (0: none); training stops cleanly before the step that would pass it
    time_budget_minutes: float = 0.0
    # save a resumable checkpoint every this many steps (0: only at the end)
    save_every: int = 200
    # evaluate on the held-out fold every this many steps (0: only at the end); the end is always evaluated
    eval_every_steps: int = 0
    # the evaluation metric that picks the adapter kept: "log_loss", "accuracy" or "swap_consistency"
    best_metric: str = "log_loss"
    # languages listed on their own in the per-language table; the others are pooled as "other"
    eval_languages: int = 8
    # use at most this many training rows (0: all), for quick runs
    max_train_rows: int = 0
    # seed for shuffling, A/B swaps and LoRA initialisation
    seed: int = 42

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        InputConfig.__post_init__(self)
        MixConfig.__post_init__(self)
        self.train_file = Path(self.train_file)
        self.out_dir = Path(self.out_dir)
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; expected one of {LOSSES}")
        if not 0 <= self.kl_weight <= 1 or self.cos_weight < 0 or self.temperature <= 0:
            raise ValueError(
                f"need 0 <= kl_weight <= 1, cos_weight >= 0 and temperature > 0; got kl_weight={self.kl_weight}, "
                f"cos_weight={self.cos_weight}, temperature={self.temperature}"
            )
        bad = {k: v for k, v in self.source_weights.items() if not (isinstance(v, (int, float)) and v >= 0)}
        if bad:
            raise ValueError(f"source_weights {bad}: weights must be numbers >= 0")
        if not 0 <= self.swap_fraction <= 1:
            raise ValueError(f"swap_fraction={self.swap_fraction} must be in [0, 1]")
        if self.epochs <= 0 or self.lr <= 0 or self.batch_tokens < 0 or 0 < self.batch_tokens < self.max_length:
            raise ValueError(
                f"need epochs > 0, lr > 0 and batch_tokens >= max_length (or 0: measured from free GPU memory); got "
                f"epochs={self.epochs}, lr={self.lr}, batch_tokens={self.batch_tokens}, max_length={self.max_length}"
            )
        if self.packing and not self.batch_tokens:
            # the probe measures padded micro-batches; a pack's memory at the same tokens is not measured
            raise ValueError(
                "batch_tokens=0 (measured from free GPU memory) is not available with packing=True: give batch_tokens "
                "(e.g. the budget a run with packing=False measured, printed and saved in its train_config.json)"
            )
        if self.best_metric not in SELECTABLE:
            raise ValueError(f"best_metric={self.best_metric!r}; expected one of {sorted(SELECTABLE)}")
        if self.eval_every_steps < 0 or self.eval_languages < 0:
            raise ValueError(
                f"eval_every_steps={self.eval_every_steps} and eval_languages={self.eval_languages} must be >= 0"
            )
        self.init_adapter = Path(self.init_adapter) if self.init_adapter else None
        if self.init_head and self.init_adapter is None:
            raise ValueError("init_head=True keeps the head of init_adapter, but no init_adapter is given")
        if self.extras_only and not self.extra_files:
            raise ValueError("extras_only=True trains on the extra_files alone, but extra_files is empty")


@dataclass
class TrainResult:
    adapter_dir: Path
    history: pd.DataFrame
    metrics: dict
    # one row per evaluation (step, accuracy, log_loss, ...): what evals.csv holds
    evals: pd.DataFrame = field(default_factory=pd.DataFrame)
    # per-language accuracy of the kept adapter (metrics.by_language)
    languages: pd.DataFrame = field(default_factory=pd.DataFrame)


class NonFiniteLossError(RuntimeError):
    """The training loss became inf/NaN; the message names the step, the rows and what to try."""


def _check_val_fold(cfg: TrainConfig, folds: pd.Series) -> None:
    """``val_fold`` selects rows of a numeric ``fold`` column: anything else would train with no validation."""
    found = sorted(pd.unique(folds.dropna()).tolist(), key=str)
    shown = f"{found[:12]!r}{' ...' if len(found) > 12 else ''}"
    if not pd.api.types.is_numeric_dtype(folds):
        # strings "0", "1" never equal the number 0: every row would train and none validate
        raise schema.DataError(
            f"{cfg.train_file}: the 'fold' column holds {folds.dtype} values {shown}, not numbers; write the folds "
            f"as integers (the prepare stage does), or pass --val-fold -1 to train on every row"
        )
    if not (folds == cfg.val_fold).any():
        raise schema.DataError(
            f"{cfg.train_file}: --val-fold {cfg.val_fold} selects no rows; the 'fold' column holds {shown}: pass "
            "one of them, or --val-fold -1 to train on every row"
        )


def split(cfg: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training rows (labelled folds + pseudo-labelled extras) and validation rows."""
    df = schema.load(cfg.train_file, "train")
    if cfg.val_fold >= 0:
        if "fold" not in df.columns:
            raise schema.DataError(f"{cfg.train_file}: no 'fold' column; run the prepare stage or pass --val-fold -1")
        _check_val_fold(cfg, df["fold"])
        train_df, val_df = df[df["fold"] != cfg.val_fold], df[df["fold"] == cfg.val_fold]
    else:
        train_df, val_df = df, df.iloc[:0]
    extras = []
    if cfg.extra_files:
        # one file per teacher over the same pool: one row per id, the teachers' logits averaged; then the mixing
        # settings (confidence, agreement with a human label, per-source caps) choose the rows, and say so
        extras = [mix_extras(cfg, read_extras(cfg.extra_files), cfg.seed)[0]]
    kept = [] if cfg.extras_only else [train_df]  # extras_only: the labelled rows only validate
    train_df = pd.concat([*kept, *extras], ignore_index=True)
    if cfg.max_train_rows:
        train_df = train_df.sample(n=min(cfg.max_train_rows, len(train_df)), random_state=cfg.seed)
    return train_df.reset_index(drop=True), val_df.reset_index(drop=True)


def _targets(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Human labels (N,) int64, -1 where a row has none, and teacher logits (N, 2), NaN where it has none."""
    hard = np.full(len(df), -1, dtype=np.int64)
    if "winner" in df.columns:
        known = df["winner"].isin(schema.WINNERS).to_numpy()
        hard[known] = schema.labels(df[known])
    return hard, schema.teacher_logits(df)


def _row_weights(cfg: TrainConfig, df: pd.DataFrame) -> np.ndarray:
    """(N,) float32: the ``weight`` column where given, else ``source_weights[source]``, else 1."""
    w = np.ones(len(df), dtype=np.float32)
    if cfg.source_weights and "source" in df.columns:
        w = df["source"].map(cfg.source_weights).fillna(1.0).to_numpy(dtype=np.float32)
    if "weight" in df.columns:
        given = df["weight"].to_numpy(dtype=np.float32)
        w = np.where(np.isfinite(given), given, w)
    if (w < 0).any() or w.sum() <= 0:
        raise schema.DataError(f"row weights must be >= 0 and not all 0; got min {w.min()}, sum {w.sum()}")
    return w


# fields that may change between a run and its resumption without changing what is trained
RESUMABLE_CHANGES = frozenset({"time_budget_minutes", "save_every", "device", "out_dir", "eval_every_steps"})


def _resume_blockers(saved: dict, current: dict) -> list[str]:
    """Config fields whose change makes a checkpoint's schedule or weights meaningless for this run."""
    return sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def _epoch_batches(
    cfg: TrainConfig, lengths: np.ndarray, epoch: int, per_step: int = 1
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


def _steps_per_epoch(cfg: TrainConfig, lengths: np.ndarray, world: int = 1) -> int:
    """Optimiser steps in one epoch; the same every epoch, since shuffling reorders batches but never regroups them."""
    n_batches = len(_epoch_batches(cfg, lengths, 0)[1])
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


def _schedule(
    cfg: TrainConfig, lengths: np.ndarray, world: int = 1
) -> Iterator[tuple[int, np.ndarray, list[np.ndarray]]]:
    """``(epoch, swapped, micro_batches)`` of every optimiser step in order, epoch after epoch without end.

    A step is ``grad_accum x world`` micro-batches, which the ``world`` processes of a data-parallel launch share
    (:func:`train_step`): 2 processes at grad_accum=1 train exactly what 1 process does at grad_accum=2.
    It depends on the config, the row lengths and the world size alone, so a resumed run replays it up to its
    checkpoint and goes on with the very batches the uninterrupted run would have seen. An epoch's last
    micro-batches that cannot fill a step are left out.
    """
    per_step = cfg.grad_accum * world
    for epoch in itertools.count():
        swapped, batches = _epoch_batches(cfg, lengths, epoch, per_step)
        for i in range(0, len(batches) - per_step + 1, per_step):
            yield epoch, swapped, batches[i : i + per_step]


@dataclass
class TrainRows:
    """The training rows, encoded once; each epoch shows every row in one A/B orientation, built per batch."""

    tokens: PairTokens  # token ids of every row in one flat int32 array; ``rows(idx, swapped)`` builds a batch
    hard: np.ndarray  # (N,) int64: 0 if A wins, 1 if B wins, -1 without a human label
    teacher: np.ndarray  # (N, 2) float32: the teacher's logits of A and B winning, NaN without a teacher
    weight: np.ndarray  # (N,) float32: the row's weight in the loss
    row_ids: np.ndarray  # (N,) the rows' ``id`` values, named when a batch's loss is not finite
    lengths: np.ndarray  # (N,) tokens per row (the same in both orientations); batches are formed on these

    def __len__(self) -> int:
        return len(self.tokens)


def _encode(cfg: TrainConfig, fmt: PromptFormatter, df: pd.DataFrame) -> TrainRows:
    hard, teacher = _targets(df)
    tokens = fmt.encode_pairs(df)
    return TrainRows(tokens, hard, teacher, _row_weights(cfg, df), df["id"].to_numpy(), tokens.lengths)


@dataclass(frozen=True)
class Precision:
    """How a step computes: the autocast dtype (None: as the weights are) and whether the loss is scaled."""

    autocast: torch.dtype | None
    scale_loss: bool

    @classmethod
    def choose(cls, device: torch.device, requested: str = "auto") -> Precision:
        """bf16 on sm_80+ (no scaling: bf16 has fp32's range), fp16 with loss scaling below, fp32 on the CPU.

        fp16 gradients underflow to 0 below 6e-8 and overflow above 65,504: the scaler multiplies the loss so
        small gradients survive, and skips the steps whose gradients overflowed, lowering the scale.
        """
        dtype = compute_dtype(device, requested)  # the same rule the weights were loaded by
        if device.type != "cuda" or dtype == torch.float32:
            return cls(None, False)
        return cls(dtype, dtype == torch.float16)

    def context(self, device: torch.device):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)


def _trainable_in_fp32(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters (LoRA and the head), cast to fp32 where loaded in half precision.

    An fp16 head updated by Adam loses updates smaller than its rounding and overflows in the moments; fp32
    master weights under autocast are the standard mixed-precision recipe (the frozen base stays half).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    return params


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
    history: list[dict] = field(default_factory=list)  # one row per step taken: what history.csv holds
    evals: list[dict] = field(default_factory=list)  # one row per evaluation: what evals.csv holds
    # the best evaluation so far: step, its metrics, per-language table, predictions and adapter weights (CPU)
    best: dict | None = None

    def __post_init__(self) -> None:
        if self.wrapped is None:
            self.wrapped = self.model
        if self.cfg.packing and self.head is None:
            self.head = classifier_head(self.model)

    @property
    def checkpoint_path(self) -> Path:
        return self.cfg.out_dir / "checkpoint.pt"


def setup(cfg: TrainConfig) -> Run:
    """Rows, model, optimiser and schedule of a run, at the step its checkpoint reached (0 without one).

    In a launch of several processes every process builds the same run (same rows, same seed: the same LoRA
    initialisation) on its own device, and its model is wrapped for data-parallel training (``run.wrapped``).
    """
    parallel = Parallel.from_env(cfg)
    _refuse_measured_budget_under_fsdp(cfg, parallel)
    torch.manual_seed(cfg.seed)  # before the model is built: it draws the LoRA initialisation
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.model_path)
    fmt = PromptFormatter(tok, cfg)
    train_df, val_df = split(cfg)
    data = _encode(cfg, fmt, train_df)
    cfg = _resumed_batch_tokens(cfg, parallel)
    if cfg.batch_tokens:  # checked before the model loads, so a bad config fails fast; 0 is measured after it
        steps_per_epoch = _steps_per_epoch(cfg, data.lengths, parallel.world)
    _refuse_fsdp_resume(cfg, parallel)

    here = parallel.shard.device(cfg.device, torch.cuda.is_available())  # cuda:LOCAL_RANK
    model = load_classifier(
        replace(cfg, device=here),
        tok.pad_token_id,
        lora=LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.init_adapter, cfg.init_head),
        gradient_checkpointing=cfg.gradient_checkpointing,
        packing=cfg.packing,
        # FSDP shards the packed nf4 weights only as floating tensors: packed into the compute dtype's storage
        quant_storage=compute_dtype(pick_device(here), cfg.dtype) if parallel.fsdp else None,
    )
    device = model_device(model)
    precision = Precision.choose(device, cfg.dtype)
    params = _trainable_in_fp32(model)  # cast before DDP wraps the model: it registers the parameters as they are
    if not cfg.batch_tokens:  # before DDP wraps the model: the probe's backwards must not synchronise processes
        cfg = _measured_batch_tokens(cfg, model, data, tok.pad_token_id, device, precision, parallel)
        steps_per_epoch = _steps_per_epoch(cfg, data.lengths, parallel.world)
    wrapped = parallel.wrap(model)
    if parallel.fsdp:  # fully_shard replaced every parameter by a sharded one (a DTensor): optimise those
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = max(1, int(cfg.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scale_loss)
    n_trainable = sum(p.numel() for p in params)
    n_taught = int(np.isfinite(data.teacher).all(1).sum())
    per_step = cfg.grad_accum * parallel.world
    processes = f" · {parallel.world} processes x {cfg.grad_accum} micro-batch(es)/step" if parallel.world > 1 else ""
    if parallel.is_main:
        print(
            f"train rows {len(data):,} ({n_taught:,} with a teacher) · val rows {len(val_df):,} · "
            f"tokens/epoch {int(data.lengths.sum()):,} · steps {total_steps} ({steps_per_epoch}/epoch) · "
            f"≤{cfg.batch_tokens * per_step:,} {'packed' if cfg.packing else 'padded'} tokens/step{processes} · "
            f"trainable params {n_trainable:,} · "
            f"device {device} · autocast {precision.autocast} · loss scaling {precision.scale_loss}"
        )
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
        scaler=scaler,
        total_steps=total_steps,
        parallel=parallel,
        wrapped=wrapped,
    )
    load_checkpoint(run)
    # written only once the checkpoint's config guard passed: a refused rerun leaves the run's record intact
    if parallel.is_main:
        save_config(cfg, cfg.out_dir / "train_config.json")
    return run


def _refuse_fsdp_resume(cfg: TrainConfig, parallel: Parallel) -> None:
    """Under FSDP no checkpoint is written (the optimiser state is sharded): an existing one cannot be resumed."""
    path = cfg.out_dir / "checkpoint.pt"
    if parallel.fsdp and path.is_file():
        raise RuntimeError(
            f"{path} exists, and resuming a checkpoint under FSDP is not supported: use a new --out-dir (under "
            "FSDP a run starts from scratch and writes no checkpoints), or resume it with the launch that wrote it"
        )
    if parallel.fsdp and parallel.is_main and cfg.save_every:
        print(f"FSDP: no checkpoints are written (save_every={cfg.save_every} ignored); a stopped run starts over")


# batch_tokens=0 where there is no GPU memory to measure (the CPU): the field's default
FALLBACK_BATCH_TOKENS = 8192


def _refuse_measured_budget_under_fsdp(cfg: TrainConfig, parallel: Parallel) -> None:
    """Under FSDP every forward is a collective of every rank: a probe batch that runs out of memory on one rank
    cannot be dropped there alone, so the budget is not measured."""
    if parallel.fsdp and not cfg.batch_tokens:
        raise ValueError(
            "batch_tokens=0 (measured from free GPU memory) is not available under FSDP: give batch_tokens (e.g. "
            "what a probe of this model on one GPU printed, divided by the processes if it had to be sharded)"
        )


def _resumed_batch_tokens(cfg: TrainConfig, parallel: Parallel) -> TrainConfig:
    """``cfg`` with batch_tokens=0 resolved to the budget of the checkpoint it resumes, if any.

    A new measurement could give another budget, hence other micro-batches: the checkpoint's step would then
    point into another schedule. The checkpoint's own config (what ``load_checkpoint`` guards with) holds it.
    """
    path = cfg.out_dir / "checkpoint.pt"
    if cfg.batch_tokens or not path.is_file():
        return cfg
    # mmap: only the config's bytes are read, not the adapter's and the optimiser's
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("config", {})
    tokens = saved.get("batch_tokens")
    if not tokens:
        raise RuntimeError(
            f"{path} records no batch_tokens to resume with, and batch_tokens=0 would measure a new budget (another "
            "schedule): pass the batch_tokens of the run that wrote it (its train_config.json), or use a new --out-dir"
        )
    if parallel.is_main:
        print(f"batch_tokens=0: resuming with the budget {path} was trained with, {tokens:,} padded tokens")
    return replace(cfg, batch_tokens=int(tokens))


def _measured_batch_tokens(
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
            f"saved in {cfg.out_dir / 'train_config.json'}"
        )
    return replace(cfg, batch_tokens=tokens)


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
    unswapped = np.zeros(len(data), dtype=bool)  # (N,): memory is the same in either orientation

    def fits(idx: np.ndarray) -> bool:
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        try:
            enc, _, hard, teacher, weight = _micro_batch(cfg, data, pad_id, device, idx, unswapped)
            with precision.context(device):
                logits = model(**enc).logits  # (B, 2)
            loss = preference_loss(
                logits, hard, teacher, cfg.loss, cfg.kl_weight, cfg.temperature, cfg.cos_weight, row_weight=weight
            )
            loss.backward()  # unscaled: loss scaling changes the gradients' values, not their memory
            return True
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
            return False  # the failed batch's activations are freed with this frame, before the gauge clears
        finally:
            for p, g in zip(params, grads, strict=True):
                p.grad = g

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
                max_rows=cfg.max_rows,
                fallback=max(FALLBACK_BATCH_TOKENS, cfg.max_length),
                log=log,
                run_batch=fits,
                reserve=reserve,
            )
    finally:
        model.train(was_training)


def load_checkpoint(run: Run) -> None:
    """Restore adapter, optimiser, schedule, step, history and evaluations from ``checkpoint.pt``, if any."""
    path = run.checkpoint_path
    if not path.is_file():
        return
    from peft import set_peft_model_state_dict

    state = torch.load(path, map_location="cpu", weights_only=False)
    changed = _resume_blockers(state.get("config", {}), config_to_dict(run.cfg))
    if changed:
        raise RuntimeError(
            f"{path} was written with a different config ({', '.join(changed)}); "
            "use a new --out-dir, or delete the checkpoint to start over"
        )
    saved_world, world = state.get("world", 1), run.parallel.world
    if saved_world != world:
        # a step is grad_accum x processes micro-batches: another world size replays another schedule
        raise RuntimeError(
            f"{path} was written by {saved_world} process(es) and this launch has {world}; relaunch with "
            f"--num_processes {saved_world}, or use a new --out-dir"
        )
    set_peft_model_state_dict(run.model, state["adapter"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    run.step, run.history = state["step"], state["history"]
    run.evals, run.best = state.get("evals", []), state.get("best")
    if run.parallel.is_main:
        print(f"resuming from {path} at step {run.step}/{run.total_steps}")


def save_checkpoint(run: Run) -> None:
    """Everything ``load_checkpoint`` needs to continue at ``run.step``, with the config that guards it.

    Written by rank 0 alone: under DDP every process holds the same weights and optimiser state. Under FSDP
    nothing is written: the optimiser state is sharded, and such a checkpoint is not resumed (see setup).
    """
    from peft import get_peft_model_state_dict

    if not run.parallel.is_main or run.parallel.fsdp:
        return
    state = {
        "adapter": get_peft_model_state_dict(run.model),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "step": run.step,
        "history": run.history,
        "evals": run.evals,
        "best": run.best,
        "config": config_to_dict(run.cfg),
        "world": run.parallel.world,
    }
    write_atomic(run.checkpoint_path, lambda tmp: torch.save(state, tmp))  # a kill mid-save keeps the old one


def _micro_batch(
    cfg: TrainConfig, d: TrainRows, pad_id: int, dev: torch.device, idx: np.ndarray, swapped: np.ndarray
) -> tuple[dict, np.ndarray | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model inputs, packed rows' last positions (None: padded), human labels, teacher logits and row weights of
    rows ``idx``, in this epoch's orientation (the token budget's probe calls it before a :class:`Run` exists).

    A swapped row shows B first: its label flips and its teacher logits swap with it.
    """
    rows = d.tokens.rows(idx, swapped[idx])
    ends = None
    if cfg.packing:  # input_ids, position_ids: (1, T), T = the rows' tokens; row bounds stay on the CPU
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


class TrainMemoryError(RuntimeError):
    """A single training row does not fit in GPU memory; the message names the row and the settings to change."""


def _backward(run: Run, idx: np.ndarray, swapped: np.ndarray, step_weight: float, sync: bool) -> float:
    """Forward and backward of rows ``idx``, the loss weighted by their share of the step's row weight.

    Returns the weighted loss. A micro-batch that runs out of memory is split in halves, each retried (its rows
    keep their weights and the step its total, so the gradient is the unsplit one). Gradients are kept across
    processes only where ``sync`` (the process's last micro-batch of the step).
    """
    cfg, par = run.cfg, run.parallel
    enc, ends, hard, teacher, weight = _micro_batch(cfg, run.data, run.tok.pad_token_id, run.device, idx, swapped)
    width = enc["input_ids"].shape[1]
    shape = f"{len(idx)} packed row(s), {width} tokens" if cfg.packing else f"{len(idx)} row(s) x {width} tokens"
    # what a backward that dies half-way (having added part of its gradient) is rolled back to
    grads = [None if p.grad is None else p.grad.clone() for p in run.params]
    in_backward = False
    try:
        with par.no_sync(run.wrapped, skip=not sync):
            with run.precision.context(run.device):
                if cfg.packing:
                    logits = packed_logits(run.wrapped, run.head, enc, ends)  # (B, 2)
                else:
                    logits = run.wrapped(**enc).logits  # (B, 2)
            # the loss itself in fp32, outside autocast (losses.preference_loss upcasts the logits)
            loss = preference_loss(
                logits, hard, teacher, cfg.loss, cfg.kl_weight, cfg.temperature, cfg.cos_weight, row_weight=weight
            )
            _check_finite(run, loss, idx)
            # weight micro-batches by their rows' weight, so a step's loss is the weighted mean over its rows; x world
            # since DDP averages the processes' gradients where the step's gradient is their sum
            share = float(weight.sum()) / step_weight
            in_backward = True
            run.scaler.scale(loss * (share * par.world)).backward()
        return loss.item() * share
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
    if len(idx) == 1:
        raise TrainMemoryError(
            f"{where} (the row with id {run.data.row_ids[idx[0]]}): one row alone does not fit. Set "
            f"gradient_checkpointing = true (now {cfg.gradient_checkpointing}), lower max_length (now "
            f"{cfg.max_length}), or load the base in 4-bit; batch_tokens={cfg.batch_tokens} only bounds batches"
        )
    if par.fsdp:  # every forward all-gathers layers from every rank: a retry on this rank alone would hang the rest
        raise TrainMemoryError(
            f"{where} under FSDP, where a micro-batch cannot be split and retried: lower batch_tokens (now "
            f"{cfg.batch_tokens}) or set gradient_checkpointing = true (now {cfg.gradient_checkpointing})"
        )
    if in_backward and sync and par.world > 1:
        # the gradient all-reduce had started with the other processes: it cannot be taken back and redone
        raise TrainMemoryError(
            f"{where}, while its gradients were being synchronised across processes: lower batch_tokens (now "
            f"{cfg.batch_tokens}) or set gradient_checkpointing = true (now {cfg.gradient_checkpointing})"
        )
    half = (len(idx) + 1) // 2
    print(f"{where}; retrying it as {half} + {len(idx) - half} rows (lower batch_tokens to avoid the retries)")
    first = _backward(run, idx[:half], swapped, step_weight, sync=False)
    return first + _backward(run, idx[half:], swapped, step_weight, sync=sync)


def train_step(run: Run, epoch: int, micro_batches: list[np.ndarray], swapped: np.ndarray) -> dict:
    """One optimiser step over its micro-batches; its history row is appended to ``run.history``.

    A step is ``grad_accum`` micro-batches per process. Every process knows the whole step (the schedule is the
    same everywhere) and takes micro-batches ``rank::world`` of it; each micro-batch's loss is weighted by its
    rows' share of the whole step's weight, so the synchronised gradient is the one a single process would get
    from all of them. The gradients are synchronised once, in the backward of the process's last micro-batch.
    """
    par, t0 = run.parallel, time.monotonic()
    step_rows = sum(len(idx) for idx in micro_batches)
    step_weight = float(sum(run.data.weight[idx].sum() for idx in micro_batches))
    step_tokens = int(sum(run.data.lengths[idx].sum() for idx in micro_batches))
    # sum of squared row lengths: attention's share of the step's work (benchmarks/bench_train.py's FLOPs)
    step_tokens_sq = int(sum((run.data.lengths[idx].astype(np.int64) ** 2).sum() for idx in micro_batches))
    mine = micro_batches[par.shard.rank :: par.world]
    if not mine:  # a process without a backward would never join the gradient all-reduce: the others would hang
        raise ValueError(f"a step of {len(micro_batches)} micro-batch(es) for {par.world} processes leaves one idle")
    loss_sum = 0.0
    for i, idx in enumerate(mine):
        loss_sum += _backward(run, idx, swapped, step_weight, sync=i == len(mine) - 1)
    loss_sum = par.sum(loss_sum)  # the step's loss over every process's rows
    run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = par.clip_grad_norm(run.params, 1.0)  # under FSDP the norm of the whole, sharded gradient
    run.scaler.step(run.optimizer)  # skipped when fp16 gradients overflowed (the scale is then lowered)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    row = {
        "step": run.step,
        "epoch": epoch,
        "loss": loss_sum,
        "lr": run.scheduler.get_last_lr()[0],
        "rows": step_rows,
        "tokens": step_tokens,
        "tokens_sq": step_tokens_sq,
        "grad_norm": float(grad_norm),
        "seconds": time.monotonic() - t0,
    }
    run.history.append(row)
    return row


def _scores(run: Run, df: pd.DataFrame, desc: str) -> np.ndarray:
    """Probabilities (N, 2) of the model on ``df``'s rows, in row order (NaN where a row could not be scored).

    In a launch each process scores rows ``rank::world`` with its unwrapped model (no collective in a forward
    under DDP; under FSDP every rank makes the same number of forward calls, :meth:`Parallel.predict_proba`)
    and every process receives all of them: evaluation is N times faster on N GPUs, and every process takes
    the same decisions (best adapter) from the same numbers.
    """
    cfg, par = run.cfg, run.parallel
    mine = df.iloc[par.shard.rank :: par.world]
    with run.precision.context(run.device):
        probs = par.predict_proba(
            run.model, run.fmt.encode(mine), run.tok.pad_token_id, cfg.batch_tokens, cfg.max_rows, desc=desc
        )
    return par.gather_rows(probs, len(df))


def validate(run: Run, val_df: pd.DataFrame) -> dict:
    """One evaluation of the model as it is now on ``val_df``, scored in both A/B orientations.

    Returns the record: ``metrics`` (accuracy, log loss, NaN rows, swap consistency, position bias),
    ``languages`` (metrics.by_language, as records) and the predictions ``probs`` / ``probs_swapped`` (N, 2).
    """
    t0 = time.monotonic()
    was_training = run.model.training
    run.model.eval()
    probs = _scores(run, val_df, "validate")  # (N, 2): P(A wins), P(B wins)
    probs_swapped = _scores(run, schema.swap_ab(val_df), "validate (swapped)")  # (N, 2) in the swapped order
    run.model.train(was_training)
    labels = schema.labels(val_df)
    metrics = evaluate_pairs(probs, probs_swapped, labels)
    languages = val_df["language"] if "language" in val_df.columns else pd.Series(["missing"] * len(val_df))
    table = by_language(probs, labels, languages, run.cfg.eval_languages)
    return {
        "metrics": metrics | {"seconds": round(time.monotonic() - t0, 2)},
        "languages": table.to_dict("records"),
        "probs": probs,
        "probs_swapped": probs_swapped,
    }


def _better(cfg: TrainConfig, new: dict, old: dict | None) -> bool:
    """Whether evaluation ``new`` beats the best so far on ``cfg.best_metric`` (a NaN value never does)."""
    value = new["metrics"][cfg.best_metric]
    if old is None:
        return True
    best = old["metrics"][cfg.best_metric]
    if not math.isfinite(value):
        return False
    if not math.isfinite(best):
        return True
    return value < best if SELECTABLE[cfg.best_metric] else value > best


def evaluate_run(run: Run, epoch: int) -> dict:
    """Evaluate now, record it in ``run.evals``, and keep it (with a CPU copy of the adapter) if it is the best."""
    record = validate(run, run.val_df)
    run.evals.append({"step": run.step, "epoch": epoch, **record["metrics"]})
    if _better(run.cfg, record, run.best):  # the same decision on every rank: a gather under FSDP
        run.best = {"step": run.step, **record, "adapter": run.parallel.adapter_copy(run.model)}
    m = record["metrics"]
    if run.parallel.is_main:
        print(
            f"eval at step {run.step}: accuracy {m['accuracy']:.4f} · log loss {m['log_loss']:.4f} · "
            f"swap gap {m['swap_consistency']:.4f} · predicts A {m['position_bias']:.3f} · NaN rows {m['nan_rows']} · "
            f"best {run.cfg.best_metric} at step {run.best['step']}"
        )
    return record


def restore_best(run: Run) -> None:
    """Put the best evaluation's adapter weights back into the model, if the best is not the current state."""
    if run.best is None or run.best["step"] == run.step:
        return
    run.parallel.restore_adapter(run.model, run.best["adapter"])
    if run.parallel.is_main:
        print(f"keeping the adapter of step {run.best['step']} (best {run.cfg.best_metric}), not of step {run.step}")


def save_adapter(run: Run) -> Path:
    """``out_dir/adapter``: LoRA weights, tokenizer and training config, a folder that can be used on its own.

    Written by rank 0 alone (every process holds the same weights; under FSDP every process gathers them first,
    and rank 0 writes the gathered ones); the others return the folder's path.
    """
    gathered = run.parallel.gathered_trainable(run.model)  # None unless FSDP: then {name: full weight}
    named = gathered.items() if gathered is not None else run.model.named_parameters()
    broken = [n for n, p in named if (gathered is not None or p.requires_grad) and not torch.isfinite(p).all()]
    if broken:  # never publish a dead adapter: every score it gives would be NaN
        raise NonFiniteLossError(f"trainable weights {broken[:3]} hold inf/NaN at step {run.step}; no adapter saved")
    adapter_dir = run.cfg.out_dir / "adapter"
    if not run.parallel.is_main:
        return adapter_dir
    run.model.save_pretrained(adapter_dir, state_dict=gathered)  # None: peft reads the model's own weights
    run.tok.save_pretrained(adapter_dir)
    # an adapter copied elsewhere (a Kaggle dataset) still says which max_length, template and truncation it expects
    save_config(run.cfg, adapter_dir / "train_config.json")
    return adapter_dir


def save_val_predictions(run: Run, probs: np.ndarray) -> Path:
    """``val_predictions.parquet`` (id, p_a, p_b, winner) of the kept adapter, in the held-out rows' order."""
    path = run.cfg.out_dir / "val_predictions.parquet"
    val_df = run.val_df
    pd.DataFrame({"id": val_df["id"], "p_a": probs[:, 0], "p_b": probs[:, 1], "winner": val_df["winner"]}).to_parquet(
        path, index=False
    )
    return path


def save_outputs(run: Run, metrics: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``metrics.json``, ``history.csv``, ``evals.csv`` and ``evals.json`` in ``out_dir``; returns history, evals."""
    (run.cfg.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    history = pd.DataFrame(run.history)
    history.to_csv(run.cfg.out_dir / "history.csv", index=False)
    evals = pd.DataFrame(run.evals)
    evals.to_csv(run.cfg.out_dir / "evals.csv", index=False)
    (run.cfg.out_dir / "evals.json").write_text(json.dumps(run.evals, indent=2) + "\n")
    return history, evals


def _eval_due(run: Run, deadline: Deadline) -> bool:
    """An evaluation every ``eval_every_steps`` steps, when the last one's duration still fits the time budget."""
    every = run.cfg.eval_every_steps
    if not (every and len(run.val_df) and run.step % every == 0) or run.step == run.total_steps:
        return False  # the last step is evaluated after the loop, whatever stopped it
    last = run.evals[-1]["seconds"] if run.evals else 0.0
    return deadline.allows(last * 1.5)


def keep_best(run: Run, epoch: int, adapter_dir: Path) -> tuple[Path, dict]:
    """Evaluate the last step (unless done), keep the best evaluation's adapter, its predictions and calibration.

    Returns the adapter folder and the metrics of the kept evaluation (``val``, ``best``, ``val_languages``,
    ``calibration``) for ``metrics.json``.
    """
    cfg = run.cfg
    if not run.evals or run.evals[-1]["step"] != run.step:
        evaluate_run(run, epoch)
        save_checkpoint(run)  # with the final evaluation: a rerun does not evaluate again
    if run.best["step"] != run.step:
        restore_best(run)
        adapter_dir = save_adapter(run)
    if not run.parallel.is_main:  # rank 0 writes the predictions and fits the calibration
        return adapter_dir, {}
    save_val_predictions(run, run.best["probs"])
    # the temperature inference applies to this adapter's probabilities, saved with the adapter it belongs to
    fitted = calibration.fit_from_val_predictions(cfg.out_dir / "val_predictions.parquet")
    fitted.save(adapter_dir / "calibration.json")
    return adapter_dir, {
        "val": dict(run.best["metrics"]),
        "best": {"metric": cfg.best_metric, "step": run.best["step"], "evals": len(run.evals)},
        "val_languages": run.best["languages"],
        "calibration": {"temperature": fitted.temperature, "reason": fitted.reason},
    }


def train(cfg: TrainConfig) -> TrainResult | None:
    """Train (or resume) until the last step or the time budget, evaluating on the way; save the best adapter.

    In a launch of several processes (``accelerate launch --num_processes N -m kaggle_utils.train ...``) each
    process trains its share of every step and evaluates its share of the held-out rows; rank 0 takes the
    decisions that hang on a clock, writes every file and returns the result, the other ranks return None.
    """
    run = setup(cfg)
    cfg, par = run.cfg, run.parallel  # run.cfg: batch_tokens=0 resolved to the measured budget
    deadline = Deadline(cfg.time_budget_minutes * 60)  # counts from here: encoding and model loading are not in it
    t_start, step_seconds, stopped_by_budget = time.monotonic(), 0.0, False
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", disable=not par.is_main)
    run.model.train()
    schedule = itertools.islice(_schedule(cfg, run.data.lengths, par.world), run.total_steps)
    epoch = 0
    for step, (epoch, swapped, micro_batches) in enumerate(schedule):
        if step < run.step:  # taken before the checkpoint: replay the schedule up to it
            continue
        # start a step only if it and the final evaluation end in time: the last step's duration plus 50%
        # estimates it, the last evaluation's the final one
        final_eval = run.evals[-1]["seconds"] if run.evals else 0.0
        if not par.agree(deadline.allows(step_seconds * 1.5 + final_eval)):
            if par.is_main:
                print(
                    f"time budget of {cfg.time_budget_minutes} min reached at step {run.step}/{run.total_steps}; "
                    "stopping"
                )
            stopped_by_budget = True
            break
        row = train_step(run, epoch, micro_batches, swapped)
        step_seconds = row["seconds"]
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if par.agree(_eval_due(run, deadline)):
            evaluate_run(run, epoch)
        if cfg.save_every and run.step % cfg.save_every == 0:
            save_checkpoint(run)
    bar.close()
    save_checkpoint(run)

    # the adapter is saved before the final evaluation, so a run killed while evaluating still leaves one
    adapter_dir = save_adapter(run)
    metrics = {
        "steps": run.step,
        "total_steps": run.total_steps,
        "stopped_by_budget": stopped_by_budget,
        "train_rows": len(run.data),
        "seconds": round(time.monotonic() - t_start, 1),
    }
    languages = pd.DataFrame()
    if len(run.val_df):
        adapter_dir, val_metrics = keep_best(run, epoch, adapter_dir)
        metrics |= val_metrics
        languages = pd.DataFrame(run.best["languages"])
    if not par.is_main:
        par.barrier()  # exits once rank 0 has written everything
        return None
    history, evals = save_outputs(run, metrics)
    par.barrier()
    return TrainResult(adapter_dir, history, metrics, evals, languages)


def main(argv: list[str] | None = None) -> None:
    result = train(parse_config(TrainConfig, argv))
    if result is not None:  # None on the ranks other than 0 of a launch
        print(json.dumps(result.metrics, indent=2))


if __name__ == "__main__":
    main()
