"""A model of the cascade (the primary or the secondary), from its files to its loaded copies: the folder checks made
before anything loads, the token ids its tokenizer makes of the test rows, where its copies go (one per GPU, or one
split across them), their loading, and the padded tokens per batch measured on the first copy; and the work planned
for the roles after the primary pass (:class:`OptionalWork`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from kaggle_utils.inputs.formatter import INPUT_CONTRACT, InputConfig, PromptFormatter
from kaggle_utils.models.loading import (
    WEIGHT_PATTERNS,
    ModelConfig,
    ModelFilesError,
    check_adapter_dir,
    check_model_dir,
    load_classifier,
    load_tokenizer,
    model_device,
)
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.scoring.memory import TokenBudget, probe_token_budget
from kaggle_utils.scoring.placement import Placement, choose_placement, device_limits, weights_bytes
from kaggle_utils.scoring.planner import CostModel, PassWork
from kaggle_utils.scoring.pool import DeviceCopies

# padded tokens per batch where no GPU memory can be measured (``batch_tokens = 0`` on a CPU)
CPU_BATCH_TOKENS = 16_384


class LoadSettings(Protocol):
    """How a role's weights are loaded (the fields of the infer stage's ``models`` section)."""

    load_in_4bit: bool
    dtype: str


def resolve_devices(spec: str) -> list[str]:
    if spec != "auto":
        return [d.strip() for d in spec.split(",") if d.strip()]
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def preflight(model_path: Path, adapter: Path | None, what: str) -> str | None:
    """Why ``what`` cannot be loaded (its folders checked, no load and no hub), or None when it looks complete."""
    try:
        check_model_dir(model_path, f"{what} model")
        if adapter is not None:
            check_adapter_dir(adapter, f"{what} adapter")
    except ModelFilesError as err:
        return str(err)
    return None


@dataclass
class Encoded:
    """One model's view of the rows it will score: its tokenizer, the token ids, their lengths (R,), and the test
    rows (R,) they are (positions into the test file, in the pass's priority order)."""

    tokenizer: object
    rows: list[list[int]]
    lengths: np.ndarray
    index: np.ndarray


def encode(cfg: InputConfig, model_path: Path, df: pd.DataFrame, index: np.ndarray | None = None) -> Encoded:
    """Token ids of ``df``'s rows ``index`` (default: all) as ``model_path``'s tokenizer and the template make them."""
    index = np.arange(len(df)) if index is None else np.asarray(index)
    tok = load_tokenizer(model_path)
    rows = PromptFormatter(tok, cfg).encode(df.iloc[index].reset_index(drop=True))
    return Encoded(tok, rows, PromptFormatter.lengths(rows), index)


def input_fields(cfg: InputConfig) -> dict:
    """The InputConfig part of a stage's config (what decides the token ids)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(InputConfig)}


class InputMismatchError(ValueError):
    """The inference recipe sets a token-id setting other than the one the role's adapter was trained with."""


def role_inputs(cfg: InputConfig, adapter: Path | None, role: str) -> InputConfig:
    """How ``role``'s rows become token ids: its adapter's own settings (``train_config.json``), the recipe's where
    the adapter has none (None: InputConfig's default). A recipe value that differs from the adapter's is refused,
    naming both: the model would score rows shaped unlike those it learnt from."""
    saved = {}
    if adapter is not None and (Path(adapter) / "train_config.json").is_file():
        saved = json.loads((Path(adapter) / "train_config.json").read_text())
    chosen = {}
    for key, value in input_fields(cfg).items():
        if key in INPUT_CONTRACT and key in saved:
            if value is not None and value != saved[key]:
                raise InputMismatchError(
                    f"{role}: {key} = {value!r} in the inference recipe, but its adapter {adapter} was trained with "
                    f"{key} = {saved[key]!r}: leave {key} out of the recipe (each adapter's own is used) or set it "
                    f"to {saved[key]!r}"
                )
            chosen[key] = saved[key]
        elif value is not None:
            chosen[key] = value
    return InputConfig(**chosen)


def weight_file_bytes(folder: Path) -> int:
    """Bytes of the weight files in a model folder, as they lie on disk."""
    return sum(p.stat().st_size for pattern in WEIGHT_PATTERNS for p in Path(folder).glob(pattern))


@dataclass
class Role:
    """A model of the cascade: its files, its cost model, and (while loaded) its device copies."""

    name: str
    model_path: Path
    adapter: Path | None
    cost: CostModel
    copies: DeviceCopies | None = None
    # padded tokens per batch: the configured figure, or measured on the first copy once loaded
    batch_tokens: int = 0
    # how its rows become token ids (role_inputs: its adapter's own settings); None until the role is set up
    inputs: InputConfig | None = None

    def placement(self, models: LoadSettings, reserve_gib: float, devices: list[str]) -> Placement:
        """Where the copies go: one per GPU when the weights and ``activation_reserve_gib`` fit a card, else one
        split across the GPUs (scoring.placement); ``kind == "none"`` when it fits neither way."""
        weights = weights_bytes(self.model_path, models.load_in_4bit, 4 if models.dtype == "fp32" else 2)
        reserve = int(reserve_gib * 2**30)
        return choose_placement(weights, devices, device_limits(devices), reserve)

    def start_loading(
        self, models: LoadSettings, reserve_gib: float, pad_id: int, devices: list[str], deadline: Deadline
    ) -> None:
        def load(device: str):
            model_cfg = ModelConfig(
                model_path=self.model_path,
                load_in_4bit=models.load_in_4bit,
                device=device,
                dtype=models.dtype,
                split_reserve_gib=reserve_gib,
            )
            return load_classifier(model_cfg, pad_id, adapter=self.adapter)

        self.copies = DeviceCopies(load, devices, deadline.clock)

    def probe_budget(self, model, enc: Encoded, max_rows: int, ceiling: int) -> TokenBudget:
        """The padded tokens per batch ``model`` (a loaded copy) holds on its device, measured on the longest rows."""
        return probe_token_budget(
            model,
            enc.rows,
            enc.lengths,
            enc.tokenizer.pad_token_id,
            model_device(model),
            max_rows=max_rows,
            ceiling=ceiling,
            fallback=CPU_BATCH_TOKENS,
        )

    def scaled_cost(self, model_path: Path) -> CostModel:
        """A prior for another model while this role's copies are loaded: its cost as measured (per token, per batch,
        load) scaled by the ratio of the two models' weight bytes on disk."""
        ratio = weight_file_bytes(model_path) / max(1, weight_file_bytes(self.model_path))
        a, b, c = self.cost.coefficients()
        load = ratio * (self.copies.total_load_seconds or 0.0)
        return CostModel(per_token=max(ratio * a, 1e-12), per_token2=ratio * b, per_batch=c, load_seconds=load)

    def close(self) -> float | None:
        """Free the copies; the wall seconds their load took (None when it never ended)."""
        if self.copies is None:
            return None
        seconds = self.copies.total_load_seconds
        if seconds is not None:
            self.cost.record_load(seconds)
        self.copies.close()
        self.copies = None
        return seconds


@dataclass
class OptionalWork:
    """The work after the primary pass: candidate rows (test positions, least certain first) and each pass's
    encoding and batches, planned whole once (so a rerun resumes the same batches), run as far as planned."""

    order: np.ndarray
    keys: np.ndarray
    tta: Encoded | None = None
    tta_work: PassWork | None = None
    tta_batches: int = 0
    secondary: Role | None = None
    secondary_enc: Encoded | None = None
    secondary_work: PassWork | None = None
