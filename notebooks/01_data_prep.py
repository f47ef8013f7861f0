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
# Settings come from recipes (kaggle_utils/recipes/*.toml; `python -m kaggle_utils.prepare --help` lists them).
# `make push` replaces this cell's values with the Kaggle profile's recipes (recipes/profiles.toml) and their
# resolved fields, so what runs on Kaggle is what the recipe says. Overrides: field -> value over the recipe.
# After this cell it adds the one that finds this package and its wheels on Kaggle (kaggle_utils/kaggle/bootstrap.py).
prepare_recipe = "demo-prepare"
prepare_overrides = {}
# the extra labelled set and the unlabelled pool from the public sources (kaggle_utils.data.pool); "" skips it
pool_recipe = "demo-pool"
pool_overrides = {}

# %%
from dataclasses import replace

from kaggle_utils import plots
from kaggle_utils.config import recipes
from kaggle_utils.data import clean, sources
from kaggle_utils.kaggle import env
from kaggle_utils.prepare import PrepareConfig, prepare, summary

# on Kaggle the competition folder is found under /kaggle/input wherever it is mounted
where = env.detect()
cfg = recipes.load(prepare_recipe, PrepareConfig, prepare_overrides)
cfg = replace(cfg, data_dir=env.locate(cfg.data_dir, where, env.find_competition_dir))
print(where.kind, cfg)

# %% [markdown]
# ## Validate and fold

# %%
frames = prepare(cfg)
summary(frames)

# %% [markdown]
# ## Data layer: every source into one table
# `kaggle_utils.data.sources` turns each public format (competition train, LMSYS arena-55k, chatbot arena
# conversations, DPO chosen/rejected pairs, A/B-labelled message pairs, unlabelled pools) into one schema with a
# `source` column; ties and bad rows are dropped and counted. The demo has one labelled source (the
# competition-format train file) and the unlabelled pool; more sources are more `(frame or path, format, name)`
# triples in the same call.

# %%
inputs = [(frames["train"].drop(columns="fold"), "competition", "competition")]
if "unlabeled" in frames:
    inputs.append((frames["unlabeled"], "unlabelled", "unlabeled pool"))
table, report = sources.normalise_all(inputs, progress=True)
table.groupby("source").size().rename("rows").to_frame()

# %% [markdown]
# ## Clean: quality filters, pair dedup, leakage against the test prompts, language
# Each step reports rows in, rows out and rows dropped per reason and source. Leakage drops training rows
# whose prompt equals a test prompt after normalisation (`leak_exact`) or is a MinHash near-duplicate of one
# (`leak_near`). What is shown here is the data layer's verdict on these files; `PrepareConfig(clean=True)`
# applies it to the prepared train file (`python -m kaggle_utils.prepare --clean true`).

# %%
cleaned, clean_report = clean.clean(table, frames["test"]["prompt"], progress=True)
report.extend(clean_report)
report.check_balanced()
report.summary()

# %%
print("notes:", report.notes())
plots.source_flow(report);

# %% [markdown]
# ## A/B label balance per source
# A source whose labels lean to A teaches a position bias; `clean.balance_ab` swaps rows (`data.swap_ab`) to
# even it out, and training's swap augmentation removes what is left.

# %%
balance = clean.ab_balance(cleaned)
plots.label_balance(balance)
balance

# %% [markdown]
# ## Languages and lengths
# Responses are an order of magnitude longer than prompts; at 2,500 tokens the truncation rule decides
# what the model sees of the long ones.

# %%
plots.languages_and_lengths(cleaned);

# %% [markdown]
# ## Folds: rows per fold and language
# Folds group rows by normalised prompt (no prompt in two folds) and deal prompts round-robin per language.

# %%
frames["train"].pivot_table(index="language", columns="fold", values="id", aggfunc="count", fill_value=0)

# %% [markdown]
# ## The pool: public pairs for extra training rows and for the teacher
# `kaggle_utils.data.pool` reads a manifest of public sources (the recipe's `[[sources]]`: path, format, labelled or
# not, cap, weight), normalises and cleans each, drops copies across sources (A/B-swapped ones too; the first source
# in the manifest keeps its copy) and rows whose prompt is in the competition's validation or test files, applies
# caps and language budgets, and writes `extra_labelled.parquet` (human labels) and `unlabelled.parquet` (for the
# teacher), each row with its source. Shell: `python -m kaggle_utils.data.pool --recipe pool-public`.

# %%
if pool_recipe:
    from kaggle_utils.data import pool

    assembled = pool.assemble(recipes.load(pool_recipe, pool.PoolConfig, pool_overrides), progress=True)
    plots.source_flow(assembled.report)
    pool.plot_languages(assembled)
    display(assembled.summary())
