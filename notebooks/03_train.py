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
# name -> base model folder; on Kaggle, when absent, the attached model whose path contains the name
students = {"qwen": "demo/models/qwen2-tiny", "gemma": "demo/models/gemma2-tiny"}
work_dir = "demo/work"
loss = "mixed"
max_length = 384
epochs = 3.0
lr = 2e-3
time_budget_minutes = 0.0  # per student; 0: no limit

# %%
# On Kaggle the package comes from its dataset under /kaggle/input (found by search); locally it is installed.
# The internet is off there: the pinned dependencies Kaggle's image lacks come from the wheels dataset
# (`make wheels`); pip installs only what is missing or at another version. Locally this cell does nothing.
import subprocess
import sys
from pathlib import Path

kaggle_input = Path("/kaggle/input")
if kaggle_input.is_dir() and not any((Path(p) / "kaggle_utils").is_dir() for p in sys.path):
    sys.path += sorted(str(p.parent.parent) for p in kaggle_input.rglob("kaggle_utils/__init__.py"))[:1]
for pins in sorted(kaggle_input.rglob("kaggle_utils-wheels.txt"))[:1]:
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(pins.parent)]
    subprocess.run([*pip, "-r", str(pins)], check=True)

# %%
import json

import pandas as pd

from kaggle_utils.kaggle import env
from kaggle_utils import plots
from kaggle_utils.train import TrainConfig, train

# on Kaggle: earlier notebooks' outputs and the models are attached inputs, found by search
where = env.detect()
prepared = env.locate(prepared_dir, where, lambda r: env.find_dir(r, "train.parquet", "prepared"))
pseudo = env.locate(pseudo_file, where, lambda r: env.find_dir(r, "pseudo.parquet") / "pseudo.parquet") if pseudo_file else None
work = where.working_dir if where.on_kaggle else Path(work_dir)

# %%
results = {}
for name, model_path in students.items():
    cfg = TrainConfig(
        model_path=env.locate(model_path, where, lambda r, hint=name: env.find_model_dir(r, hint)),
        train_file=prepared / "train.parquet", extra_files=[str(pseudo)] if pseudo else [], out_dir=work / name, loss=loss,
        max_length=max_length, epochs=epochs, lr=lr, batch_tokens=4096, time_budget_minutes=time_budget_minutes,
    )
    results[name] = train(cfg)
    plots.training_curve(results[name].history, f"{name}: loss ({loss})")

# %% [markdown]
# ## Held-out fold

# %%
pd.DataFrame({name: r.metrics["val"] | {"steps": r.metrics["steps"]} for name, r in results.items()}).T
