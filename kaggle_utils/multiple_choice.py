"""The mDeBERTa-v3 multiple-choice baseline: an encoder scores (prompt, response) once for each response.

``AutoModelForMultipleChoice`` reads a row as two choices, choice k = (prompt, response_k) encoded as a text pair
with the tokenizer's own pair template (``[CLS] prompt [SEP] response [SEP]`` for DeBERTa); each choice gets one
logit and a softmax over the two gives P(A wins), P(B wins); the label is the winner's index. This is the seed's
reference point for "small models are not enough": ``microsoft/mdeberta-v3-base`` reached CV ≈ 0.645 on the real
data, where the top teams' 9-14B models reached 0.705-0.716 (docs/facts.md §3).

It uses the main models' data and folds (the prepared ``train.parquet`` and its ``fold`` column), their metrics
(``evaluation.metrics.evaluate``) and their ``val_predictions.parquet`` columns (id, p_a, p_b, winner), so its
predictions compare and blend with the students' row for row.

* Inputs (:class:`ChoiceEncoder`): each choice holds at most ``max_length`` (≤ 512) tokens. Prompt and response
  share the field budget by the decoder formatter's rule (``inputs.formatter.allocate``: the prompt is capped at
  ``prompt_fraction``, the response takes the rest, and what one leaves goes to the other); a cut field keeps its
  head and its tail around a snip marker. Fields are tokenised alone and joined as ids: nothing is decoded.
* Training (:func:`train_step`): AdamW with a linear warm-up and linear decay; weights stay fp32 and the forward runs
  in fp32 on the CPU, fp16 autocast with loss scaling on GPUs before sm_80 (T4), bf16 autocast from sm_80. Each
  epoch shows ``swap_fraction`` of the rows A/B-swapped (``schema.swap_ab``), in the train stage's schedule
  (``training.schedule``: the first step holds the epoch's largest micro-batches, so a run that does not fit fails at
  once). Optional adversarial weight perturbation (``training.awp.AWP``) from ``awp_start_epoch`` on.
* Outputs in ``out_dir``: ``model/`` (weights, tokenizer, this config), ``val_predictions.parquet``,
  ``metrics.json``, ``history.csv`` and ``multiple_choice_config.json``.

``train(cfg) -> dict`` (the metrics, as in metrics.json) is the whole stage and the one call a notebook needs, with
``cfg = recipes.load("demo-mdeberta", MultipleChoiceConfig, overrides)``; from a shell::

    python -m kaggle_utils.multiple_choice --recipe demo-mdeberta [--flag value ...]
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kaggle_utils.config.cli import parse_config, save_config
from kaggle_utils.data import schema
from kaggle_utils.evaluation.metrics import evaluate
from kaggle_utils.inputs.batching import pad, token_budget_batches
from kaggle_utils.inputs.formatter import MAX_CHARS_PER_TOKEN, SNIP_MARKER, allocate
from kaggle_utils.models.loading import (
    DTYPES,
    LOAD_LOCK,
    check_model_dir,
    load_tokenizer,
    pick_device,
)
from kaggle_utils.scoring.budget import Deadline
from kaggle_utils.training.awp import AWP
from kaggle_utils.training.precision import Precision
from kaggle_utils.training.schedule import schedule, steps_per_epoch

# mDeBERTa-v3 was pretrained at 512 tokens; its relative positions are bucketed for that length
MAX_ENCODER_LENGTH = 512
# The fields' text in the probe that finds the pair template's special tokens; any two distinct words do.
_PROBE_FIELDS = ("question", "answer")


@dataclass
class MultipleChoiceConfig:
    """Fine-tune an encoder (mDeBERTa-v3) as a two-choice model; every field is a ``--flag`` of the stage."""

    # the stage its recipes name (``stage = "multiple-choice"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "multiple-choice"
    # its recipes' [sections] and the groups of --help: section -> the fields written under it
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "model": ("model_path", "device", "dtype", "cpu_threads"),
        "inputs": ("max_length", "prompt_fraction", "head_fraction"),
        "data": ("train_file", "out_dir", "val_fold", "max_train_rows", "swap_fraction"),
        "optim": (
            "lr",
            "weight_decay",
            "warmup_fraction",
            "epochs",
            "batch_tokens",
            "max_rows",
            "grad_accum",
            "max_grad_norm",
        ),
        "awp": ("awp_lr", "awp_eps", "awp_start_epoch", "awp_steps", "awp_params"),
        "schedule": ("eval_every", "eval_batch_tokens", "time_budget_minutes", "seed"),
    }
    # rows are padded, never packed (the shared schedule, training.schedule.Batching, asks)
    packing: ClassVar[bool] = False

    # local folder of an encoder saved by save_pretrained (config.json + weights + tokenizer), e.g. mdeberta-v3-base
    model_path: Path = Path("demo/models/mdeberta-tiny")
    # "auto" (first GPU if any, else CPU), or a torch device string such as "cuda:1"
    device: str = "auto"
    # autocast dtype: "auto" (bf16 on sm_80+, fp16 with loss scaling on older GPUs, fp32 on the CPU), or "fp16" /
    # "bf16" / "fp32"; the weights and the optimiser stay fp32 either way
    dtype: str = "auto"
    # intra-op threads when running on the CPU, set process-wide (0: leave torch's default); tiny models run fastest on
    # 1 (the demo recipe on a shared 2-core machine: 33 s with 1 thread, 60-94 s with 2)
    cpu_threads: int = 0

    # tokens per choice, special tokens included; at most 512, the length mDeBERTa-v3 was pretrained at
    max_length: int = MAX_ENCODER_LENGTH
    # share of a choice's field budget the prompt may take before the response gets the rest
    prompt_fraction: float = 0.3
    # share of a cut field's kept tokens taken from its head (the rest from its tail)
    head_fraction: float = 0.5

    # prepared training file with a ``fold`` column (the prepare stage's output)
    train_file: Path = Path("demo/work/prepared/train.parquet")
    # folder that receives model/, metrics.json, history.csv, val_predictions.parquet and the config
    out_dir: Path = Path("demo/work/mdeberta")
    # rows of this fold are held out for validation; -1 trains on every row
    val_fold: int = 0
    # use at most this many training rows (0: all), for quick runs
    max_train_rows: int = 0
    # share of rows shown A/B-swapped each epoch (labels swap with them)
    swap_fraction: float = 0.5

    # peak learning rate (linear warm-up, then linear decay to 0)
    lr: float = 2e-5
    # AdamW weight decay, not applied to biases and LayerNorm weights
    weight_decay: float = 0.01
    # share of the steps spent warming up
    warmup_fraction: float = 0.1
    # passes over the training rows (fractions allowed)
    epochs: float = 2.0
    # padded tokens per micro-batch, both choices counted (rows x 2 x longest choice): the memory knob
    batch_tokens: int = 8192
    # most rows in one micro-batch
    max_rows: int = 16
    # micro-batches per optimiser step
    grad_accum: int = 1
    # clip the gradient to this global norm
    max_grad_norm: float = 1.0

    # AWP step size, relative to each weight tensor's norm (0: AWP off)
    awp_lr: float = 0.0
    # AWP bound: every weight moves at most awp_eps x |weight|
    awp_eps: float = 0.01
    # epoch from which AWP runs (fractions allowed; 1.0: from the second epoch), once the model has learnt something
    awp_start_epoch: float = 1.0
    # perturbation steps per micro-batch; each costs one more forward and backward
    awp_steps: int = 1
    # weights whose parameter name contains this are perturbed ("weight": matrices, embeddings and LayerNorms)
    awp_params: str = "weight"

    # validate (and rewrite val_predictions.parquet) every this many steps; 0: only at the end
    eval_every: int = 0
    # padded tokens per validation batch (no gradients are kept, so larger than batch_tokens fits)
    eval_batch_tokens: int = 32768
    # wall-clock limit in minutes (0: none); training stops cleanly before the step that would pass it
    time_budget_minutes: float = 0.0
    # seed for the new head's initialisation, shuffling, A/B swaps and dropout
    seed: int = 42

    def __post_init__(self) -> None:
        self.model_path = Path(self.model_path)
        self.train_file = Path(self.train_file)
        self.out_dir = Path(self.out_dir)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected 'auto' or one of {sorted(DTYPES)}")
        if not 16 <= self.max_length <= MAX_ENCODER_LENGTH:
            raise ValueError(
                f"max_length={self.max_length} must be in [16, {MAX_ENCODER_LENGTH}]: mDeBERTa-v3 was pretrained "
                f"at {MAX_ENCODER_LENGTH} tokens per sequence"
            )
        if not 0 < self.prompt_fraction < 1:
            raise ValueError(f"prompt_fraction={self.prompt_fraction} must be in (0, 1)")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        for name in ("head_fraction", "swap_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.lr <= 0 or self.epochs <= 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError(
                f"need lr > 0, epochs > 0, weight_decay >= 0 and max_grad_norm > 0; got lr={self.lr}, "
                f"epochs={self.epochs}, weight_decay={self.weight_decay}, max_grad_norm={self.max_grad_norm}"
            )
        if self.grad_accum < 1 or self.max_rows < 1 or min(self.max_train_rows, self.eval_every, self.cpu_threads) < 0:
            raise ValueError(
                f"need grad_accum >= 1, max_rows >= 1 and max_train_rows, eval_every, cpu_threads >= 0; got "
                f"{self.grad_accum}, {self.max_rows}, {self.max_train_rows}, {self.eval_every}, {self.cpu_threads}"
            )
        for name in ("batch_tokens", "eval_batch_tokens"):
            if getattr(self, name) < 2 * self.max_length:
                raise ValueError(
                    f"{name}={getattr(self, name)} cannot hold one row at max_length={self.max_length}: "
                    f"a row is 2 choices x max_length = {2 * self.max_length} padded tokens; raise {name}"
                )
        if self.awp_lr < 0 or self.awp_eps <= 0 or self.awp_steps < 1 or self.awp_start_epoch < 0:
            raise ValueError(
                f"need awp_lr >= 0, awp_eps > 0, awp_steps >= 1 and awp_start_epoch >= 0; got awp_lr={self.awp_lr}, "
                f"awp_eps={self.awp_eps}, awp_steps={self.awp_steps}, awp_start_epoch={self.awp_start_epoch}"
            )
        if self.awp_lr > 0 and not self.awp_params:
            raise ValueError("awp_params is empty: name the weights to perturb (e.g. 'weight'), or set awp_lr = 0")

    @property
    def awp(self) -> bool:
        """Whether adversarial weight perturbation runs at all."""
        return self.awp_lr > 0


# --- inputs ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairTemplate:
    """The tokenizer's own text-pair layout cut at its two fields: ``before + first + between + second + after``."""

    before: tuple[int, ...]  # special-token ids before the first field ([CLS])
    between: tuple[int, ...]  # between the fields ([SEP])
    after: tuple[int, ...]  # after the second field ([SEP])
    # token type of each of the five parts, in order (before, first, between, second, after)
    types: tuple[int, int, int, int, int]

    @property
    def n_special(self) -> int:
        return len(self.before) + len(self.between) + len(self.after)

    @classmethod
    def of(cls, tokenizer) -> PairTemplate:
        """Encode a probe pair with special tokens and find the two fields' ids inside it."""
        first, second = (list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in _PROBE_FIELDS)
        enc = tokenizer(*_PROBE_FIELDS, add_special_tokens=True, return_token_type_ids=True)
        ids, types = list(enc["input_ids"]), list(enc["token_type_ids"])
        i = _find(ids, first, 0)
        j = _find(ids, second, i + len(first)) if i >= 0 else -1
        if j < 0:
            raise ValueError(
                f"{type(tokenizer).__name__} does not keep the fields' ids intact in a text pair "
                f"(pair {ids}, fields {first} and {second}); the multiple-choice stage needs an encoder's tokenizer"
            )
        k = j + len(second)
        # an empty part takes the type of the field before it (its type is never used)
        part_types = (
            types[0],
            types[i],
            types[i + len(first)] if j > i + len(first) else types[i],
            types[j],
            types[k] if k < len(ids) else types[j],
        )
        return cls(tuple(ids[:i]), tuple(ids[i + len(first) : j]), tuple(ids[k:]), part_types)

    def join(self, first: list[int], second: list[int]) -> np.ndarray:
        """The ids of one choice, int32 (half the memory of Python ints over 100M tokens)."""
        return np.array([*self.before, *first, *self.between, *second, *self.after], dtype=np.int32)

    def token_types(self, length: int, n_first: int) -> np.ndarray:
        """Token types of a joined choice of ``length`` ids whose first field kept ``n_first`` tokens."""
        parts = (len(self.before), n_first, len(self.between), length - self.n_special - n_first, len(self.after))
        return np.repeat(np.array(self.types, dtype=np.int64), parts)


def _find(haystack: list[int], needle: list[int], start: int) -> int:
    """Index of the first occurrence of ``needle`` in ``haystack`` at or after ``start``; -1 if none."""
    for i in range(start, len(haystack) - len(needle) + 1):
        if haystack[i : i + len(needle)] == needle:
            return i
    return -1


def allocate_pair(lengths: tuple[int, int], budget: int, prompt_fraction: float) -> tuple[int, int]:
    """Tokens kept of (prompt, response) within ``budget``: ``allocate``'s rule with the response as the only one.

    The prompt is capped at ``prompt_fraction`` of the budget, the response takes the rest, and a short field's
    unused share goes to the other (an empty second response leaves ``allocate``'s whole response share to it).
    """
    keep_p, keep_r, _ = allocate((lengths[0], lengths[1], 0), budget, prompt_fraction)
    return keep_p, keep_r


def cut(head: list[int], tail: list[int] | None, keep: int, head_fraction: float, snip: list[int]) -> list[int]:
    """``keep`` tokens of a field: all of it when it fits, else its head, ``snip`` and its tail.

    ``tail`` holds the ids of the text's last characters when the text was too long to tokenise whole (``head``
    then holds its first characters' ids); None means ``head`` is the whole field.
    """
    if tail is None and keep >= len(head):
        return head
    room = keep - len(snip)
    if room < 2:  # no room for both ends around the marker: keep the head
        return head[:keep]
    tail = head if tail is None else tail
    n_head = int(room * head_fraction)
    n_tail = room - n_head
    return head[:n_head] + snip + tail[max(0, len(tail) - n_tail) :]


@dataclass
class Choices:
    """Rows encoded as two choices each: ``ids[i] = (ids of (prompt, response_a), ids of (prompt, response_b))``."""

    ids: list[tuple[np.ndarray, np.ndarray]]
    first_lengths: np.ndarray  # (N, 2) prompt tokens kept in each choice: where its token types change
    labels: np.ndarray  # (N,) int64: index of the winning choice (0 = A); -1 when the rows carry no winner
    template: PairTemplate  # the layout the ids were joined in (token types are rebuilt from it per batch)

    @property
    def lengths(self) -> np.ndarray:
        """(N,) tokens of each row's longer choice: the width a row needs in a padded batch."""
        return np.fromiter((max(len(a), len(b)) for a, b in self.ids), dtype=np.int64, count=len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def types(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Token types of row ``i``'s two choices."""
        (a, b), (n_a, n_b) = self.ids[i], self.first_lengths[i]
        return self.template.token_types(len(a), n_a), self.template.token_types(len(b), n_b)


class ChoiceEncoder:
    """Rows of (prompt, response_a, response_b) → two token sequences per row, each at most ``max_length`` long."""

    def __init__(self, tokenizer, max_length: int, prompt_fraction: float, head_fraction: float):
        self.tokenizer = tokenizer
        self.template = PairTemplate.of(tokenizer)
        self.budget = max_length - self.template.n_special
        if self.budget < 8:
            raise ValueError(f"max_length={max_length} leaves {self.budget} tokens for the fields; raise max_length")
        self.prompt_fraction, self.head_fraction = prompt_fraction, head_fraction
        self.snip = list(tokenizer(SNIP_MARKER, add_special_tokens=False)["input_ids"])
        # text beyond this many characters can never be shown; cut before tokenising (30K-token prompts exist)
        self.char_limit = max_length * MAX_CHARS_PER_TOKEN

    def _field_ids(self, texts: list[str]) -> list[tuple[list[int], list[int] | None]]:
        """(head ids, tail ids or None) of each text; the tail only for texts longer than the character limit."""
        if not texts:  # the tokenizer's batch call fails on an empty list (no validation rows with val_fold=-1)
            return []
        limit = self.char_limit
        # verbose=False: fields longer than the model's 512 are expected here (they are cut below), not a misuse
        heads = self.tokenizer([t[:limit] for t in texts], add_special_tokens=False, verbose=False)["input_ids"]
        long_rows = [i for i, t in enumerate(texts) if len(t) > limit]
        tails: dict[int, list[int]] = {}
        if long_rows:
            long_texts = [texts[i][-limit:] for i in long_rows]
            tail_ids = self.tokenizer(long_texts, add_special_tokens=False, verbose=False)["input_ids"]
            tails = dict(zip(long_rows, tail_ids, strict=True))
        return [(list(h), tails.get(i)) for i, h in enumerate(heads)]

    def choice(self, prompt: tuple[list[int], list[int] | None], response: tuple[list[int], list[int] | None]):
        """Ids of one (prompt, response) pair, and how many prompt tokens they keep."""
        keep_p, keep_r = allocate_pair((len(prompt[0]), len(response[0])), self.budget, self.prompt_fraction)
        first = cut(*prompt, keep_p, self.head_fraction, self.snip)
        return self.template.join(first, cut(*response, keep_r, self.head_fraction, self.snip)), len(first)

    def encode(self, df: pd.DataFrame) -> Choices:
        """Both choices of every row, in row order; labels from ``winner`` where the frame has it."""
        prompts, as_, bs = (self._field_ids(df[c].tolist()) for c in schema.TEXT_COLUMNS)
        ids, first_lengths = [], np.zeros((len(df), 2), dtype=np.int64)
        for i, (p, a, b) in enumerate(zip(prompts, as_, bs, strict=True)):
            (ids_a, first_lengths[i, 0]), (ids_b, first_lengths[i, 1]) = self.choice(p, a), self.choice(p, b)
            ids.append((ids_a, ids_b))
        labels = schema.labels(df) if "winner" in df.columns else np.full(len(df), -1, dtype=np.int64)
        return Choices(ids, first_lengths, labels, self.template)


def collate(rows: list[tuple[Choices, int]], pad_id: int, with_types: bool) -> dict[str, torch.Tensor]:
    """Model inputs of rows given as (encoded rows, index): ``input_ids``, ``attention_mask`` and, ``with_types``,
    ``token_type_ids``, each (B, 2, T) with T the longest choice in the batch."""
    batch = pad([s for c, i in rows for s in c.ids[i]], pad_id)  # (2B, T): row 0's A, row 0's B, row 1's A, ...
    if with_types:
        batch["token_type_ids"] = pad([t for c, i in rows for t in c.types(i)], 0)["input_ids"]
    return {k: v.view(len(rows), 2, -1) for k, v in batch.items()}


# --- data ------------------------------------------------------------------------------------------------------------


def split(cfg: MultipleChoiceConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training rows and validation rows (fold ``val_fold``) of the prepared file, as the train stage splits them."""
    df = schema.load(cfg.train_file, "train")
    if cfg.val_fold < 0:
        train_df, val_df = df, df.iloc[:0]
    elif "fold" not in df.columns:
        raise schema.DataError(f"{cfg.train_file}: no 'fold' column; run the prepare stage or pass --val-fold -1")
    else:
        train_df, val_df = df[df["fold"] != cfg.val_fold], df[df["fold"] == cfg.val_fold]
        if val_df.empty:
            folds = sorted(df["fold"].unique().tolist())
            raise schema.DataError(f"{cfg.train_file}: no row has fold {cfg.val_fold}; its folds are {folds}")
    if cfg.max_train_rows:
        train_df = train_df.sample(n=min(cfg.max_train_rows, len(train_df)), random_state=cfg.seed)
    return train_df.reset_index(drop=True), val_df.reset_index(drop=True)


@dataclass
class TrainRows:
    """The training rows encoded once in each A/B orientation; every epoch shows each row in one of them."""

    plain: Choices  # response A as choice 0, as in the file
    swapped: Choices  # rows through ``schema.swap_ab``: response B as choice 0, labels flipped

    def __len__(self) -> int:
        return len(self.plain)

    def rows(self, idx: np.ndarray, swapped: np.ndarray) -> list[tuple[Choices, int]]:
        """Rows ``idx``, each in this epoch's orientation, as ``collate`` takes them."""
        return [(self.swapped if swapped[i] else self.plain, i) for i in idx]


# --- the run ---------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run, built by :func:`setup` and advanced by :func:`train_step`."""

    cfg: MultipleChoiceConfig
    tok: Any  # the transformers tokenizer: its pad id pads batches, and it is saved beside the model
    data: TrainRows
    val: Choices
    val_df: pd.DataFrame
    model: torch.nn.Module
    device: torch.device
    precision: Precision
    scaler: torch.amp.GradScaler  # loss scaling for fp16; a pass-through otherwise
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    awp: AWP | None
    steps_per_epoch: int
    total_steps: int
    awp_start_step: int  # first optimiser step (0-based) that runs AWP
    with_types: bool  # whether the tokenizer's inputs include token_type_ids
    step: int = 0
    history: list[dict] = field(default_factory=list)  # one row per step: what history.csv holds
    evals: list[dict] = field(default_factory=list)  # one entry per validation: step and metrics


def load_model(cfg: MultipleChoiceConfig, device: torch.device) -> torch.nn.Module:
    """``AutoModelForMultipleChoice`` in fp32 on ``device`` (autocast lowers the compute, not the weights)."""
    from transformers import AutoModelForMultipleChoice

    check_model_dir(cfg.model_path, "encoder")
    with LOAD_LOCK:
        model = AutoModelForMultipleChoice.from_pretrained(cfg.model_path, local_files_only=True, dtype=torch.float32)
    return model.to(device)


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices and embeddings, none on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: linear from 1/warmup to 1 over the warm-up, then linear to 0 at the last step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def encode_rows(enc: ChoiceEncoder, train_df: pd.DataFrame, val_df: pd.DataFrame) -> tuple[TrainRows, Choices]:
    return TrainRows(enc.encode(train_df), enc.encode(schema.swap_ab(train_df))), enc.encode(val_df)


def setup(cfg: MultipleChoiceConfig) -> Run:
    """Rows, model, optimiser, schedule and AWP of a run; prints the derived numbers once."""
    torch.manual_seed(cfg.seed)  # before the model loads: it draws the new head of a pretrained encoder
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.out_dir / "multiple_choice_config.json")
    tok = load_tokenizer(cfg.model_path)
    train_df, val_df = split(cfg)
    data, val = encode_rows(
        ChoiceEncoder(tok, cfg.max_length, cfg.prompt_fraction, cfg.head_fraction), train_df, val_df
    )
    per_epoch = steps_per_epoch(cfg, 2 * data.plain.lengths)  # before the model loads, so a bad config fails fast

    device = pick_device(cfg.device)
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    precision = Precision.choose(device, cfg.dtype, weights_in_dtype=False)  # fp32 weights
    model = load_model(cfg, device)
    # fused: one kernel for all tensors (4x faster than the per-tensor loop on the CPU, fastest on GPUs)
    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr, fused=True)
    total_steps = max(1, math.ceil(cfg.epochs * per_epoch))
    warmup_steps = max(1, int(cfg.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup_steps))
    awp = AWP(model, cfg.awp_lr, cfg.awp_eps, cfg.awp_steps, cfg.awp_params) if cfg.awp else None
    awp_start = int(cfg.awp_start_epoch * per_epoch)
    n_params = sum(p.numel() for p in model.parameters())
    awp_text = f"AWP from step {awp_start} on {len(awp.params)} tensors" if awp else "AWP off"
    print(
        f"train rows {len(data):,} · val rows {len(val):,} · tokens/epoch {2 * int(data.plain.lengths.sum()):,} · "
        f"steps {total_steps} ({per_epoch}/epoch, warm-up {warmup_steps}) · "
        f"≤{cfg.batch_tokens * cfg.grad_accum:,} padded tokens/step · {awp_text} · params {n_params:,} · "
        f"device {device} · {str(precision.dtype).removeprefix('torch.')}"
    )
    return Run(
        cfg=cfg,
        tok=tok,
        data=data,
        val=val,
        val_df=val_df,
        model=model,
        device=device,
        precision=precision,
        scaler=precision.scaler(device),
        optimizer=optimizer,
        scheduler=scheduler,
        awp=awp,
        steps_per_epoch=per_epoch,
        total_steps=total_steps,
        awp_start_step=awp_start,
        with_types="token_type_ids" in tok.model_input_names,
    )


def choice_logits(run: Run, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 2) float32 scores of the two choices of each row."""
    with run.precision.context(run.device):
        logits = run.model(**batch).logits  # (B, 2): one score per choice
    return logits.float()


def micro_batch(run: Run, idx: np.ndarray, swapped: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs (B, 2, T) and labels (B,) of training rows ``idx`` in this epoch's orientation, on the device."""
    rows = run.data.rows(idx, swapped)
    batch = collate(rows, run.tok.pad_token_id, run.with_types)
    labels = torch.tensor([c.labels[i] for c, i in rows], device=run.device)  # (B,): the swapped rows' flipped
    return {k: v.to(run.device) for k, v in batch.items()}, labels


def backward(run: Run, batch: dict[str, torch.Tensor], y: torch.Tensor, weight: float, adversarial: bool):
    """Accumulate ``weight`` x the micro-batch's loss gradient into ``.grad`` (at AWP-perturbed weights when
    ``adversarial``); returns (loss, adversarial loss or NaN) as floats."""
    scaler = run.scaler

    def loss_fn() -> torch.Tensor:
        return F.cross_entropy(choice_logits(run, batch), y)

    def scale(loss: torch.Tensor) -> torch.Tensor:
        return scaler.scale(loss * weight)

    if adversarial:
        return run.awp.backward(loss_fn, scale)
    loss = loss_fn()
    scale(loss).backward()
    return float(loss.detach()), float("nan")


def train_step(run: Run, epoch: int, micro_batches: list[np.ndarray], swapped: np.ndarray) -> dict:
    """One optimiser step over ``grad_accum`` micro-batches; its history row is appended to ``run.history``."""
    t0, scaler = time.monotonic(), run.scaler
    step_rows = sum(len(idx) for idx in micro_batches)
    adversarial = run.awp is not None and run.step >= run.awp_start_step
    loss_sum = adv_sum = 0.0
    for idx in micro_batches:
        batch, y = micro_batch(run, idx, swapped)
        # micro-batches weighted by rows: a step's loss is the mean over its rows
        loss, adv = backward(run, batch, y, len(idx) / step_rows, adversarial)
        loss_sum, adv_sum = loss_sum + loss * len(idx), adv_sum + adv * len(idx)
    scaler.unscale_(run.optimizer)  # clip the true gradient, not the scaled one
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.max_grad_norm)
    scaler.step(run.optimizer)  # skipped by the scaler when an fp16 gradient overflowed
    scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    row = {
        "step": run.step,
        "epoch": epoch,
        "loss": loss_sum / step_rows,
        "adv_loss": adv_sum / step_rows,
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": float(grad_norm),
        "rows": step_rows,
        "seconds": time.monotonic() - t0,
    }
    run.history.append(row)
    return row


@torch.no_grad()
def predict(run: Run, choices: Choices) -> np.ndarray:
    """(N, 2) probabilities P(A wins), P(B wins) of ``choices``' rows, in row order (batched by length)."""
    run.model.eval()
    probs = np.zeros((len(choices), 2), dtype=np.float32)
    batches = token_budget_batches(2 * choices.lengths, run.cfg.eval_batch_tokens, max_rows=4 * run.cfg.max_rows)
    for idx in tqdm(batches, desc="validate", unit="batch", leave=False):
        batch = collate([(choices, i) for i in idx], run.tok.pad_token_id, run.with_types)
        batch = {k: v.to(run.device) for k, v in batch.items()}
        probs[idx] = torch.softmax(choice_logits(run, batch), dim=-1).cpu().numpy()
    run.model.train()
    return probs


def validate(run: Run) -> dict:
    """Metrics on the held-out fold; its probabilities go to ``val_predictions.parquet`` (the train stage's columns)."""
    probs = predict(run, run.val)
    metrics = evaluate(probs, run.val.labels)
    df = run.val_df
    pd.DataFrame({"id": df["id"], "p_a": probs[:, 0], "p_b": probs[:, 1], "winner": df["winner"]}).to_parquet(
        run.cfg.out_dir / "val_predictions.parquet", index=False
    )
    run.evals.append({"step": run.step, **metrics})
    return metrics


def save_model(run: Run) -> Path:
    """``out_dir/model``: weights, tokenizer and this config, a folder ``from_pretrained`` loads on its own."""
    model_dir = run.cfg.out_dir / "model"
    run.model.save_pretrained(model_dir)
    run.tok.save_pretrained(model_dir)
    save_config(run.cfg, model_dir / "multiple_choice_config.json")
    return model_dir


def _loop(run: Run) -> bool:
    """Train until the last step or the time budget; returns whether the budget stopped it."""
    cfg = run.cfg
    deadline = Deadline(cfg.time_budget_minutes * 60)  # counts from here: encoding and loading are not in it
    step_seconds = 0.0
    bar = tqdm(total=run.total_steps, desc="train", unit="step")
    run.model.train()
    for epoch, swapped, micro_batches in itertools.islice(schedule(cfg, 2 * run.data.plain.lengths), run.total_steps):
        # start a step only if it should end in time: the last step's duration plus 50% estimates it
        if not deadline.allows(step_seconds * 1.5):
            bar.close()
            print(f"time budget of {cfg.time_budget_minutes} min reached at step {run.step}/{run.total_steps}")
            return True
        row = train_step(run, epoch, micro_batches, swapped)
        step_seconds = row["seconds"]
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", epoch=epoch)
        if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < run.total_steps and len(run.val):
            bar.write(f"step {run.step}: {validate(run)}")
    bar.close()
    return False


def train(cfg: MultipleChoiceConfig) -> dict:
    """The whole stage: train, save ``model/``, validate on the held-out fold; returns the metrics (metrics.json)."""
    t_start = time.monotonic()
    run = setup(cfg)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    stopped_by_budget = _loop(run)
    model_dir = save_model(run)  # before validation: a run killed while validating still leaves the model
    metrics: dict[str, Any] = {
        "steps": run.step,
        "total_steps": run.total_steps,
        "stopped_by_budget": stopped_by_budget,
        "train_rows": len(run.data),
        "seconds": round(time.monotonic() - t_start, 1),
        "model_dir": str(model_dir),
    }
    if run.device.type == "cuda":
        metrics["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2)
    if len(run.val):
        metrics["val"] = validate(run)
        metrics["evals"] = run.evals
    (cfg.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    pd.DataFrame(run.history).to_csv(cfg.out_dir / "history.csv", index=False)
    return metrics


def main(argv: list[str] | None = None) -> None:
    print(json.dumps(train(parse_config(MultipleChoiceConfig, argv)), indent=2))


if __name__ == "__main__":
    main()
