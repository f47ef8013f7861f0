"""Stage 3 (and the teacher of stage 2): LoRA training of a sequence classifier on hard and soft labels.

The base is loaded 4-bit nf4 (QLoRA) or in full precision; LoRA goes on every linear layer and the 2-way
head is trained in full. Batches are length-sorted under a token budget and shuffled; half the rows are
A/B-swapped each epoch. The loss mixes cross-entropy on human labels with KL to a teacher's soft labels.
A wall-clock budget is checked before every step; a checkpoint every ``save_every`` steps makes the run
resumable: run the same command again and it continues where it stopped.

``python -m kaggle_utils.train --train-file demo/work/prepared/train.parquet --out-dir demo/work/student``
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

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
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.scoring.metrics import evaluate
from kaggle_utils.scoring.predict import predict_proba


@dataclass
class TrainConfig(ModelConfig, InputConfig):
    """LoRA training of one model; every field is also a ``--flag`` of ``python -m kaggle_utils.train``."""

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


def train(cfg: TrainConfig) -> TrainResult:
    torch.manual_seed(cfg.seed)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.out_dir / "train_config.json")
    tok = load_tokenizer(cfg.model_path)
    fmt = PromptFormatter(tok, cfg)
    train_df, val_df = split(cfg)
    hard, soft = _targets(train_df)
    # both orientations are encoded once; an epoch picks one per row
    rows = fmt.encode(train_df)
    rows_swapped = fmt.encode(schema.swap_ab(train_df))
    lengths = fmt.lengths(rows)
    n_batches = len(_epoch_batches(cfg, lengths, 0)[1])
    if n_batches < cfg.grad_accum:
        # an epoch would hold no complete optimiser step, and the loop below would never end
        raise ValueError(
            f"{len(train_df)} training rows make {n_batches} micro-batch(es) under batch_tokens={cfg.batch_tokens}, "
            f"fewer than grad_accum={cfg.grad_accum}; lower grad_accum or batch_tokens"
        )

    model = load_classifier(
        cfg,
        tok.pad_token_id,
        lora=LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout),
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = max(1, len(_epoch_batches(cfg, lengths, 0)[1]) // cfg.grad_accum)
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total_steps, max(1, int(cfg.warmup_fraction * total_steps)))
    )
    n_trainable = sum(p.numel() for p in params)
    print(
        f"train rows {len(train_df):,} · val rows {len(val_df):,} · tokens/epoch {int(lengths.sum()):,} · "
        f"steps {total_steps} ({steps_per_epoch}/epoch) · ≤{cfg.batch_tokens * cfg.grad_accum:,} padded tokens/step · "
        f"trainable params {n_trainable:,} · device {device}"
    )

    ckpt_path = cfg.out_dir / "checkpoint.pt"
    history: list[dict] = []
    start_step = 0
    if ckpt_path.is_file():
        from peft import set_peft_model_state_dict

        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        changed = _resume_blockers(state.get("config", {}), config_to_dict(cfg))
        if changed:
            raise RuntimeError(
                f"{ckpt_path} was written with a different config ({', '.join(changed)}); "
                "use a new --out-dir, or delete the checkpoint to start over"
            )
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, history = state["step"], state["history"]
        print(f"resuming from {ckpt_path} at step {start_step}/{total_steps}")

    def save_checkpoint(step: int) -> None:
        from peft import get_peft_model_state_dict

        state = {
            "adapter": get_peft_model_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "history": history,
            "config": config_to_dict(cfg),
        }
        torch.save(state, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)  # atomic: a kill mid-save keeps the old checkpoint

    deadline = Deadline(cfg.time_budget_minutes * 60)
    stopped_by_budget = False
    step, epoch, t_start = 0, 0, time.monotonic()
    step_seconds = 0.0
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step")
    model.train()
    while step < total_steps:
        swapped, batches = _epoch_batches(cfg, lengths, epoch)
        for i in range(0, len(batches) - cfg.grad_accum + 1, cfg.grad_accum):
            if step >= total_steps:
                break
            if step < start_step:  # replay the same deterministic schedule up to the checkpoint
                step += 1
                continue
            if not deadline.allows(step_seconds * 1.5):
                print(f"time budget of {cfg.time_budget_minutes} min reached at step {step}/{total_steps}; stopping")
                stopped_by_budget = True
                break
            t0 = time.monotonic()
            micro = batches[i : i + cfg.grad_accum]
            step_rows = sum(len(b) for b in micro)
            step_tokens = int(sum(lengths[b].sum() for b in micro))
            loss_sum = 0.0
            for idx in micro:
                batch_rows = [rows_swapped[j] if swapped[j] else rows[j] for j in idx]
                y_hard = torch.tensor([1 - hard[j] if swapped[j] else hard[j] for j in idx], device=device)
                y_soft = torch.tensor(np.stack([soft[j][::-1] if swapped[j] else soft[j] for j in idx]), device=device)
                enc = pad(batch_rows, tok.pad_token_id)
                logits = model(**{k: v.to(device) for k, v in enc.items()}).logits  # (B, 2)
                loss = preference_loss(logits, y_hard, y_soft, cfg.loss, cfg.kl_weight, cfg.temperature)
                # weight micro-batches by rows so a step's loss is the mean over its rows
                (loss * len(idx) / step_rows).backward()
                loss_sum += loss.item() * len(idx)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_seconds = time.monotonic() - t0
            history.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss_sum / step_rows,
                    "lr": scheduler.get_last_lr()[0],
                    "rows": step_rows,
                    "tokens": step_tokens,
                    "seconds": step_seconds,
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if cfg.save_every and step % cfg.save_every == 0:
                save_checkpoint(step)
        if stopped_by_budget:
            break
        epoch += 1
    bar.close()
    save_checkpoint(step)

    adapter_dir = cfg.out_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tok.save_pretrained(adapter_dir)
    metrics = {
        "steps": step,
        "total_steps": total_steps,
        "stopped_by_budget": stopped_by_budget,
        "train_rows": len(train_df),
        "seconds": round(time.monotonic() - t_start, 1),
    }
    if len(val_df):
        model.eval()
        scores = predict_proba(
            model, fmt.encode(val_df), tok.pad_token_id, cfg.batch_tokens, cfg.max_rows, desc="validate"
        )
        metrics["val"] = evaluate(scores.probs, schema.labels(val_df))
        pd.DataFrame(
            {"id": val_df["id"], "p_a": scores.probs[:, 0], "p_b": scores.probs[:, 1], "winner": val_df["winner"]}
        ).to_parquet(cfg.out_dir / "val_predictions.parquet", index=False)
    (cfg.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    hist = pd.DataFrame(history)
    hist.to_csv(cfg.out_dir / "history.csv", index=False)
    return TrainResult(adapter_dir, hist, metrics)


def main(argv: list[str] | None = None) -> None:
    result = train(parse_config(TrainConfig, argv))
    print(json.dumps(result.metrics, indent=2))


if __name__ == "__main__":
    main()
