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
# # 05 · Side experiments beside the students
#
# The seed's three experiments beside the main line, on the rows the students validated on (notebook 03's held-out
# fold), in one table: an mDeBERTa-v3 two-choice baseline (`kaggle_utils.multiple_choice`), an OpenAI judge
# fine-tuned to answer "A" or "B" (`kaggle_utils.api.judge`) and a judge shown k labelled examples
# (`kaggle_utils.api.fewshot`). Shell: `python -m kaggle_utils.multiple_choice --help`,
# `python -m kaggle_utils.api.judge prepare --recipe judge-gpt-4o-mini`, `python -m kaggle_utils.api.fewshot --help`.
#
# **The demo's API models are stand-ins.** With `demo_endpoint = True` this notebook starts
# `kaggle_utils.api.demo_server` on 127.0.0.1: an OpenAI-compatible endpoint whose "models" are transparent rules over
# the demo data's signal, not language models. `demo-judge` decides by which response's opening phrase won more often
# in the examples it has (none: the longer response wins), `ft:demo-judge:...` is that rule fitted on the uploaded
# training file, and a stated share of answers is deliberately not a letter. The stages talk to it through the real
# `openai` client exactly as they would to OpenAI, so every step (upload, job, polling, events, answers, invalid
# answers, cost, cleanup) runs; the accuracies say how the *pipeline* treats a judge, not how GPT judges.
#
# This notebook is not a Kaggle kernel (competition kernels have no internet for the API stages, and the mDeBERTa
# baseline is a reference point, not a submission): it runs in `make demo`, and on any machine with the recipes'
# endpoint and key (`demo_endpoint = False`; a real endpoint costs money).

# %% tags=["parameters"]
# Settings come from recipes (kaggle_utils/recipes/*.toml; each stage's `--help` lists them); the demo profile
# (recipes/profiles.toml) names these. Overrides: field -> value over the recipe. An empty recipe skips that system.
mdeberta_recipe = "demo-mdeberta"
mdeberta_overrides = {}
judge_recipe = "demo-judge"
judge_overrides = {}
fewshot_recipe = "demo-fewshot"
fewshot_overrides = {}
# serve the stand-in models (kaggle_utils.api.demo_server) and point the API stages at them; False: the recipes'
# base_url and key as written (a real endpoint: it costs money)
demo_endpoint = True
# the rows every system is scored on: fold `val_fold` of the prepared training file (the students' held-out fold);
# the judge fine-tunes on, and the few-shot judge takes its shots from, the other folds
heldout_file = "demo/work/prepared/train.parquet"
val_fold = 0
# the students' predictions on those rows (notebook 03 writes them): name -> val_predictions.parquet; missing: skipped
student_predictions = {
    "student qwen2 (primary)": "demo/work/qwen/val_predictions.parquet",
    "student gemma2 (secondary)": "demo/work/gemma/val_predictions.parquet",
}

# %%
# the figures are pyplot-free (nothing global changes): shown with display()
import os
from dataclasses import replace
from pathlib import Path

import pandas as pd
from IPython.display import display

from kaggle_utils import multiple_choice, plots, side_by_side
from kaggle_utils.config import recipes
from kaggle_utils.kaggle import env

where = env.detect()
systems = []  # side_by_side.Verdicts of every system that ran, for the table at the end
print(where.kind)

# %% [markdown]
# ## mDeBERTa-v3 as a two-choice model
# Each row is two choices, (prompt, response A) and (prompt, response B), one logit each; a softmax over the two gives
# P(A wins). Same folds and held-out fold as the students; the demo trains the tiny random-weight stand-in
# (`python -m kaggle_utils.models.demo_encoder`).

# %%
if mdeberta_recipe:
    mc_cfg = recipes.load(mdeberta_recipe, multiple_choice.MultipleChoiceConfig, mdeberta_overrides)
    mc_cfg = replace(
        mc_cfg,
        model_path=env.locate_model(mc_cfg.model_path, where),
        train_file=env.locate_file(mc_cfg.train_file, where),
    )
    print(f"{mdeberta_recipe}: {mc_cfg.model_path} · max_length {mc_cfg.max_length} · held-out fold {mc_cfg.val_fold}")
    mc_metrics = multiple_choice.train(mc_cfg)
    print({k: v for k, v in mc_metrics.items() if k not in ("evals", "model_dir")})
    plots.training_and_validation(
        pd.read_csv(mc_cfg.out_dir / "history.csv"), pd.DataFrame(mc_metrics.get("evals", [])), title=mdeberta_recipe
    )
    systems.append(side_by_side.from_predictions("mDeBERTa", mc_cfg.out_dir / "val_predictions.parquet"))

# %% [markdown]
# ## The endpoint
# The stand-in endpoint accepts any key; the stages read keys only from the environment, so a dummy one is set there
# for it (and for nothing else: `demo_endpoint = False` leaves the environment alone).

# %%
api_target = {}
if demo_endpoint and (judge_recipe or fewshot_recipe):
    # the API modules need the openai package, which Kaggle's image lacks: imported only where an API stage runs
    from kaggle_utils.api import demo_server

    os.environ["KAGGLE_UTILS_DEMO_KEY"] = "any-key-the-demo-endpoint-accepts"
    endpoint = demo_server.DemoEndpoint().start()
    api_target = {"base_url": endpoint.base_url}
    print(f"demo endpoint at {endpoint.base_url}: {endpoint.models()} (stand-ins, see kaggle_utils.api.demo_server)")

# %% [markdown]
# ## The fine-tuned judge
# `prepare` writes the training and validation files in chat format and estimates tokens and cost; `train` uploads
# them, creates the job and polls it, printing its events; `compare` asks the fine-tuned model and its base about every
# held-out row in both A/B orders. An answer that is not one letter is `invalid` and counts as wrong.

# %%
if judge_recipe:
    from kaggle_utils.api import judge

    judge_cfg = recipes.load(judge_recipe, judge.JudgeConfig, {**judge_overrides, **api_target})
    judge_cfg = side_by_side.judge_on_heldout(judge_cfg, heldout_file, val_fold)
    print(judge.prepare(judge_cfg))

# %%
if judge_recipe:
    job = judge.train(judge_cfg)
    judged = judge.compare(judge_cfg) if len(judge_cfg.test_models) == 2 else judge.evaluate(judge_cfg)
    print(judged)
    for model, answers in judged.answers.groupby("model", sort=False):
        name = "judge, fine-tuned" if model == job.fine_tuned_model else f"judge, {model}"
        systems.append(side_by_side.from_answers(name, answers, judge_cfg.prices))

# %% [markdown]
# ## The few-shot judge: accuracy against k
# The same held-out rows, each shown k labelled examples of its own language from the other folds (answers balanced
# A/B), both orders. The stand-in learns the openings its shots show, so here accuracy rises with k by construction;
# with GPT-3.5 the seed team saw no gain.

# %%
if fewshot_recipe:
    from kaggle_utils.api import fewshot

    fewshot_cfg = recipes.load(fewshot_recipe, fewshot.FewShotConfig, {**fewshot_overrides, **api_target})
    fewshot_cfg = side_by_side.fewshot_on_heldout(fewshot_cfg, heldout_file, val_fold)
    shots = fewshot.run_fewshot(fewshot_cfg)
    print(shots.run)
    for k, answers in shots.answers.groupby("k"):
        systems.append(side_by_side.from_answers(f"few-shot, k={k}", answers, fewshot_cfg.prices, "few-shot judge"))
    display(fewshot.plot_accuracy(shots.table, f"{fewshot_cfg.model}, shots by {fewshot_cfg.selection}"))
    display(shots.table[["k", "rows", "answers", "invalid", "accuracy", "row_accuracy", "consistency", "cost_usd"]])

# %% [markdown]
# ## Everything on the same rows
# Accuracy counts a row without a decision (NaN probabilities, an invalid or tied answer) as wrong; log loss exists
# only where a system gives probabilities (the judges answer with a letter); `invalid_rate` is the share of answers
# (judges: rows x 2 orders) that were invalid or failed; `cost_usd` is the estimated API spend (the demo prices the
# stand-ins' tokens at gpt-4o-mini's list prices; local models' compute is not priced here).

# %%
for name, path in student_predictions.items():
    if Path(path).is_file():
        systems.append(side_by_side.from_predictions(name, path))
    else:
        print(f"{name}: {path} not found (run notebook 03 first); left out")
if systems:
    table = side_by_side.compare(systems, side_by_side.heldout_rows(heldout_file, val_fold))
    display(plots.side_by_side(table, shots.table if fewshot_recipe else None))
    display(table)

# %% [markdown]
# ## Clean up
# Delete the uploaded files (and the fine-tuned model where the recipe says `delete_model`), then stop the endpoint.

# %%
if judge_recipe:
    judge.cleanup(judge_cfg)
if api_target:
    endpoint.stop()
