"""Figures the notebooks show: one function per figure, each returning a matplotlib Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from kaggle_utils.data import TEXT_COLUMNS


def lengths_and_languages(frames: dict[str, pd.DataFrame]):
    """Character-length histograms per text field (log scale) and the language mix of the labelled rows."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
    bins = np.logspace(0, 5, 40)
    for name, df in frames.items():
        lengths = pd.concat([df[c].str.len() for c in TEXT_COLUMNS[1:]])
        axes[0].hist(lengths.clip(lower=1), bins=bins, histtype="step", label=f"{name} responses")
    train = frames["train"]
    axes[0].hist(train["prompt"].str.len().clip(lower=1), bins=bins, histtype="step", ls="--", label="train prompts")
    axes[0].set(xscale="log", xlabel="characters", ylabel="rows", title="Lengths")
    axes[0].legend(fontsize=8)
    train["language"].value_counts().head(12).iloc[::-1].plot.barh(ax=axes[1], title="Languages (train)")
    fig.tight_layout()
    return fig


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
