"""Stage 2, pseudo-labelling: a trained teacher scores a pool and writes soft labels as logits, with provenance.

The output is the input rows plus (the contract with the train stage, which distils from the logits when present):

* ``logit_a``, ``logit_b``: the teacher's raw classifier logits (float32) in the row's own A/B order. With ``tta``
  every row is also scored A/B-swapped; the swapped view's logits are mapped back (its logit for "A" is about the
  original B) and averaged with the direct view's, which removes the teacher's position bias;
* ``p_a``, ``p_b``: the softmax of those logits at temperature 1;
* ``teacher``: a readable name (model folder + adapter), ``label_key``: a hash of everything that decides the logits
  (model files, adapter content, template, max length, dtype, tta); equal keys mean interchangeable labels.

The pool is scored in parts of ``chunk_rows`` rows. A part file is named by a key of the settings and of the
part's rows (ids and texts), so a changed teacher, adapter, input, template, max length or chunk size never
reuses old parts: those are counted, reported and left on disk. A kill loses at most the part being scored; the
rerun gives the same output as an uninterrupted run.

Every GPU: started by ``accelerate launch`` or ``torchrun``, each process (rank r of w) scores the parts with index
r mod w on its own GPU (``cuda:LOCAL_RANK``) and rank 0 assembles the output once every part file exists
(:mod:`kaggle_utils.scoring.shards`). Out of fold: with ``oof_adapters`` (k teachers, each trained with one fold held
out) every labelled row is scored only by the teacher that did not train on it. Several teachers' files are
averaged by :func:`merge_teachers`.

``python -m kaggle_utils.pseudo_label --recipe pseudo-label``  (one GPU)
``accelerate launch --num_processes 8 -m kaggle_utils.pseudo_label --recipe pseudo-label``  (8 GPUs, 8x rows/s)
``python -m kaggle_utils.pseudo_label merge --out-file pool-2t.parquet pool.parquet pool-llama.parquet``

Engines: ``engine = "transformers"`` (the default and the reference: the base + LoRA adapter as trained) or ``"vllm"``
(:mod:`kaggle_utils.scoring.vllm_engine`, optional: a merged sequence classifier, or a causal LM scored by the
log-probs of its answer tokens; one process, ``tensor_parallel_size`` GPUs). Both give logits per row and share the
A/B averaging and the parts; the engine is part of the label key, so switching engines never reuses parts.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from kaggle_utils.config.cli import parse_config, save_config
from kaggle_utils.config.sections import Sectioned
from kaggle_utils.data import schema
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.loading import (
    TOKENIZER_FILES,
    ModelConfig,
    check_adapter_dir,
    compute_dtype,
    load_classifier,
    load_tokenizer,
    pick_device,
)
from kaggle_utils.scoring.pool import pass_key
from kaggle_utils.scoring.predict import predict_logits
from kaggle_utils.scoring.shards import PartStore, Shard
from kaggle_utils.scoring.vllm_engine import (
    ANSWER_LOGPROBS,
    ENGINES,
    NonFiniteLogits,
    VllmTeacher,
    answer_token_ids,
    import_vllm,
    teacher_mode,
)
from kaggle_utils.store import rows_fingerprint

LOGITS = ["logit_a", "logit_b"]
# bump when the meaning of the stored logits changes: every earlier part becomes stale
LABELS_VERSION = "labels-v1"
# a teacher on some engine: token-id rows -> logits (N, 2) float32 in row order
Scorer = Callable[[list[list[int]]], np.ndarray]


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: its base weights, loaded as for training, and its LoRA adapter(s)."""

    # the teacher's LoRA adapter (train stage output ``adapter/``); empty: the base model as is
    adapter_dir: Path | None = Path("demo/work/teacher/adapter")
    # out-of-fold labels: adapter folders of k teachers, each trained with one fold held out (its train_config.json
    # says which, ``val_fold``); a row is scored only by the teacher that did not see its fold, so the input needs a
    # ``fold`` column (the prepare stage's train file). adapter_dir is then unused. Empty: adapter_dir scores every row
    oof_adapters: list[str] = field(default_factory=list)
    # name written in the ``teacher`` column; empty: "<model folder>+<adapter>" (the adapter's training folder)
    teacher_name: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.adapter_dir = Path(self.adapter_dir) if self.adapter_dir else None


@dataclass
class LabelFilesConfig:
    """The pool read and the labelled file written."""

    # rows in competition format (no winner needed)
    input_file: Path = Path("demo/work/prepared/unlabeled.parquet")
    # output: the input rows plus p_a, p_b, logit_a, logit_b, teacher, label_key
    out_file: Path = Path("demo/work/pseudo.parquet")

    def __post_init__(self) -> None:
        self.input_file = Path(self.input_file)
        self.out_file = Path(self.out_file)


@dataclass
class LabelRunConfig:
    """How the rows are scored: both A/B orders, parts, batches, and the wait for the other processes."""

    # also score every row A/B-swapped and average the two views' logits
    tta: bool = True
    # rows per resumable part (a kill loses at most one part per process)
    chunk_rows: int = 2048
    # padded tokens per batch (rows x longest row)
    batch_tokens: int = 16384
    # most rows in one batch
    max_rows: int = 64
    # several processes: minutes rank 0 waits for the other ranks' parts after its own (a rerun resumes after it)
    wait_minutes: float = 240.0

    def __post_init__(self) -> None:
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows={self.chunk_rows} must be positive")
        if self.wait_minutes < 0:
            raise ValueError(f"wait_minutes={self.wait_minutes} must be >= 0")


@dataclass
class BackendConfig:
    """The engine that scores: transformers (the reference) or vLLM, and vLLM's settings."""

    # "transformers" (the reference: base + adapter as trained) or "vllm" (optional, not installed by the package:
    # a merged *ForSequenceClassification folder, or a *ForCausalLM answering answer_tokens; adapter_dir empty)
    engine: str = "transformers"
    # vllm: GPUs one model is split over (tensor parallel), in one process (no accelerate/torchrun)
    tensor_parallel_size: int = 1
    # vllm: share of each GPU's memory for weights, activations and KV cache (vLLM on a CPU: of the machine's memory)
    gpu_memory_utilization: float = 0.9
    # vllm with a causal-LM teacher: the answer strings for "A" and "B", one token each, the token after the prompt
    answer_tokens: list[str] = field(default_factory=lambda: ["A", "B"])

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}; expected one of {ENGINES}")
        if self.tensor_parallel_size < 1 or not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"need tensor_parallel_size >= 1 and 0 < gpu_memory_utilization <= 1; got "
                f"{self.tensor_parallel_size}, {self.gpu_memory_utilization}"
            )


@dataclass
class PseudoLabelConfig(Sectioned):
    """Score a pool with a teacher; every field is also a ``--flag``. Made of sections (``cfg.model.adapter_dir``),
    each a ``[section]`` of the recipes; flat names (flags, ``cfg.replace``) build it
    (:mod:`kaggle_utils.config.sections`)."""

    # the stage its recipes name (``stage = "pseudo_label"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "pseudo_label"

    # the teacher: base weights and adapter(s)
    model: TeacherConfig = field(default_factory=TeacherConfig)
    # how a row becomes token ids
    inputs: InputConfig = field(default_factory=InputConfig)
    # the pool and the output file
    data: LabelFilesConfig = field(default_factory=LabelFilesConfig)
    # parts, batches, A/B views
    run: LabelRunConfig = field(default_factory=LabelRunConfig)
    # the scoring engine
    backend: BackendConfig = field(default_factory=BackendConfig)

    def __post_init__(self) -> None:
        if self.backend.engine == "vllm" and (self.model.adapter_dir or self.model.oof_adapters):
            raise ValueError(
                "engine='vllm' serves no LoRA adapter (it was trained on a 4-bit nf4 base, and vLLM has no 4-bit "
                "bitsandbytes base to attach it to): merge it into the dequantised base first, "
                "`python -m kaggle_utils.models.merge --base-model BASE --adapter ADAPTER --out-dir MERGED`, then pass "
                "--model-path MERGED --adapter-dir '' (out of fold: one run per merged fold teacher, then merge)"
            )

    @property
    def parts_dir(self) -> Path:
        return self.data.out_file.with_name(self.data.out_file.stem + ".parts")


@dataclass(frozen=True)
class Teacher:
    """A model + adapter that labels some rows."""

    # the LoRA adapter folder; None: the base model
    adapter: Path | None
    # the ``teacher`` column
    name: str
    # the ``label_key`` column: hash of everything that decides its logits
    key: str
    # the fold it held out in training (out of fold: the only rows it scores); None: it scores every row
    fold: int | None = None


@dataclass(frozen=True)
class Part:
    """Rows scored and written together: positions in the pool (all of one teacher)."""

    teacher: Teacher
    rows: np.ndarray


# ---------------------------------------------------------------------------------------------------- provenance


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(model_path: Path) -> tuple:
    """The base model's identity without reading its weights (140 GB for a 72B): folder name, config, tokenizer
    files and the weight files' names and sizes; the folder's location does not count (Kaggle mounts it elsewhere)."""
    folder = Path(model_path)
    small = ["config.json", *TOKENIZER_FILES]
    files = {name: _file_digest(folder / name) for name in small if (folder / name).is_file()}
    weights = sorted((p.name, p.stat().st_size) for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))
    return folder.name, files, weights


def adapter_fingerprint(adapter: Path | None) -> tuple:
    """The adapter's content: its config and weight files, hashed whole (a LoRA of a 72B is well under 1 GB)."""
    if adapter is None:
        return ("no adapter",)
    check_adapter_dir(adapter)
    files = [adapter / "adapter_config.json", *sorted(adapter.glob("adapter_model.*"))]
    return tuple((p.name, _file_digest(p)) for p in files)


def label_key(cfg: PseudoLabelConfig, adapter: Path | None) -> str:
    """Hash of what decides a teacher's logits. Batch size and device are left out: they change only round-off,
    and lowering ``batch_tokens`` after an out-of-memory stop must not discard the finished parts (nor, with vLLM,
    lowering ``gpu_memory_utilization`` or changing ``tensor_parallel_size``). The engine is in: a key of the
    default engine is the key it had before engines existed, so no transformers part went stale with them."""
    inputs = (
        cfg.inputs.template,
        cfg.inputs.truncation,
        cfg.inputs.max_length,
        cfg.inputs.prompt_fraction,
        cfg.inputs.head_fraction,
    )
    dtype = str(compute_dtype(pick_device(cfg.model.device), cfg.model.dtype))
    engine = () if cfg.backend.engine == "transformers" else (engine_settings(cfg),)
    return pass_key(
        LABELS_VERSION,
        model_fingerprint(cfg.model.model_path),
        adapter_fingerprint(adapter),
        (cfg.model.load_in_4bit, cfg.model.attn_implementation, dtype),
        (*inputs, cfg.inputs.split_special_tokens),
        cfg.run.tta,
        *engine,
    )


def engine_settings(cfg: PseudoLabelConfig) -> tuple:
    """What an engine other than transformers adds to the label key: its name, its mode, the answer tokens read."""
    mode = teacher_mode(cfg.model.model_path)
    return (cfg.backend.engine, mode, tuple(cfg.backend.answer_tokens) if mode == ANSWER_LOGPROBS else ())


def teacher_name(model: TeacherConfig, adapter: Path | None) -> str:
    """``<model folder>+<adapter>``; the train stage's ``out/adapter`` is named by its ``out`` folder."""
    base = model.teacher_name or Path(model.model_path).name
    if adapter is None or (model.teacher_name and not model.oof_adapters):
        return base
    return f"{base}+{adapter.parent.name if adapter.name == 'adapter' else adapter.name}"


def held_out_fold(adapter: Path) -> int:
    """The fold an adapter did not train on: ``val_fold`` of its train_config.json (adapter folder, else its parent)."""
    for path in (adapter / "train_config.json", adapter.parent / "train_config.json"):
        if path.is_file():
            fold = json.loads(path.read_text()).get("val_fold")
            if not isinstance(fold, int) or fold < 0:
                raise ValueError(
                    f"{path}: val_fold={fold!r}: this teacher trained on every fold, so it has no out-of-fold rows; "
                    "list only adapters trained with --val-fold k in oof_adapters"
                )
            return fold
    raise FileNotFoundError(
        f"{adapter}: no train_config.json here or in {adapter.parent}; out-of-fold scoring reads val_fold from it "
        "(the train stage writes it into adapter/)"
    )


def resolve_teachers(cfg: PseudoLabelConfig, pool: pd.DataFrame) -> list[Teacher]:
    """The teacher(s) of this run: ``adapter_dir`` for every row, or one per held-out fold (out of fold)."""
    if not cfg.model.oof_adapters:
        return [
            Teacher(
                cfg.model.adapter_dir,
                teacher_name(cfg.model, cfg.model.adapter_dir),
                label_key(cfg, cfg.model.adapter_dir),
            )
        ]
    if "fold" not in pool.columns:
        raise schema.DataError(
            f"{cfg.data.input_file}: no 'fold' column; out-of-fold scoring needs the prepare stage's train file "
            "(output/prepared/train.parquet), or leave oof_adapters empty"
        )
    teachers, by_fold = [], {}
    for adapter in map(Path, cfg.model.oof_adapters):
        fold = held_out_fold(adapter)
        if fold in by_fold:
            raise ValueError(f"oof_adapters: {adapter} and {by_fold[fold]} both held out fold {fold}; keep one")
        by_fold[fold] = adapter
        teachers.append(Teacher(adapter, teacher_name(cfg.model, adapter), label_key(cfg, adapter), fold))
    orphans = sorted(set(pool["fold"].unique()) - set(by_fold))
    if orphans:
        raise ValueError(
            f"{cfg.data.input_file}: column 'fold' has fold(s) {orphans} that no adapter of oof_adapters held out "
            f"(they held out {sorted(by_fold)}); add their teachers, or drop those rows"
        )
    return sorted(teachers, key=lambda t: t.fold)


# ---------------------------------------------------------------------------------------------------- parts


def plan_parts(pool: pd.DataFrame, teachers: Sequence[Teacher], chunk_rows: int) -> list[Part]:
    """Each teacher's rows (all, or its held-out fold) in input order, cut into parts of ``chunk_rows``."""
    parts = []
    for t in teachers:
        rows = np.arange(len(pool)) if t.fold is None else np.flatnonzero(pool["fold"].to_numpy() == t.fold)
        parts += [Part(t, rows[s : s + chunk_rows]) for s in range(0, len(rows), chunk_rows)]
    return parts


def part_key(pool: pd.DataFrame, part: Part, chunk_rows: int) -> str:
    """Settings (the teacher's label key, the chunk size) and the part's rows: ids and texts."""
    rows = rows_fingerprint(pool.iloc[part.rows], ("id", *schema.TEXT_COLUMNS))
    return pass_key(part.teacher.key, chunk_rows, rows)


def load_scorer(cfg: PseudoLabelConfig, tok, teacher: Teacher) -> Scorer:
    """The teacher on ``cfg.engine``, as a function token-id rows -> logits (N, 2) float32 in row order."""
    if cfg.backend.engine == "vllm":
        mode = teacher_mode(cfg.model.model_path)
        return VllmTeacher.load(
            cfg.model.model_path,
            dtype=compute_dtype(pick_device(cfg.model.device), cfg.model.dtype),
            max_model_len=cfg.inputs.max_length,
            tensor_parallel_size=cfg.backend.tensor_parallel_size,
            gpu_memory_utilization=cfg.backend.gpu_memory_utilization,
            answer_ids=answer_token_ids(tok, cfg.backend.answer_tokens) if mode == ANSWER_LOGPROBS else None,
        )
    model = load_classifier(cfg.model, tok.pad_token_id, adapter=teacher.adapter)
    return lambda rows: predict_logits(model, rows, tok.pad_token_id, cfg.run.batch_tokens, cfg.run.max_rows)


def teacher_logits(score: Scorer, fmt: PromptFormatter, chunk: pd.DataFrame, tta: bool) -> np.ndarray:
    """Logits (len(chunk), 2) in the rows' own A/B order, both orders averaged with ``tta``; ``score``: any engine's
    rows -> logits (:func:`load_scorer`)."""
    logits = score(fmt.encode(chunk))
    if tta:
        swapped = score(fmt.encode(schema.swap_ab(chunk)))
        # column 0 of the swapped view scores the original B: swap_probs maps logits back like probabilities
        logits = (logits + schema.swap_probs(swapped)) / 2
    return logits.astype(np.float32)


def score_parts(cfg: PseudoLabelConfig, pool: pd.DataFrame, parts: list[Part], store: PartStore, shard: Shard) -> int:
    """Score this process's missing parts, one teacher at a time; returns how many were scored."""
    done = store.done()
    todo = [i for i in range(len(parts)) if shard.owns(i) and i not in done]
    if not todo:
        return 0
    cfg = cfg.replace(device=shard.device(cfg.model.device, torch.cuda.is_available()))
    tok = load_tokenizer(cfg.model.model_path)
    fmt = PromptFormatter(tok, cfg.inputs)
    for teacher, group in itertools.groupby(todo, key=lambda i: parts[i].teacher):
        score = load_scorer(cfg, tok, teacher)
        for i in tqdm(list(group), desc=f"{teacher.name} parts", unit="part"):
            chunk = pool.iloc[parts[i].rows]
            try:
                logits = teacher_logits(score, fmt, chunk, cfg.run.tta)  # (n, 2)
            except NonFiniteLogits as err:  # vLLM names positions; the ids are known here
                raise NonFiniteLogits(
                    f"{store.path(i).name}, ids {chunk['id'].iloc[err.rows].tolist()}: {err}", err.rows
                ) from err
            _check_scored(logits, chunk, store.path(i))
            store.write(
                i, pd.DataFrame({"id": chunk["id"].to_numpy(), "logit_a": logits[:, 0], "logit_b": logits[:, 1]})
            )
        del score  # the next fold's teacher needs the memory
        gc.collect()
    return len(todo)


def _check_scored(logits: np.ndarray, chunk: pd.DataFrame, path: Path) -> None:
    """A part with an unscored row is not written: a rerun would otherwise take it as finished, NaN and all."""
    bad = np.flatnonzero(~np.isfinite(logits).all(1))
    if len(bad):
        raise RuntimeError(
            f"{path.name}: {len(bad)} row(s) could not be scored (out of memory even alone, or non-finite logits in "
            f"fp32 too), e.g. id {chunk['id'].iloc[bad[0]]!r}; lower max_length or use a larger GPU and rerun "
            "(finished parts are kept; a new max_length starts new parts)"
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities (N, 2) float32 of logits (N, 2) at temperature 1."""
    z = logits.astype(np.float64) - logits.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def with_labels(pool: pd.DataFrame, logits: np.ndarray, names, keys) -> pd.DataFrame:
    """The pool plus the output columns (see the module doc string)."""
    p = softmax(logits)
    cols = {"p_a": p[:, 0], "p_b": p[:, 1], "logit_a": logits[:, 0], "logit_b": logits[:, 1]}
    return pool.assign(**cols, teacher=names, label_key=keys)


def assemble(pool: pd.DataFrame, parts: list[Part], store: PartStore) -> pd.DataFrame:
    """Every part read back into input order; a part whose ids are not its rows' is an error naming the file."""
    logits = np.full((len(pool), 2), np.nan, dtype=np.float32)
    names, keys = np.empty(len(pool), dtype=object), np.empty(len(pool), dtype=object)
    for i, part in enumerate(parts):
        got = store.read(i)
        if got["id"].tolist() != pool["id"].iloc[part.rows].tolist():
            raise schema.DataError(
                f"{store.path(i)}: column 'id' differs from the rows of part {i}; delete it and rerun"
            )
        logits[part.rows] = got[LOGITS].to_numpy(dtype=np.float32)
        names[part.rows], keys[part.rows] = part.teacher.name, part.teacher.key
    return with_labels(pool, logits, names, keys)


def pseudo_label(cfg: PseudoLabelConfig, shard: Shard | None = None) -> pd.DataFrame | None:
    """Run the stage (this process's share of it); rank 0 returns the labelled pool (also written to ``out_file``),
    other ranks None once their parts are written."""
    shard = shard or Shard.from_env()
    who = f"rank {shard.rank}/{shard.world}: " if shard.world > 1 else ""
    if cfg.backend.engine == "vllm":
        import_vllm()  # before any work: a missing vLLM is said at once, with how to install it
        if shard.world > 1:
            raise ValueError(
                f"engine='vllm' runs in one process ({shard.world} were started): vLLM spreads one model over GPUs "
                "itself; run `python -m kaggle_utils.pseudo_label ... --engine vllm --tensor-parallel-size N`"
            )
    pool = schema.load(cfg.data.input_file, "unlabeled").reset_index(drop=True)
    parts = plan_parts(pool, resolve_teachers(cfg, pool), cfg.run.chunk_rows)
    store = PartStore(cfg.parts_dir, [part_key(pool, p, cfg.run.chunk_rows) for p in parts])
    stale, done = store.stale(), store.done()
    if stale and shard.is_main:
        print(
            f"ignored {len(stale)} stale part(s) in {store.folder}: another teacher, adapter, input, template, max "
            "length or chunk size wrote them; not deleted (remove them to free the space)"
        )
    if done:
        print(f"{who}resuming: {len(done)} of {len(parts)} parts already in {store.folder}")
    if shard.is_main:
        save_config(cfg, cfg.data.out_file.with_name(cfg.data.out_file.stem + "_config.json"))
    print(f"{who}{sum(map(shard.owns, range(len(parts))))} of {len(parts)} parts are this process's")
    score_parts(cfg, pool, parts, store, shard)
    if not shard.is_main:
        print(f"{who}parts written; rank 0 assembles {cfg.data.out_file}")
        return None
    store.wait(cfg.run.wait_minutes * 60)
    out = assemble(pool, parts, store)
    schema.validate(out, "soft", source=str(store.folder))
    out.to_parquet(cfg.data.out_file, index=False)
    return out


# ---------------------------------------------------------------------------------------------------- several teachers


def merge_teachers(files: Sequence[Path | str]) -> pd.DataFrame:
    """Several teachers' files of one pool averaged: mean logits per id, ``p`` recomputed from them.

    Rows, order and other columns are the first file's; ``teacher`` and ``label_key`` name the combination.
    """
    if len(files) < 2:
        raise ValueError(f"merge_teachers needs two files or more, got {len(files)}")
    first = schema.load(files[0], "soft")
    ids = first["id"]
    logits, names, keys = [], [], []
    for path in files:
        df = first if path is files[0] else schema.load(path, "soft")
        missing = [c for c in (*LOGITS, "teacher", "label_key") if c not in df.columns]
        if missing:
            raise schema.DataError(
                f"{path}: no column(s) {missing}; it was written before logits were stored: rerun the pseudo-label "
                "stage for it (its parts are reused only where the settings match)"
            )
        extra, absent = set(df["id"]) - set(ids), set(ids) - set(df["id"])
        if extra or absent or len(df) != len(first):
            example = next(iter(extra or absent), None)
            raise schema.DataError(
                f"{path}: column 'id' does not match {files[0]}: {len(extra)} id(s) only here, {len(absent)} only "
                f"there (e.g. {example!r}); label the same pool with every teacher"
            )
        df = df.set_index("id").loc[ids]
        logits.append(df[LOGITS].to_numpy(dtype=np.float64))
        names.append(df["teacher"].astype(str).to_numpy())
        keys.append(df["label_key"].astype(str).to_numpy())
    combos = list(zip(*names, *keys, strict=True))  # per row: who labelled it (rows of out-of-fold files differ)
    merged = {c: ("+".join(c[: len(files)]), pass_key("merge", *c[len(files) :])) for c in set(combos)}
    out = with_labels(
        first.drop(columns=["p_a", "p_b", *LOGITS, "teacher", "label_key"]),
        np.mean(logits, axis=0).astype(np.float32),
        [merged[c][0] for c in combos],
        [merged[c][1] for c in combos],
    )
    return schema.validate(out, "soft", source=" + ".join(map(str, files)))


def merge_main(argv: Sequence[str]) -> pd.DataFrame:
    parser = argparse.ArgumentParser(
        prog="python -m kaggle_utils.pseudo_label merge", description=merge_teachers.__doc__
    )
    parser.add_argument("files", nargs="+", type=Path, help="pseudo-label outputs of one pool, one per teacher")
    parser.add_argument("--out-file", type=Path, required=True, help="the merged file (parquet)")
    args = parser.parse_args(argv)
    out = merge_teachers(args.files)
    args.out_file.parent.mkdir(parents=True, exist_ok=True)
    out.to_parquet(args.out_file, index=False)
    print(f"{args.out_file}: {len(out)} rows, teachers {sorted(out['teacher'].unique())[:4]}")
    return out


def label_summary(df: pd.DataFrame) -> pd.DataFrame:
    """How confident the teacher is: rows per band of max(p_a, p_b), and the share it prefers A."""
    conf = np.maximum(df["p_a"], df["p_b"])
    bands = pd.cut(conf, [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], include_lowest=True)
    out = bands.value_counts(sort=False).rename("rows").to_frame()
    out["share_prefers_a"] = (df["p_a"] > df["p_b"]).groupby(bands, observed=False).mean().round(3)
    return out


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        merge_main(argv[1:])
        return
    out = pseudo_label(parse_config(PseudoLabelConfig, argv))
    if out is not None:
        print(label_summary(out).to_string())


if __name__ == "__main__":
    main()
