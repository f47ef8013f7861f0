"""Recipes: every file loads into its stage's dataclass; a broken key fails naming the file and the key; a variant
overrides only what it writes; the command line takes ``--recipe`` and flags over it; profiles name real recipes."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import pandas as pd
import pytest

from kaggle_utils.config import recipes
from kaggle_utils.config.sections import flat_fields, is_sectioned, sections, to_flat
from kaggle_utils.kaggle.staging import STAGE_CONFIGS
from kaggle_utils.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
RECIPE_FILES = sorted(p for p in recipes.RECIPES_DIR.glob("*.toml") if p != recipes.PROFILES_FILE)


# stages without a notebook of their own: "module:Class" of their configs
OTHER_STAGES = {
    "data": "kaggle_utils.kaggle.download:DownloadConfig",
    "generate_pairs": "kaggle_utils.api.generate:GenerateConfig",
    "translate": "kaggle_utils.api.translate:TranslateConfig",
    "judge": "kaggle_utils.api.judge:JudgeConfig",
    "fewshot": "kaggle_utils.api.fewshot:FewShotConfig",
    "multiple-choice": "kaggle_utils.multiple_choice:MultipleChoiceConfig",
    "pool": "kaggle_utils.data.pool:PoolConfig",
    "calibrate": "kaggle_utils.evaluation.calibration:CalibrateConfig",
}


def config_class(stage: str) -> type:
    if stage in OTHER_STAGES:
        module, name = OTHER_STAGES[stage].split(":")
        return getattr(importlib.import_module(module), name)
    return STAGE_CONFIGS[stage]


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_recipe_loads_into_its_stage_config(path):
    cls = config_class(recipes.read(path).stage)
    recipe = recipes.read(path, cls)
    cfg = recipes.load(path.stem, cls)
    assert type(cfg).STAGE == recipe.stage
    # the header says what it is for; every field it sets reaches the config
    assert path.read_text().startswith("#") and recipe.summary
    flat = to_flat(cfg)  # the recipe's keys are flat names
    for key, value in recipe.values.items():
        got = flat[key]
        assert (str(got) if isinstance(got, Path) else got) == value or (value == "" and got is None), key


STAGES = sorted({*OTHER_STAGES, *STAGE_CONFIGS})


@pytest.mark.parametrize("stage", STAGES)
def test_every_field_of_a_stage_has_exactly_one_section_and_a_unique_flat_name(stage):
    cls = config_class(stage)
    fields = list(flat_fields(cls))  # builds the flat names: a name in two sections is a TypeError
    placed = [name for keys in sections(cls).values() for name in keys.values()]
    assert sorted(placed) == sorted(fields), f"{cls.__name__}: the sections and the config's fields differ"
    assert len(set(fields)) == len(fields), "flat names must be unique"
    if is_sectioned(cls):  # cfg.<section> is the section, so no flat name may be a section's name
        assert not set(fields) & set(sections(cls))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_an_unknown_key_names_the_file_the_key_and_the_closest_field(tmp_path):
    bad = write(tmp_path, "bad", 'stage = "train"\nextends = "demo-teacher"\n[optim]\nlrr = 1e-3\n')
    with pytest.raises(recipes.RecipeError, match=r"bad\.toml: unknown key 'lrr' \(did you mean 'lr'\?\)"):
        recipes.load(bad, TrainConfig)


def test_a_value_of_the_wrong_type_names_the_file_and_the_key(tmp_path):
    bad = write(tmp_path, "typo", 'stage = "train"\nextends = "demo-teacher"\nmax_length = "2500"\n')
    with pytest.raises(recipes.RecipeError, match=r"typo\.toml: key 'max_length' = '2500' should be int"):
        recipes.load(bad, TrainConfig)
    flag = write(tmp_path, "flag", 'stage = "train"\nextends = "demo-teacher"\nload_in_4bit = "yes"\n')
    with pytest.raises(recipes.RecipeError, match="'load_in_4bit' = 'yes' should be bool"):
        recipes.load(flag, TrainConfig)


def test_a_broken_key_in_a_base_is_reported_in_the_base_file(tmp_path):
    write(tmp_path, "base", 'stage = "train"\nmodel_path = "m"\nbatch_tokenz = 4096\n')
    child = write(tmp_path, "child", 'extends = "base"\nlr = 1e-3\n')
    with pytest.raises(recipes.RecipeError, match=r"base\.toml: unknown key 'batch_tokenz'"):
        recipes.load(child, TrainConfig)


def test_a_variant_overrides_only_what_it_writes():
    base, variant = recipes.read("demo-student-qwen2", TrainConfig), recipes.read("demo-student-gemma2", TrainConfig)
    changed = {k for k in variant.values if variant.values[k] != base.values.get(k)}
    assert changed == {"model_path", "out_dir"}
    assert [p.stem for p in variant.chain] == [
        "train-base",
        "demo-teacher",
        "demo-student-qwen2",
        "demo-student-gemma2",
    ]
    real = recipes.load("student-gemma2-9b", TrainConfig)
    got = (real.inputs.max_length, real.objective.loss, real.lora.lora_r, real.model.load_in_4bit)
    assert got == (2500, "mixed", 16, True)


def test_extends_loops_stage_mismatches_and_double_keys_are_errors(tmp_path):
    write(tmp_path, "a", 'stage = "train"\nextends = "b"\n')
    write(tmp_path, "b", 'stage = "train"\nextends = "a"\n')
    with pytest.raises(recipes.RecipeError, match="loops back"):
        recipes.read(tmp_path / "a.toml")
    other = write(tmp_path, "other", 'stage = "infer"\nextends = "demo-teacher"\n')
    with pytest.raises(recipes.RecipeError, match="stage 'infer' differs"):
        recipes.read(other)
    twice = write(tmp_path, "twice", 'stage = "train"\nlr = 1.0\n[optim]\nlr = 2.0\n')
    with pytest.raises(recipes.RecipeError, match="'lr' is set twice"):
        recipes.read(twice, TrainConfig)
    with pytest.raises(recipes.RecipeError, match="not 'infer'"):
        recipes.load("demo-teacher", STAGE_CONFIGS["infer"])
    with pytest.raises(recipes.RecipeError, match="no recipe 'nope'"):
        recipes.read("nope")


def test_overrides_are_checked_like_recipe_keys():
    cfg = recipes.load("demo-teacher", TrainConfig, {"lr": 0.5, "out_dir": "elsewhere"})
    assert cfg.optim.lr == 0.5 and cfg.data.out_dir == Path("elsewhere")
    with pytest.raises(recipes.RecipeError, match="overrides of recipe demo-teacher: unknown key 'epoch'"):
        recipes.load("demo-teacher", TrainConfig, {"epoch": 2})


def run_cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow  # a subprocess
def test_the_command_line_takes_a_recipe_and_flags_over_it():
    from kaggle_utils.config.cli import parse_config

    cfg = parse_config(TrainConfig, ["--recipe", "student-qwen2.5-14b", "--lr", "3e-5"])
    assert (cfg.inputs.max_length, cfg.optim.lr, cfg.objective.loss) == (2500, 3e-5, "mixed")
    assert parse_config(TrainConfig, ["--lr", "3e-5"]).inputs.max_length == TrainConfig().inputs.max_length
    for stage in ("prepare", "train", "pseudo_label", "infer"):
        text = run_cli(f"kaggle_utils.{stage}", "--help")
        listed = re.findall(r"^  (\S+) ", text.split("recipes for this stage")[1], flags=re.M)
        assert listed == [r.name for r in recipes.available(stage)] and listed, stage


def test_profiles_name_existing_recipes_of_the_right_stage():
    roles = {
        "prepare": "prepare",
        "pool": "pool",
        "teacher": "train",
        "pseudo_label": "pseudo_label",
        "primary": "train",
    }
    roles |= {"secondary": "train", "infer": "infer"}
    roles |= {"mdeberta": "multiple-choice", "judge": "judge", "fewshot": "fewshot"}
    for profile in ("demo", "kaggle"):
        for notebook, table in recipes.profile(profile).items():
            assert (ROOT / "notebooks" / f"{notebook}.py").is_file(), notebook
            for role, name in table.items():
                assert not name or recipes.read(name).stage == roles[role], (profile, notebook, role)
    for stage, names in recipes.profile("shell").items():
        assert all(recipes.read(n) for n in names), stage


@pytest.mark.parametrize("notebook", sorted(recipes.profile("demo")), ids=str)
def test_notebook_defaults_are_the_demo_profile(notebook):
    """The parameters cell holds ``<role>_recipe`` / ``<role>_overrides`` for exactly the profile's roles."""
    nb = jupytext.read(ROOT / "notebooks" / f"{notebook}.py")
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params: dict = {}
    exec(cell.source, params)
    roles = recipes.profile("demo")[notebook]
    assert {k: v for k, v in params.items() if k.endswith("_recipe")} == {f"{r}_recipe": n for r, n in roles.items()}
    assert {k for k in params if k.endswith("_overrides")} == {f"{r}_overrides" for r in roles}
    # a Kaggle kernel takes the same roles; a notebook without a [kaggle] table is not one
    assert set(recipes.profile("kaggle").get(notebook, roles)) == set(roles)


@pytest.mark.slow  # a subprocess
def test_a_stage_runs_from_a_recipe_in_a_shell(demo_files, tmp_path):
    """`python -m kaggle_utils.prepare --recipe PATH` with a flag over it: the recipe's values reach the stage."""
    recipe = write(tmp_path, "three-folds", 'stage = "prepare"\nextends = "demo-prepare"\nn_folds = 3\n')
    out = tmp_path / "prepared"
    run_cli("kaggle_utils.prepare", "--recipe", str(recipe), "--data-dir", str(demo_files["train"].parent),
            "--out-dir", str(out))  # fmt: skip
    saved = json.loads((out / "prepare_config.json").read_text())
    assert saved["n_folds"] == 3 and saved["clean"] is False and saved["out_dir"] == str(out)
    assert sorted(pd.read_parquet(out / "train.parquet")["fold"].unique()) == [0, 1, 2]


def test_a_key_under_another_section_names_file_section_and_key(tmp_path):
    bad = write(tmp_path, "misplaced", 'stage = "train"\nextends = "demo-student-qwen2"\n[lora]\nlr = 3e-4\n')
    with pytest.raises(
        recipes.RecipeError, match=r"misplaced\.toml: key 'lr' is under \[lora\]; it belongs in \[optim\]"
    ):
        recipes.load(bad, TrainConfig)
    unknown = write(tmp_path, "unknown", 'stage = "train"\nextends = "demo-student-qwen2"\n[optimiser]\nlr = 3e-4\n')
    with pytest.raises(recipes.RecipeError, match=r"unknown\.toml: unknown section \[optimiser\]"):
        recipes.load(unknown, TrainConfig)
    # the same key at the top of the file, or in its own section, is fine
    for text in ("lr = 3e-4\n", "[optim]\nlr = 3e-4\n"):
        ok = write(tmp_path, "fine", f'stage = "train"\nextends = "demo-student-qwen2"\n{text}')
        assert recipes.load(ok, TrainConfig).optim.lr == 3e-4
