"""Stage "generate_pairs": new unlabelled pairs — prompts sampled from a pool, answered by several models, paired.

1. Sample ``n_prompts`` distinct prompts from the pool, balanced across languages (:func:`language_quotas`): each
   language's share follows ``language_weights`` (empty: equal shares), capped by what the pool holds, and what a
   capped language cannot fill is shared among the others by the same weights. Within a language the prompts are a
   seeded permutation's first ones, so a larger ``n_prompts`` with the same seed keeps the earlier prompts (and
   their paid answers).
2. Ask every model for an answer to every sampled prompt (resumable: ``<out_file>.requests.jsonl``).
3. Per prompt, form ``pairs_per_prompt`` pairs of two different models' answers; A/B positions are a seeded coin
   flip per pair (through :func:`kaggle_utils.data.schema.swap_ab`, the one definition of the A/B swap).

The output is in the competition schema with ``winner`` empty, ready for the pseudo-labelling stage, plus
``source = "generated:<model_a>|<model_b>"`` and ``prompt_id``.

``python -m kaggle_utils.api.generate --recipe generate-pairs``
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from kaggle_utils.api.client import (
    API_SECTION,
    ApiConfig,
    ChatClient,
    ChatRequest,
    ChatResult,
    JsonlStore,
    StageResult,
)
from kaggle_utils.config.cli import parse_config, save_config
from kaggle_utils.data import schema

# a pool row without a language label
UNKNOWN_LANGUAGE = "unknown"
# the pairs' columns before ``winner`` and ``source`` are added
PAIR_COLUMNS = ["id", "prompt", "response_a", "response_b", "model_a", "model_b", "language", "prompt_id"]


@dataclass
class GenerateConfig(ApiConfig):
    """Sample prompts, ask several models, pair their answers; every field is also a ``--flag``."""

    # the stage its recipes name (``stage = "generate_pairs"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "generate_pairs"
    # its recipes' [sections] and the groups of --help: section -> the fields written under it
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "data": ("pool_file", "out_file"),
        "sampling": ("n_prompts", "language_weights", "seed", "max_prompt_chars"),
        "answers": ("models", "temperature", "max_tokens", "pairs_per_prompt", "system_prompt"),
        "api": API_SECTION,
    }

    # prompt pool (.parquet or .csv): a ``prompt`` column, optionally ``language``
    pool_file: Path = Path("data/pools/prompts.parquet")
    # output: unlabelled pairs in the competition schema (requests kept beside it in <stem>.requests.jsonl)
    out_file: Path = Path("output/generated/pairs.parquet")
    # distinct prompts to sample
    n_prompts: int = 1000
    # relative share per language, e.g. {"English": 2, "Russian": 1}; empty: every language of the pool, equal shares
    language_weights: dict[str, float] = field(default_factory=dict)
    # seed of the sampling and of the A/B positions
    seed: int = 0
    # models that answer every prompt (at least two)
    models: list[str] = field(default_factory=lambda: ["gpt-4o-mini", "gpt-4.1-mini"])
    # pairs formed per prompt, each from two different models (at most models choose 2)
    pairs_per_prompt: int = 1
    # system message sent before each prompt (empty: none)
    system_prompt: str = ""
    # prompts longer than this many characters are not sampled (cost, and the students' context)
    max_prompt_chars: int = 8000

    def __post_init__(self) -> None:
        ApiConfig.__post_init__(self)
        self.pool_file = Path(self.pool_file)
        self.out_file = Path(self.out_file)
        if len(set(self.models)) < 2:
            raise ValueError(f"models={self.models}: pairs need at least two different models")
        most = len(set(self.models)) * (len(set(self.models)) - 1) // 2
        if not 1 <= self.pairs_per_prompt <= most:
            raise ValueError(
                f"pairs_per_prompt={self.pairs_per_prompt} must be in 1..{most} for {len(self.models)} models"
            )
        if self.n_prompts < 1 or self.max_prompt_chars < 1:
            raise ValueError(
                f"n_prompts={self.n_prompts} and max_prompt_chars={self.max_prompt_chars} must be positive"
            )
        if any(w < 0 for w in self.language_weights.values()):
            raise ValueError(f"language_weights={self.language_weights}: weights must be 0 or more")
        self.check_prices(self.models)

    @property
    def requests_file(self) -> Path:
        """The resumable store of this output's requests."""
        return self.out_file.with_name(self.out_file.stem + ".requests.jsonl")


def text_id(*parts: str) -> str:
    """A stable id from text (the same in every run and process, unlike ``hash``)."""
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


def read_pool(path: Path, max_prompt_chars: int) -> pd.DataFrame:
    """Distinct usable prompts of the pool: ``prompt_id``, ``prompt``, ``language``, in a stable order."""
    pool = schema.read_table(path)
    if "prompt" not in pool.columns:
        raise schema.DataError(f"{path}: a prompt pool needs a 'prompt' column; found {list(pool.columns)}")
    language = pool["language"] if "language" in pool.columns else pd.Series(UNKNOWN_LANGUAGE, index=pool.index)
    out = pd.DataFrame({"prompt": pool["prompt"], "language": language.fillna(UNKNOWN_LANGUAGE).astype(str)})
    usable = out["prompt"].map(lambda p: isinstance(p, str) and 0 < len(p.strip()) and len(p) <= max_prompt_chars)
    out = out[usable].drop_duplicates("prompt")
    dropped = len(pool) - len(out)
    if dropped:
        print(f"{path}: {dropped} of {len(pool)} prompts left out (empty, repeated or > {max_prompt_chars} chars)")
    out.insert(0, "prompt_id", [text_id(p) for p in out["prompt"]])
    # sorted by id: the sample does not depend on the pool's row order
    return out.sort_values("prompt_id", ignore_index=True)


def language_quotas(available: Mapping[str, int], n: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Prompts to take per language: ``n`` split by ``weights`` (empty: equal), each capped by ``available``.

    What a capped language cannot fill goes to the others in proportion to their weights, until ``n`` is placed or
    the pool is used up; shares are rounded by largest remainder (ties to the language name, for determinism).
    """
    weight = {lang: (weights.get(lang, 0.0) if weights else 1.0) for lang in available}
    quotas = dict.fromkeys(available, 0)
    open_ = sorted(lang for lang in available if available[lang] > 0 and weight[lang] > 0)
    left = min(n, sum(available[lang] for lang in open_))
    while left > 0 and open_:
        total = sum(weight[lang] for lang in open_)
        share = {lang: left * weight[lang] / total for lang in open_}
        give = {lang: int(share[lang]) for lang in open_}
        for lang in sorted(open_, key=lambda g: (give[g] - share[g], g))[: left - sum(give.values())]:
            give[lang] += 1
        for lang in open_:
            take = min(give[lang], available[lang] - quotas[lang])
            quotas[lang] += take
            left -= take
        open_ = [lang for lang in open_ if quotas[lang] < available[lang]]
    return quotas


def sample_prompts(pool: pd.DataFrame, n: int, weights: Mapping[str, float], seed: int) -> pd.DataFrame:
    """``n`` prompts balanced across languages (:func:`language_quotas`), each language drawn with its own seed."""
    quotas = language_quotas(pool["language"].value_counts().to_dict(), n, weights)
    absent = sorted(set(weights) - set(quotas))
    if absent:
        print(f"language_weights names languages the pool does not hold: {absent}")
    parts = []
    for lang, quota in sorted(quotas.items()):
        rows = pool[pool["language"] == lang]
        # a seed per language: adding a language to the pool does not change the others' samples
        order = np.random.default_rng([seed, int(text_id(lang)[:8], 16)]).permutation(len(rows))
        parts.append(rows.iloc[order[:quota]])
    sample = pd.concat(parts, ignore_index=True) if parts else pool.iloc[:0]
    if len(sample) < n:
        print(f"the pool holds {len(sample)} usable prompts in the weighted languages, fewer than n_prompts={n}")
    return sample


def answer_requests(client: ChatClient, prompts: pd.DataFrame, cfg: GenerateConfig) -> list[ChatRequest]:
    """One request per (prompt, model); the prompt id is the request's tag."""
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return [
        client.request(model, [*system, {"role": "user", "content": prompt}], tag=pid, prompt_id=pid)
        for pid, prompt in zip(prompts["prompt_id"], prompts["prompt"], strict=True)
        for model in cfg.models
    ]


def form_pairs(
    prompts: pd.DataFrame, answers: Mapping[tuple[str, str], str], models: list[str], per_prompt: int, seed: int
) -> pd.DataFrame:
    """Pairs of two different models' answers per prompt, A/B positions randomised; competition schema, no winner."""
    rows, flips = [], []
    for prompt in prompts.itertuples(index=False):
        answered = [m for m in models if (prompt.prompt_id, m) in answers]
        combos = list(itertools.combinations(answered, 2))
        # a generator per prompt: one prompt's failed answer does not reshuffle every other prompt's pairs
        rng = np.random.default_rng([seed, int(prompt.prompt_id[:8], 16)])
        for i in rng.choice(len(combos), size=min(per_prompt, len(combos)), replace=False):
            first, second = combos[i]
            rows.append(
                {
                    "id": "gen-" + text_id(prompt.prompt_id, first, second),
                    "prompt": prompt.prompt,
                    "response_a": answers[(prompt.prompt_id, first)],
                    "response_b": answers[(prompt.prompt_id, second)],
                    "model_a": first,
                    "model_b": second,
                    "language": prompt.language,
                    "prompt_id": prompt.prompt_id,
                }
            )
            flips.append(bool(rng.random() < 0.5))
    return _finish_pairs(pd.DataFrame(rows, columns=PAIR_COLUMNS), flips)


def _finish_pairs(pairs: pd.DataFrame, flips: list[bool]) -> pd.DataFrame:
    flip = np.array(flips, dtype=bool)
    if flip.any():
        pairs.loc[flip] = schema.swap_ab(pairs.loc[flip]).to_numpy()
    pairs.insert(pairs.columns.get_loc("response_b") + 1, "winner", None)
    pairs["source"] = "generated:" + pairs["model_a"] + "|" + pairs["model_b"]
    return pairs


def generate_pairs(cfg: GenerateConfig, after_each: Callable[[ChatResult], None] | None = None) -> StageResult:
    """Run the stage; the pairs are also written to ``cfg.out_file`` (and the config beside them)."""
    prompts = sample_prompts(
        read_pool(cfg.pool_file, cfg.max_prompt_chars), cfg.n_prompts, cfg.language_weights, cfg.seed
    )
    print(
        f"{len(prompts)} prompts x {len(cfg.models)} models; languages: {prompts['language'].value_counts().to_dict()}"
    )
    client = ChatClient(cfg)
    store = JsonlStore(cfg.requests_file)
    save_config(cfg, cfg.out_file.with_name(cfg.out_file.stem + "_config.json"))
    requests = answer_requests(client, prompts, cfg)
    run = client.run(requests, store, desc="answers", after_each=after_each)
    done = store.load()
    results = [done[r.key] for r in requests if r.key in done]
    answers = {(r.meta["prompt_id"], r.model): r.content for r in results if r.ok}
    pairs = form_pairs(prompts, answers, cfg.models, cfg.pairs_per_prompt, cfg.seed)
    with_pairs = pairs["prompt_id"].nunique()
    counts = {"prompts": len(prompts), "prompts without two answers": len(prompts) - with_pairs, "pairs": len(pairs)}
    return StageResult.written(pairs, "unlabeled", cfg.out_file, run, results, cfg.prices, counts)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(GenerateConfig, argv)
    result = generate_pairs(cfg)
    print(result)
    print(f"wrote {len(result.frame)} pairs to {cfg.out_file}")


if __name__ == "__main__":
    main()
