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
# # 02 · Pseudo-labelling
#
# A teacher fine-tuned on the labelled data scores the unlabelled pool; its logits (averaged over both A/B
# orders) become soft labels for distillation in notebook 03, at whatever temperature the student uses. Each row
# also says which teacher labelled it (`teacher`) and under which settings (`label_key`). The seed solution's
# teachers were Qwen2.5-72B and Llama3.3-70B; the demo's is a tiny Qwen2 trained here in a minute.
# Shell equivalents: `python -m kaggle_utils.train`, `python -m kaggle_utils.pseudo_label`; on every GPU of a
# machine: `accelerate launch --num_processes 8 -m kaggle_utils.pseudo_label --recipe pseudo-label`.

# %% tags=["parameters"]
# Settings come from recipes (kaggle_utils/recipes/*.toml; `python -m kaggle_utils.pseudo_label --help` lists them).
# `make push` replaces this cell's values with the Kaggle profile's recipes (recipes/profiles.toml) and their
# resolved fields, so what runs on Kaggle is what the recipe says. Overrides: field -> value over the recipe.
# After this cell it adds the one that finds this package and its wheels on Kaggle (kaggle_utils/kaggle/bootstrap.py).
# the teacher: a train recipe run here first; empty: the adapter_dir of the pseudo-label recipe (an uploaded one)
teacher_recipe = "demo-teacher"
teacher_overrides = {}
pseudo_label_recipe = "demo-pseudo-label"
pseudo_label_overrides = {}

# %%
import json

from kaggle_utils import plots
from kaggle_utils.config import recipes
from kaggle_utils.data import mixing
from kaggle_utils.kaggle import env
from kaggle_utils.pseudo_label import PseudoLabelConfig, label_summary, pseudo_label
from kaggle_utils.train import TrainConfig, train

# on Kaggle, notebook 01's output and the models are attached inputs, found wherever they are mounted
where = env.detect()
cfg = recipes.load(pseudo_label_recipe, PseudoLabelConfig, pseudo_label_overrides)
cfg = cfg.replace(model_path=env.locate_model(cfg.model.model_path, where), input_file=env.locate_file(cfg.data.input_file, where))

# %% [markdown]
# ## The teacher

# %%
if teacher_recipe:
    teacher = recipes.load(teacher_recipe, TrainConfig, teacher_overrides)
    teacher = teacher.replace(
        model_path=env.locate_model(teacher.model.model_path, where), train_file=env.locate_file(teacher.data.train_file, where)
    )
    result = train(teacher)
    cfg = cfg.replace(adapter_dir=result.adapter_dir)
    plots.training_curve(result.history, "Teacher loss")
    print(json.dumps(result.metrics, indent=2))
else:
    cfg = cfg.replace(adapter_dir=env.locate_adapter(cfg.model.adapter_dir, where))
    print(f"teacher adapter: {cfg.model.adapter_dir}")

# %% [markdown]
# ## Soft labels for the pool
# The input is the pool stage's `unlabelled.parquet`: notebook 01's in the demo, the dataset `wsdm-arena-pool`
# (`make pool-dataset`) on Kaggle. Each row keeps its `source`, so the table below follows every public source
# through the teacher: its rows, the teacher's mean confidence (max p), the share it prefers A, and how many rows each
# `mix_min_confidence` of the students' recipes would keep.

# %%
soft = pseudo_label(cfg)
soft.groupby(["teacher", "label_key"]).size().rename("rows").to_frame()

# %%
mixing.confidence_table(soft)

# %%
label_summary(soft)

# %%
plots.confidence(soft[["p_a", "p_b"]].to_numpy(), "Teacher confidence on the pool");
