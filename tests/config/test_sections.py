"""kaggle_utils.config.sections: a stage config is made of typed sections, each checked on its own; users keep the
flat names (flags, overrides, saved JSON), and a name shared by two sections of one class carries the section's."""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kaggle_utils.config import recipes
from kaggle_utils.config.cli import parse_config, save_config
from kaggle_utils.config.sections import Sectioned, flat_fields, from_flat, sections, to_flat
from kaggle_utils.data.mixing import MixConfig
from kaggle_utils.infer import InferConfig, RoleConfig
from kaggle_utils.inputs.formatter import InputConfig
from kaggle_utils.models.loading import ModelConfig
from kaggle_utils.pseudo_label import PseudoLabelConfig
from kaggle_utils.train import TrainConfig


def test_a_stage_config_holds_typed_sections_and_each_field_is_read_in_its_section():
    cfg = TrainConfig.flat(max_length=512, lr=3e-4, model_path="m", mix_min_confidence=0.7)
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.inputs, InputConfig) and isinstance(cfg.mix, MixConfig)
    assert (cfg.inputs.max_length, cfg.optim.lr, cfg.model.model_path) == (512, 3e-4, Path("m"))
    assert cfg.mix.mix_min_confidence == 0.7
    cfg.optim.batch_tokens = 4096  # a section's field is assigned in the section
    assert cfg.optim.batch_tokens == 4096 and to_flat(cfg)["batch_tokens"] == 4096


def test_a_flat_name_is_no_attribute_and_the_error_names_its_section():
    """One way to read a field: ``cfg.lr`` once read through to ``cfg.optim.lr``; now it says where to look, and a
    flat assignment, which would leave a stray attribute that no section sees, is refused."""
    cfg = TrainConfig.flat(lr=3e-4)
    with pytest.raises(AttributeError, match=r"no attribute 'lr': the field lives in a section, read cfg\.optim\.lr"):
        cfg.lr  # noqa: B018
    with pytest.raises(AttributeError, match=r"assign cfg\.optim\.lr, or build a copy with cfg\.replace\(lr=\.\.\.\)"):
        cfg.lr = 1.0
    assert cfg.optim.lr == 3e-4 and "lr" not in vars(cfg)
    infer = InferConfig()
    with pytest.raises(AttributeError, match=r"read cfg\.primary\.adapter"):
        infer.primary_adapter  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'lrr'$"):
        cfg.lrr  # noqa: B018


def test_each_section_checks_its_own_fields_and_the_stage_checks_what_spans_them():
    with pytest.raises(ValueError, match="max_length=10 is too small"):
        TrainConfig.flat(max_length=10)
    with pytest.raises(ValueError, match="loss='l2'"):
        TrainConfig.flat(loss="l2")
    with pytest.raises(ValueError, match="batch_tokens >= max_length"):  # optim x inputs: the stage's check
        TrainConfig.flat(max_length=4096, batch_tokens=2048)
    with pytest.raises(TypeError, match="TrainConfig has no field 'lrr'"):
        TrainConfig.flat(lrr=1.0)


def test_replace_takes_flat_names_and_copies_every_section():
    cfg = TrainConfig.flat(lr=1e-4)
    other = cfg.replace(lr=2e-4, out_dir="elsewhere")
    assert (cfg.optim.lr, other.optim.lr, other.data.out_dir) == (1e-4, 2e-4, Path("elsewhere"))
    other.inputs.max_length = 1024  # no section is shared between the two configs
    assert cfg.inputs.max_length == 2500
    with pytest.raises(ValueError, match="swap_fraction=2"):
        cfg.replace(swap_fraction=2)


def test_to_flat_and_from_flat_round_trip_every_stage():
    for cls in (TrainConfig, PseudoLabelConfig, InferConfig):
        cfg = cls()
        flat = to_flat(cfg)
        assert list(flat) == list(flat_fields(cls)) and from_flat(cls, flat) == cfg
        # Sectioned's __getattr__ (the error naming a section) must not get in the way of copies and of configs sent
        # to other processes
        assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg


def test_sections_shared_by_one_class_prefix_their_flat_names():
    layout = sections(InferConfig)
    assert layout["primary"] == {"model": "primary_model", "adapter": "primary_adapter"}
    assert layout["secondary"] == {"model": "secondary_model", "adapter": "secondary_adapter"}
    assert layout["inputs"]["max_length"] == "max_length"  # unambiguous: as short as before
    cfg = InferConfig.flat(secondary_model="g", secondary_adapter="g/adapter")
    assert cfg.primary == RoleConfig(Path("demo/models/qwen2-tiny")) and cfg.secondary.adapter == Path("g/adapter")
    assert cfg.secondary.model == Path("g")
    assert parse_config(InferConfig, ["--primary-adapter", "q/adapter"]).primary.adapter == Path("q/adapter")


@dataclass
class _First:
    lr: float = 1.0


@dataclass
class _Second:
    lr: float = 2.0


@dataclass
class _Clash(Sectioned):
    first: _First = field(default_factory=_First)
    second: _Second = field(default_factory=_Second)


def test_a_flat_name_in_two_sections_is_refused_naming_both():
    with pytest.raises(TypeError, match=r"the flat name 'lr' of \[second\] is also in \[first\]"):
        flat_fields(_Clash)


def test_saved_configs_stay_flat_so_adapters_trained_before_the_sections_still_read(tmp_path):
    """inference.roles reads max_length, template, ... from an adapter's train_config.json by flat name."""
    cfg = TrainConfig.flat(max_length=640, template="chat")
    saved = json.loads(save_config(cfg, tmp_path / "train_config.json").read_text())
    assert saved["max_length"] == 640 and saved["template"] == "chat" and "inputs" not in saved
    assert TrainConfig.flat(**saved) == cfg


def test_a_recipe_section_is_the_config_section_and_a_role_key_is_written_under_its_role(tmp_path):
    path = tmp_path / "roles.toml"
    path.write_text('stage = "infer"\nextends = "demo-infer"\n[secondary]\nadapter = "other/adapter"\n')
    assert recipes.load(path, InferConfig).secondary.adapter == Path("other/adapter")
    path.write_text('stage = "infer"\nextends = "demo-infer"\n[inputs]\nprimary_adapter = "x"\n')
    with pytest.raises(
        recipes.RecipeError, match=r"key 'primary_adapter' is under \[inputs\]; it belongs in \[primary\]"
    ):
        recipes.load(path, InferConfig)
    # at the top of the file a key takes its flat name, as a flag or a notebook override does
    path.write_text('stage = "infer"\nextends = "demo-infer"\nsecondary_model = ""\n')
    assert recipes.load(path, InferConfig).secondary.model is None
    assert recipes.load("demo-infer", InferConfig, {"primary_adapter": "y"}).primary.adapter == Path("y")
