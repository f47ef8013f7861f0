"""kaggle_utils.config.cli: every config field is a documented flag; values convert; configs save as JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kaggle_utils import train as train_module
from kaggle_utils.config.cli import (
    build_parser,
    config_to_argv,
    config_to_dict,
    field_docs,
    parse_config,
    save_config,
)
from kaggle_utils.config.sections import flat_fields
from kaggle_utils.data.demo import DemoDataConfig
from kaggle_utils.infer import InferConfig
from kaggle_utils.models.demo import DemoModelsConfig
from kaggle_utils.prepare import PrepareConfig
from kaggle_utils.pseudo_label import PseudoLabelConfig
from kaggle_utils.train import TrainConfig

CONFIGS = [TrainConfig, InferConfig, PseudoLabelConfig, PrepareConfig, DemoDataConfig, DemoModelsConfig]
# fields written without a comment of their own (they share the comment of the field above them)
UNCOMMENTED = {"lora_alpha", "lora_dropout", "seed", "primary_adapter", "secondary_adapter"}


def _flat(text: str) -> str:
    """Whitespace-normalised text."""
    return " ".join(text.split())


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """argparse wraps help at the terminal width (breaking after hyphens too): one line per option here."""
    monkeypatch.setenv("COLUMNS", "100000")


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_help_lists_every_field_with_its_comment(cls: type) -> None:
    help_text = _flat(build_parser(cls).format_help())
    docs = field_docs(cls)
    for f in flat_fields(cls).values():
        flag = "--" + f.name.replace("_", "-")
        assert flag + " " in help_text, f"{flag} missing from --help of {cls.__name__}"
        if f.name in UNCOMMENTED:
            continue
        assert docs.get(f.name), f"{cls.__name__}.{f.name} has no comment text"
        # the comment follows the flag in the help output
        after_flag = help_text[help_text.index(flag + " ") :]
        assert _flat(docs[f.name]) in after_flag, f"{cls.__name__}.{f.name}: comment missing from --help"


def test_help_includes_comments_of_inherited_fields() -> None:
    help_text = _flat(build_parser(TrainConfig).format_help())
    # from InputConfig
    assert "--max-length MAX_LENGTH total tokens per row, special tokens and template included" in help_text
    assert "share of the field budget the prompt may take" in help_text
    # from ModelConfig
    assert "--model-path MODEL_PATH local folder of a sequence-classification model" in help_text
    assert "load the base weights as 4-bit nf4 with bitsandbytes" in help_text
    # TrainConfig's own, including a literal percent sign, and the default
    assert "peak learning rate (linear warm-up, then cosine decay to 10%) (default: 0.0001)" in help_text


def test_help_of_infer_includes_input_config_fields() -> None:
    help_text = _flat(build_parser(InferConfig).format_help())
    # the token-id settings are each adapter's own unless the recipe sets them
    assert "--max-length MAX_LENGTH the token-id settings (max_length, template" in help_text
    assert "--num-proc NUM_PROC worker processes for tokenising" in help_text
    assert "--reserve-minutes RESERVE_MINUTES minutes kept back for writing files" in help_text


def test_main_help_exits_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m kaggle_utils.train --help`` prints the help and exits 0 (a "%" in a comment once crashed it)."""
    with pytest.raises(SystemExit) as exc:
        train_module.main(["--help"])
    assert exc.value.code == 0
    out = _flat(capsys.readouterr().out)
    assert "--time-budget-minutes TIME_BUDGET_MINUTES wall-clock limit in minutes (0: none)" in out


def test_parse_config_converts_types() -> None:
    cfg = parse_config(
        TrainConfig,
        [
            "--load-in-4bit",
            "false",
            "--gradient-checkpointing",
            "YES",
            "--max-length",
            "512",
            "--batch-tokens",
            "1024",
            "--lr",
            "3e-4",
            "--epochs",
            "1.5",
            "--train-file",
            "some/dir/train.parquet",
            "--extra-files",
            '["a.parquet", "b.parquet"]',
            "--loss",
            "mixed",
        ],
    )
    assert cfg.model.load_in_4bit is False
    assert cfg.optim.gradient_checkpointing is True
    assert cfg.inputs.max_length == 512 and isinstance(cfg.inputs.max_length, int)
    assert cfg.optim.batch_tokens == 1024
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 1.5
    assert cfg.data.train_file == Path("some/dir/train.parquet") and isinstance(cfg.data.train_file, Path)
    assert cfg.data.extra_files == ["a.parquet", "b.parquet"]
    assert cfg.objective.loss == "mixed"
    # untouched fields keep their defaults
    assert cfg.lora == TrainConfig().lora
    assert cfg.model.model_path == Path("demo/models/qwen2-tiny")


@pytest.mark.parametrize(
    "text,value", [("1", True), ("on", True), ("True", True), ("0", False), ("off", False), ("No", False)]
)
def test_parse_bool_spellings(text: str, value: bool) -> None:
    assert parse_config(PseudoLabelConfig, ["--tta", text]).run.tta is value


def test_bad_bool_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(PseudoLabelConfig, ["--tta", "maybe"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--tta" in err and "expected true/false, got 'maybe'" in err


def test_bad_int_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(PrepareConfig, ["--n-folds", "five"])
    assert "--n-folds" in capsys.readouterr().err


def test_post_init_validation_runs() -> None:
    with pytest.raises(ValueError, match="n_folds=1"):
        parse_config(PrepareConfig, ["--n-folds", "1"])


def test_optional_paths_empty_means_none() -> None:
    """The comments promise "empty: primary only" / "empty: the base model as is"."""
    cfg = parse_config(InferConfig, ["--secondary-model", "", "--primary-adapter", "x/adapter"])
    assert cfg.secondary.model is None
    assert cfg.primary.adapter == Path("x/adapter")
    assert parse_config(PseudoLabelConfig, ["--adapter-dir", ""]).model.adapter_dir is None


def test_save_config_round_trips(tmp_path: Path) -> None:
    cfg = parse_config(
        TrainConfig,
        ["--extra-files", '["p1.parquet"]', "--out-dir", str(tmp_path / "m"), "--lr", "0.002", "--loss", "kl"],
    )
    path = save_config(cfg, tmp_path / "nested" / "train_config.json")
    assert path.is_file()
    loaded = json.loads(path.read_text())
    assert loaded == config_to_dict(cfg)
    assert loaded["out_dir"] == str(tmp_path / "m") and loaded["extra_files"] == ["p1.parquet"]
    assert set(loaded) == set(flat_fields(TrainConfig))  # flat, as before the sections: old adapters read the same
    # the saved JSON rebuilds the same config
    assert TrainConfig.flat(**loaded) == cfg


def test_save_config_round_trips_none_and_unicode(tmp_path: Path) -> None:
    cfg = InferConfig.flat(primary_adapter=None, out_dir=tmp_path / "провер", labels_file=None)
    path = save_config(cfg, tmp_path / "infer_config.json")
    loaded = json.loads(path.read_text(encoding="utf-8"))
    assert loaded["primary_adapter"] is None and loaded["labels_file"] is None
    assert InferConfig.flat(**loaded) == cfg


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_config_to_argv_parses_back_to_the_same_config(cls: type) -> None:
    """Every field of every stage's config, written as flags, is read back unchanged (what a launcher relies on)."""
    cfg = cls()
    assert parse_config(cls, config_to_argv(config_to_dict(cfg))) == cfg


def test_config_to_argv_writes_each_kind_of_value() -> None:
    values = {"packing": True, "init_adapter": None, "extra_files": ["a.parquet"], "source_weights": {"x": 0.5}}
    assert config_to_argv(values) == [
        "--packing", "true", "--init-adapter", "", "--extra-files", '["a.parquet"]', "--source-weights", '{"x": 0.5}',
    ]  # fmt: skip
    cfg = parse_config(TrainConfig, config_to_argv(values))
    assert cfg.optim.packing is True and cfg.lora.init_adapter is None
    assert cfg.data.extra_files == ["a.parquet"] and cfg.objective.source_weights == {"x": 0.5}


def test_help_groups_a_stage_flags_by_recipe_section(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_module.main(["--help"])
    out = capsys.readouterr().out
    headers = re.findall(r"^\[(\w+)\]:$", out, flags=re.M)
    assert headers == ["model", "inputs", "data", "mix", "objective", "lora", "optim", "schedule"]
    optim = out.split("[optim]:")[1].split("[schedule]:")[0]
    assert "--lr LR" in optim and "--lora-r" not in optim
    assert "--fp32-residual FP32_RESIDUAL" in optim and "--fused-kernels" in optim
