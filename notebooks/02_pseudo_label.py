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
# A teacher fine-tuned on the labelled data scores the unlabelled pool; its probabilities (averaged over
# both A/B orders) become soft labels for distillation in notebook 03. The seed solution's teachers were
# Qwen2.5-72B and Llama3.3-70B; the demo's is a tiny Qwen2 trained here in a minute.
# Shell equivalents: `python -m kaggle_utils.train`, `python -m kaggle_utils.pseudo_label`.

# %% tags=["parameters"]
prepared_dir = "demo/work/prepared"
teacher_model = "demo/models/qwen2-tiny"  # base model folder; on Kaggle, when absent, found by teacher_hint
teacher_hint = "qwen"
teacher_adapter = ""  # a trained teacher adapter; empty: train one here on the labelled folds
work_dir = "demo/work"
max_length = 384
teacher_epochs = 3.0
teacher_lr = 2e-3

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
from kaggle_utils.pseudo_label import PseudoLabelConfig, label_summary, pseudo_label
from kaggle_utils.train import TrainConfig, train

# on Kaggle: notebook 01's output and the model are attached inputs, and outputs go to /kaggle/working
where = env.detect()
prepared = env.locate(prepared_dir, where, lambda r: env.find_dir(r, "unlabeled.parquet", "prepared"))
teacher = env.locate(teacher_model, where, lambda r: env.find_model_dir(r, teacher_hint))
work = where.working_dir if where.on_kaggle else Path(work_dir)

# %% [markdown]
# ## The teacher

# %%
if teacher_adapter:
    adapter = Path(teacher_adapter)
else:
    result = train(TrainConfig(
        model_path=teacher, train_file=prepared / "train.parquet", out_dir=work / "teacher",
        max_length=max_length, epochs=teacher_epochs, lr=teacher_lr, batch_tokens=4096, loss="ce",
    ))
    adapter = result.adapter_dir
    plots.training_curve(result.history, "Teacher loss")
    print(json.dumps(result.metrics, indent=2))

# %% [markdown]
# ## Soft labels for the pool

# %%
cfg = PseudoLabelConfig(
    model_path=teacher, adapter_dir=adapter, input_file=prepared / "unlabeled.parquet",
    out_file=work / "pseudo.parquet", max_length=max_length, tta=True,
)
soft = pseudo_label(cfg)
label_summary(soft)

# %%
plots.confidence(soft[["p_a", "p_b"]].to_numpy(), "Teacher confidence on the pool");
