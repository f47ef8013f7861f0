"""The inference stage's report: what each pass scored and how long it took, each plan as it was made, the sources of
the final predictions, the accuracy where an answer key is given, and a rehearsal's projection of a full run.

The report is a plain dict (saved as ``report.json`` by :mod:`kaggle_utils.inference.outputs`); :func:`pass_table`
turns it into the table notebook 04 prints and plots.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from kaggle_utils.data import schema
from kaggle_utils.evaluation.metrics import evaluate
from kaggle_utils.inference.roles import CPU_BATCH_TOKENS, Role
from kaggle_utils.scoring.planner import Plan, rehearsal_report
from kaggle_utils.scoring.pool import PassResult

# the cascade's passes, in run order
PASSES = ("primary", "tta", "secondary")


def announce_pass(desc: str, run: int, planned: int, role: Role, max_length: int) -> None:
    """Prints what a pass is about to do: ``run`` of its ``planned`` batches, their token budget, the devices of the
    role's copies, and its cost model."""
    print(
        f"{desc}: {run} of {planned} batches of up to {role.batch_tokens:,} padded tokens on "
        f"{', '.join(role.copies.devices)}; cost {role.cost.describe(max_length)}",
        flush=True,
    )


def pass_report(result: PassResult, rows: np.ndarray, planned: int | None = None, wall: float | None = None) -> dict:
    """A pass in the report; ``wall``: seconds from the start of its load to its end (default: the pass's own)."""
    report = {
        "scored": int(rows.sum()),
        "seconds": round(result.seconds if wall is None else wall, 1),
        "load_seconds": result.load_seconds,
        "stopped_by_deadline": result.stopped_by_deadline,
        "resumed_batches": result.resumed_batches,
        "oom": result.oom,
    }
    return report | ({} if planned is None else {"planned_rows": planned})


def plan_entry(plan: Plan, elapsed_s: float) -> dict:
    """Prints the plan with its projected finish (wall clock); its entry in the report's ``plans``."""
    finish = time.strftime("%H:%M:%S", time.localtime(time.time() + plan.projected))
    print(f"{plan.describe()}; projected finish {finish}", flush=True)
    return {"elapsed_s": round(elapsed_s, 1), "rows": plan.rows, "seconds": plan.seconds}


def finish_report(report: dict, pred: pd.DataFrame, elapsed_s: float, labels_file: Path | None) -> dict:
    """The run's totals added to ``report``: rows per source, fallback rows, minutes elapsed, and the accuracy
    against ``labels_file`` (id, winner) when one is given."""
    report["sources"] = pred["source"].value_counts().to_dict()
    report["fallback_rows"] = int((pred["source"] == "fallback").sum())
    report["elapsed_minutes"] = round(elapsed_s / 60, 2)
    if labels_file is not None:
        key = schema.read_table(labels_file).astype({"id": pred["id"].dtype})
        merged = pred.merge(key[["id", "winner"]].rename(columns={"winner": "truth"}), on="id", validate="1:1")
        truth = (merged["truth"] == "model_b").to_numpy().astype(np.int64)
        report["accuracy"] = evaluate(merged[["p_a", "p_b"]].to_numpy(), truth)
    return report


class ProjectionBudget(Protocol):
    """What a rehearsal's projection reads of the infer stage's ``budget`` section."""

    batch_tokens: int
    max_rows: int
    tta_fraction: float
    time_budget_minutes: float
    reserve_minutes: float


def project_rehearsal(
    report: dict,
    measured: dict[str, list],
    devices: int,
    budget: ProjectionBudget,
    project_rows: int,
    max_length: int | None,
) -> dict:
    """A rehearsal's measured batches and loads (its ``report`` and batch logs) projected onto a ``project_rows``
    test set on this hardware and printed (scoring.planner); the projection as the report keeps it."""
    loads = {role: seconds for role, seconds in report.get("load_seconds", {}).items() if seconds}
    measured = {role: batches for role, batches in measured.items() if batches}
    projection = rehearsal_report(
        measured,
        loads,
        n_rows=project_rows,
        # the primary's own (its adapter's), as the run used it
        max_length=report.get("inputs", {}).get("primary", {}).get("max_length") or max_length or 2500,
        devices=devices,
        batch_tokens=report["token_budget"].get("primary", {}).get("tokens", budget.batch_tokens or CPU_BATCH_TOKENS),
        max_rows=budget.max_rows,
        tta_fraction=budget.tta_fraction,
        budget_seconds=budget.time_budget_minutes * 60,
        reserve_seconds=budget.reserve_minutes * 60,
    )
    return {
        "table": projection.table(),
        "primary_hours": round(projection.primary_hours, 3),
        "planned_rows": projection.plan.rows,
        "primary_finishes": projection.plan.complete.get("primary", False),
    }


def pass_table(report: dict) -> pd.DataFrame:
    """One row per pass of a run's ``report.json``: rows scored and planned, load and scoring seconds, the seconds
    the first plan after the primary projected (load included), and whether the deadline stopped it."""
    projected = next((plan["seconds"] for plan in report.get("plans", [])), {})
    rows = []
    for role in PASSES:
        done = report.get(role)
        if done is None:
            continue
        load = sum((done.get("load_seconds") or {}).values())
        rows.append(
            {
                "pass": role,
                "rows": done.get("scored", 0),
                "planned_rows": done.get("planned_rows", report["rows"] if role == "primary" else 0),
                "load_s": round(load, 1),
                "seconds": done.get("seconds", 0.0),
                "projected_s": round(projected[role], 1) if role in projected else None,
                "stopped_by_deadline": done.get("stopped_by_deadline", False),
                "note": done.get("skipped", ""),
            }
        )
    return pd.DataFrame(rows).set_index("pass") if rows else pd.DataFrame()
