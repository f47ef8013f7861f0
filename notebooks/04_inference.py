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
# # 04 · Inference under the 12-hour budget
#
# The primary model scores every test row; the secondary re-scores the rows the primary is least sure of,
# for as long as the budget allows; rows nothing reached get the stated fallback. Each batch starts only if
# its projected time fits, so the notebook never runs over. Shell: `python -m kaggle_utils.infer --help`.

# %%
import time

started_at = time.time()  # the budget counts from here: imports and model loading included

# %% tags=["parameters"]
test_file = ""  # empty: test.parquet of the competition under /kaggle/input on Kaggle, demo/data locally
# model and adapter folders: local paths; on Kaggle, when absent, found under /kaggle/input by the hints
primary_model = "demo/models/qwen2-tiny"
primary_adapter = "demo/work/qwen/adapter"
primary_hint = "qwen"
secondary_model = "demo/models/gemma2-tiny"  # empty: primary only
secondary_adapter = "demo/work/gemma/adapter"
secondary_hint = "gemma"
time_budget_minutes = 690.0
out_dir = "demo/work/submission"
labels_file = "demo/data/test_labels.csv"  # the demo's answer key; absent on Kaggle
max_length = 384

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
from kaggle_utils.infer import InferConfig, infer

where = env.detect()
cfg = InferConfig(
    test_file=Path(test_file) if test_file else env.resolve_dir("", where, env.find_competition_dir, "demo/data")
    / "test.parquet",
    primary_model=env.locate(primary_model, where, lambda r: env.find_model_dir(r, primary_hint)),
    primary_adapter=env.locate(primary_adapter, where, lambda r: env.find_adapter_dir(r, primary_hint)),
    secondary_model=env.locate(secondary_model, where, lambda r: env.find_model_dir(r, secondary_hint))
    if secondary_model else None,
    secondary_adapter=env.locate(secondary_adapter, where, lambda r: env.find_adapter_dir(r, secondary_hint))
    if secondary_model else None,
    time_budget_minutes=time_budget_minutes, started_at=started_at, max_length=max_length,
    out_dir=where.working_dir if where.on_kaggle else Path(out_dir),
    labels_file=labels_file if labels_file and Path(labels_file).is_file() else None,
)
pred = infer(cfg)
report = json.loads((cfg.out_dir / "report.json").read_text())
print(json.dumps(report, indent=2))

# %% [markdown]
# ## Who scored which rows, and how sure

# %%
pred["source"].value_counts().to_frame("rows")

# %%
plots.confidence(pred[["p_a", "p_b"]].to_numpy(), "Final p(A)");

# %%
if "accuracy" in report:
    print(f"held-out demo accuracy: {report['accuracy']['accuracy']:.3f} on {report['accuracy']['rows']} rows")
pd.read_csv(cfg.out_dir / "submission.csv").head()
