"""Stage 3 (and the teacher of stage 2): LoRA training of a sequence classifier on hard and soft labels.

The base is loaded 4-bit nf4 (QLoRA) or in full precision; LoRA goes on every linear layer and the 2-way
head is trained in full. Batches are length-sorted under a token budget and shuffled; half the rows are
A/B-swapped each epoch. The loss mixes cross-entropy on human labels with KL to a teacher's soft labels.
A wall-clock budget is checked before every step; a checkpoint every ``save_every`` steps makes the run
resumable: run the same command again and it continues where it stopped.

``train`` is the driver: ``setup`` (rows, model, optimiser, resume), ``train_step`` per optimiser step, then
``save_checkpoint``, ``save_adapter`` (weights, tokenizer and this config), ``validate`` and ``save_outputs``.

``python -m kaggle_utils.train --train-file demo/work/prepared/train.parquet --out-dir demo/work/student``
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kaggle_utils.config.cli import config_to_dict, parse_config, save_config
from kaggle_utils.data import schema
from kaggle_utils.inputs.batching import pad, token_budget_batches
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.loading import LoraSettings, ModelConfig, load_classifier, load_tokenizer, model_device
from kaggle_utils.models.losses import LOSSES, preference_loss
from kaggle_utils.scoring import calibration
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.scoring.metrics import evaluate
from kaggle_utils.scoring.predict import predict_proba


@dataclass
class TrainConfig(ModelConfig, InputConfig):
    """LoRA training of one model; every field is also a ``--flag`` of ``python -m kaggle_utils.train``."""

    # the stage its recipes name (``stage = "train"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "train"

    # prepared training file with a ``fold`` column (stage 1 output); may carry teacher ``p_a``/``p_b``
    train_file: Path = Path("demo/work/prepared/train.parquet")
    # extra pseudo-labelled files (stage 2 output, with ``p_a``/``p_b``), added to the training rows
    extra_files: list[str] = field(default_factory=list)
    # folder that receives adapter/, metrics.json, history.csv, val_predictions.parquet and the config
    out_dir: Path = Path("demo/work/model")
    # rows of this fold are held out for validation; -1 trains on every row
    val_fold: int = 0
    # "ce" (hard labels), "kl" (teacher soft labels) or "mixed"
    loss: str = "ce"
    # weight of the KL term in the "mixed" loss
    kl_weight: float = 0.5
    # softmax temperature of the student in the KL term
    temperature: float = 1.0
    # LoRA rank
    lora_r: int = 16
    # LoRA scale numerator: updates are scaled by lora_alpha / lora_r
    lora_alpha: int = 32
    # dropout on the LoRA branch
    lora_dropout: float = 0.05
    # peak learning rate (linear warm-up, then cosine decay to 10%)
    lr: float = 1e-4
    # share of the steps spent warming up
    warmup_fraction: float = 0.05
    # passes over the training rows (fractions allowed)
    epochs: float = 1.0
    # padded tokens per micro-batch (rows x longest row): the memory knob
    batch_tokens: int = 8192
    # most rows in one micro-batch
    max_rows: int = 16
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
    # use at most this many training rows (0: all), for quick runs
    max_train_rows: int = 0
    # seed for shuffling, A/B swaps and LoRA initialisation
    seed: int = 42

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        InputConfig.__post_init__(self)
        self.train_file = Path(self.train_file)
        self.out_dir = Path(self.out_dir)
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; expected one of {LOSSES}")
        if not 0 <= self.swap_fraction <= 1:
            raise ValueError(f"swap_fraction={self.swap_fraction} must be in [0, 1]")
        if self.epochs <= 0 or self.lr <= 0 or self.batch_tokens < self.max_length:
            raise ValueError(
                f"need epochs > 0, lr > 0 and batch_tokens >= max_length; got epochs={self.epochs}, "
                f"lr={self.lr}, batch_tokens={self.batch_tokens}, max_length={self.max_length}"
            )


@dataclass
class TrainResult:
    adapter_dir: Path
    history: pd.DataFrame
    metrics: dict


def split(cfg: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training rows (labelled folds + pseudo-labelled extras) and validation rows."""
    df = schema.load(cfg.train_file, "train")
    if cfg.val_fold >= 0:
        if "fold" not in df.columns:
            raise schema.DataError(f"{cfg.train_file}: no 'fold' column; run the prepare stage or pass --val-fold -1")
        train_df, val_df = df[df["fold"] != cfg.val_fold], df[df["fold"] == cfg.val_fold]
    else:
        train_df, val_df = df, df.iloc[:0]
    extras = [schema.load(f, "soft") for f in cfg.extra_files]
    train_df = pd.concat([train_df, *extras], ignore_index=True)
    if cfg.max_train_rows:
        train_df = train_df.sample(n=min(cfg.max_train_rows, len(train_df)), random_state=cfg.seed)
    return train_df.reset_index(drop=True), val_df.reset_index(drop=True)


def _targets(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Hard labels (N,) and soft targets (N, 2); pseudo-labelled rows take the teacher's argmax as hard label."""
    soft = schema.soft_targets(df)
    hard = soft.argmax(1).astype(np.int64)
    if "winner" in df.columns:
        known = df["winner"].isin(schema.WINNERS).to_numpy()
        hard[known] = schema.labels(df[known])
    return hard, soft


# fields that may change between a run and its resumption without changing what is trained
RESUMABLE_CHANGES = frozenset({"time_budget_minutes", "save_every", "device", "out_dir"})


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


def _epoch_batches(cfg: TrainConfig, lengths: np.ndarray, epoch: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Which rows are swapped, and the shuffled token-budget batches, for one epoch (deterministic)."""
    rng = np.random.default_rng([cfg.seed, epoch])
    swapped = rng.random(len(lengths)) < cfg.swap_fraction
    batches = token_budget_batches(lengths, cfg.batch_tokens, cfg.max_rows, shuffle=True, seed=cfg.seed + epoch)
    return swapped, batches


def _steps_per_epoch(cfg: TrainConfig, lengths: np.ndarray) -> int:
    """Optimiser steps in one epoch; the same every epoch, since shuffling reorders batches but never regroups them."""
    n_batches = len(_epoch_batches(cfg, lengths, 0)[1])
    if n_batches < cfg.grad_accum:
        # an epoch would hold no complete optimiser step, and the schedule would never yield one
        raise ValueError(
            f"{len(lengths)} training rows make {n_batches} micro-batch(es) under batch_tokens={cfg.batch_tokens}, "
            f"fewer than grad_accum={cfg.grad_accum}; lower grad_accum or batch_tokens"
        )
    return max(1, n_batches // cfg.grad_accum)


def _schedule(cfg: TrainConfig, lengths: np.ndarray) -> Iterator[tuple[int, np.ndarray, list[np.ndarray]]]:
    """``(epoch, swapped, micro_batches)`` of every optimiser step in order, epoch after epoch without end.

    It depends on the config and the row lengths alone, so a resumed run replays it up to its checkpoint and
    goes on with the very batches the uninterrupted run would have seen. An epoch's last micro-batches that
    cannot fill a step of ``grad_accum`` are left out.
    """
    for epoch in itertools.count():
        swapped, batches = _epoch_batches(cfg, lengths, epoch)
        for i in range(0, len(batches) - cfg.grad_accum + 1, cfg.grad_accum):
            yield epoch, swapped, batches[i : i + cfg.grad_accum]


@dataclass
class TrainRows:
    """The training rows, encoded once in both A/B orientations; each epoch shows every row in one of them."""

    ids: list[list[int]]  # token ids per row, response A first as in the file
    ids_swapped: list[list[int]]  # token ids per row with responses A and B swapped
    hard: np.ndarray  # (N,) int64: 0 if A wins, 1 if B wins
    soft: np.ndarray  # (N, 2): target probabilities of A and B winning
    lengths: np.ndarray  # (N,) tokens per row of ``ids``; batches are formed on these

    def __len__(self) -> int:
        return len(self.ids)


def _encode(fmt: PromptFormatter, df: pd.DataFrame) -> TrainRows:
    hard, soft = _targets(df)
    ids = fmt.encode(df)
    return TrainRows(ids, fmt.encode(schema.swap_ab(df)), hard, soft, fmt.lengths(ids))


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
    params: list[torch.nn.Parameter]  # the trainable ones (LoRA and the head): optimised and clipped
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    step: int = 0  # optimiser steps taken; a resumed run starts at its checkpoint's
    history: list[dict] = field(default_factory=list)  # one row per step taken: what history.csv holds

    @property
    def checkpoint_path(self) -> Path:
        return self.cfg.out_dir / "checkpoint.pt"


def setup(cfg: TrainConfig) -> Run:
    """Rows, model, optimiser and schedule of a run, at the step its checkpoint reached (0 without one)."""
    torch.manual_seed(cfg.seed)  # before the model is built: it draws the LoRA initialisation
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.model_path)
    fmt = PromptFormatter(tok, cfg)
    train_df, val_df = split(cfg)
    data = _encode(fmt, train_df)
    steps_per_epoch = _steps_per_epoch(cfg, data.lengths)  # checked before the model loads, so a bad config fails fast

    model = load_classifier(
        cfg,
        tok.pad_token_id,
        lora=LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout),
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = max(1, int(cfg.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup_steps))
    n_trainable = sum(p.numel() for p in params)
    print(
        f"train rows {len(data):,} · val rows {len(val_df):,} · tokens/epoch {int(data.lengths.sum()):,} · "
        f"steps {total_steps} ({steps_per_epoch}/epoch) · ≤{cfg.batch_tokens * cfg.grad_accum:,} padded tokens/step · "
        f"trainable params {n_trainable:,} · device {device}"
    )
    run = Run(
        cfg=cfg,
        tok=tok,
        fmt=fmt,
        data=data,
        val_df=val_df,
        model=model,
        device=device,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        total_steps=total_steps,
    )
    load_checkpoint(run)
    # written only once the checkpoint's config guard passed: a refused rerun leaves the run's record intact
    save_config(cfg, cfg.out_dir / "train_config.json")
    return run


def load_checkpoint(run: Run) -> None:
    """Restore adapter, optimiser, schedule, step and history from ``checkpoint.pt``, if ``out_dir`` holds one."""
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
    set_peft_model_state_dict(run.model, state["adapter"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.step, run.history = state["step"], state["history"]
    print(f"resuming from {path} at step {run.step}/{run.total_steps}")


def save_checkpoint(run: Run) -> None:
    """Everything ``load_checkpoint`` needs to continue at ``run.step``, with the config that guards it."""
    from peft import get_peft_model_state_dict

    state = {
        "adapter": get_peft_model_state_dict(run.model),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "step": run.step,
        "history": run.history,
        "config": config_to_dict(run.cfg),
    }
    tmp = run.checkpoint_path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(run.checkpoint_path)  # atomic: a kill mid-save keeps the old checkpoint


def _micro_batch(
    run: Run, idx: np.ndarray, swapped: np.ndarray
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Inputs and targets of rows ``idx``, each row in this epoch's orientation (its labels swap with it)."""
    d, dev = run.data, run.device
    rows = [d.ids_swapped[j] if swapped[j] else d.ids[j] for j in idx]
    enc = pad(rows, run.tok.pad_token_id)  # input_ids, attention_mask: (B, T), T = the longest row
    y_hard = torch.tensor([1 - d.hard[j] if swapped[j] else d.hard[j] for j in idx], device=dev)  # (B,)
    y_soft = torch.tensor(np.stack([d.soft[j][::-1] if swapped[j] else d.soft[j] for j in idx]), device=dev)  # (B, 2)
    return {k: v.to(dev) for k, v in enc.items()}, y_hard, y_soft


def train_step(run: Run, epoch: int, micro_batches: list[np.ndarray], swapped: np.ndarray) -> dict:
    """One optimiser step over ``grad_accum`` micro-batches; its history row is appended to ``run.history``."""
    cfg, t0 = run.cfg, time.monotonic()
    step_rows = sum(len(idx) for idx in micro_batches)
    step_tokens = int(sum(run.data.lengths[idx].sum() for idx in micro_batches))
    loss_sum = 0.0
    for idx in micro_batches:
        enc, y_hard, y_soft = _micro_batch(run, idx, swapped)
        logits = run.model(**enc).logits  # (B, 2)
        loss = preference_loss(logits, y_hard, y_soft, cfg.loss, cfg.kl_weight, cfg.temperature)
        # weight micro-batches by rows so a step's loss is the mean over its rows
        (loss * len(idx) / step_rows).backward()
        loss_sum += loss.item() * len(idx)
    torch.nn.utils.clip_grad_norm_(run.params, 1.0)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    row = {
        "step": run.step,
        "epoch": epoch,
        "loss": loss_sum / step_rows,
        "lr": run.scheduler.get_last_lr()[0],
        "rows": step_rows,
        "tokens": step_tokens,
        "seconds": time.monotonic() - t0,
    }
    run.history.append(row)
    return row


def validate(run: Run, val_df: pd.DataFrame) -> dict:
    """Metrics of the model on ``val_df``; its probabilities go to ``val_predictions.parquet``, in row order."""
    cfg = run.cfg
    run.model.eval()
    scores = predict_proba(
        run.model, run.fmt.encode(val_df), run.tok.pad_token_id, cfg.batch_tokens, cfg.max_rows, desc="validate"
    )
    probs = scores.probs  # (N, 2): P(A wins), P(B wins)
    metrics = evaluate(probs, schema.labels(val_df))
    pd.DataFrame({"id": val_df["id"], "p_a": probs[:, 0], "p_b": probs[:, 1], "winner": val_df["winner"]}).to_parquet(
        cfg.out_dir / "val_predictions.parquet", index=False
    )
    return metrics


def save_adapter(run: Run) -> Path:
    """``out_dir/adapter``: LoRA weights, tokenizer and training config, a folder that can be used on its own."""
    adapter_dir = run.cfg.out_dir / "adapter"
    run.model.save_pretrained(adapter_dir)
    run.tok.save_pretrained(adapter_dir)
    # an adapter copied elsewhere (a Kaggle dataset) still says which max_length, template and truncation it expects
    save_config(run.cfg, adapter_dir / "train_config.json")
    return adapter_dir


def save_outputs(run: Run, metrics: dict) -> pd.DataFrame:
    """``metrics.json`` and ``history.csv`` in ``out_dir``; returns the history."""
    (run.cfg.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    history = pd.DataFrame(run.history)
    history.to_csv(run.cfg.out_dir / "history.csv", index=False)
    return history


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) until the last step or the time budget, then save the adapter and validate it."""
    run = setup(cfg)
    deadline = Deadline(cfg.time_budget_minutes * 60)  # counts from here: encoding and model loading are not in it
    t_start, step_seconds, stopped_by_budget = time.monotonic(), 0.0, False
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step")
    run.model.train()
    schedule = itertools.islice(_schedule(cfg, run.data.lengths), run.total_steps)
    for step, (epoch, swapped, micro_batches) in enumerate(schedule):
        if step < run.step:  # taken before the checkpoint: replay the schedule up to it
            continue
        # start a step only if it should end in time: the last step's duration plus 50% estimates it
        if not deadline.allows(step_seconds * 1.5):
            print(
                f"time budget of {cfg.time_budget_minutes} min reached at step {run.step}/{run.total_steps}; stopping"
            )
            stopped_by_budget = True
            break
        row = train_step(run, epoch, micro_batches, swapped)
        step_seconds = row["seconds"]
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        if cfg.save_every and run.step % cfg.save_every == 0:
            save_checkpoint(run)
    bar.close()
    save_checkpoint(run)

    # the adapter is saved before validation, so a run killed while validating still leaves it
    adapter_dir = save_adapter(run)
    metrics = {
        "steps": run.step,
        "total_steps": run.total_steps,
        "stopped_by_budget": stopped_by_budget,
        "train_rows": len(run.data),
        "seconds": round(time.monotonic() - t_start, 1),
    }
    if len(run.val_df):
        metrics["val"] = validate(run, run.val_df)
        # the temperature inference applies to this adapter's probabilities, saved with the adapter it belongs to
        fitted = calibration.fit_from_val_predictions(cfg.out_dir / "val_predictions.parquet")
        fitted.save(adapter_dir / "calibration.json")
        metrics["calibration"] = {"temperature": fitted.temperature, "reason": fitted.reason}
    return TrainResult(adapter_dir, save_outputs(run, metrics), metrics)


def main(argv: list[str] | None = None) -> None:
    result = train(parse_config(TrainConfig, argv))
    print(json.dumps(result.metrics, indent=2))


if __name__ == "__main__":
    main()
