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
# # 01 · Data preparation
#
# Validate the competition files against the schema (a bad file stops here with the file, column and row
# named) and assign cross-validation folds grouped by prompt, balanced per language.
# Every call below is `kaggle_utils.prepare`, which also runs from a shell:
# `python -m kaggle_utils.prepare --help`.

# %% tags=["parameters"]
data_dir = ""  # competition folder; empty: searched under /kaggle/input on Kaggle, demo/data locally
out_dir = "demo/work/prepared"
n_folds = 5

# %%
# On Kaggle the package comes from its dataset under /kaggle/input (found by search); locally it is installed.
import sys
from pathlib import Path

if not any((Path(p) / "kaggle_utils").is_dir() for p in sys.path):
    sys.path += sorted(str(p.parent.parent) for p in Path("/kaggle/input").rglob("kaggle_utils/__init__.py"))[:1]

# %%
from kaggle_utils import env, plots
from kaggle_utils.prepare import PrepareConfig, prepare, summary

where = env.detect()
cfg = PrepareConfig(
    data_dir=env.resolve_dir(data_dir, where, env.find_competition_dir, "demo/data"),
    out_dir=Path(out_dir) if not where.on_kaggle else where.working_dir / "prepared",
    n_folds=n_folds,
)
print(where.kind, cfg)

# %% [markdown]
# ## Validate and fold

# %%
frames = prepare(cfg)
summary(frames)

# %% [markdown]
# ## Lengths and languages
# Responses are an order of magnitude longer than prompts; at 2,500 tokens the truncation rule decides
# what the model sees of the long ones.

# %%
plots.lengths_and_languages(frames);

# %% [markdown]
# ## Folds: rows per fold and language

# %%
frames["train"].pivot_table(index="language", columns="fold", values="id", aggfunc="count", fill_value=0)
