"""What a run leaves in ``out_dir``: the adapter folder, held-out predictions, metrics, history and evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kaggle_utils.config.cli import save_config
from kaggle_utils.data import schema
from kaggle_utils.training.errors import NonFiniteLossError
from kaggle_utils.training.run import Run


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
    adapter_dir = run.cfg.data.out_dir / "adapter"
    if not run.parallel.is_main:
        return adapter_dir
    run.model.save_pretrained(adapter_dir, state_dict=gathered)  # None: peft reads the model's own weights
    run.tok.save_pretrained(adapter_dir)
    # an adapter copied elsewhere (a Kaggle dataset) still says which max_length, template and truncation it expects
    save_config(run.cfg, adapter_dir / "train_config.json")
    return adapter_dir


def save_val_predictions(run: Run, probs: np.ndarray, probs_swapped: np.ndarray | None) -> Path:
    """``val_predictions.parquet`` of the kept adapter, in the held-out rows' order: id, p_a, p_b, winner and the
    swapped view's probabilities in the original A/B order (p_a_swapped: P(the original A wins) when shown second),
    so that calibration fits the swap-averaged margins inference makes. probs, probs_swapped (N, 2), the latter in
    the swapped order as scored (None, from a checkpoint written before both were kept: the single order only)."""
    path = run.cfg.data.out_dir / "val_predictions.parquet"
    val_df = run.val_df
    table = {"id": val_df["id"], "p_a": probs[:, 0], "p_b": probs[:, 1], "winner": val_df["winner"]}
    if probs_swapped is not None:
        back = schema.swap_probs(probs_swapped)  # (N, 2) in the original order
        table |= {"p_a_swapped": back[:, 0], "p_b_swapped": back[:, 1]}
    pd.DataFrame(table).to_parquet(path, index=False)
    return path


def save_outputs(run: Run, metrics: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``metrics.json``, ``history.csv``, ``evals.csv`` and ``evals.json`` in ``out_dir``; returns history, evals."""
    (run.cfg.data.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    history = pd.DataFrame(run.history)
    history.to_csv(run.cfg.data.out_dir / "history.csv", index=False)
    evals = pd.DataFrame(run.evals)
    evals.to_csv(run.cfg.data.out_dir / "evals.csv", index=False)
    (run.cfg.data.out_dir / "evals.json").write_text(json.dumps(run.evals, indent=2) + "\n")
    return history, evals
