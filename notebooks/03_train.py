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
# LoRA on 4-bit nf4 bases, distilling the teacher's logits (KL at a temperature T on both teacher and student,
# x T^2) mixed with the human labels (CE), as the seed solution did for Qwen2.5-14B and Gemma2-9B at max length
# 2,500. The held-out fold is evaluated every `eval_every_steps` steps and at the end; the adapter kept is the best
# evaluation by `best_metric`. The demo trains the tiny stand-ins of both architectures.
# Shell equivalent: `python -m kaggle_utils.train --help`.

# %% tags=["parameters"]
# Settings come from recipes (kaggle_utils/recipes/*.toml; `python -m kaggle_utils.train --help` lists them).
# `make push` replaces this cell's values with the Kaggle profile's recipes (recipes/profiles.toml) and their
# resolved fields, so what runs on Kaggle is what the recipe says. Overrides: field -> value over the recipe.
# After this cell it adds the one that finds this package and its wheels on Kaggle (kaggle_utils/kaggle/bootstrap.py).
# the students: primary (scores every test row) and secondary (the least certain rows); an empty recipe skips one
primary_recipe = "demo-student-qwen2"
primary_overrides = {}
secondary_recipe = "demo-student-gemma2"
secondary_overrides = {}

# %%

import pandas as pd

from kaggle_utils import plots
from kaggle_utils.config import recipes
from kaggle_utils.kaggle import env
from kaggle_utils.evaluation import calibration
from kaggle_utils.train import TrainConfig, train

# on Kaggle, earlier notebooks' outputs and the models are attached inputs, found wherever they are mounted
where = env.detect()
students = {"primary": (primary_recipe, primary_overrides), "secondary": (secondary_recipe, secondary_overrides)}

# %%
results = {}
for role, (recipe, overrides) in students.items():
    if not recipe:
        continue
    cfg = recipes.load(recipe, TrainConfig, overrides)
    cfg = cfg.replace(
        model_path=env.locate_model(cfg.model.model_path, where),
        train_file=env.locate_file(cfg.data.train_file, where),
        extra_files=[str(env.locate_file(f, where)) for f in cfg.data.extra_files],
    )
    loss = cfg.objective
    print(
        f"{role}: {recipe} · {cfg.model.model_path} · max_length {cfg.inputs.max_length} · loss {loss.loss} "
        f"(kl_weight {loss.kl_weight}, T {loss.temperature}) · eval every {cfg.schedule.eval_every_steps or 'end only'}"
    )
    # train() prints the extra rows per source (the pool's pseudo-labelled pairs, its human-labelled set) and what
    # the recipe's mixing settings keep
    results[role] = train(cfg)
    r = results[role]
    plots.training_and_validation(r.history, r.evals, r.metrics.get("best", {}).get("step"), f"{role} ({recipe})")

# %% [markdown]
# ## Held-out fold
# The kept adapter's metrics: accuracy and log loss (NaN predictions count as wrong, `nan_rows` says how many),
# swap consistency (mean |p(A | a,b) - p(B | b,a)|, 0 is order-blind) and position bias (share predicted A).

# %%
pd.DataFrame(
    {
        role: r.metrics["val"] | {"steps": r.metrics["steps"], "best step": r.metrics["best"]["step"]}
        for role, r in results.items()
        if "val" in r.metrics
    }
).T

# %% [markdown]
# Accuracy per language (the most frequent languages of the held-out fold; the rest pooled as "other").

# %%
pd.concat({role: r.languages.set_index("language") for role, r in results.items() if len(r.languages)}, axis=1)

# %% [markdown]
# ## Calibration and the blend
# Each student's temperatures and the weights of the secondary in the cascade's blend, each fitted on the validation
# margins of the view it serves (`+tta`: the primary's swap-averaged margin; otherwise single-order; the blend on the
# share of rows the cascade sends the secondary) and written where inference reads them: `calibration.json` beside
# each adapter, `blend.json` beside the secondary's. The same step from a shell:
# `python -m kaggle_utils.evaluation.calibration --recipe calibrate-students`.

# %%
if {"primary", "secondary"} <= set(results):
    dirs = {f"{role}_dir": r.adapter_dir.parent for role, r in results.items()}
    cals, blend = calibration.run(calibration.CalibrateConfig(**dirs))
    display(calibration.summary(cals, blend))
