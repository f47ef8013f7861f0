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
the Kaggle T4 x2 shape). Its parts (roles, blend, outputs, report) are in :mod:`kaggle_utils.inference`.

``python -m kaggle_utils.infer --recipe demo-infer``
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from kaggle_utils.config.cli import config_to_dict, parse_config, save_config
from kaggle_utils.config.sections import Sectioned
from kaggle_utils.data import schema
from kaggle_utils.evaluation.calibration import margin, probs_from_margin, swap_tta_margin
from kaggle_utils.inference import outputs
from kaggle_utils.inference.blend import FALLBACK_LONGER_WINS, Blender, fallback_probs, uncalibrated
from kaggle_utils.inference.outputs import write_submission
from kaggle_utils.inference.report import (
    announce_pass,
    finish_report,
    pass_report,
    pass_table,
    plan_entry,
    project_rehearsal,
)
from kaggle_utils.inference.roles import (
    CPU_BATCH_TOKENS,
    Encoded,
    OptionalWork,
    Role,
    encode,
    preflight,
    resolve_devices,
    role_inputs,
)
from kaggle_utils.inputs.formatter import INPUT_CONTRACT, InputConfig
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.scoring.planner import CostModel, PassWork, Plan, plan_cascade, synthetic_test
from kaggle_utils.scoring.pool import PassResult, pass_key, run_pass
from kaggle_utils.scoring.predict import plan_batches

# the stage's public names: notebooks, tests and benchmarks import them from here, wherever they are defined
__all__ = [
    "CPU_BATCH_TOKENS",
    "FALLBACK_LONGER_WINS",
    "Cascade",
    "InferConfig",
    "InferenceError",
    "Role",
    "check_started_at",
    "encode",
    "fallback_probs",
    "infer",
    "main",
    "pass_table",
    "rehearse",
    "resolve_devices",
    "run_cascade",
    "write_submission",
]


@dataclass
class InferFilesConfig:
    """The test rows read, the folder written, and an optional answer key."""

    # test rows in competition format (on Kaggle: found under /kaggle/input by kaggle_utils.kaggle.env)
    test_file: Path = Path("demo/data/test.parquet")
    # folder that receives submission.csv, predictions.parquet and report.json
    out_dir: Path = Path("demo/work/submission")
    # optional answer key (id, winner) to print accuracy; the demo data has one, the competition does not
    labels_file: Path | None = None

    def __post_init__(self) -> None:
        self.test_file, self.out_dir = Path(self.test_file), Path(self.out_dir)
        self.labels_file = Path(self.labels_file) if self.labels_file else None


@dataclass
class RoleConfig:
    """One model of the cascade: the primary scores every row, the secondary re-scores the least certain ones.
    Its flags carry the role's name: ``--primary-model``, ``--secondary-adapter``."""

    # model folder; empty: no such role (the secondary only: primary alone)
    model: Path | None = None
    # the role's LoRA adapter folder; empty: the base model as is
    adapter: Path | None = None

    def __post_init__(self) -> None:
        self.model = Path(self.model) if self.model else None
        self.adapter = Path(self.adapter) if self.adapter else None


@dataclass
class InferModelsConfig:
    """How both roles are loaded, on which devices, and how their predictions are blended."""

    # weight of the secondary in the blend of calibrated logits on rows both scored, used when no blend.json (fitted
    # on validation predictions: python -m kaggle_utils.evaluation.calibration) lies beside the secondary adapter
    secondary_weight: float = 0.5
    # load base weights 4-bit nf4 (as trained); else fp16/bf16
    load_in_4bit: bool = True
    # compute dtype: "auto" (bf16 on sm_80+, fp16 on a T4, fp32 on the CPU) or "fp16" / "bf16" / "fp32"
    dtype: str = "auto"
    # "auto": every visible GPU (one model copy and thread each), else the CPU; or e.g. "cuda:0,cuda:1"
    devices: str = "auto"

    def __post_init__(self) -> None:
        if not 0 <= self.secondary_weight <= 1:
            raise ValueError(f"secondary_weight={self.secondary_weight} must be in [0, 1]")
        if not self.devices.strip(",; "):
            raise ValueError("devices is empty: use 'auto' (every GPU, else the CPU), 'cpu' or e.g. 'cuda:0,cuda:1'")


@dataclass
class InferInputsConfig(InputConfig):
    """How a row becomes token ids: each role's adapter's own settings, unless the recipe sets one."""

    # the token-id settings (max_length, template, truncation, prompt_fraction, head_fraction, split_special_tokens):
    # empty, each role takes its adapter's own (its train_config.json), so primary and secondary may differ; a value
    # set here must equal the adapter's (a difference stops that role, naming both)
    max_length: int | None = None
    prompt_fraction: float | None = None
    template: str | None = None
    truncation: str | None = None
    head_fraction: float | None = None
    split_special_tokens: bool | None = None

    def __post_init__(self) -> None:
        role_inputs(self, None, "recipe")  # the settings it does give are valid ones
        self.cache_dir = Path(self.cache_dir) if self.cache_dir else None


@dataclass
class InferBudgetConfig:
    """The wall-clock budget, the batches, and the shares of optional work the planner may fit into it."""

    # the whole budget in minutes, counted from ``started_at`` (Kaggle allows 720; the winners capped at 690)
    time_budget_minutes: float = 690.0
    # minutes kept back for writing files and the notebook's last cells
    reserve_minutes: float = 5.0
    # wall-clock start of the run (time.time()); 0: when the stage starts
    started_at: float = 0.0
    # padded tokens per batch (rows x longest row); 0: measured per model from the GPU's free memory on the longest
    # rows right after loading (scoring.memory), CPU_BATCH_TOKENS on a CPU
    batch_tokens: int = 0
    # the most padded tokens a measured budget may reach (larger batches stop paying: docs/facts.md §7)
    max_batch_tokens: int = 32_768
    # most rows in one batch
    max_rows: int = 64
    # GiB of each GPU kept for activations when deciding whether a model fits one card (else its layers are split
    # across the GPUs, scoring.placement); 2 GiB holds a 8K-token batch of Qwen2.5-14B at 2,500 tokens (0.12 MiB/token)
    activation_reserve_gib: float = 2.0
    # most share of the rows (least certain first) the primary re-scores A/B-swapped while still loaded, averaged
    # in logit space (position bias cancels); the planner decides how much of it fits; 0: no swap TTA. Those rows
    # (source "+tta") get the swap-averaged temperature and blend weight; calibrate's tta_fraction should match it
    tta_fraction: float = 0.25
    # most share of the rows (least certain first) the secondary re-scores (in one order); the planner decides how
    # much fits; calibrate's secondary_fraction should match it
    secondary_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.time_budget_minutes <= self.reserve_minutes:
            raise ValueError(
                f"time_budget_minutes={self.time_budget_minutes} must exceed reserve_minutes={self.reserve_minutes}"
            )
        if self.batch_tokens < 0 or self.max_batch_tokens < 1:
            raise ValueError(f"batch_tokens={self.batch_tokens} must be >= 0 (0: measured), max_batch_tokens >= 1")
        for name in ("tta_fraction", "secondary_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        check_started_at(self.started_at)


@dataclass
class InferSafetyConfig:
    """What a model error, a first batch and a kill may cost."""

    # on a model error keep what was scored, report the error and return normally (a Kaggle notebook that raises
    # scores nothing); false: raise once the submission is written (for development and the demo)
    fail_soft: bool = True
    # seconds per padded token assumed for a model's first batch, before anything is measured, so that a first
    # batch started close to the deadline is counted (0.005 = 200 tokens/s: slower than a 14B nf4 model on a T4)
    first_batch_seconds_per_token: float = 0.005
    # scored batches are saved in parts at least this often, so a rerun after a kill resumes with the same output
    checkpoint_seconds: float = 60.0
    # apply a calibration.json / blend.json fitted for other adapter weights (said in report.json) instead of refusing
    accept_stale_calibration: bool = False


@dataclass
class RehearsalConfig:
    """``--rehearse N``: a short run on synthetic rows, projected onto the full test set."""

    # > 0: rehearse on this many synthetic rows of the competition's length profile, then project a full run
    rehearse: int = 0
    # the rehearsal's own time budget, minutes
    rehearse_minutes: float = 5.0
    # rows of the test set the rehearsal projects (the hidden test set: ~25K rows, docs/facts.md §1)
    project_rows: int = 25_000

    def __post_init__(self) -> None:
        if self.rehearse < 0 or self.rehearse_minutes <= 0 or self.project_rows < 1:
            raise ValueError("rehearse must be >= 0 rows, rehearse_minutes > 0 and project_rows >= 1")


@dataclass
class InferConfig(Sectioned):
    """Time-budgeted cascade inference; every field is also a ``--flag``. Made of sections (``cfg.primary.adapter``,
    ``cfg.budget.max_rows``), each a ``[section]`` of the recipes; flat names (``--primary-adapter``,
    ``cfg.replace(max_rows=...)``) build it (:mod:`kaggle_utils.config.sections`)."""

    # the stage its recipes name (``stage = "infer"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "infer"

    # test file, output folder, answer key
    data: InferFilesConfig = field(default_factory=InferFilesConfig)
    # the model that scores every row
    primary: RoleConfig = field(default_factory=lambda: RoleConfig(model=Path("demo/models/qwen2-tiny")))
    # the model that re-scores the least certain rows (none by default)
    secondary: RoleConfig = field(default_factory=RoleConfig)
    # loading, devices and blend
    models: InferModelsConfig = field(default_factory=InferModelsConfig)
    # the token-id settings, each adapter's own by default
    inputs: InferInputsConfig = field(default_factory=InferInputsConfig)
    # time, batches and optional work
    budget: InferBudgetConfig = field(default_factory=InferBudgetConfig)
    # errors, first batches, parts
    safety: InferSafetyConfig = field(default_factory=InferSafetyConfig)
    # a rehearsal instead of a run
    rehearsal: RehearsalConfig = field(default_factory=RehearsalConfig)

    def __post_init__(self) -> None:
        if self.primary.model is None:
            raise ValueError("primary_model is empty: the primary model scores every row, give its folder")


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


class Cascade:
    """The run's state: probabilities and their source per row, the report, and the submission on disk.

    Probabilities are kept raw (the models' own) and calibrated when written (:mod:`kaggle_utils.inference.blend`).
    """

    def __init__(self, cfg: InferConfig, test: pd.DataFrame, repairs: dict, deadline: Deadline):
        self.cfg, self.test, self.deadline = cfg, test, deadline
        self.devices = resolve_devices(cfg.models.devices)
        self.raw = np.full((len(test), 2), np.nan, dtype=np.float32)  # the primary's, TTA-averaged where run
        self.secondary_raw = np.full((len(test), 2), np.nan, dtype=np.float32)
        self.tta = np.zeros(len(test), dtype=bool)
        self.report: dict = {"rows": len(test), "repairs": repairs, "errors": [], "devices": self.devices, "plans": []}
        self.measured: dict[str, list] = {"primary": [], "secondary": []}  # batch logs, for a rehearsal
        self.blender = Blender(
            cfg.primary.adapter,
            cfg.secondary.adapter,
            cfg.models.secondary_weight,
            self.report,
            cfg.safety.accept_stale_calibration,
        )

    def error(self, text: str) -> None:
        print(f"ERROR: {text}", flush=True)
        self.report["errors"].append(text)

    # ---- the passes

    def run(self) -> None:
        """The primary on every row, then the swapped view and the secondary on the least certain rows, as planned."""
        cfg = self.cfg
        primary = Role(
            "primary", cfg.primary.model, cfg.primary.adapter, CostModel(cfg.safety.first_batch_seconds_per_token)
        )
        if self.deadline.remaining() <= 0:
            self.report["primary"] = {"scored": 0, "skipped": "no time left", "stopped_by_deadline": True}
            return
        enc = self.guarded(
            "primary", lambda: encode(self.inputs_of(primary), cfg.primary.model, self.test), preflight_of=primary
        )
        if enc is None:
            return
        workers = self.place(primary)
        if not workers:
            return
        t0 = self.deadline.clock()
        primary.start_loading(
            cfg.models, cfg.budget.activation_reserve_gib, enc.tokenizer.pad_token_id, workers, self.deadline
        )
        try:
            self.measure_budget(primary, enc)
            result = self.guarded("primary", lambda: self.score(primary, enc, "primary"))
            if result is None:
                return
            self.raw[:] = result.probs
            self.report["primary"] = pass_report(result, result.scored, wall=self.deadline.clock() - t0)
            self.write()  # the primary's submission as soon as it exists
            optional = self.plan_optional(primary, enc)
            if optional is not None and optional.tta_batches:
                self.run_tta(primary, optional)
        finally:
            self.report.setdefault("load_seconds", {})["primary"] = primary.close()
        if optional is not None and optional.secondary is not None:
            self.run_secondary(optional)

    def place(self, role: Role) -> list[str]:
        """The devices of ``role``'s copies: one per GPU when it fits a card, else one split across the GPUs
        (scoring.placement); empty, with the reason as an error, when it fits neither way."""
        placement = role.placement(self.cfg.models, self.cfg.budget.activation_reserve_gib, self.devices)
        self.report.setdefault("placement", {})[role.name] = dataclasses.asdict(placement)
        print(f"{role.name}: {placement.reason}", flush=True)
        if placement.kind == "none":
            self.error(f"{role.name}: {placement.reason}")
        return placement.workers

    def measure_budget(self, role: Role, enc: Encoded) -> None:
        """``role.batch_tokens``: the configured figure, else measured on the first copy's device on the longest
        rows (once per model and settings: a rerun reads the figure back, so it forms the same batches and resumes
        its parts). A copy that never loads leaves the CPU figure; the pass then reports the load's error."""
        cfg = self.cfg
        if cfg.budget.batch_tokens:
            self.set_budget(role, cfg.budget.batch_tokens, "configured")
            return
        key = pass_key(
            role.model_path, role.adapter, cfg.models.load_in_4bit, cfg.models.dtype, self.devices, enc.lengths.max()
        )
        saved = outputs.budget_file(cfg.data.out_dir, role.name, key)
        tokens = outputs.read_budget(saved)
        if tokens is not None:
            self.set_budget(role, tokens, "read back")
            return
        model = role.copies.wait(0, self.deadline)
        self.set_budget(role, CPU_BATCH_TOKENS, "no copy loaded")
        if model is None:
            return
        budget = self.guarded(
            role.name, lambda: role.probe_budget(model, enc, cfg.budget.max_rows, cfg.budget.max_batch_tokens)
        )
        if budget is None:
            return
        self.set_budget(role, budget.tokens, budget.describe())
        outputs.save_budget(saved, budget.tokens, budget.describe())

    def set_budget(self, role: Role, tokens: int, how: str) -> None:
        role.batch_tokens = tokens
        self.report.setdefault("token_budget", {})[role.name] = {"tokens": tokens, "how": how}

    def guarded(self, what: str, work: Callable, preflight_of: Role | None = None):
        """``work()``, with anything it raises (a tokenizer that will not load, say) reported, not raised."""
        if preflight_of is not None:
            problem = preflight(preflight_of.model_path, preflight_of.adapter, what)
            if problem:
                self.error(problem)
                return None
        try:
            result = work()
        except Exception as err:
            self.error(f"{what}: {type(err).__name__}: {err}")
            return None
        for line in getattr(result, "errors", []):
            self.error(f"{what}: {line}")
        return result

    def inputs_of(self, role: Role) -> InputConfig:
        """The role's token-id settings (its adapter's own, :func:`role_inputs`), recorded in the report."""
        if role.inputs is None:
            role.inputs = role_inputs(self.cfg.inputs, role.adapter, role.name)
            self.report.setdefault("inputs", {})[role.name] = {k: getattr(role.inputs, k) for k in INPUT_CONTRACT}
        return role.inputs

    def score(self, role: Role, enc: Encoded, desc: str, batches=None, limit: int | None = None) -> PassResult:
        """One pass of ``role`` over ``enc``'s rows, resumable and guarded; probabilities (N, 2) in test order.
        ``batches``: the pass planned whole (positions into ``enc``), of which the first ``limit`` run; default: all
        rows by length."""
        cfg = self.cfg
        batches = plan_batches(enc.lengths, role.batch_tokens, cfg.budget.max_rows) if batches is None else batches
        inputs = config_to_dict(role.inputs)
        ids = self.test["id"].iloc[enc.index].tolist()
        plan = [b.tolist() for b in batches]
        key = pass_key(
            role.model_path, role.adapter, cfg.models.load_in_4bit, cfg.models.dtype, inputs, desc, ids, plan
        )
        run = batches if limit is None else batches[:limit]
        announce_pass(desc, len(run), len(batches), role, role.inputs.max_length)
        result = run_pass(
            role.copies,
            enc.rows,
            run,
            enc.tokenizer.pad_token_id,
            self.deadline,
            role.cost,
            parts_dir=cfg.data.out_dir / "parts" / f"{desc}-{key}",
            flush_seconds=cfg.safety.checkpoint_seconds,
            desc=desc,
        )
        self.measured["secondary" if role.name == "secondary" else "primary"] += result.batch_log
        probs = np.full((len(self.test), 2), np.nan, dtype=np.float32)
        probs[enc.index] = result.probs
        result.probs = probs
        return result

    # ---- optional work: the swapped view and the secondary, planned together

    def plan_optional(self, primary: Role, enc: Encoded) -> OptionalWork | None:
        """Candidates (the primary's rows, least certain first), batched once per pass, and the shares that fit."""
        cfg = self.cfg
        scored = np.flatnonzero(np.isfinite(self.raw).all(1))
        if len(scored) < len(self.test) or (cfg.budget.tta_fraction == 0 and cfg.secondary.model is None):
            return None  # the primary did not finish: no optional work (its rows are the submission)
        certainty = np.abs(self.raw[scored, 0] - 0.5)  # (S,) the same order as calibrated margins
        pick = np.argsort(certainty, kind="stable")
        work = OptionalWork(order=scored[pick], keys=certainty[pick])
        build = dict(batch_tokens=primary.batch_tokens, max_rows=cfg.budget.max_rows)
        n_tta = int(round(cfg.budget.tta_fraction * len(work.order)))
        if n_tta:
            rows = work.order[:n_tta]
            swapped = schema.swap_ab(self.test)
            work.tta = self.guarded("tta", lambda: encode(primary.inputs, cfg.primary.model, swapped, rows))
            if work.tta is not None:
                work.tta_work = PassWork.build(work.tta.lengths, primary.cost, keys=work.keys[:n_tta], **build)
        if cfg.secondary.model is not None:
            self.add_secondary(work, primary, build)
        plan = self.plan(None if work.tta is None else work.tta_work, work.secondary_work)
        work.tta_batches = plan.batches.get("tta", 0)
        return work

    def add_secondary(self, work: OptionalWork, primary: Role, build: dict) -> None:
        cfg = self.cfg
        cost = primary.scaled_cost(cfg.secondary.model)  # the secondary's prior: the primary's, scaled by weight size
        # batched with the primary's budget until its own is measured (run_secondary re-batches then)
        role = Role("secondary", cfg.secondary.model, cfg.secondary.adapter, cost, batch_tokens=build["batch_tokens"])
        n = int(round(cfg.budget.secondary_fraction * len(work.order)))
        rows = work.order[:n]
        if n == 0:
            return
        enc = self.guarded(
            "secondary", lambda: encode(self.inputs_of(role), cfg.secondary.model, self.test, rows), preflight_of=role
        )
        if enc is None:
            return
        work.secondary, work.secondary_enc = role, enc
        work.secondary_work = PassWork.build(enc.lengths, cost, keys=work.keys[:n], needs_load=True, **build)

    def plan(self, tta: PassWork | None, secondary: PassWork | None) -> Plan:
        """The shares that fit in the time left (the deadline already holds the reserve back), printed."""
        plan = plan_cascade(self.deadline.remaining(), 0.0, None, secondary, tta, devices=len(self.devices))
        self.report["plans"].append(plan_entry(plan, self.deadline.elapsed()))
        return plan

    def run_tta(self, primary: Role, work: OptionalWork) -> None:
        """The primary again, on the swapped view of the least certain rows, while its copies are loaded."""
        result = self.guarded(
            "tta", lambda: self.score(primary, work.tta, "tta", work.tta_work.batches, work.tta_batches)
        )
        if result is None:
            return
        done = result.scored
        # the swapped view's A is the original B: average the margins (position bias cancels), in raw space
        z = swap_tta_margin(margin(self.raw[done]), margin(result.probs[done]))
        self.raw[done], self.tta[done] = probs_from_margin(z), True
        self.report["tta"] = pass_report(result, done, planned=int(work.tta_work.sizes[: work.tta_batches].sum()))
        self.report["tta"]["load_seconds"] = {}  # the primary's copies, loaded (and counted) by the primary pass

    def run_secondary(self, work: OptionalWork) -> None:
        """Re-planned with what the swapped view took; loaded only when its load and a first batch fit."""
        role = work.secondary
        plan = self.plan(None, work.secondary_work)
        n = plan.batches["secondary"]
        if n == 0:
            estimate = role.cost.load_estimate()
            self.report["secondary"] = {"scored": 0, "skipped": f"loading (~{estimate:.0f} s) and a batch do not fit"}
            return
        workers = self.place(role)
        if not workers:
            return
        t0 = self.deadline.clock()
        role.start_loading(
            self.cfg.models,
            self.cfg.budget.activation_reserve_gib,
            work.secondary_enc.tokenizer.pad_token_id,
            workers,
            self.deadline,
        )
        try:
            planned = role.batch_tokens
            self.measure_budget(role, work.secondary_enc)
            if role.batch_tokens != planned:  # its own budget, measured: the same rows in other batches, re-planned
                old = work.secondary_work
                work.secondary_work = PassWork.build(
                    old.lengths, role.cost, keys=work.keys[: len(old.lengths)], batch_tokens=role.batch_tokens,
                    max_rows=self.cfg.budget.max_rows,
                )  # fmt: skip
                plan = self.plan(None, work.secondary_work)
                n = plan.batches["secondary"]
            result = self.guarded(
                "secondary",
                lambda: self.score(role, work.secondary_enc, "secondary", work.secondary_work.batches, n),
            )
        finally:
            self.report.setdefault("load_seconds", {})["secondary"] = role.close()
        if result is None:
            return
        done = result.scored
        self.secondary_raw[done] = result.probs[done]
        self.report["secondary"] = pass_report(
            result, done, planned=plan.rows["secondary"], wall=self.deadline.clock() - t0
        )

    # ---- predictions and outputs

    def predictions(self) -> pd.DataFrame:
        """The predictions as they stand now: calibrated, blended, the fallback where no model scored."""
        return self.blender.predictions(self.test, self.raw, self.secondary_raw, self.tta)

    def write(self) -> pd.DataFrame:
        """The submission (and predictions) as they stand now, written atomically."""
        pred = self.guarded("calibration", self.predictions)
        if pred is None:  # a malformed calibration or blend file: the raw probabilities rather than nothing
            pred = uncalibrated(self.test, self.raw)
        outputs.write_predictions(pred, self.test, self.cfg.data.out_dir)
        return pred


def infer(cfg: InferConfig) -> pd.DataFrame:
    """Run the stage; returns the predictions (also written with the submission and a report)."""
    # before CUDA's allocator starts: without expandable segments, budgets past ~40K tokens fragmented the cache and
    # split batches that had fit (H200 capped at 15 GiB, scoring.memory's probe)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if cfg.rehearsal.rehearse:
        return rehearse(cfg)
    test, repairs = schema.read_test(cfg.data.test_file)  # refuses only a file that cannot be a test file at all
    if repairs:
        print(f"test file repaired (rows kept, ids as given): {repairs}")
    deadline = Deadline(
        (cfg.budget.time_budget_minutes - cfg.budget.reserve_minutes) * 60, start=cfg.budget.started_at or None
    )
    return run_cascade(cfg, test, repairs, deadline).predictions()


def run_cascade(cfg: InferConfig, test: pd.DataFrame, repairs: dict, deadline: Deadline) -> Cascade:
    cfg.data.out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.data.out_dir / "infer_config.json")
    run = Cascade(cfg, test, repairs, deadline)
    run.write()  # the fallback submission first: whatever happens from here on, a complete one exists
    try:
        run.run()
    finally:
        pred = run.write()  # also on a KeyboardInterrupt: what was scored is in the submission
    report = finish_report(run.report, pred, deadline.elapsed(), cfg.data.labels_file)
    outputs.write_report(cfg.data.out_dir / "report.json", report)
    if report["errors"] and not cfg.safety.fail_soft:
        raise InferenceError(f"{len(report['errors'])} error(s), the submission holds the rest: {report['errors']}")
    return run


def rehearse(cfg: InferConfig) -> pd.DataFrame:
    """``--rehearse N``: the cascade on N synthetic rows of the competition's length profile for at most
    ``rehearse_minutes``, then the measured batches projected onto a ``project_rows`` test set on this hardware.

    Outputs go to ``out_dir/rehearsal`` (never a submission.csv a notebook could take for the real one); the
    projection is printed and saved in its ``report.json`` under ``projection``.
    """
    test = synthetic_test(cfg.rehearsal.rehearse, seed=0)
    out = cfg.data.out_dir / "rehearsal"
    run_cfg = cfg.replace(rehearse=0, out_dir=out, labels_file=None, checkpoint_seconds=1e9)
    shutil.rmtree(out / "parts", ignore_errors=True)  # a rehearsal measures: nothing is resumed
    run = run_cascade(run_cfg, test, {}, Deadline(cfg.rehearsal.rehearse_minutes * 60))
    run.report["projection"] = project_rehearsal(
        run.report, run.measured, len(run.devices), cfg.budget, cfg.rehearsal.project_rows, cfg.inputs.max_length
    )
    outputs.write_report(out / "report.json", run.report)
    return run.predictions()


class InferenceError(RuntimeError):
    """A model failed during inference (``fail_soft=False``); the submission was written before this is raised."""


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(InferConfig, argv)
    infer(cfg.replace(started_at=cfg.budget.started_at or time.time()))
    print((cfg.data.out_dir / "report.json").read_text())


if __name__ == "__main__":
    main()
