"""Stage 2, pseudo-labelling: a trained teacher scores an unlabelled pool and writes soft labels.

The pool is processed in chunks written as separate parquet parts, so a long run (560K rows with a 72B
teacher) resumes after an interruption: finished parts are skipped. With ``tta`` every row is also scored
A/B-swapped and the two views are averaged, which removes the teacher's position bias from the labels.

``python -m kaggle_utils.pseudo_label --model-path M --adapter-dir demo/work/teacher/adapter \\
    --input-file demo/work/prepared/unlabeled.parquet --out-file demo/work/pseudo.parquet``
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kaggle_utils.config.cli import parse_config, save_config
from kaggle_utils.data import schema
from kaggle_utils.inputs.formatter import InputConfig, PromptFormatter
from kaggle_utils.models.loading import ModelConfig, load_classifier, load_tokenizer
from kaggle_utils.scoring.predict import predict_proba


@dataclass
class PseudoLabelConfig(ModelConfig, InputConfig):
    """Score an unlabelled pool with a teacher; every field is also a ``--flag``."""

    # the stage its recipes name (``stage = "pseudo_label"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "pseudo_label"

    # the teacher's LoRA adapter (train stage output ``adapter/``); empty: the base model as is
    adapter_dir: Path | None = Path("demo/work/teacher/adapter")
    # unlabelled rows in competition format (no winner needed)
    input_file: Path = Path("demo/work/prepared/unlabeled.parquet")
    # output: the input rows plus ``p_a``, ``p_b`` (the teacher's probabilities)
    out_file: Path = Path("demo/work/pseudo.parquet")
    # also score every row A/B-swapped and average the two views
    tta: bool = True
    # rows per resumable part
    chunk_rows: int = 2048
    # padded tokens per batch (rows x longest row)
    batch_tokens: int = 16384
    # most rows in one batch
    max_rows: int = 64

    def __post_init__(self) -> None:
        ModelConfig.__post_init__(self)
        InputConfig.__post_init__(self)
        self.adapter_dir = Path(self.adapter_dir) if self.adapter_dir else None
        self.input_file = Path(self.input_file)
        self.out_file = Path(self.out_file)
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows={self.chunk_rows} must be positive")


def pseudo_label(cfg: PseudoLabelConfig) -> pd.DataFrame:
    """Run the stage; returns the pool with ``p_a``/``p_b`` (also written to ``cfg.out_file``)."""
    pool = schema.load(cfg.input_file, "unlabeled").reset_index(drop=True)
    parts_dir = cfg.out_file.with_name(cfg.out_file.stem + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.out_file.with_name(cfg.out_file.stem + "_config.json"))
    chunks = range(0, len(pool), cfg.chunk_rows)
    todo = [s for s in chunks if not (parts_dir / f"part-{s // cfg.chunk_rows:05d}.parquet").is_file()]
    if len(todo) < len(chunks):
        print(f"resuming: {len(chunks) - len(todo)} of {len(chunks)} parts already in {parts_dir}")
    if todo:
        tok = load_tokenizer(cfg.model_path)
        fmt = PromptFormatter(tok, cfg)
        model = load_classifier(cfg, tok.pad_token_id, adapter=cfg.adapter_dir)
        for start in tqdm(todo, desc="pseudo-label parts", unit="part"):
            chunk = pool.iloc[start : start + cfg.chunk_rows]
            probs = predict_proba(model, fmt.encode(chunk), tok.pad_token_id, cfg.batch_tokens, cfg.max_rows).probs
            if cfg.tta:
                swapped = predict_proba(
                    model, fmt.encode(schema.swap_ab(chunk)), tok.pad_token_id, cfg.batch_tokens, cfg.max_rows
                ).probs
                probs = (probs + schema.swap_probs(swapped)) / 2
            part = chunk.assign(p_a=probs[:, 0], p_b=probs[:, 1])
            tmp = parts_dir / f"part-{start // cfg.chunk_rows:05d}.tmp"
            part.to_parquet(tmp, index=False)
            tmp.replace(tmp.with_suffix(".parquet"))  # a part exists only once it is complete
    out = pd.concat([pd.read_parquet(p) for p in sorted(parts_dir.glob("part-*.parquet"))], ignore_index=True)
    schema.validate(out, "soft", source=str(parts_dir))
    out.to_parquet(cfg.out_file, index=False)
    return out


def label_summary(df: pd.DataFrame) -> pd.DataFrame:
    """How confident the teacher is: rows per band of max(p_a, p_b), and the share it prefers A."""
    conf = np.maximum(df["p_a"], df["p_b"])
    bands = pd.cut(conf, [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], include_lowest=True)
    out = bands.value_counts(sort=False).rename("rows").to_frame()
    out["share_prefers_a"] = (df["p_a"] > df["p_b"]).groupby(bands, observed=False).mean().round(3)
    return out


def main(argv: list[str] | None = None) -> None:
    out = pseudo_label(parse_config(PseudoLabelConfig, argv))
    print(label_summary(out).to_string())


if __name__ == "__main__":
    main()
