"""Environment detection and the search that finds inputs under /kaggle/input without hard-coded paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from kaggle_utils.kaggle import env


def test_detect_kinds():
    assert env.detect({}).kind == "local"
    assert env.detect({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}).kind == "kaggle-interactive"
    assert env.detect({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}).kind == "kaggle-batch"
    rerun = env.detect({"KAGGLE_KERNEL_RUN_TYPE": "Batch", "KAGGLE_IS_COMPETITION_RERUN": "True"})
    assert rerun.is_rerun and rerun.on_kaggle and str(rerun.working_dir) == "/kaggle/working"


def test_a_rehearsal_root_stands_in_for_kaggle_and_output_paths_follow_it(tmp_path):
    """``KAGGLE_UTILS_KAGGLE_ROOT`` moves /kaggle/input and /kaggle/working below it; a recipe's /kaggle/working
    output lands in the stand-in, other paths stay as written; on Kaggle (no variable) nothing moves."""
    where = env.detect({"KAGGLE_KERNEL_RUN_TYPE": "Batch", env.ROOT_VARIABLE: str(tmp_path)})
    assert (where.input_root, where.working_dir) == (tmp_path / "input", tmp_path / "working")
    assert where.output_path("/kaggle/working") == tmp_path / "working"
    assert where.output_path("/kaggle/working/sub/x.csv") == tmp_path / "working/sub/x.csv"
    assert where.output_path("out/x.csv") == Path("out/x.csv")
    kaggle = env.detect({"KAGGLE_KERNEL_RUN_TYPE": "Batch"})
    assert kaggle.output_path("/kaggle/working/x") == Path("/kaggle/working/x")
    assert env.detect({env.ROOT_VARIABLE: str(tmp_path)}).output_path("/kaggle/working") == Path("/kaggle/working")


@pytest.fixture
def kaggle_input(tmp_path):
    """A Kaggle-like input tree: competition, two model versions, an adapter, an earlier kernel's output."""
    comp = tmp_path / "wsdm-cup-multilingual-chatbot-arena"
    comp.mkdir()
    (comp / "train.parquet").write_bytes(b"x")
    (comp / "test.parquet").write_bytes(b"x")
    for version in (
        "qwen2.5/transformers/14b/1",
        "qwen2.5/transformers/14b/1/nested-copy",
        "gemma-2/transformers/9b/2",
    ):
        d = tmp_path / version
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"x")
    adapter = tmp_path / "my-adapters/qwen/adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    prepared = tmp_path / "wsdm-arena-01-data-prep/prepared"
    prepared.mkdir(parents=True)
    (prepared / "train.parquet").write_bytes(b"x")
    return tmp_path


def test_search_finds_each_input_by_what_identifies_it(kaggle_input):
    assert env.find_competition_dir(kaggle_input).name == "wsdm-cup-multilingual-chatbot-arena"
    assert env.find_model_dir(kaggle_input, "qwen") == kaggle_input / "qwen2.5/transformers/14b/1"
    assert env.find_model_dir(kaggle_input, "gemma") == kaggle_input / "gemma-2/transformers/9b/2"
    assert env.find_adapter_dir(kaggle_input, "qwen") == kaggle_input / "my-adapters/qwen/adapter"
    assert env.find_dir(kaggle_input, "train.parquet", "prepared").name == "prepared"
    with pytest.raises(FileNotFoundError, match="llama"):
        env.find_model_dir(kaggle_input, "llama")


def test_search_enters_a_mount_that_is_a_symlink(kaggle_input, tmp_path_factory):
    """The 2026 layout (/kaggle/input/models/<owner>/<model>/...) as a link to the files, which rglob skips."""
    elsewhere = tmp_path_factory.mktemp("mounted") / "llama-3.3/transformers/70b/1"
    elsewhere.mkdir(parents=True)
    (elsewhere / "config.json").write_text("{}")
    (elsewhere / "model.safetensors").write_bytes(b"x")
    (kaggle_input / "models" / "meta").mkdir(parents=True)
    (kaggle_input / "models" / "meta" / "llama-3.3").symlink_to(elsewhere.parents[2], target_is_directory=True)
    assert env.find_model_dir(kaggle_input, "llama") == kaggle_input / "models/meta/llama-3.3/transformers/70b/1"


def test_locate_prefers_an_existing_path_then_searches_on_kaggle_only(kaggle_input, tmp_path):
    on_kaggle = env.Environment("kaggle-batch", kaggle_input, tmp_path)
    local = env.Environment("local", tmp_path, tmp_path)
    find = lambda root: env.find_model_dir(root, "gemma")  # noqa: E731
    assert env.locate(kaggle_input / "qwen2.5", on_kaggle, find) == kaggle_input / "qwen2.5"
    assert env.locate("demo/models/absent", on_kaggle, find) == kaggle_input / "gemma-2/transformers/9b/2"
    with pytest.raises(FileNotFoundError, match="make demo"):
        env.locate("demo/models/absent", local, find)


def test_recipe_paths_are_found_wherever_kaggle_mounts_the_input(kaggle_input, tmp_path):
    """Kaggle recipes name /kaggle/input/<slug>/...; the slug finds the input under another mount root."""
    on_kaggle = env.Environment("kaggle-batch", kaggle_input, tmp_path)
    assert env.input_slug("/kaggle/input/qwen2.5/transformers/14b/1") == "qwen2.5"
    assert env.input_slug("demo/models/qwen2-tiny") is None
    model = env.locate_model("/kaggle/input/qwen2.5/transformers/14b/1", on_kaggle)
    assert model == kaggle_input / "qwen2.5/transformers/14b/1"
    assert env.locate_adapter("/kaggle/input/my-adapters", on_kaggle) == kaggle_input / "my-adapters/qwen/adapter"
    train = env.locate_file("/kaggle/input/wsdm-arena-01-data-prep/prepared/train.parquet", on_kaggle)
    assert train == kaggle_input / "wsdm-arena-01-data-prep/prepared/train.parquet"
    # the slug decides: the competition's train.parquet is not taken for the prepared one
    with pytest.raises(FileNotFoundError, match="wsdm-arena-02"):
        env.locate_file("/kaggle/input/wsdm-arena-02-pseudo-label/pseudo.parquet", on_kaggle)


def test_an_empty_optional_model_or_adapter_stays_none(tmp_path):
    on_kaggle = env.Environment("kaggle-batch", tmp_path, tmp_path)
    assert env.locate_model("", on_kaggle) is None and env.locate_adapter(None, on_kaggle) is None
