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
# The primary model scores every test row; then, on the rows it is least sure of, it re-scores their A/B-swapped
# view while still loaded (swap TTA) and the secondary re-scores them, as far as the planner says the budget allows;
# rows nothing reached get the stated fallback. The planner projects every batch from a cost model fitted on the
# batches measured so far (load times included), so the notebook never runs over; a submission exists from the
# first seconds on and is rewritten as it improves. Shell: `python -m kaggle_utils.infer --help`.
#
# Before spending a 12-hour submission, rehearse: `infer_overrides = {"rehearse": 2000}` scores 2,000 synthetic rows
# of the competition's length profile on this hardware for at most `rehearse_minutes`, then projects the hidden run
# (`project_rows`, 25,000 by default) and prints how many secondary and TTA rows would fit.

# %%
import time

started_at = time.time()  # the budget counts from here: imports and model loading included

# %% tags=["parameters"]
# Settings come from recipes (kaggle_utils/recipes/*.toml; `python -m kaggle_utils.infer --help` lists them).
# `make push` replaces this cell's values with the Kaggle profile's recipes (recipes/profiles.toml) and their
# resolved fields, so what runs on Kaggle is what the recipe says. Overrides: field -> value over the recipe.
# After this cell it adds the one that finds this package and its wheels on Kaggle (kaggle_utils/kaggle/bootstrap.py).
infer_recipe = "demo-infer"
infer_overrides = {}

# %%
import json

import pandas as pd

from kaggle_utils import plots
from kaggle_utils.config import recipes
from kaggle_utils.infer import InferConfig, infer, pass_table
from kaggle_utils.kaggle import env

# on Kaggle the test file, the base models and the uploaded adapters are found wherever they are mounted; a model or
# adapter that is not attached is reported by the stage, which then runs without it (no primary: the fallback)
where = env.detect()
cfg = recipes.load(infer_recipe, InferConfig, infer_overrides)
labels = cfg.data.labels_file
cfg = cfg.replace(
    test_file=env.locate_file(cfg.data.test_file, where),
    out_dir=where.output_path(cfg.data.out_dir),
    primary_model=env.locate_soft(cfg.primary.model, where, env.locate_model),
    primary_adapter=env.locate_soft(cfg.primary.adapter, where, env.locate_adapter),
    secondary_model=env.locate_soft(cfg.secondary.model, where, env.locate_model),
    secondary_adapter=env.locate_soft(cfg.secondary.adapter, where, env.locate_adapter),
    labels_file=labels if labels and labels.is_file() else None,
    started_at=started_at,
)
print(where.kind, cfg)
pred = infer(cfg)
out_dir = cfg.data.out_dir
report_dir = out_dir / "rehearsal" if cfg.rehearsal.rehearse else out_dir  # a rehearsal writes no submission
report = json.loads((report_dir / "report.json").read_text())
print(json.dumps({k: v for k, v in report.items() if k != "projection"}, indent=2))
if "projection" in report:
    print(report["projection"]["table"])

# %% [markdown]
# ## Where the time went, and who scored which rows
#
# One row per pass: rows scored and planned, load and wall seconds, and what the first plan after the primary
# projected (load included). Sources: `primary`, `blend` (primary and secondary, calibrated logits averaged with the
# fitted weight), `+tta` (the primary's margin averaged with its swapped view's), `fallback`.

# %%
passes = pass_table(report)
passes

# %%
plots.inference_run(pred["source"].value_counts(), passes);

# %%
plots.confidence(pred[["p_a", "p_b"]].to_numpy(), "Final p(A)");

# %%
if "accuracy" in report:
    print(f"held-out demo accuracy: {report['accuracy']['accuracy']:.3f} on {report['accuracy']['rows']} rows")
pd.read_csv(out_dir / "submission.csv").head()
