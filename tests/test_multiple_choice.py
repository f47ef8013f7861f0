"""kaggle_utils.multiple_choice: the tiny mDeBERTa stand-in learns the demo signal; inputs, outputs, AWP, config."""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from kaggle_utils import multiple_choice as mc
from kaggle_utils.config import recipes
from kaggle_utils.data import schema
from kaggle_utils.inputs.formatter import SNIP_MARKER
from kaggle_utils.models.demo_encoder import DemoEncoderConfig, build_demo_encoder
from kaggle_utils.models.loading import load_tokenizer
from kaggle_utils.training.awp import AWP
from kaggle_utils.training.precision import Precision

# trains the encoder: make test runs these, make test-fast does not
pytestmark = pytest.mark.slow

# the columns the train stage writes to val_predictions.parquet (kaggle_utils/train.py, validate)
VAL_COLUMNS = ["id", "p_a", "p_b", "winner"]


@pytest.fixture(scope="module")
def encoder_path(session_dir: Path, tokenizer) -> Path:
    """The tiny DeBERTa-v2 multiple-choice model with the session's Qwen2.5 tokenizer (copied, not changed)."""
    return build_demo_encoder(DemoEncoderConfig(out_dir=session_dir / "encoder"), tokenizer)


@pytest.fixture(scope="module")
def encoder_tokenizer(encoder_path: Path):
    return load_tokenizer(encoder_path)


@dataclass
class Fitted:
    cfg: mc.MultipleChoiceConfig
    metrics: dict
    stdout: str


@pytest.fixture(scope="module")
def fitted(session_dir: Path, prepared: dict[str, Path], encoder_path: Path) -> Fitted:
    """Fold 0 held out; 2 epochs of 30 steps at 128 tokens, validated every 20 steps, AWP over the last 6 steps."""
    cfg = mc.MultipleChoiceConfig(
        model_path=encoder_path,
        train_file=prepared["train"],
        out_dir=session_dir / "multiple-choice",
        max_length=128,
        batch_tokens=4096,
        lr=4e-3,
        epochs=2.0,
        eval_every=20,
        awp_lr=1.0,
        awp_eps=0.01,
        awp_start_epoch=1.8,
    )
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        metrics = mc.train(cfg)
    return Fitted(cfg, metrics, buf.getvalue())


def rows(**texts: str) -> pd.DataFrame:
    """One competition row; fields not given are short texts."""
    row = {"id": "r0", "prompt": "Why is the sky blue?", "response_a": "Rayleigh scattering.", "response_b": "No idea."}
    row.update(texts, winner="model_a", model_a="x", model_b="y", language="English")
    return pd.DataFrame([row])


# --- learning and outputs --------------------------------------------------------------------------------------------


def test_the_tiny_encoder_learns_the_demo_signal_on_held_out_rows(fitted: Fitted) -> None:
    # measured 0.83-0.90 over seeds 0-9 and 42 (the labels carry 10% noise: ~0.9 is the ceiling); chance is 0.5, and
    # 0.75 is 5 standard deviations above it at 120 rows
    val = fitted.metrics["val"]
    assert val["rows"] == 120
    assert val["accuracy"] > 0.75, val
    assert val["log_loss"] < math.log(2), val
    assert "AWP from step 54" in fitted.stdout and "device cpu · float32" in fitted.stdout


def test_outputs_have_the_train_stages_columns_and_reload(fitted: Fitted, prepared: dict[str, Path]) -> None:
    cfg, out = fitted.cfg, fitted.cfg.out_dir
    preds = pd.read_parquet(out / "val_predictions.parquet")
    assert list(preds.columns) == VAL_COLUMNS
    fold0 = pd.read_parquet(prepared["train"]).query("fold == 0")
    assert preds["id"].tolist() == fold0["id"].tolist() and preds["winner"].tolist() == fold0["winner"].tolist()
    np.testing.assert_allclose(preds["p_a"] + preds["p_b"], 1.0, atol=1e-5)

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(fitted.metrics))
    assert metrics["steps"] == metrics["total_steps"] == 60 and not metrics["stopped_by_budget"]
    # validated at steps 20 and 40, then at the end; the last one is the reported one
    assert [e["step"] for e in metrics["evals"]] == [20, 40, 60]
    assert metrics["evals"][-1] == {"step": 60, **metrics["val"]}

    history = pd.read_csv(out / "history.csv")
    assert len(history) == 60
    adversarial = history["adv_loss"].notna()
    assert adversarial.tolist() == [step > 54 for step in history["step"]]
    # (adv_loss > loss is checked without dropout in the AWP test: here each forward draws its own dropout mask)
    assert np.isfinite(history.loc[adversarial, "adv_loss"]).all()

    saved = json.loads((out / "model" / "multiple_choice_config.json").read_text())
    assert mc.MultipleChoiceConfig(**saved) == cfg
    # the run's record and the model's copy are the same resolved config
    assert json.loads((out / "multiple_choice_config.json").read_text()) == saved


def test_the_saved_model_reproduces_the_validation_probabilities(fitted: Fitted, prepared: dict[str, Path]) -> None:
    from transformers import AutoModelForMultipleChoice

    model_dir = fitted.cfg.out_dir / "model"
    model = AutoModelForMultipleChoice.from_pretrained(model_dir, local_files_only=True).eval()
    tok = load_tokenizer(model_dir)
    val = pd.read_parquet(prepared["train"]).query("fold == 0").head(6)
    choices = mc.ChoiceEncoder(tok, fitted.cfg.max_length, fitted.cfg.prompt_fraction, 0.5).encode(val)
    batch = mc.collate([(choices, i) for i in range(len(val))], tok.pad_token_id, with_types=True)
    with torch.no_grad():
        probs = torch.softmax(model(**batch).logits, -1).numpy()  # (6, 2)
    preds = pd.read_parquet(fitted.cfg.out_dir / "val_predictions.parquet").head(6)
    np.testing.assert_allclose(probs[:, 0], preds["p_a"], atol=1e-5)


def test_the_time_budget_stops_training_and_the_model_is_still_saved(
    session_dir: Path, prepared: dict[str, Path], encoder_path: Path
) -> None:
    cfg = mc.MultipleChoiceConfig(
        model_path=encoder_path,
        train_file=prepared["train"],
        out_dir=session_dir / "multiple-choice-budget",
        max_length=64,
        batch_tokens=2048,
        val_fold=-1,  # every row trains, none validates
        time_budget_minutes=1e-6,
    )
    with contextlib.redirect_stdout(io.StringIO()) as out:
        metrics = mc.train(cfg)
    assert metrics["stopped_by_budget"] and metrics["steps"] == 0 < metrics["total_steps"]
    assert "time budget of 1e-06 min reached at step 0/" in out.getvalue()
    assert metrics["train_rows"] == 600 and "val" not in metrics
    assert (cfg.out_dir / "model" / "model.safetensors").is_file()
    assert not (cfg.out_dir / "val_predictions.parquet").exists()


# --- inputs ----------------------------------------------------------------------------------------------------------


def test_the_stand_in_has_mdebertas_architecture_and_pair_template(encoder_path: Path, encoder_tokenizer) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(encoder_path)
    assert config.model_type == "deberta-v2" and config.architectures == ["DebertaV2ForMultipleChoice"]
    assert (config.relative_attention, config.position_biased_input, config.position_buckets) == (True, False, 256)
    assert config.vocab_size >= len(encoder_tokenizer) and config.pad_token_id == encoder_tokenizer.pad_token_id
    enc = encoder_tokenizer("Hi", "there")
    cls_id, sep_id = encoder_tokenizer.cls_token_id, encoder_tokenizer.sep_token_id
    assert enc["input_ids"][0] == cls_id and enc["input_ids"].count(sep_id) == 2 and enc["input_ids"][-1] == sep_id
    template = mc.PairTemplate.of(encoder_tokenizer)
    assert (template.before, template.between, template.after) == ((cls_id,), (sep_id,), (sep_id,))
    assert template.types == (0, 0, 0, 1, 1)


def test_a_short_row_is_the_tokenizers_own_pair_encoding(encoder_tokenizer) -> None:
    df = rows()
    choices = mc.ChoiceEncoder(encoder_tokenizer, 512, 0.3, 0.5).encode(df)
    for k, col in enumerate(("response_a", "response_b")):
        ref = encoder_tokenizer(df["prompt"][0], df[col][0], return_token_type_ids=True)
        assert choices.ids[0][k].tolist() == ref["input_ids"]
        assert choices.types(0)[k].tolist() == ref["token_type_ids"]
    assert choices.labels.tolist() == [0]


def test_long_rows_fit_512_and_keep_the_prompt_and_both_ends_of_each_response(encoder_tokenizer) -> None:
    filler = " ".join(["lorem ipsum dolor"] * 3000)  # ~9k tokens each
    df = rows(
        prompt=f"zebra {filler} walrus",
        response_a=f"falcon {filler} otter",
        # longer than max_length x 16 characters: its tail is tokenised from the text's end
        response_b="heron " + " ".join(["sit amet"] * 20_000) + " badger",
    )
    enc = mc.ChoiceEncoder(encoder_tokenizer, 512, 0.3, 0.5)
    assert len(df["response_b"][0]) > enc.char_limit
    choices = enc.encode(df)
    share = int(enc.budget * 0.3)
    for k, (head, tail) in enumerate((("falcon", "otter"), ("heron", "badger"))):
        ids = choices.ids[0][k]
        assert len(ids) == 512  # the whole budget is used
        text = encoder_tokenizer.decode(ids)  # decoded only to look: the stage never decodes
        assert text.startswith("<|im_start|>zebra") and text.endswith("<|im_end|>")
        assert "walrus<|im_end|>" in text  # the prompt's tail, then [SEP]
        assert f"<|im_end|>{head}" in text and text.endswith(f"{tail}<|im_end|>")
        assert text.count(SNIP_MARKER.strip()) == 2  # one cut in the prompt, one in the response
        assert choices.first_lengths[0, k] == share
        types = choices.types(0)[k]
        assert (types[: share + 2] == 0).all() and (types[share + 2 :] == 1).all()


def test_swapping_a_and_b_swaps_the_choices_and_the_label(encoder_tokenizer, prepared: dict[str, Path]) -> None:
    df = pd.read_parquet(prepared["train"]).head(20)
    enc = mc.ChoiceEncoder(encoder_tokenizer, 128, 0.3, 0.5)
    plain, swapped = enc.encode(df), enc.encode(schema.swap_ab(df))
    for (a, b), (sa, sb) in zip(plain.ids, swapped.ids, strict=True):
        assert a.tolist() == sb.tolist() and b.tolist() == sa.tolist()
    assert (swapped.labels == 1 - plain.labels).all()
    assert max(len(s) for pair in plain.ids for s in pair) <= 128


def test_a_tokenizer_that_merges_the_fields_is_refused() -> None:
    class Merging:  # joins the pair as one text: the fields' own ids do not appear in it
        def __call__(self, text, pair=None, add_special_tokens=True, return_token_type_ids=False):
            ids = [len(text)] if pair is None else [len(text) + len(pair) + 100]
            return {"input_ids": ids, "token_type_ids": [0] * len(ids)}

    with pytest.raises(ValueError, match="needs an encoder's tokenizer"):
        mc.PairTemplate.of(Merging())


# --- AWP -------------------------------------------------------------------------------------------------------------


def _clean_loss_fn(model, batch, y):
    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(model(**batch).logits, y)

    return loss_fn


def test_awp_restores_the_weights_exactly_and_changes_the_gradient(encoder_path: Path, encoder_tokenizer) -> None:
    from transformers import AutoModelForMultipleChoice

    model = AutoModelForMultipleChoice.from_pretrained(encoder_path, local_files_only=True).eval()  # no dropout
    df = pd.concat([rows(), schema.swap_ab(rows()).assign(id="r1")], ignore_index=True)
    choices = mc.ChoiceEncoder(encoder_tokenizer, 64, 0.3, 0.5).encode(df)
    batch = mc.collate([(choices, i) for i in range(2)], encoder_tokenizer.pad_token_id, with_types=True)
    y = torch.as_tensor(choices.labels)
    loss_fn = _clean_loss_fn(model, batch, y)

    clean_loss = loss_fn()
    clean_loss.backward()
    clean = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    awp = AWP(model, lr=1.0, eps=0.01)
    moved: dict[str, float] = {}

    def watched() -> torch.Tensor:  # records how far each weight sits from its original during the forward
        for n, p in awp.params.items():
            rel = ((p - before[n]).abs() / before[n].abs().clamp_min(1e-30)).max().item()
            moved[n] = max(moved.get(n, 0.0), rel)
        return loss_fn()

    loss, adv = awp.backward(watched, lambda loss: loss)
    assert loss == pytest.approx(clean_loss.item()) and adv > loss
    # every weight moved within its ±eps·|w| bound, and the perturbation was real
    assert max(moved.values()) <= 0.01 + 1e-6 and max(moved.values()) > 0.005
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights not restored bit for bit"

    adv_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    diff = sum((adv_grad[n] - clean[n]).norm() ** 2 for n in clean) ** 0.5
    assert diff > 1e-3 * sum(g.norm() ** 2 for g in clean.values()) ** 0.5, "AWP did not change the gradient"

    # a second call adds to .grad: accumulated micro-batches survive the attack (no zero_grad inside it)
    awp.backward(loss_fn, lambda loss: loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * adv_grad[n], rtol=1e-4, atol=1e-7)


def test_awp_restores_the_weights_when_the_forward_fails(encoder_path: Path, encoder_tokenizer) -> None:
    from transformers import AutoModelForMultipleChoice

    model = AutoModelForMultipleChoice.from_pretrained(encoder_path, local_files_only=True).eval()
    choices = mc.ChoiceEncoder(encoder_tokenizer, 64, 0.3, 0.5).encode(rows())
    batch = mc.collate([(choices, 0)], encoder_tokenizer.pad_token_id, with_types=False)
    loss_fn = _clean_loss_fn(model, batch, torch.as_tensor(choices.labels))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing() -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:  # the forward at the perturbed weights
            raise RuntimeError("CUDA out of memory (simulated)")
        return loss_fn()

    with pytest.raises(RuntimeError, match="simulated"):
        AWP(model, lr=1.0, eps=0.01).backward(failing, lambda loss: loss)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_awp_needs_weights_to_perturb(encoder_path: Path) -> None:
    from transformers import AutoModelForMultipleChoice

    model = AutoModelForMultipleChoice.from_pretrained(encoder_path, local_files_only=True)
    with pytest.raises(ValueError, match="no trainable parameter name contains 'nothing'"):
        AWP(model, lr=1.0, eps=0.01, name_filter="nothing")


# --- config, recipes, command line -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_length": 1024}, r"max_length=1024 must be in \[16, 512\]"),
        ({"prompt_fraction": 0.0}, r"prompt_fraction=0.0 must be in \(0, 1\)"),
        ({"swap_fraction": 1.5}, r"swap_fraction=1.5 must be in \[0, 1\]"),
        ({"dtype": "fp8"}, "dtype='fp8'; expected 'auto' or one of"),
        ({"batch_tokens": 512}, "batch_tokens=512 cannot hold one row at max_length=512"),
        ({"lr": 0.0}, "need lr > 0"),
        ({"grad_accum": 0}, "need grad_accum >= 1"),
        ({"awp_lr": -1.0}, "need awp_lr >= 0"),
        ({"awp_lr": 1.0, "awp_params": ""}, "awp_params is empty"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mc.MultipleChoiceConfig(**kwargs)


def test_a_missing_fold_is_a_data_error(prepared: dict[str, Path]) -> None:
    cfg = mc.MultipleChoiceConfig(train_file=prepared["train"], val_fold=7)
    with pytest.raises(schema.DataError, match=r"no row has fold 7; its folds are \[0, 1, 2, 3, 4\]"):
        mc.split(cfg)


def test_both_recipes_load_and_the_command_line_lists_them(capsys: pytest.CaptureFixture[str]) -> None:
    demo = recipes.load("demo-mdeberta", mc.MultipleChoiceConfig)
    real = recipes.load("mdeberta-v3-base", mc.MultipleChoiceConfig)
    assert demo.model_path == Path("demo/models/mdeberta-tiny") and demo.awp
    assert (real.max_length, real.lr, real.awp_start_epoch) == (512, 2e-5, 1.0)
    assert real.model_path == Path("models/mdeberta-v3-base")
    with pytest.raises(SystemExit) as exc:
        mc.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo-mdeberta" in out and "mdeberta-v3-base" in out and "--awp-start-epoch" in out


def test_an_unknown_recipe_key_names_the_file_and_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "typo.toml"
    bad.write_text('stage = "multiple-choice"\nextends = "demo-mdeberta"\n[awp]\nawp_lrr = 1.0\n')
    with pytest.raises(recipes.RecipeError, match=r"typo\.toml: unknown key 'awp_lrr' \(did you mean 'awp_lr'\?\)"):
        recipes.load(bad, mc.MultipleChoiceConfig)


def test_cpu_precision_is_fp32_without_loss_scaling() -> None:
    """The baseline's weights are fp32: on the CPU "auto" computes in fp32, a requested bf16 is an autocast."""
    cpu = torch.device("cpu")
    auto = Precision.choose(cpu, "auto", weights_in_dtype=False)
    assert auto.dtype == torch.float32 and not auto.scaler(cpu).is_enabled()
    bf16 = Precision.choose(cpu, "bf16", weights_in_dtype=False)
    assert bf16.autocast == torch.bfloat16 and not bf16.scale_loss
    # the train stage loads its weights in the compute dtype: off the GPU they compute as they are
    assert Precision.choose(cpu, "bf16") == Precision(None, False)
