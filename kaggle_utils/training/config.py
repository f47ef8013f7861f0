"""The train stage's settings: one typed config, every field a ``--flag`` of ``python -m kaggle_utils.train``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from kaggle_utils.data.mixing import MixConfig
from kaggle_utils.evaluation.metrics import SELECTABLE
from kaggle_utils.inputs.formatter import InputConfig
from kaggle_utils.models.loading import ModelConfig
from kaggle_utils.models.losses import LOSSES


@dataclass
class TrainConfig(ModelConfig, InputConfig, MixConfig):
    """LoRA training of one model; every field is also a ``--flag`` of ``python -m kaggle_utils.train``."""

    # the stage its recipes name (``stage = "train"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "train"
    # its recipes' [sections] and the groups of --help: section -> the fields written under it
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "model": (
            "model_path",
            "load_in_4bit",
            "device",
            "attn_implementation",
            "dtype",
            "split_reserve_gib",
            "init_adapter",
            "init_head",
            "fused_kernels",
            "compile_layers",
        ),
        "inputs": (
            "max_length",
            "prompt_fraction",
            "template",
            "truncation",
            "head_fraction",
            "split_special_tokens",
            "num_proc",
            "fast_bpe",
            "cache_dir",
        ),
        "data": ("train_file", "teacher_files", "extra_files", "out_dir", "val_fold", "extras_only", "max_train_rows"),
        "mix": ("mix_min_confidence", "mix_agree_with_human", "mix_source_caps"),
        "loss": ("loss", "kl_weight", "temperature", "cos_weight", "source_weights"),
        "lora": ("lora_r", "lora_alpha", "lora_dropout"),
        "optim": (
            "lr",
            "warmup_fraction",
            "epochs",
            "batch_tokens",
            "max_rows",
            "packing",
            "grad_accum",
            "swap_fraction",
            "gradient_checkpointing",
        ),
        "schedule": (
            "time_budget_minutes",
            "save_every",
            "eval_every_steps",
            "best_metric",
            "eval_languages",
            "eval_batch_tokens",
            "eval_max_rows",
            "max_val_rows",
            "seed",
        ),
    }

    # prepared training file with a ``fold`` column (stage 1 output); may carry teacher ``p_a``/``p_b``
    train_file: Path = Path("demo/work/prepared/train.parquet")
    # extra pseudo-labelled files (stage 2 output: ``logit_a``/``logit_b`` and/or ``p_a``/``p_b``), added to the
    # training rows; files labelling the same ids (one per teacher) are merged, their logits averaged
    extra_files: list[str] = field(default_factory=list)
    # teacher logits of train_file's own rows (the out-of-fold labels: output/pseudo/train-oof.parquet), joined onto
    # them by id (several files: averaged in logit space); rows they do not cover keep their human label alone
    teacher_files: list[str] = field(default_factory=list)
    # folder that receives adapter/, metrics.json, history.csv, evals.csv, val_predictions.parquet and the config
    out_dir: Path = Path("demo/work/model")
    # rows of this fold are held out for validation; -1 trains on every row
    val_fold: int = 0
    # "ce" (human labels only), "kl" (distillation only) or "mixed" (both, weighted by kl_weight)
    loss: str = "ce"
    # weight of the distillation term in the "mixed" loss; cross-entropy gets 1 - kl_weight
    kl_weight: float = 0.5
    # temperature T of the distillation term: teacher and student logits are both divided by it (x T^2)
    temperature: float = 1.0
    # weight of an extra 1 - cosine(student, teacher) term on the softened distributions (0: off)
    cos_weight: float = 0.0
    # row weight per value of the rows' ``source`` column (unlisted sources weigh 1); a ``weight`` column wins
    source_weights: dict[str, float] = field(default_factory=dict)
    # LoRA rank
    lora_r: int = 16
    # LoRA scale numerator: updates are scaled by lora_alpha / lora_r
    lora_alpha: int = 32
    # dropout on the LoRA branch
    lora_dropout: float = 0.05
    # adapter folder of an earlier run (its ``out_dir/adapter``) to continue from: its LoRA weights (lora_r and
    # lora_alpha must be its own) instead of a fresh LoRA; empty: a fresh LoRA
    init_adapter: Path | None = None
    # with init_adapter: keep that adapter's trained head; false: the head a run without init_adapter starts from
    init_head: bool = False
    # train on the extra_files alone (e.g. pseudo-labels before competition rows): train_file's rows then serve
    # only as the validation fold val_fold
    extras_only: bool = False
    # peak learning rate (linear warm-up, then cosine decay to 10%)
    lr: float = 1e-4
    # share of the steps spent warming up
    warmup_fraction: float = 0.05
    # passes over the training rows (fractions allowed)
    epochs: float = 1.0
    # padded tokens per micro-batch (rows x longest row): the memory knob. 0: measured once the model is loaded, by
    # forwards and backwards of the longest training rows (the smallest budget of a launch's processes; 8192 on the
    # CPU; not with packing or FSDP); a resumed run keeps its first budget. The resolved number is saved in the configs
    batch_tokens: int = 8192
    # most rows in one micro-batch
    max_rows: int = 16
    # pack a micro-batch's rows end to end into one sequence of at most batch_tokens real tokens (no padding;
    # attention stays inside each row): kaggle_utils.models.packing. Needs sdpa or eager attention
    packing: bool = False
    # micro-batches per optimiser step
    grad_accum: int = 1
    # share of rows shown A/B-swapped each epoch (labels swap with them)
    swap_fraction: float = 0.5
    # recompute activations in backward to fit long rows in memory (slower)
    gradient_checkpointing: bool = False
    # liger-kernel's fused RMSNorm, gated-MLP activation and RoPE on a CUDA device (kaggle_utils.models.fused; LoRA
    # is kept); needs `pip install liger-kernel`; off CUDA a printed no-op. Qwen2.5-14B nf4 on an H200 at 4,096 padded
    # tokens: 1.10x the tokens/s and 10 GiB less peak memory (benchmarks/RESULTS.md, 2026-12-03)
    fused_kernels: bool = False
    # torch.compile each decoder layer on a CUDA device (dynamic shapes); off CUDA a no-op. Runs on nf4 + LoRA, but
    # the first step compiles (107 s for Qwen2.5-14B on an H200); its steady speed is not measured yet
    compile_layers: bool = False
    # wall-clock limit in minutes (0: none); training stops cleanly before the step that would pass it
    time_budget_minutes: float = 0.0
    # save a resumable checkpoint every this many steps (0: only at the end)
    save_every: int = 200
    # evaluate on the held-out fold every this many steps (0: only at the end); the end is always evaluated
    eval_every_steps: int = 0
    # the evaluation metric that picks the adapter kept: "log_loss", "accuracy" or "swap_consistency"
    best_metric: str = "log_loss"
    # languages listed on their own in the per-language table; the others are pooled as "other"
    eval_languages: int = 8
    # padded tokens per evaluation batch (no gradients are kept, so more than a training micro-batch fits; the batch
    # engine splits a batch that runs out of memory). 0: 4 x batch_tokens
    eval_batch_tokens: int = 0
    # most rows in one evaluation batch
    eval_max_rows: int = 64
    # evaluate on at most this many held-out rows (a subset stratified by language and winner; 0: all). Under a
    # time budget the rows are also cut so that one evaluation is priced at most a fifth of it (said in the log)
    max_val_rows: int = 0
    # use at most this many training rows (0: all), for quick runs
    max_train_rows: int = 0
    # seed for shuffling, A/B swaps and LoRA initialisation
    seed: int = 42

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        InputConfig.__post_init__(self)
        MixConfig.__post_init__(self)
        self.train_file = Path(self.train_file)
        self.out_dir = Path(self.out_dir)
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}; expected one of {LOSSES}")
        if not 0 <= self.kl_weight <= 1 or self.cos_weight < 0 or self.temperature <= 0:
            raise ValueError(
                f"need 0 <= kl_weight <= 1, cos_weight >= 0 and temperature > 0; got kl_weight={self.kl_weight}, "
                f"cos_weight={self.cos_weight}, temperature={self.temperature}"
            )
        bad = {k: v for k, v in self.source_weights.items() if not (isinstance(v, (int, float)) and v >= 0)}
        if bad:
            raise ValueError(f"source_weights {bad}: weights must be numbers >= 0")
        if not 0 <= self.swap_fraction <= 1:
            raise ValueError(f"swap_fraction={self.swap_fraction} must be in [0, 1]")
        if self.epochs <= 0 or self.lr <= 0 or self.batch_tokens < 0 or 0 < self.batch_tokens < self.max_length:
            raise ValueError(
                f"need epochs > 0, lr > 0 and batch_tokens >= max_length (or 0: measured from free GPU memory); got "
                f"epochs={self.epochs}, lr={self.lr}, batch_tokens={self.batch_tokens}, max_length={self.max_length}"
            )
        if self.packing and not self.batch_tokens:
            # the probe measures padded micro-batches; a pack's memory at the same tokens is not measured
            raise ValueError(
                "batch_tokens=0 (measured from free GPU memory) is not available with packing=True: give batch_tokens "
                "(e.g. the budget a run with packing=False measured, printed and saved in its train_config.json)"
            )
        if self.best_metric not in SELECTABLE:
            raise ValueError(f"best_metric={self.best_metric!r}; expected one of {sorted(SELECTABLE)}")
        if min(self.eval_batch_tokens, self.max_val_rows) < 0 or self.eval_max_rows < 1:
            raise ValueError(
                f"need eval_batch_tokens >= 0, max_val_rows >= 0 and eval_max_rows >= 1; got {self.eval_batch_tokens}, "
                f"{self.max_val_rows}, {self.eval_max_rows}"
            )
        if self.eval_every_steps < 0 or self.eval_languages < 0:
            raise ValueError(
                f"eval_every_steps={self.eval_every_steps} and eval_languages={self.eval_languages} must be >= 0"
            )
        self.init_adapter = Path(self.init_adapter) if self.init_adapter else None
        if self.init_head and self.init_adapter is None:
            raise ValueError("init_head=True keeps the head of init_adapter, but no init_adapter is given")
        if self.extras_only and not self.extra_files:
            raise ValueError("extras_only=True trains on the extra_files alone, but extra_files is empty")
