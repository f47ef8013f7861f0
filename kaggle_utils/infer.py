"""Stage 4, inference under a wall-clock budget: ``submission.csv`` with one row per test id, always.

The cascade of the seed solution: the primary model (Qwen2.5-14B) scores every row; the secondary
(Gemma2-9B) then re-scores rows in order of the primary's uncertainty (|p_a - 0.5| smallest first) for as
long as the budget allows, and the two are averaged on the rows both scored. Every batch is started only
if its projected time (measured seconds per token, a prior before the first measurement, a safety factor)
fits before the deadline, and the secondary is loaded only when its projected load time fits, so the run
never passes the budget. Rows no model reached get the stated fallback: the longer response wins with
probability 0.55 (in arena data the longer response is preferred somewhat more often than not).

A submission exists from the first seconds on: the fallback one is written before any model loads, and
rewritten (atomically) after each pass. A bad row in the test file is repaired, not a reason to stop
(:func:`kaggle_utils.data.schema.read_test`); model folders are checked before loading; an error in one
model or one GPU keeps what was scored (:mod:`kaggle_utils.scoring.pool`), and out-of-memory batches are split
and retried. Passes are saved in parts, so a rerun after a kill resumes with the same predictions.

With several GPUs each gets its own copy of the model and takes batches from one queue (one thread per GPU:
the Kaggle T4 x2 shape).

``python -m kaggle_utils.infer --recipe demo-infer``
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from kaggle_utils.config.cli import config_to_dict, parse_config, save_config
from kaggle_utils.data import schema
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.loading import (
    WEIGHT_PATTERNS,
    ModelConfig,
    ModelFilesError,
    check_adapter_dir,
    check_model_dir,
    load_classifier,
    load_tokenizer,
)
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.scoring.calibration import Blend, Calibration
from kaggle_utils.scoring.metrics import evaluate
from kaggle_utils.scoring.pool import PassResult, pass_key, run_pass
from kaggle_utils.scoring.predict import plan_batches

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
    # weight of the secondary in the blend of calibrated logits on rows both scored, used when no blend.json (fitted
    # on validation predictions, see notebook 03) lies beside the secondary adapter
    secondary_weight: float = 0.5
    # load base weights 4-bit nf4 (as trained); else fp16/bf16
    load_in_4bit: bool = True
    # compute dtype: "auto" (bf16 on sm_80+, fp16 on a T4, fp32 on the CPU) or "fp16" / "bf16" / "fp32"
    dtype: str = "auto"
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
    # on a model error keep what was scored, report the error and return normally (a Kaggle notebook that raises
    # scores nothing); false: raise once the submission is written (for development and the demo)
    fail_soft: bool = True
    # seconds per padded token assumed for a model's first batch, before anything is measured, so that a first
    # batch started close to the deadline is counted (0.005 = 200 tokens/s: slower than a 14B nf4 model on a T4)
    first_batch_seconds_per_token: float = 0.005
    # scored batches are saved in parts at least this often, so a rerun after a kill resumes with the same output
    checkpoint_seconds: float = 60.0

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
        if not self.devices.strip(",; "):
            raise ValueError("devices is empty: use 'auto' (every GPU, else the CPU), 'cpu' or e.g. 'cuda:0,cuda:1'")
        check_started_at(self.started_at)


def check_started_at(started_at: float, now: float | None = None) -> None:
    """``started_at`` is 0 (now) or a Unix time in seconds at most a minute ahead; anything else would move or
    switch off the deadline, so it is refused with what it looks like."""
    now = time.time() if now is None else now
    if started_at == 0:
        return
    if started_at > 1e11:
        raise ValueError(f"started_at={started_at} looks like milliseconds: pass time.time() (seconds)")
    if not 1e9 < started_at <= now + 60:
        when = "in the future" if started_at > now else "before 2001"
        raise ValueError(f"started_at={started_at} is {when}: pass time.time() taken when the run began, or 0")


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


def preflight(model_path: Path, adapter: Path | None, what: str) -> str | None:
    """Why ``what`` cannot be loaded (its folders checked, no load and no hub), or None when it looks complete."""
    try:
        check_model_dir(model_path, f"{what} model")
        if adapter is not None:
            check_adapter_dir(adapter, f"{what} adapter")
    except ModelFilesError as err:
        return str(err)
    return None


def score_model(
    cfg: InferConfig,
    model_path: Path,
    adapter: Path | None,
    df: pd.DataFrame,
    deadline: Deadline,
    order: np.ndarray | None = None,
    desc: str = "",
    prior: float = 0.0,
) -> PassResult:
    """One pass of one model over ``df`` (in ``order``'s priority): a copy per device, resumable, guarded."""
    tok = load_tokenizer(model_path)
    rows = PromptFormatter(tok, cfg).encode(df)
    lengths = PromptFormatter.lengths(rows)
    batches = plan_batches(lengths, cfg.batch_tokens, cfg.max_rows, order)
    key = pass_key(
        model_path,
        adapter,
        cfg.load_in_4bit,
        cfg.dtype,
        config_to_dict(InputConfig(**_input_fields(cfg))),
        df["id"].tolist(),
        [b.tolist() for b in batches],
    )

    def load(device: str):
        return load_classifier(
            ModelConfig(model_path=model_path, load_in_4bit=cfg.load_in_4bit, device=device, dtype=cfg.dtype),
            tok.pad_token_id,
            adapter=adapter,
        )

    devices = resolve_devices(cfg.devices)
    print(f"{desc}: {len(batches)} batches of up to {cfg.batch_tokens:,} padded tokens on {', '.join(devices)}")
    result = run_pass(
        load,
        devices,
        rows,
        batches,
        tok.pad_token_id,
        deadline,
        prior,
        parts_dir=cfg.out_dir / "parts" / f"{desc}-{key}",
        flush_seconds=cfg.checkpoint_seconds,
        desc=desc,
    )
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _input_fields(cfg: InferConfig) -> dict:
    """The InputConfig part of an InferConfig (what decides the token ids)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(InputConfig)}


def _pass_report(result: PassResult, rows: np.ndarray) -> dict:
    return {
        "scored": int(rows.sum()),
        "seconds": round(result.seconds, 1),
        "load_seconds": result.load_seconds,
        "stopped_by_deadline": result.stopped_by_deadline,
        "resumed_batches": result.resumed_batches,
        "oom": result.oom,
    }


class Cascade:
    """The run's state: probabilities and their source per row, the report, and the submission on disk."""

    def __init__(self, cfg: InferConfig, test: pd.DataFrame, repairs: dict, deadline: Deadline):
        self.cfg, self.test, self.deadline = cfg, test, deadline
        self.probs = fallback_probs(test)  # (N, 2): the fallback until a model scores the row
        self.source = np.full(len(test), "fallback", dtype=object)
        self.report: dict = {"rows": len(test), "repairs": repairs, "errors": []}

    def error(self, text: str) -> None:
        print(f"ERROR: {text}", flush=True)
        self.report["errors"].append(text)

    def run_primary(self) -> PassResult | None:
        cfg = self.cfg
        problem = preflight(cfg.primary_model, cfg.primary_adapter, "primary")
        if problem:
            self.error(problem)
            return None
        if self.deadline.remaining() <= 0:
            self.report["primary"] = {"scored": 0, "skipped": "no time left", "stopped_by_deadline": True}
            return None
        prior = cfg.first_batch_seconds_per_token
        result = self.guarded("primary", cfg.primary_model, cfg.primary_adapter, None, prior)
        if result is not None:
            scored = result.scored
            cal = self.calibration("primary", cfg.primary_adapter)
            self.probs[scored], self.source[scored] = cal.apply(result.probs[scored]), "primary"
            self.report["primary"] = _pass_report(result, scored)
        return result

    def calibration(self, what: str, adapter: Path | None) -> Calibration:
        """The adapter's fitted temperature (``calibration.json``, written by the train stage), else identity."""
        if adapter is None:
            cal = Calibration.identity("no adapter: the base model as is")
        else:
            cal = Calibration.load(adapter / "calibration.json")
        self.report.setdefault("calibration", {})[what] = {"temperature": cal.temperature, "reason": cal.reason}
        return cal

    def guarded(self, what, model_path, adapter, order, prior) -> PassResult | None:
        """``score_model``, with anything it raises (a tokenizer that will not load, say) reported, not raised."""
        try:
            result = score_model(self.cfg, model_path, adapter, self.test, self.deadline, order, what, prior)
        except Exception as err:
            self.error(f"{what}: {type(err).__name__}: {err}")
            return None
        for line in result.errors:
            self.error(f"{what}: {line}")
        return result

    def run_secondary(self, first: PassResult) -> None:
        cfg = self.cfg
        scored = self.source == "primary"
        problem = preflight(cfg.secondary_model, cfg.secondary_adapter, "secondary")
        if problem:
            self.error(problem)
            return
        # the secondary's load and first batch are projected from the primary's, scaled by weight size
        ratio = _weights_bytes(cfg.secondary_model) / max(1, _weights_bytes(cfg.primary_model))
        load_estimate = 1.25 * ratio * max(first.load_seconds.values(), default=0.0)
        if not self.deadline.allows(load_estimate):
            self.report["secondary"] = {"scored": 0, "skipped": f"loading would take ~{load_estimate:.0f} s"}
            return
        # least certain primary rows first; rows the primary never reached are left to the fallback
        margin = np.where(scored, np.abs(self.probs[:, 0] - 0.5), np.inf)
        order = np.argsort(margin, kind="stable")[: int(scored.sum())]
        prior = ratio * (first.seconds_per_token or cfg.first_batch_seconds_per_token)
        second = self.guarded("secondary", cfg.secondary_model, cfg.secondary_adapter, order, prior)
        if second is None:
            return
        both = second.scored & scored
        blend = self.blend(first.probs, second.probs)
        self.probs[both] = blend.combine(first.probs[both], second.probs[both])
        self.source[both] = "blend"
        self.report["secondary"] = _pass_report(second, both)

    def blend(self, primary_probs: np.ndarray, secondary_probs: np.ndarray) -> Blend:
        """The fitted blend (``blend.json`` beside the secondary adapter), else ``secondary_weight`` with each
        model's own temperature; both average calibrated logit margins, not probabilities."""
        cfg = self.cfg
        fitted = cfg.secondary_adapter / "blend.json" if cfg.secondary_adapter else None
        if fitted is not None and fitted.is_file():
            blend = Blend.load(fitted)
        else:
            t1 = self.calibration("primary", cfg.primary_adapter).temperature
            t2 = self.calibration("secondary", cfg.secondary_adapter).temperature
            blend = Blend(
                weight=cfg.secondary_weight,
                primary_temperature=t1,
                secondary_temperature=t2,
                reason=f"no blend.json beside the secondary adapter: secondary_weight={cfg.secondary_weight}",
            )
        self.report["blend"] = {"weight": blend.weight, "reason": blend.reason}
        return blend

    def predictions(self) -> pd.DataFrame:
        pred = pd.DataFrame({"id": self.test["id"], "p_a": self.probs[:, 0], "p_b": self.probs[:, 1]})
        pred["source"] = self.source
        pred["winner"] = np.where(pred["p_a"] >= pred["p_b"], "model_a", "model_b")
        return pred

    def write(self) -> pd.DataFrame:
        """The submission (and predictions) as they stand now, written atomically."""
        pred = self.predictions()
        write_submission(pred, self.test, self.cfg.out_dir / "submission.csv")
        tmp = self.cfg.out_dir / "predictions.parquet.tmp"
        pred.to_parquet(tmp, index=False)
        tmp.replace(self.cfg.out_dir / "predictions.parquet")
        return pred


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for pattern in WEIGHT_PATTERNS for p in Path(folder).glob(pattern))


def infer(cfg: InferConfig) -> pd.DataFrame:
    """Run the stage; returns the predictions (also written with the submission and a report)."""
    deadline = Deadline((cfg.time_budget_minutes - cfg.reserve_minutes) * 60, start=cfg.started_at or None)
    test, repairs = schema.read_test(cfg.test_file)  # refuses only a file that cannot be a test file at all
    if repairs:
        print(f"test file repaired (rows kept, ids as given): {repairs}")
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.out_dir / "infer_config.json")
    run = Cascade(cfg, test, repairs, deadline)
    run.write()  # the fallback submission first: whatever happens from here on, a complete one exists
    first = run.run_primary()
    run.write()
    if cfg.secondary_model is not None and first is not None and (run.source == "primary").any():
        run.run_secondary(first)
        run.write()
    pred = run.predictions()
    report = run.report
    report["sources"] = pred["source"].value_counts().to_dict()
    report["fallback_rows"] = int((pred["source"] == "fallback").sum())
    report["elapsed_minutes"] = round(deadline.elapsed() / 60, 2)
    if cfg.labels_file is not None:
        key = schema.read_table(cfg.labels_file).astype({"id": pred["id"].dtype})
        merged = pred.merge(key[["id", "winner"]].rename(columns={"winner": "truth"}), on="id", validate="1:1")
        truth = (merged["truth"] == "model_b").to_numpy().astype(np.int64)
        report["accuracy"] = evaluate(merged[["p_a", "p_b"]].to_numpy(), truth)
    (cfg.out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    if report["errors"] and not cfg.fail_soft:
        raise InferenceError(f"{len(report['errors'])} error(s), the submission holds the rest: {report['errors']}")
    return pred


class InferenceError(RuntimeError):
    """A model failed during inference (``fail_soft=False``); the submission was written before this is raised."""


def write_submission(pred: pd.DataFrame, test: pd.DataFrame, path: Path) -> Path:
    """``id,winner`` with exactly one row per test row, ids as given, in test order; written atomically."""
    sub = pred[["id", "winner"]]
    if len(sub) != len(test) or not sub["id"].equals(test["id"]):
        raise RuntimeError("predictions do not cover every test row exactly once, in order; not writing a submission")
    if not sub["winner"].isin(schema.WINNERS).all():
        raise RuntimeError("a prediction is not model_a/model_b; not writing a submission")
    tmp = path.with_name(path.name + ".tmp")
    sub.to_csv(tmp, index=False)
    tmp.replace(path)  # a kill mid-write leaves the previous complete submission, never a truncated one
    return path


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(InferConfig, argv)
    infer(replace(cfg, started_at=cfg.started_at or time.time()))
    print((cfg.out_dir / "report.json").read_text())


if __name__ == "__main__":
    main()
