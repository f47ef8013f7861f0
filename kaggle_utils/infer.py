"""Stage 4, inference under a wall-clock budget: ``submission.csv`` with one row per test id, always.

The cascade of the seed solution: the primary model (Qwen2.5-14B) scores every row; the secondary
(Gemma2-9B) then re-scores rows in order of the primary's uncertainty (|p_a - 0.5| smallest first) for as
long as the budget allows, and the two are averaged on the rows both scored. Every batch is started only
if its projected time (measured tokens/s so far, with a safety factor) fits before the deadline, so the
run never passes the budget. Rows no model reached get the stated fallback: the longer response wins
with probability 0.55 (in arena data the longer response is preferred somewhat more often than not).

With several GPUs each gets its own copy of the model and every other batch (one thread per GPU: the
Kaggle T4 x2 shape).

``python -m kaggle_utils.infer --test-file demo/data/test.parquet --primary-model M --primary-adapter A``
"""

from __future__ import annotations

import gc
import json
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from kaggle_utils.config.cli import parse_config, save_config
from kaggle_utils.data import schema
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.loading import ModelConfig, load_classifier, load_tokenizer
from kaggle_utils.scoring.budget import Deadline, RateMeter
from kaggle_utils.scoring.metrics import evaluate
from kaggle_utils.scoring.predict import Scores, predict_proba

# Probability given to the longer response on rows that no model scored.
FALLBACK_LONGER_WINS = 0.55


@dataclass
class InferConfig(InputConfig):
    """Time-budgeted cascade inference; every field is also a ``--flag``."""

    # the stage its recipes name (``stage = "infer"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "infer"

    # test rows in competition format (on Kaggle: found under /kaggle/input by kaggle_utils.kaggle.env)
    test_file: Path = Path("demo/data/test.parquet")
    # primary model folder (scores every row)
    primary_model: Path = Path("demo/models/qwen2-tiny")
    # the primary's LoRA adapter folder; empty: the base model as is
    primary_adapter: Path | None = None
    # secondary model folder (re-scores the least certain rows); empty: primary only
    secondary_model: Path | None = None
    # the secondary's LoRA adapter folder; empty: the base model as is
    secondary_adapter: Path | None = None
    # weight of the secondary model in the average on rows both scored
    secondary_weight: float = 0.5
    # load base weights 4-bit nf4 (as trained); else fp16/bf16
    load_in_4bit: bool = True
    # "auto": every visible GPU (one model copy and thread each), else the CPU; or e.g. "cuda:0,cuda:1"
    devices: str = "auto"
    # the whole budget in minutes, counted from ``started_at`` (Kaggle allows 720; the winners capped at 690)
    time_budget_minutes: float = 690.0
    # minutes kept back for writing files and the notebook's last cells
    reserve_minutes: float = 5.0
    # wall-clock start of the run (time.time()); 0: when the stage starts
    started_at: float = 0.0
    # padded tokens per batch (rows x longest row)
    batch_tokens: int = 16384
    # most rows in one batch
    max_rows: int = 64
    # folder that receives submission.csv, predictions.parquet and report.json
    out_dir: Path = Path("demo/work/submission")
    # optional answer key (id, winner) to print accuracy; the demo data has one, the competition does not
    labels_file: Path | None = None

    def __post_init__(self) -> None:
        InputConfig.__post_init__(self)
        for name in ("test_file", "primary_model", "out_dir"):
            setattr(self, name, Path(getattr(self, name)))
        for name in ("primary_adapter", "secondary_model", "secondary_adapter", "labels_file"):
            value = getattr(self, name)
            setattr(self, name, Path(value) if value else None)
        if not 0 <= self.secondary_weight <= 1:
            raise ValueError(f"secondary_weight={self.secondary_weight} must be in [0, 1]")
        if self.time_budget_minutes <= self.reserve_minutes:
            raise ValueError(
                f"time_budget_minutes={self.time_budget_minutes} must exceed reserve_minutes={self.reserve_minutes}"
            )


def resolve_devices(spec: str) -> list[str]:
    if spec != "auto":
        return [d.strip() for d in spec.split(",") if d.strip()]
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def fallback_probs(df: pd.DataFrame) -> np.ndarray:
    """The stated fallback for unscored rows: the longer response wins with p = 0.55. Shape (N, 2)."""
    longer_a = df["response_a"].str.len().to_numpy() >= df["response_b"].str.len().to_numpy()
    p_a = np.where(longer_a, FALLBACK_LONGER_WINS, 1 - FALLBACK_LONGER_WINS)
    return np.stack([p_a, 1 - p_a], axis=1).astype(np.float32)


def score_model(
    cfg: InferConfig,
    model_path: Path,
    adapter: Path | None,
    df: pd.DataFrame,
    deadline: Deadline,
    order: np.ndarray | None = None,
    desc: str = "",
) -> Scores:
    """Score ``df`` with one model, one copy and thread per device, until done or out of time."""
    devices = resolve_devices(cfg.devices)
    tok = load_tokenizer(model_path)
    rows = PromptFormatter(tok, cfg).encode(df)
    order = np.argsort(-PromptFormatter.lengths(rows)) if order is None else order
    shards = [order[i :: len(devices)] for i in range(len(devices))]
    results: list[Scores | BaseException] = [None] * len(devices)  # type: ignore[list-item]

    def work(k: int) -> None:
        try:
            mcfg = ModelConfig(model_path=model_path, load_in_4bit=cfg.load_in_4bit, device=devices[k])
            model = load_classifier(mcfg, tok.pad_token_id, adapter=adapter)
            # each worker sees only its shard; scores come back in shard order
            sub = [rows[i] for i in shards[k]]
            results[k] = predict_proba(
                model,
                sub,
                tok.pad_token_id,
                cfg.batch_tokens,
                cfg.max_rows,
                deadline=deadline,
                rate=RateMeter(),
                desc=f"{desc} {devices[k]}",
                order=np.arange(len(sub)),
            )
            del model
        except BaseException as exc:  # re-raised in the caller's thread
            results[k] = exc

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(devices))]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    probs = np.full((len(df), 2), np.nan, dtype=np.float32)
    scored = np.zeros(len(df), dtype=bool)
    stopped = False
    for k, res in enumerate(results):
        if isinstance(res, BaseException):
            raise res
        probs[shards[k]] = res.probs
        scored[shards[k]] = res.scored
        stopped |= res.stopped_by_deadline
    return Scores(probs, scored, time.time() - t0, stopped)


def infer(cfg: InferConfig) -> pd.DataFrame:
    """Run the stage; returns the predictions (also written with the submission and a report)."""
    deadline = Deadline((cfg.time_budget_minutes - cfg.reserve_minutes) * 60, start=cfg.started_at or None)
    test = schema.load(cfg.test_file, "test").reset_index(drop=True)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.out_dir / "infer_config.json")
    report: dict = {"rows": len(test)}

    first = score_model(cfg, cfg.primary_model, cfg.primary_adapter, test, deadline, desc="primary")
    probs = first.probs.copy()
    source = np.where(first.scored, "primary", "fallback").astype(object)
    report["primary"] = {
        "scored": int(first.scored.sum()),
        "seconds": round(first.seconds, 1),
        "stopped_by_deadline": first.stopped_by_deadline,
    }

    if cfg.secondary_model is not None and first.scored.any() and deadline.remaining() > 0:
        # least certain primary rows first; rows the primary never reached are left to the fallback
        margin = np.where(first.scored, np.abs(first.probs[:, 0] - 0.5), np.inf)
        order = np.argsort(margin, kind="stable")[: int(first.scored.sum())]
        second = score_model(
            cfg, cfg.secondary_model, cfg.secondary_adapter, test, deadline, order=order, desc="secondary"
        )
        both = second.scored & first.scored
        w = cfg.secondary_weight
        probs[both] = (1 - w) * first.probs[both] + w * second.probs[both]
        source[both] = "blend"
        report["secondary"] = {
            "scored": int(both.sum()),
            "seconds": round(second.seconds, 1),
            "stopped_by_deadline": second.stopped_by_deadline,
        }

    unscored = ~np.isfinite(probs).all(1)
    probs[unscored] = fallback_probs(test[unscored])
    report["fallback_rows"] = int(unscored.sum())
    report["elapsed_minutes"] = round(deadline.elapsed() / 60, 2)

    pred = pd.DataFrame({"id": test["id"], "p_a": probs[:, 0], "p_b": probs[:, 1], "source": source})
    pred["winner"] = np.where(pred["p_a"] >= pred["p_b"], "model_a", "model_b")
    write_submission(pred, test, cfg.out_dir / "submission.csv")
    pred.to_parquet(cfg.out_dir / "predictions.parquet", index=False)
    if cfg.labels_file is not None:
        key = schema.read_table(cfg.labels_file)
        merged = pred.merge(key[["id", "winner"]].rename(columns={"winner": "truth"}), on="id", validate="1:1")
        truth = (merged["truth"] == "model_b").to_numpy().astype(np.int64)
        report["accuracy"] = evaluate(merged[["p_a", "p_b"]].to_numpy(), truth)
    (cfg.out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return pred


def write_submission(pred: pd.DataFrame, test: pd.DataFrame, path: Path) -> Path:
    """``id,winner`` with exactly one row per test id, in test order; refuses to write anything else."""
    sub = pred[["id", "winner"]]
    if len(sub) != len(test) or not (sub["id"].to_numpy() == test["id"].to_numpy()).all():
        raise RuntimeError("predictions do not cover every test id exactly once, in order; not writing a submission")
    if not sub["winner"].isin(schema.WINNERS).all():
        raise RuntimeError("a prediction is not model_a/model_b; not writing a submission")
    sub.to_csv(path, index=False)
    return path


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(InferConfig, argv)
    infer(replace(cfg, started_at=cfg.started_at or time.time()))
    print((cfg.out_dir / "report.json").read_text())


if __name__ == "__main__":
    main()
