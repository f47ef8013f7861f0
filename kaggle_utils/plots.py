"""Figures the notebooks show: one function per figure, each returning a matplotlib Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from kaggle_utils.data.schema import TEXT_COLUMNS


def training_curve(history: pd.DataFrame, title: str = "Training loss"):
    """Loss per step with a moving average, and the learning-rate schedule on a second axis."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(history["step"], history["loss"], alpha=0.3, label="loss")
    window = max(1, len(history) // 20)
    ax.plot(history["step"], history["loss"].rolling(window, min_periods=1).mean(), label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend(loc="upper right")
    lr_ax = ax.twinx()
    lr_ax.plot(history["step"], history["lr"], color="grey", lw=0.8)
    lr_ax.set_ylabel("learning rate", color="grey")
    fig.tight_layout()
    return fig


def confidence(probs: np.ndarray, title: str = "Confidence"):
    """Histogram of p(A) — mass near 0.5 is what the secondary model and TTA are for."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(probs[:, 0], bins=np.linspace(0, 1, 41))
    ax.axvline(0.5, color="k", lw=0.8)
    ax.set(xlabel="p(response A preferred)", ylabel="rows", title=title)
    fig.tight_layout()
    return fig


def inference_run(sources: pd.Series, passes: pd.DataFrame):
    """Rows per source of the final predictions, and each pass's wall time (load + scoring) against what the plan
    projected for it: where the 12 hours went, and whether the planner's projections held.

    ``sources``: rows per source (primary / primary+tta / blend / blend+tta / fallback); ``passes``:
    :func:`kaggle_utils.inference.report.pass_table`.
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))
    sources.sort_values().plot.barh(ax=axes[0], title="Rows per source")
    axes[0].set_xlabel("rows")
    if passes.empty:
        axes[1].set_axis_off()
    else:
        unit, scale = ("minutes", 60) if passes["seconds"].max() > 120 else ("seconds", 1)
        wall = passes[["load_s", "seconds"]] / scale
        wall = wall.assign(scoring=(wall["seconds"] - wall["load_s"]).clip(lower=0))
        wall[["load_s", "scoring"]].rename(columns={"load_s": "load"}).plot.barh(
            ax=axes[1], stacked=True, title=f"{unit.capitalize()} per pass: actual (bars) vs projected (x)"
        )
        projected = passes["projected_s"].astype(float) / scale
        axes[1].scatter(projected, range(len(passes)), marker="x", color="k", zorder=3, label="projected")
        axes[1].set_xlabel(unit)
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def source_flow(report):
    """Rows per source through the data layer: what each step kept, and what it dropped per reason.

    ``report`` is a :class:`kaggle_utils.data.sources.Report` (normalise and clean steps together).
    """
    table = report.table()
    drops = table[table["kind"] == "dropped"].pivot_table(
        index="source", columns="reason", values="rows", aggfunc="sum", fill_value=0
    )
    flow = table[table["kind"] == "in"].groupby("source", sort=False)["rows"].first()
    last_step = table["step"].iloc[-1]
    kept = table[(table["kind"] == "out") & (table["step"] == last_step)].set_index("source")["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.2))
    pd.DataFrame({"raw rows": flow, "kept": kept.reindex(flow.index)}).plot.barh(ax=axes[0], title="Rows per source")
    axes[0].set_xlabel("rows")
    if drops.empty:
        axes[1].text(0.5, 0.5, "nothing dropped", ha="center", va="center")
        axes[1].set_axis_off()
    else:
        drops.reindex(flow.index, fill_value=0).plot.barh(ax=axes[1], stacked=True, title="Dropped, per reason")
        axes[1].set_xlabel("rows")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def label_balance(balance: pd.DataFrame):
    """Share of rows won by response A per source (``clean.ab_balance``), with the 50% line."""
    fig, ax = plt.subplots(figsize=(6, 1.4 + 0.4 * len(balance)))
    ax.barh(balance["source"], balance["share_a"])
    ax.axvline(0.5, color="k", lw=0.8)
    for y, (share, rows) in enumerate(zip(balance["share_a"], balance["rows"], strict=True)):
        ax.text(share, y, f" {share:.3f} of {rows:,}", va="center", fontsize=8)
    ax.set(xlim=(0, 1), xlabel="share won by A", title="A/B label balance")
    fig.tight_layout()
    return fig


def languages_and_lengths(df: pd.DataFrame, top: int = 12):
    """The language mix of a normalised table and its character-length histograms per field and source."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
    df["language"].fillna("missing").value_counts().head(top).iloc[::-1].plot.barh(ax=axes[0], title="Languages")
    bins = np.logspace(0, 5, 40)
    for source, part in df.groupby("source", sort=False):
        axes[1].hist(
            part["prompt"].str.len().clip(lower=1), bins=bins, histtype="step", ls="--", label=f"{source} prompts"
        )
        lengths = pd.concat([part[c].str.len() for c in TEXT_COLUMNS[1:]])
        axes[1].hist(lengths.clip(lower=1), bins=bins, histtype="step", label=f"{source} responses")
    axes[1].set(xscale="log", xlabel="characters", ylabel="texts", title="Lengths")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def training_and_validation(history: pd.DataFrame, evals: pd.DataFrame, best_step: int | None = None, title: str = ""):
    """Training loss per step (with a moving average) beside the validation curves of every evaluation.

    ``history``: ``TrainResult.history`` (history.csv); ``evals``: ``TrainResult.evals`` (evals.csv: step, accuracy,
    log_loss, swap_consistency, ...); ``best_step``: the evaluation whose adapter was kept, marked on both panels.
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
    ax = axes[0]
    if len(history):
        ax.plot(history["step"], history["loss"], alpha=0.3, label="train loss")
        window = max(1, len(history) // 20)
        ax.plot(history["step"], history["loss"].rolling(window, min_periods=1).mean(), label=f"mean of {window}")
    if len(evals):
        ax.plot(evals["step"], evals["log_loss"], "o-", color="k", label="val log loss")
    ax.set(xlabel="step", ylabel="loss", title=f"{title}: loss" if title else "Loss")
    ax.legend(loc="upper right", fontsize=8)
    ax = axes[1]
    if len(evals):
        for column in ("accuracy", "swap_consistency", "position_bias"):
            if column in evals:
                ax.plot(evals["step"], evals[column], "o-", label=column.replace("_", " "))
        ax.axhline(0.5, color="grey", lw=0.6)
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no evaluation (no held-out fold)", ha="center", va="center")
    ax.set(xlabel="step", title="Validation")
    if best_step is not None:
        for ax in axes:
            ax.axvline(best_step, color="tab:red", ls="--", lw=0.8)
    fig.tight_layout()
    return fig


def side_by_side(table: pd.DataFrame, fewshot: pd.DataFrame | None = None, title: str = "Same held-out rows"):
    """Every system's accuracy on the same rows (``side_by_side.compare``'s table), the share of its answers
    that were invalid beside it; with ``fewshot`` (the few-shot stage's table, one row per k), its row accuracy against
    k with the other systems (kind other than "few-shot judge") as horizontal lines.

    A pyplot-free Figure (as ``api.fewshot.plot_accuracy``'s), shown with ``display(fig)`` or saved with ``savefig``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12 if fewshot is not None else 7, 3.8))
    axes = fig.subplots(1, 2 if fewshot is not None else 1, squeeze=False)[0]
    ax = axes[0]
    y = np.arange(len(table))[::-1]
    palette = {"local model": "tab:blue", "API judge": "tab:orange", "few-shot judge": "tab:green"}
    colors = [palette.get(kind, "tab:purple") for kind in table["kind"]]
    ax.barh(y, table["accuracy"], color=colors)
    ax.barh(y, table["invalid_rate"], left=table["accuracy"], color="lightgrey", hatch="//", label="invalid answers")
    for yi, (acc, loss) in zip(y, table[["accuracy", "log_loss"]].to_numpy(), strict=True):
        ax.text(acc - 0.01, yi, f"{acc:.3f}" + ("" if np.isnan(loss) else f"  (log loss {loss:.3f})"),
                ha="right", va="center", color="white", fontsize=8)  # fmt: skip
    ax.set_yticks(y, table["system"])
    ax.axvline(0.5, color="k", lw=0.6)
    ax.set(xlim=(0, 1), xlabel="accuracy (no decision = wrong)", title=f"{title}: {int(table['rows'].iloc[0])} rows")
    ax.legend(loc="lower right", fontsize=8)
    if fewshot is not None:
        ax = axes[1]
        ks = fewshot["k"].to_numpy()
        ax.plot(ks, fewshot["row_accuracy"], "o-", color="tab:green", label="few-shot judge")
        others = table.loc[table["kind"] != "few-shot judge", ["system", "accuracy"]].to_numpy()
        for i, (name, acc) in enumerate(others):
            ax.axhline(acc, color=f"C{(i + 2) % 10}", ls="--", lw=0.9, label=name)
        ax.axhline(0.5, color="k", lw=0.6)
        ax.set_xscale("symlog", base=2, linthresh=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set(ylim=(0.3, 1), xlabel="shots (k)", ylabel="row accuracy", title="Few-shot judge against k")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
