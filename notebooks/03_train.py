# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Training the students
#
# LoRA on 4-bit nf4 bases, distilling the teacher's soft labels (KL) mixed with the human labels (CE),
# as the seed solution did for Qwen2.5-14B and Gemma2-9B at max length 2,500. The demo trains the tiny
# stand-ins of both architectures. Shell equivalent: `python -m kaggle_utils.train --help`.

# %% tags=["parameters"]
prepared_dir = "demo/work/prepared"
pseudo_file = "demo/work/pseudo.parquet"  # soft labels from notebook 02; empty: labelled rows only
students = {"qwen": "demo/models/qwen2-tiny", "gemma": "demo/models/gemma2-tiny"}
work_dir = "demo/work"
loss = "mixed"
max_length = 384
epochs = 3.0
lr = 2e-3
time_budget_minutes = 0.0  # per student; 0: no limit

# %%
# On Kaggle the package comes from its dataset under /kaggle/input (found by search); locally it is installed.
import sys
from pathlib import Path

if not any((Path(p) / "kaggle_utils").is_dir() for p in sys.path):
    sys.path += sorted(str(p.parent.parent) for p in Path("/kaggle/input").rglob("kaggle_utils/__init__.py"))[:1]

# %%
import json

import pandas as pd

from kaggle_utils import plots
from kaggle_utils.train import TrainConfig, train

# %%
results = {}
for name, model_path in students.items():
    cfg = TrainConfig(
        model_path=model_path, train_file=Path(prepared_dir) / "train.parquet",
        extra_files=[pseudo_file] if pseudo_file else [], out_dir=Path(work_dir) / name, loss=loss,
        max_length=max_length, epochs=epochs, lr=lr, batch_tokens=4096, time_budget_minutes=time_budget_minutes,
    )
    results[name] = train(cfg)
    plots.training_curve(results[name].history, f"{name}: loss ({loss})")

# %% [markdown]
# ## Held-out fold

# %%
pd.DataFrame({name: r.metrics["val"] | {"steps": r.metrics["steps"]} for name, r in results.items()}).T
