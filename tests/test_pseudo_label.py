"""kaggle_utils.pseudo_label: teacher logits with provenance, A/B-averaged, in keyed resumable parts, over ranks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

from kaggle_utils import pseudo_label as pl_module
from kaggle_utils.config.cli import config_to_argv, config_to_dict
from kaggle_utils.data import schema
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.loading import ModelConfig, load_classifier
from kaggle_utils.pseudo_label import (
    PseudoLabelConfig,
    label_key,
    label_summary,
    merge_teachers,
    model_fingerprint,
    pseudo_label,
    softmax,
)
from kaggle_utils.scoring import predict as predict_module
from kaggle_utils.scoring.predict import predict_logits, predict_proba
from kaggle_utils.scoring.shards import Shard

# runs the pseudo-label stage: make test runs these, make test-fast does not
pytestmark = pytest.mark.slow

NEW_COLUMNS = ["p_a", "p_b", "logit_a", "logit_b", "teacher", "label_key"]


class Killed(BaseException):
    """Stands for the process being killed: not an Exception, so no guard catches it."""


def _run(cfg: PseudoLabelConfig, shard: Shard | None = None) -> tuple[pd.DataFrame | None, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = pseudo_label(cfg, shard or Shard())
    return out, buf.getvalue()


def _variant(cfg: PseudoLabelConfig, **changes) -> PseudoLabelConfig:
    return PseudoLabelConfig.flat(**{**config_to_dict(cfg), **changes})


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def _count_scoring(monkeypatch, kill_after: int | None = None) -> list[int]:
    """Rows per predict_logits call of the stage; raise Killed on call ``kill_after + 1``."""
    scored: list[int] = []
    original = pl_module.predict_logits

    def counting(model, rows, *args, **kwargs):
        if kill_after is not None and len(scored) >= kill_after:
            raise Killed
        scored.append(len(rows))
        return original(model, rows, *args, **kwargs)

    monkeypatch.setattr(pl_module, "predict_logits", counting)
    return scored


@pytest.fixture(scope="module")
def labelled(trained, prepared, qwen_path, tmp_path_factory):
    cfg = PseudoLabelConfig.flat(
        model_path=qwen_path,
        load_in_4bit=True,
        adapter_dir=trained.result.adapter_dir,
        input_file=prepared["unlabeled"],
        out_file=tmp_path_factory.mktemp("pseudo") / "pseudo.parquet",
        tta=True,
        chunk_rows=40,
        max_length=256,
        batch_tokens=4096,
        max_rows=32,
    )
    out, _ = _run(cfg)
    return cfg, out


@pytest.fixture(scope="module")
def teacher(trained, qwen_path, tokenizer):
    return load_classifier(
        ModelConfig(model_path=qwen_path, load_in_4bit=True), tokenizer.pad_token_id, adapter=trained.result.adapter_dir
    )


def test_output_is_a_valid_soft_label_file(labelled, prepared, qwen_path) -> None:
    cfg, out = labelled
    pool = pd.read_parquet(prepared["unlabeled"])
    # every input row once, in input order, with its columns unchanged
    assert out["id"].tolist() == pool["id"].tolist()
    pd.testing.assert_frame_equal(out.drop(columns=NEW_COLUMNS), pool)
    assert list(out.columns[-6:]) == NEW_COLUMNS
    np.testing.assert_allclose(out["p_a"] + out["p_b"], 1.0, atol=1e-5)
    assert ((out["p_a"] > 0) & (out["p_a"] < 1)).all()
    schema.validate(out, "soft")
    # the file round-trips through the soft loader
    pd.testing.assert_frame_equal(schema.load(cfg.data.out_file, "soft"), out)
    # parts are named by index and key (changed: they were part-NNNNN.parquet); 40 rows of id + logits each
    parts = _parts(cfg.parts_dir)
    assert [p.name[:10] for p in parts] == ["part-00000", "part-00001", "part-00002"]
    assert [len(pd.read_parquet(p)) for p in parts] == [40, 40, 40]
    assert list(pd.read_parquet(parts[0]).columns) == ["id", "logit_a", "logit_b"]
    saved = json.loads(cfg.data.out_file.with_name("pseudo_config.json").read_text())
    assert saved == config_to_dict(cfg)


def test_logits_and_provenance_are_the_train_stage_contract(labelled, qwen_path) -> None:
    cfg, out = labelled
    assert out["logit_a"].dtype == np.float32 and out["logit_b"].dtype == np.float32
    logits = out[["logit_a", "logit_b"]].to_numpy()
    np.testing.assert_allclose(out[["p_a", "p_b"]].to_numpy(), softmax(logits), atol=1e-6)
    assert set(out["teacher"]) == {f"{qwen_path.name}+trained"}  # the base folder + the training folder
    assert set(out["label_key"]) == {label_key(cfg, cfg.model.adapter_dir)}
    assert len(out["label_key"].iloc[0]) == 16


def test_teacher_is_confident_on_the_demo_signal(labelled) -> None:
    """The trained teacher's soft labels are not flat: most rows get a clear preference."""
    _, out = labelled
    assert (np.maximum(out["p_a"], out["p_b"]) > 0.6).mean() > 0.5


def test_tta_averages_both_orders_logits(labelled, teacher, tokenizer) -> None:
    """Changed: the views' logits are averaged (then softmax), no longer their probabilities."""
    cfg, out = labelled
    pool = schema.load(cfg.data.input_file, "unlabeled")
    fmt = PromptFormatter(tokenizer, InputConfig(max_length=256))
    direct = predict_logits(teacher, fmt.encode(pool), tokenizer.pad_token_id, 4096)
    swapped = predict_logits(teacher, fmt.encode(schema.swap_ab(pool)), tokenizer.pad_token_id, 4096)
    # the swapped view's logit for "A" is about the original B; the views disagree somewhat (position bias)
    back = swapped[:, ::-1]
    assert np.abs(softmax(direct) - softmax(back)).max() > 1e-3
    np.testing.assert_allclose(out[["logit_a", "logit_b"]].to_numpy(), (direct + back) / 2, atol=1e-4)
    np.testing.assert_allclose(out[["p_a", "p_b"]].to_numpy(), softmax((direct + back) / 2), atol=1e-5)


def test_without_tta_the_labels_are_the_direct_scores(labelled, teacher, tokenizer, tmp_path: Path) -> None:
    cfg, _ = labelled
    small = schema.load(cfg.data.input_file, "unlabeled").iloc[:20]
    small.to_parquet(tmp_path / "small.parquet", index=False)
    cfg2 = _variant(cfg, tta=False, input_file=tmp_path / "small.parquet", out_file=tmp_path / "out.parquet")
    out, _ = _run(cfg2)
    rows = PromptFormatter(tokenizer, InputConfig(max_length=256)).encode(small)
    direct = predict_proba(teacher, rows, tokenizer.pad_token_id, 4096).probs
    np.testing.assert_allclose(out[["p_a", "p_b"]].to_numpy(), direct, atol=1e-4)
    logits = predict_logits(teacher, rows, tokenizer.pad_token_id, 4096)
    np.testing.assert_allclose(out[["logit_a", "logit_b"]].to_numpy(), logits, atol=1e-4)
    assert out["label_key"].iloc[0] != label_key(cfg, cfg.model.adapter_dir)  # tta is part of the key


def test_deleted_part_is_the_only_one_recomputed(labelled, tmp_path: Path, monkeypatch) -> None:
    cfg, out = labelled
    cfg2 = _variant(cfg, out_file=tmp_path / "pseudo.parquet")
    shutil.copytree(cfg.parts_dir, cfg2.parts_dir)
    parts = _parts(cfg2.parts_dir)
    before = {p: p.stat().st_mtime_ns for p in parts}
    parts[1].unlink()
    scored = _count_scoring(monkeypatch)
    again, stdout = _run(cfg2)
    assert "resuming: 2 of 3 parts already in" in stdout
    assert scored == [40, 40]  # one chunk, in both A/B orders
    for p in (parts[0], parts[2]):
        assert p.stat().st_mtime_ns == before[p], f"{p} was rewritten"
    assert parts[1].is_file()
    assert not list(cfg2.parts_dir.glob("*.tmp"))
    pd.testing.assert_frame_equal(again, out, atol=1e-6)
    pd.testing.assert_frame_equal(schema.load(cfg2.data.out_file, "soft"), again)


def test_complete_run_loads_no_model(labelled, tmp_path: Path, monkeypatch) -> None:
    cfg, out = labelled
    cfg2 = _variant(cfg, out_file=tmp_path / "pseudo.parquet")
    shutil.copytree(cfg.parts_dir, cfg2.parts_dir)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded although every part exists")

    monkeypatch.setattr(pl_module, "load_classifier", no_model)
    again, stdout = _run(cfg2)
    assert "resuming: 3 of 3 parts" in stdout and "stale" not in stdout
    pd.testing.assert_frame_equal(again, out)


def test_kill_and_rerun_gives_the_uninterrupted_output(labelled, tmp_path: Path, monkeypatch) -> None:
    cfg, out = labelled
    cfg2 = _variant(cfg, out_file=tmp_path / "pseudo.parquet")
    batches: list[int] = []
    original = predict_module.score_logits

    def killed_after_five_batches(model, rows, idx, *args, **kwargs):
        if len(batches) >= 5:  # part 0 takes 4 (2 views x 2 batches): the kill comes inside part 1
            raise Killed
        batches.append(len(idx))
        return original(model, rows, idx, *args, **kwargs)

    monkeypatch.setattr(predict_module, "score_logits", killed_after_five_batches)
    with pytest.raises(Killed):
        _run(cfg2)
    assert len(_parts(cfg2.parts_dir)) == 1, "a kill loses at most the part being scored"
    assert not cfg2.data.out_file.exists() and not list(cfg2.parts_dir.glob("*.tmp"))
    monkeypatch.undo()
    scored = _count_scoring(monkeypatch)
    again, stdout = _run(cfg2)
    assert "resuming: 1 of 3 parts" in stdout and scored == [40, 40, 40, 40]
    pd.testing.assert_frame_equal(again, out)


def test_a_part_with_an_unscored_row_is_not_written(labelled, tmp_path: Path, monkeypatch) -> None:
    cfg, _ = labelled
    cfg2 = _variant(cfg, out_file=tmp_path / "pseudo.parquet")

    def one_row_lost(model, rows, *args, **kwargs):
        logits = np.zeros((len(rows), 2), dtype=np.float32)
        logits[3] = np.nan  # what score_logits leaves for a row that does not fit even alone
        return logits

    monkeypatch.setattr(pl_module, "predict_logits", one_row_lost)
    pool = schema.load(cfg.data.input_file, "unlabeled")
    with pytest.raises(RuntimeError, match=rf"part-00000-.*: 1 row\(s\) could not be scored.*id {pool['id'][3]!r}"):
        _run(cfg2)
    assert not _parts(cfg2.parts_dir)


def test_changed_settings_never_reuse_parts_and_stale_ones_are_reported(labelled, tmp_path, monkeypatch) -> None:
    cfg, out = labelled
    cfg2 = _variant(cfg, out_file=tmp_path / "pseudo.parquet", chunk_rows=60)
    shutil.copytree(cfg.parts_dir, cfg2.parts_dir)
    old = _parts(cfg2.parts_dir)
    scored = _count_scoring(monkeypatch)
    again, stdout = _run(cfg2)
    assert "ignored 3 stale part(s)" in stdout and "resuming" not in stdout
    assert scored == [60, 60, 60, 60]
    assert all(p.is_file() for p in old), "stale parts are reported, not deleted"
    assert len(_parts(cfg2.parts_dir)) == 5
    # other batches, the same labels up to round-off
    pd.testing.assert_frame_equal(again, out, atol=1e-5)


def test_a_changed_row_rescores_only_its_part(labelled, tmp_path, monkeypatch) -> None:
    cfg, out = labelled
    pool = schema.load(cfg.data.input_file, "unlabeled")
    pool.loc[50, "prompt"] = pool.loc[50, "prompt"] + " (edited)"
    pool.to_parquet(tmp_path / "pool.parquet", index=False)
    cfg2 = _variant(cfg, input_file=tmp_path / "pool.parquet", out_file=tmp_path / "pseudo.parquet")
    shutil.copytree(cfg.parts_dir, cfg2.parts_dir)
    scored = _count_scoring(monkeypatch)
    again, stdout = _run(cfg2)
    assert "ignored 1 stale part(s)" in stdout and "resuming: 2 of 3 parts" in stdout
    assert scored == [40, 40]
    keep = np.r_[0:40, 80:120]
    pd.testing.assert_frame_equal(again.drop(columns="prompt").iloc[keep], out.drop(columns="prompt").iloc[keep])


def test_label_key_follows_the_adapter_content_not_the_model_location(labelled, tmp_path) -> None:
    cfg, _ = labelled
    adapter = tmp_path / "teacher" / "adapter"
    shutil.copytree(cfg.model.adapter_dir, adapter)
    assert label_key(cfg, adapter) == label_key(cfg, cfg.model.adapter_dir)  # a copy elsewhere: the same labels
    (adapter / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text() + "\n")
    assert label_key(cfg, adapter) != label_key(cfg, cfg.model.adapter_dir)
    moved = tmp_path / "mounted" / cfg.model.model_path.name
    shutil.copytree(cfg.model.model_path, moved)
    assert model_fingerprint(moved) == model_fingerprint(cfg.model.model_path)
    keys = {
        label_key(_variant(cfg, **change), cfg.model.adapter_dir)
        for change in ({"max_length": 200}, {"template": "plain"})
    }
    assert len(keys | {label_key(cfg, cfg.model.adapter_dir)}) == 3


def test_two_ranks_in_process_give_the_single_process_output(labelled, tmp_path: Path) -> None:
    cfg, out = labelled
    cfg2 = _variant(cfg, out_file=tmp_path / "pseudo.parquet", wait_minutes=0)
    none, stdout = _run(cfg2, Shard(rank=1, world=2, local_rank=1))
    assert none is None and "rank 1/2: 1 of 3 parts are this process's" in stdout
    assert [p.name[:10] for p in _parts(cfg2.parts_dir)] == ["part-00001"] and not cfg2.data.out_file.exists()
    again, stdout = _run(cfg2, Shard(rank=0, world=2))
    assert "rank 0/2: resuming: 1 of 3 parts" in stdout
    pd.testing.assert_frame_equal(again, out)


def test_rank_zero_waits_for_the_others_and_names_what_is_missing(labelled, tmp_path: Path) -> None:
    cfg, _ = labelled
    cfg2 = _variant(cfg, out_file=tmp_path / "pseudo.parquet", wait_minutes=0)
    shutil.copytree(cfg.parts_dir, cfg2.parts_dir)
    _parts(cfg2.parts_dir)[1].unlink()  # rank 1's part: rank 0 has its own and waits for that one
    with pytest.raises(TimeoutError, match=r"1 of 3 parts still missing after 0 s \(part-00001-"):
        _run(cfg2, Shard(rank=0, world=2))


def test_two_launched_ranks_give_the_single_process_output(labelled, tmp_path: Path) -> None:
    """What ``accelerate launch --num_processes 2`` / ``torchrun`` start: RANK / WORLD_SIZE / LOCAL_RANK set."""
    cfg, out = labelled
    # 30 rows in parts of 10: rank 0 scores parts 0 and 2, rank 1 part 1
    schema.load(cfg.data.input_file, "unlabeled").iloc[:30].to_parquet(tmp_path / "pool.parquet", index=False)
    cfg2 = _variant(
        cfg, input_file=tmp_path / "pool.parquet", out_file=tmp_path / "pseudo.parquet", chunk_rows=10, wait_minutes=5
    )
    cmd = [sys.executable, "-m", "kaggle_utils.pseudo_label", *config_to_argv(config_to_dict(cfg2))]
    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(cmd, env={**env, "RANK": r, "LOCAL_RANK": r}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for r in ("0", "1")
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert "rank 1/2: parts written" in logs[1] and "share_prefers_a" in logs[0]
    # other batches than the 120-row run: equal up to round-off
    pd.testing.assert_frame_equal(pd.read_parquet(cfg2.data.out_file), out.iloc[:30], atol=1e-5)


def _other_fold_teacher(adapter: Path, dest: Path, fold: int) -> Path:
    """A copy of ``adapter`` that held out ``fold`` and whose head rows are exchanged: its logits are reversed."""
    shutil.copytree(adapter, dest)
    weights = load_file(dest / "adapter_model.safetensors")
    weights["base_model.model.score.weight"] = weights["base_model.model.score.weight"].flip(0).contiguous()
    save_file(weights, dest / "adapter_model.safetensors")
    config = json.loads((dest / "train_config.json").read_text())
    (dest / "train_config.json").write_text(json.dumps({**config, "val_fold": fold}))
    return dest


def test_out_of_fold_rows_are_scored_by_the_teacher_that_held_them_out(labelled, prepared, tmp_path: Path) -> None:
    cfg, _ = labelled
    adapter0 = cfg.model.adapter_dir  # trained with fold 0 held out (conftest)
    adapter1 = _other_fold_teacher(adapter0, tmp_path / "teacher-fold1" / "adapter", fold=1)
    train = schema.load(prepared["train"], "train")
    two_folds = train[train["fold"].isin([0, 1])].groupby("fold").head(30).sample(frac=1, random_state=0)
    two_folds.to_parquet(tmp_path / "train.parquet", index=False)
    oof = _variant(
        cfg,
        oof_adapters=[str(adapter1), str(adapter0)],
        input_file=tmp_path / "train.parquet",
        out_file=tmp_path / "oof.parquet",
        chunk_rows=16,
    )
    out, _ = _run(oof)
    # reference: teacher 0 on every row; teacher 1 gives the same logits reversed
    ref, _ = _run(_variant(oof, oof_adapters=[], out_file=tmp_path / "ref.parquet"))
    fold = out["fold"].to_numpy()
    logits, ref_logits = out[["logit_a", "logit_b"]].to_numpy(), ref[["logit_a", "logit_b"]].to_numpy()
    np.testing.assert_allclose(logits[fold == 0], ref_logits[fold == 0], atol=1e-5)
    np.testing.assert_allclose(logits[fold == 1], ref_logits[fold == 1][:, ::-1], atol=1e-5)
    keys = {0: label_key(oof, adapter0), 1: label_key(oof, adapter1)}
    assert (out["label_key"].to_numpy() == np.array([keys[f] for f in fold])).all()
    assert set(out.groupby("fold")["teacher"].first()) == {"qwen2-tiny+trained", "qwen2-tiny+teacher-fold1"}
    assert out["id"].tolist() == two_folds["id"].tolist()  # input order
    # a fold no adapter held out is refused before anything loads
    train.iloc[:50].to_parquet(tmp_path / "all.parquet", index=False)
    with pytest.raises(ValueError, match=r"fold\(s\) \[.*\] that no adapter of oof_adapters held out"):
        _run(_variant(oof, input_file=tmp_path / "all.parquet"))


def test_out_of_fold_errors_name_the_file_and_the_fix(labelled, prepared, tmp_path: Path) -> None:
    cfg, _ = labelled
    oof = _variant(cfg, oof_adapters=[str(cfg.model.adapter_dir)], out_file=tmp_path / "o.parquet")
    with pytest.raises(schema.DataError, match="unlabeled.parquet: no 'fold' column"):
        _run(oof)
    everything = tmp_path / "all-folds" / "adapter"
    everything.mkdir(parents=True)
    (everything / "train_config.json").write_text(json.dumps({"val_fold": -1}))
    with pytest.raises(ValueError, match=r"train_config.json: val_fold=-1: this teacher trained on every fold"):
        pl_module.held_out_fold(everything)


def _teacher_file(path: Path, ids, logits, name: str, key: str) -> Path:
    p = softmax(np.asarray(logits, dtype=np.float32))
    df = pd.DataFrame({"id": ids, "prompt": "q", "response_a": "a", "response_b": "b", "p_a": p[:, 0], "p_b": p[:, 1]})
    df = df.assign(logit_a=np.float32(logits)[:, 0], logit_b=np.float32(logits)[:, 1], teacher=name, label_key=key)
    df.to_parquet(path, index=False)
    return path


def test_merge_teachers_averages_logits_by_id(tmp_path: Path) -> None:
    a = _teacher_file(tmp_path / "a.parquet", ["x", "y", "z"], [[1, 0], [0, 2], [3, 3]], "qwen", "k1")
    b = _teacher_file(tmp_path / "b.parquet", ["z", "x", "y"], [[1, 1], [3, 0], [0, 0]], "llama", "k2")
    out = merge_teachers([a, b])
    assert out["id"].tolist() == ["x", "y", "z"]
    np.testing.assert_allclose(out[["logit_a", "logit_b"]].to_numpy(), [[2, 0], [0, 1], [2, 2]])
    np.testing.assert_allclose(out[["p_a", "p_b"]].to_numpy(), softmax(np.float32([[2, 0], [0, 1], [2, 2]])))
    assert set(out["teacher"]) == {"qwen+llama"} and out["label_key"].nunique() == 1
    # the command line writes the same frame
    pl_module.main(["merge", "--out-file", str(tmp_path / "m.parquet"), str(a), str(b)])
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "m.parquet"), out)


def test_merge_teachers_refuses_files_of_other_rows_or_without_logits(tmp_path: Path) -> None:
    a = _teacher_file(tmp_path / "a.parquet", ["x", "y"], [[1, 0], [0, 2]], "qwen", "k1")
    b = _teacher_file(tmp_path / "b.parquet", ["x", "w"], [[1, 0], [0, 2]], "llama", "k2")
    with pytest.raises(schema.DataError, match=r"b.parquet: column 'id' does not match .*a.parquet: 1 id\(s\) only"):
        merge_teachers([a, b])
    pd.read_parquet(a).drop(columns=["logit_a", "logit_b"]).to_parquet(tmp_path / "old.parquet")
    with pytest.raises(schema.DataError, match=r"old.parquet: no column\(s\) \['logit_a', 'logit_b'\]"):
        merge_teachers([a, tmp_path / "old.parquet"])


def test_label_summary(labelled) -> None:
    _, out = labelled
    s = label_summary(out)
    assert s["rows"].sum() == len(out)
    assert len(s) == 5
    share_a = s["share_prefers_a"].dropna()
    assert ((share_a >= 0) & (share_a <= 1)).all()


def test_chunk_rows_validated() -> None:
    with pytest.raises(ValueError, match="chunk_rows=0"):
        PseudoLabelConfig.flat(chunk_rows=0)
