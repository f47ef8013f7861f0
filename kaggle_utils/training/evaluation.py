"""Evaluation during training: both A/B orientations of the held-out fold, and the best evaluation kept."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_utils.data import schema
from kaggle_utils.evaluation import calibration
from kaggle_utils.evaluation.metrics import SELECTABLE, by_language, evaluate_pairs
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.training.checkpoints import save_checkpoint
from kaggle_utils.training.config import ScheduleConfig
from kaggle_utils.training.outputs import save_adapter, save_val_predictions
from kaggle_utils.training.run import Run


def scores(run: Run, df: pd.DataFrame, desc: str) -> np.ndarray:
    """Probabilities (N, 2) of the model on ``df``'s rows, in row order (NaN where a row could not be scored).

    In a launch each process scores rows ``rank::world`` with its unwrapped model (no collective in a forward
    under DDP; under FSDP every rank makes the same number of forward calls, :meth:`Parallel.predict_proba`)
    and every process receives all of them: evaluation is N times faster on N GPUs, and every process takes
    the same decisions (best adapter) from the same numbers.
    """
    cfg, par = run.cfg, run.parallel
    mine = df.iloc[par.shard.rank :: par.world]
    tokens = (
        cfg.schedule.eval_batch_tokens or 4 * cfg.optim.batch_tokens
    )  # a forward keeps no activations for a backward
    with run.precision.context(run.device):
        probs = par.predict_proba(
            run.model, run.fmt.encode(mine), run.tok.pad_token_id, tokens, cfg.schedule.eval_max_rows, desc=desc
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
    probs = scores(run, val_df, "validate")  # (N, 2): P(A wins), P(B wins)
    probs_swapped = scores(run, schema.swap_ab(val_df), "validate (swapped)")  # (N, 2) in the swapped order
    run.model.train(was_training)
    labels = schema.labels(val_df)
    metrics = evaluate_pairs(probs, probs_swapped, labels)
    languages = val_df["language"] if "language" in val_df.columns else pd.Series(["missing"] * len(val_df))
    table = by_language(probs, labels, languages, run.cfg.schedule.eval_languages)
    return {
        "metrics": metrics | {"seconds": round(time.monotonic() - t0, 2)},
        "languages": table.to_dict("records"),
        "probs": probs,
        "probs_swapped": probs_swapped,
    }


def _better(schedule: ScheduleConfig, new: dict, old: dict | None) -> bool:
    """Whether evaluation ``new`` beats the best so far on ``schedule.best_metric`` (a NaN value never does)."""
    value = new["metrics"][schedule.best_metric]
    if old is None:
        return True
    best = old["metrics"][schedule.best_metric]
    if not math.isfinite(value):
        return False
    if not math.isfinite(best):
        return True
    return value < best if SELECTABLE[schedule.best_metric] else value > best


def evaluate_run(run: Run, epoch: int) -> dict:
    """Evaluate now, record it in ``run.evals``, and keep it (with a CPU copy of the adapter) if it is the best."""
    record = validate(run, run.val_df)
    run.evals.append({"step": run.step, "epoch": epoch, "val_rows": len(run.val_df), **record["metrics"]})
    if _better(run.cfg.schedule, record, run.best):  # the same decision on every rank: a gather under FSDP
        run.best = {"step": run.step, **record, "adapter": run.parallel.adapter_copy(run.model)}
    m = record["metrics"]
    if run.parallel.is_main:
        print(
            f"eval at step {run.step}: accuracy {m['accuracy']:.4f} · log loss {m['log_loss']:.4f} · "
            f"swap gap {m['swap_consistency']:.4f} · predicts A {m['position_bias']:.3f} · NaN rows {m['nan_rows']} · "
            f"best {run.cfg.schedule.best_metric} at step {run.best['step']}"
        )
    return record


def restore_best(run: Run) -> None:
    """Put the best evaluation's adapter weights back into the model, if the best is not the current state."""
    if run.best is None or run.best["step"] == run.step:
        return
    run.parallel.restore_adapter(run.model, run.best["adapter"])
    if run.parallel.is_main:
        best = run.cfg.schedule.best_metric
        print(f"keeping the adapter of step {run.best['step']} (best {best}), not of step {run.step}")


def eval_seconds(run: Run) -> float:
    """What the next evaluation is expected to take: the last one's time, else the price set before step 1."""
    return run.evals[-1]["seconds"] if run.evals else run.eval_estimate


def eval_due(run: Run, deadline: Deadline) -> bool:
    """An evaluation every ``eval_every_steps`` steps, when it and the final one still fit the time budget."""
    every = run.cfg.schedule.eval_every_steps
    if not (every and len(run.val_df) and run.step % every == 0) or run.step == run.total_steps:
        return False  # the last step is evaluated after the loop, whatever stopped it
    return deadline.allows(eval_seconds(run) * 2.5)  # this one with a margin, then the final one


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
    save_val_predictions(run, run.best["probs"], run.best.get("probs_swapped"))
    # the temperatures inference applies to this adapter's probabilities (single-order rows, and swap-averaged ones
    # where the swapped view was scored), saved with the adapter they belong to and the fingerprint of its weights
    fitted = calibration.fit_from_val_predictions(cfg.data.out_dir / "val_predictions.parquet", adapter=adapter_dir)
    fitted.save(adapter_dir / "calibration.json")
    return adapter_dir, {
        "val": dict(run.best["metrics"]),
        "best": {"metric": cfg.schedule.best_metric, "step": run.best["step"], "evals": len(run.evals)},
        "val_languages": run.best["languages"],
        "calibration": {"temperature": fitted.temperature, "reason": fitted.reason, "view": fitted.view},
    }
