"""The train stage's settings: one typed config made of sections, every field a ``--flag`` of
``python -m kaggle_utils.train``. The sections from other layers: :class:`~kaggle_utils.models.loading.ModelConfig`,
:class:`~kaggle_utils.inputs.formatter.InputConfig`, :class:`~kaggle_utils.data.mixing.MixConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from kaggle_utils.config.sections import Sectioned
from kaggle_utils.data.mixing import MixConfig
from kaggle_utils.evaluation.metrics import SELECTABLE
from kaggle_utils.inputs.formatter import InputConfig
from kaggle_utils.models.loading import LoraSettings, ModelConfig
from kaggle_utils.models.losses import LOSSES
from kaggle_utils.training.schedule import BatchSettings


@dataclass
class TrainDataConfig:
    """Which rows train, which are held out, and where the run writes."""

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
    # train on the extra_files alone (e.g. pseudo-labels before competition rows): train_file's rows then serve
    # only as the validation fold val_fold
    extras_only: bool = False
    # use at most this many training rows (0: all), for quick runs
    max_train_rows: int = 0

    def __post_init__(self) -> None:
        self.train_file = Path(self.train_file)
        self.out_dir = Path(self.out_dir)
        if self.extras_only and not self.extra_files:
            raise ValueError("extras_only=True trains on the extra_files alone, but extra_files is empty")


@dataclass
class ObjectiveConfig:
    """The loss: human labels, the teacher's logits (distillation), or both; and the weight of each row."""

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

    def __post_init__(self) -> None:
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


@dataclass
class LoraConfig:
    """The LoRA trained on every linear layer of the base: fresh, or continued from an earlier run's adapter."""

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

    def __post_init__(self) -> None:
        self.init_adapter = Path(self.init_adapter) if self.init_adapter else None
        if self.init_head and self.init_adapter is None:
            raise ValueError("init_head=True keeps the head of init_adapter, but no init_adapter is given")

    @property
    def settings(self) -> LoraSettings:
        """What the model loader takes."""
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, self.init_adapter, self.init_head)


@dataclass
class OptimConfig:
    """Steps: learning rate, passes, micro-batches by token budget, accumulation, A/B swaps, memory savers."""

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
    # with gradient_checkpointing: recompute one decoder layer in every this many (1: every layer; 4: layers 0, 4,
    # 8, ...), the others keep their activations: less recomputation than all, more tokens per micro-batch than none
    recompute_every: int = 1
    # liger-kernel's fused RMSNorm, gated-MLP activation and RoPE on a CUDA device (kaggle_utils.models.fused; LoRA
    # is kept); needs `pip install liger-kernel`; off CUDA a printed no-op. Qwen2.5-14B nf4 on an H200 at 4,096 padded
    # tokens: 1.10x the tokens/s and 10 GiB less peak memory (benchmarks/RESULTS.md, 2026-12-03)
    fused_kernels: bool = False
    # torch.compile each decoder layer on a CUDA device (dynamic shapes); off CUDA a no-op. Runs on nf4 + LoRA, but
    # the first step compiles (107 s for Qwen2.5-14B on an H200); its steady speed is not measured yet
    compile_layers: bool = False
    # 4-bit base: keep the embeddings and norms in fp32, as peft's prepare_model_for_kbit_training upcasts them, so
    # the residual stream runs in fp32 under autocast. false: they stay in the compute dtype they were loaded in
    # (bf16, or fp16 below sm_80, as inference runs them) and the trained head alone is fp32: less memory and memory
    # traffic per token (kaggle_utils.models.loading). Qwen2.5-14B nf4 at 10K packed tokens on an H200: 82 vs 133 GiB
    # and 1.53x the tokens/s (benchmarks/RESULTS.md, 2026-12-03 night); fp16 training (T4) without it is not measured
    fp32_residual: bool = True
    # the LoRA update added in the base GEMM's epilogue (addmm) instead of peft's copy / scale / add passes
    # (kaggle_utils.models.fused_lora); any device, any dropout. Profiled on Qwen2.5-14B nf4 at 10K packed tokens on
    # an H200: 2.4% less GPU time a step (benchmarks/RESULTS.md, 2026-12-03 night)
    fused_lora: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.swap_fraction <= 1:
            raise ValueError(f"swap_fraction={self.swap_fraction} must be in [0, 1]")
        if self.epochs <= 0 or self.lr <= 0 or self.batch_tokens < 0:
            raise ValueError(
                f"need epochs > 0, lr > 0 and batch_tokens >= max_length (or 0: measured from free GPU memory); got "
                f"epochs={self.epochs}, lr={self.lr}, batch_tokens={self.batch_tokens}"
            )
        if self.recompute_every < 1 or (self.recompute_every > 1 and not self.gradient_checkpointing):
            raise ValueError(
                f"recompute_every={self.recompute_every}: must be >= 1, and above 1 only with gradient_checkpointing = "
                f"true (now {self.gradient_checkpointing})"
            )
        if self.packing and not self.batch_tokens:
            # the probe measures padded micro-batches; a pack's memory at the same tokens is not measured
            raise ValueError(
                "batch_tokens=0 (measured from free GPU memory) is not available with packing=True: give batch_tokens "
                "(e.g. the budget a run with packing=False measured, printed and saved in its train_config.json)"
            )


@dataclass
class ScheduleConfig:
    """When the run stops, saves and evaluates, and what evaluation measures."""

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
    # seed for shuffling, A/B swaps and LoRA initialisation
    seed: int = 42

    def __post_init__(self) -> None:
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


@dataclass
class TrainConfig(Sectioned):
    """LoRA training of one model; every field is also a ``--flag`` of ``python -m kaggle_utils.train``.

    Made of sections (``cfg.optim.lr``), each a ``[section]`` of the recipes and a group of ``--help``; flat names
    (``TrainConfig.flat(lr=1e-4)``, ``cfg.replace(lr=...)``, ``--lr``) build it (:mod:`kaggle_utils.config.sections`).
    """

    # the stage its recipes name (``stage = "train"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "train"

    # which weights to load and how
    model: ModelConfig = field(default_factory=ModelConfig)
    # how a row becomes token ids (saved in train_config.json: inference makes the same rows)
    inputs: InputConfig = field(default_factory=InputConfig)
    # the training file, the teachers' and extra files, the held-out fold, the output folder
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    # which extra rows are kept
    mix: MixConfig = field(default_factory=MixConfig)
    # the loss and the row weights
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    # the LoRA
    lora: LoraConfig = field(default_factory=LoraConfig)
    # the optimiser and the micro-batches
    optim: OptimConfig = field(default_factory=OptimConfig)
    # budget, checkpoints and evaluation
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        # the one check that spans sections: a micro-batch must hold the longest row
        if 0 < self.optim.batch_tokens < self.inputs.max_length:
            raise ValueError(
                f"need batch_tokens >= max_length (or 0: measured from free GPU memory); got "
                f"batch_tokens={self.optim.batch_tokens}, max_length={self.inputs.max_length}"
            )

    @property
    def batching(self) -> BatchSettings:
        """What the schedule reads (:class:`~kaggle_utils.training.schedule.Batching`), from the optim, schedule and
        data sections."""
        o = self.optim
        return BatchSettings(
            self.data.train_file,
            self.schedule.seed,
            o.swap_fraction,
            o.batch_tokens,
            o.max_rows,
            o.grad_accum,
            o.packing,
        )
