"""The price of an evaluation before the first one runs, and the held-out rows cut to what the time budget allows.

A run under ``--time-budget-minutes`` must end inside it with its evaluations, the final one included. Before
step 1 a sample of held-out rows (one evaluation batch) is scored as an evaluation scores them, and the whole
fold's two orientations are priced from that time, scaled by the fold's estimated tokens (characters over the
sample's characters per token, each row capped at ``max_length``). Where one evaluation would take more than a
fifth of the budget, the held-out rows are cut to a subset stratified by language and winner that fits, and the
log says so. A resumed run evaluates the same subset as before (its size is in its evaluations).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from kaggle_utils.training.evaluation import scores
from kaggle_utils.training.rows import stratified_subset
from kaggle_utils.training.run import Run

# the largest share of the time budget one evaluation may take before the held-out rows are cut
EVAL_SHARE = 0.2
# margin on the priced time: a sample's speed is noisy and rows differ
MARGIN = 1.25


def _chars(df: pd.DataFrame) -> np.ndarray:
    """(N,) characters of each row's prompt and both responses."""
    return sum(df[c].astype(str).str.len().to_numpy() for c in ("prompt", "response_a", "response_b"))


def price_evaluation(run: Run) -> float:
    """Seconds one evaluation of ``run.val_df`` (both orientations) is expected to take, from a timed sample."""
    val, cfg = run.val_df, run.cfg
    sample = val.sample(n=min(len(val), cfg.schedule.eval_max_rows), random_state=cfg.schedule.seed)
    was_training = run.model.training
    run.model.eval()
    t0 = time.monotonic()
    scores(run, sample, "price evaluation")
    took = time.monotonic() - t0
    run.model.train(was_training)
    tokens = sum(len(ids) for ids in run.fmt.encode(sample))
    chars_per_token = max(_chars(sample).sum() / max(tokens, 1), 1e-6)
    fold_tokens = np.minimum(_chars(val) / chars_per_token, cfg.inputs.max_length).sum()
    return took * 2 * fold_tokens / max(tokens, 1) * MARGIN


def fit_evaluation(run: Run, budget_seconds: float) -> None:
    """Price the evaluation (``run.eval_estimate``) and cut the held-out rows to the budget's share if needed."""
    if not len(run.val_df):
        return
    if run.evals:  # resumed: the subset its evaluations were made on (stratified_subset is deterministic)
        rows = int(run.evals[-1].get("val_rows", len(run.val_df)))
        run.val_df = stratified_subset(run.val_df, rows, run.cfg.schedule.seed)
    if not budget_seconds:
        return
    estimate = price_evaluation(run)
    if estimate > EVAL_SHARE * budget_seconds and not run.evals:
        rows = max(1, int(len(run.val_df) * EVAL_SHARE * budget_seconds / estimate))
        if run.parallel.is_main:
            print(
                f"an evaluation of {len(run.val_df):,} held-out rows is priced at {estimate:,.0f} s, over a fifth of "
                f"the {budget_seconds / 60:g}-min budget: evaluating {rows:,} rows (stratified by language and winner)"
            )
        estimate *= rows / len(run.val_df)
        run.val_df = stratified_subset(run.val_df, rows, run.cfg.schedule.seed)
    run.eval_estimate = estimate
    if run.parallel.is_main:
        print(f"evaluation priced at {estimate:,.1f} s ({len(run.val_df):,} rows, both orders) before step 1")
