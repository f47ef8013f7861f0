"""Stage "judge": an OpenAI model fine-tuned as a pairwise judge, through the official ``openai`` client.

The seed team fine-tuned GPT-3.5 on 10K rows as a pseudo-labeller and found it opaque and sensitive to its settings
(seed write-up); this stage makes that experiment cheap to repeat and to measure. Actions, one function each, all
taking one :class:`JudgeConfig`:

* ``prepare``: held-out validation rows and training rows (seeded, disjoint) written as chat-format JSONL from the
  formatter's judge templates (:data:`JUDGE_SYSTEM`, ``CHAT_USER``; the answer is "A" or "B"), plus a token and
  cost table per base model (:func:`token_table`): exact counts with tiktoken's encoding for the model where it
  loads offline, else ``chars / 4`` with its error measured on a sample against the offline Qwen2.5 tokenizer.
* ``train``: upload both files (``client.files.create``), create the job (``client.fine_tuning.jobs.create``), poll
  it with a doubling interval and print its new events. Every id is written to ``<work_dir>/state.json`` the moment
  it exists, so a restarted ``train`` uploads nothing twice and polls the same job (never a second job). A failed or
  cancelled job raises :class:`JobFailed` with the job's own error, also kept in the state file.
* ``status``: the job's state and its latest events, without waiting.
* ``test`` (:func:`evaluate`): ask each model of ``test_models`` about every validation row (both A/B orders with
  ``both_orders``), resumable (``<work_dir>/test.requests.jsonl``). An answer that is not one letter A/B is
  counted ``invalid``, a request that failed is counted ``failed``; both count as wrong in ``accuracy``, never
  dropped (:func:`score_table`).
* ``compare``: two models on the same rows: accuracy, agreement, invalid rate and cost side by side.
* ``cleanup``: cancel the job if it still runs, delete the uploaded files, and the fine-tuned model when
  ``delete_model`` is set.

The key comes from the environment variable ``api_key_env`` only; it is never written to a file or printed.

``python -m kaggle_utils.api.judge {prepare,train,status,test,compare,cleanup} --recipe judge-gpt-4o-mini``
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from kaggle_utils.api.client import (
    API_SECTION,
    ApiConfig,
    ApiError,
    ChatClient,
    ChatRequest,
    ChatResult,
    JsonlStore,
    RunSummary,
    cost_usd,
)
from kaggle_utils.api.finetune import TERMINAL, FineTuneClient, JobFailed, JobState, job_error
from kaggle_utils.api.tokens import TokenCounter, approximation_table, token_table
from kaggle_utils.config.cli import parse_config, save_config
from kaggle_utils.data import schema
from kaggle_utils.inputs.formatter import CHAT_SYSTEM, CHAT_USER, SNIP_MARKER

# The formatter's judge instruction, plus the answer format the fine-tuned model is trained to give.
JUDGE_SYSTEM = CHAT_SYSTEM + " Reply with one letter only: A or B."
LABELS = ("A", "B")
# One letter, optionally framed: "A", "B.", "[[A]]", "Assistant B", "response a". Anything else is invalid.
ANSWER = re.compile(r"^\W*(?:(?:assistant|response)\s+)?([AB])\W*$", re.IGNORECASE)
# The name test_models uses for the model the ``train`` action produced.
FINE_TUNED = "fine-tuned"


@dataclass
class JudgeConfig(ApiConfig):
    """Fine-tune, test and compare an OpenAI pairwise judge; every field is also a ``--flag``."""

    # the stage its recipes name (``stage = "judge"`` in kaggle_utils/recipes/*.toml)
    STAGE: ClassVar[str] = "judge"
    # its recipes' [sections] and the groups of --help: section -> the fields written under it
    SECTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "data": ("input_file", "work_dir", "n_train", "n_valid", "seed", "max_field_chars", "swap_train"),
        "fine_tuning": (
            "base_model",
            "suffix",
            "n_epochs",
            "training_prices",
            "poll_interval_s",
            "poll_max_interval_s",
            "max_poll_s",
        ),
        "test": ("test_models", "delete_model", "both_orders", "temperature", "max_tokens"),
        "api": API_SECTION,
    }

    # labelled rows in the competition schema (.parquet or .csv)
    input_file: Path = Path("output/prepared/train.parquet")
    # everything the stage writes: train.jsonl, valid.jsonl, valid.parquet, tokens.csv, state.json, test answers
    work_dir: Path = Path("output/judge")
    # training rows (the seed team used 10K); fewer when the input holds fewer
    n_train: int = 10000
    # validation rows, held out first: the same rows for the job's validation file and for test/compare
    n_valid: int = 500
    # seed of the row choice
    seed: int = 0
    # each text is cut to this many characters (head and tail kept around a snip marker), in training and in test
    max_field_chars: int = 6000
    # also train on every training row with A and B swapped (schema.swap_ab): no position bias to learn
    swap_train: bool = False
    # model to fine-tune
    base_model: str = "gpt-4o-mini-2024-07-18"
    # suffix of the fine-tuned model's name
    suffix: str = "wsdm-judge"
    # training epochs
    n_epochs: int = 3
    # USD per 1M training tokens per base model, for prepare's estimate (every model listed gets a row)
    training_prices: dict[str, float] = field(default_factory=dict)
    # first wait between polls of the job, in seconds; doubles up to poll_max_interval_s, back to this on a change
    poll_interval_s: float = 30.0
    # longest wait between polls
    poll_max_interval_s: float = 300.0
    # stop polling after this many seconds (the job runs on; train or status resumes it); 0: poll until it ends
    max_poll_s: float = 0.0
    # models asked by test (one or more) and compare (exactly two); "fine-tuned" is the model train produced
    test_models: list[str] = field(default_factory=lambda: [FINE_TUNED, "gpt-4o-mini-2024-07-18"])
    # ask each row in both A/B orders (the B/A copy through schema.swap_ab): measures position bias (consistency)
    both_orders: bool = True
    # cleanup also deletes the fine-tuned model (irreversible); the uploaded files are always deleted
    delete_model: bool = False
    # a judge answers with one letter: greedy, a few tokens
    temperature: float | None = 0.0
    max_tokens: int = 5

    def __post_init__(self) -> None:
        ApiConfig.__post_init__(self)
        self.input_file = Path(self.input_file)
        self.work_dir = Path(self.work_dir)
        for name in ("n_train", "n_valid", "n_epochs", "max_field_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if not 0 < self.poll_interval_s <= self.poll_max_interval_s:
            raise ValueError(
                f"poll_interval_s={self.poll_interval_s} must be positive and at most "
                f"poll_max_interval_s={self.poll_max_interval_s}"
            )
        if self.max_poll_s < 0:
            raise ValueError(f"max_poll_s={self.max_poll_s} must be 0 or more")
        if not self.test_models:
            raise ValueError("test_models is empty: name at least one model (or 'fine-tuned')")
        bad = {m: p for m, p in self.training_prices.items() if not isinstance(p, (int, float)) or p < 0}
        if bad:
            raise ValueError(f"training_prices {bad}: expected USD per 1M training tokens, 0 or more")

    @property
    def state_file(self) -> Path:
        """Ids of the uploaded files, the job and the fine-tuned model: what a restart resumes from."""
        return self.work_dir / "state.json"

    def path(self, name: str) -> Path:
        return self.work_dir / name


# --- messages and answers ------------------------------------------------------------------------------------------


def clip(text: str, max_chars: int) -> str:
    """At most ``max_chars`` characters (plus the marker): head and tail kept, as the formatter's ``head_tail``."""
    if len(text) <= max_chars:
        return text
    head = max_chars // 2
    return text[:head] + SNIP_MARKER + text[len(text) - (max_chars - head) :]


def judge_messages(prompt: str, response_a: str, response_b: str, max_chars: int) -> list[dict[str, str]]:
    """The system instruction and the user turn of one pair (the formatter's chat templates)."""
    user = CHAT_USER.format(
        prompt=clip(prompt, max_chars), response_a=clip(response_a, max_chars), response_b=clip(response_b, max_chars)
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def label_letters(df: pd.DataFrame) -> list[str]:
    """The answer of each labelled row in its shown order: "A" when response A won."""
    return [LABELS[i] for i in schema.labels(df)]


def parse_choice(text: str | None) -> str | None:
    """ "A" or "B" from a judge's answer; None when it is anything else (counted invalid, never guessed)."""
    found = ANSWER.match(text or "")
    return found.group(1).upper() if found else None


def chat_examples(df: pd.DataFrame, max_chars: int) -> list[dict[str, Any]]:
    """Fine-tuning examples in OpenAI's chat format: system, user, and the assistant's letter."""
    return [
        {"messages": [*judge_messages(p, a, b, max_chars), {"role": "assistant", "content": letter}]}
        for p, a, b, letter in zip(df["prompt"], df["response_a"], df["response_b"], label_letters(df), strict=True)
    ]


def write_jsonl(records: Iterable[dict[str, Any]], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def split_rows(df: pd.DataFrame, n_train: int, n_valid: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Disjoint (train, valid): validation rows first from a seeded permutation, so n_train never changes them."""
    if len(df) < n_valid + 1:
        raise schema.DataError(f"{len(df)} labelled rows cannot give n_valid={n_valid} plus training rows")
    order = np.random.default_rng(seed).permutation(len(df))
    valid = df.iloc[order[:n_valid]].reset_index(drop=True)
    train = df.iloc[order[n_valid : n_valid + n_train]].reset_index(drop=True)
    return train, valid


# --- prepare -------------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What ``prepare`` wrote and estimated."""

    files: dict[str, Path]
    counts: dict[str, int]
    tokens: pd.DataFrame
    # chars/4 against the reference tokenizer, overall and per language (empty when every model is counted
    # exactly or no reference loads)
    approximation: pd.DataFrame

    def __str__(self) -> str:
        lines = [f"{k}: {v}" for k, v in self.counts.items()] + [f"wrote {p}" for p in self.files.values()]
        if len(self.approximation):
            lines += [
                "",
                "OpenAI's tokenizers did not load offline: counts are chars/4. Its error per training example against "
                "the Qwen2.5 tokenizer (a stand-in; mean_abs_pct per example, total_pct on the sum):",
                self.approximation.to_string(index=False, float_format=lambda x: f"{x:.1f}"),
            ]
        return "\n".join([*lines, "", self.tokens.to_string(index=False)])


def prepare(cfg: JudgeConfig) -> Prepared:
    """Write train.jsonl, valid.jsonl and valid.parquet under ``work_dir``; estimate tokens and training cost."""
    df = schema.load(cfg.input_file, "train")
    train, valid = split_rows(df, cfg.n_train, cfg.n_valid, cfg.seed)
    if cfg.swap_train:
        train = pd.concat([train, schema.swap_ab(train)], ignore_index=True)
    examples = {"train": chat_examples(train, cfg.max_field_chars), "valid": chat_examples(valid, cfg.max_field_chars)}
    files = {
        "train": cfg.path("train.jsonl"),
        "valid": cfg.path("valid.jsonl"),
        "valid_rows": cfg.path("valid.parquet"),
        "tokens": cfg.path("tokens.csv"),
    }
    for split in ("train", "valid"):
        write_jsonl(examples[split], files[split])
    valid.to_parquet(files["valid_rows"], index=False)
    models = list(dict.fromkeys([cfg.base_model, *cfg.training_prices]))
    tokens = token_table(examples, models, cfg.n_epochs, cfg.training_prices)
    tokens.to_csv(files["tokens"], index=False)
    save_config(cfg, cfg.path("config.json"))
    approximation = pd.DataFrame()
    if not all(TokenCounter(m).exact for m in models):
        # whole examples (what is billed), a seeded sample of up to 500
        pick = np.random.default_rng(cfg.seed).permutation(len(train))[:500]
        texts = ["\n".join(m["content"] for m in examples["train"][i]["messages"]) for i in pick]
        languages = train["language"].fillna("unknown").astype(str).to_numpy()[pick].tolist()
        approximation = approximation_table(texts, languages)
        if len(approximation):
            approximation.to_csv(cfg.path("tokens_approximation.csv"), index=False)
    labels = Counter(label_letters(train))
    counts = {
        "training examples": len(train),
        "validation rows": len(valid),
        **{f"train answer {k}": v for k, v in sorted(labels.items())},
    }
    return Prepared(files, counts, tokens, approximation)


# --- the fine-tuning job ------------------------------------------------------------------------------------------


def _print_new_events(client: FineTuneClient, state: JobState) -> None:
    seen = set(state.events_seen)
    for event in client.events(state.job_id):
        if event.id not in seen:
            print(f"  [{event.level}] {event.message}")
            state.events_seen.append(event.id)


def start_job(cfg: JudgeConfig, client: FineTuneClient, state: JobState) -> None:
    """Upload what is not uploaded and create the job; each id is saved the moment it exists."""
    for split in ("train", "valid"):
        if split in state.files:
            continue
        path = cfg.path(f"{split}.jsonl")
        if not path.is_file():
            raise ApiError(f"{path} not found; fix: run `python -m kaggle_utils.api.judge prepare` with this recipe")
        state.files[split] = client.upload(path)
        state.save(cfg.state_file)
        print(f"uploaded {path} as {state.files[split]}")
    job = client.create_job(
        state.files["train"], state.files["valid"], cfg.base_model, cfg.n_epochs, suffix=cfg.suffix, seed=cfg.seed
    )
    state.job_id, state.status = job.id, job.status
    state.save(cfg.state_file)
    print(f"created fine-tuning job {job.id} on {cfg.base_model} ({cfg.n_epochs} epochs)")


def train(
    cfg: JudgeConfig,
    sleep: Callable[[float], None] = time.sleep,
    on_poll: Callable[[JobState], None] | None = None,
) -> JobState:
    """Start the job (or resume the one in the state file) and poll it until it ends or ``max_poll_s`` binds.

    ``on_poll`` runs before each poll (tests raise from it to simulate a kill). Returns the state; raises
    :class:`JobFailed` when the job failed or was cancelled.
    """
    client = FineTuneClient(cfg, sleep)
    state = JobState.load(cfg.state_file)
    if state.error:
        raise JobFailed(f"{state.error}; fix the cause, delete {cfg.state_file} and run train again")
    if state.job_id:
        print(f"resuming job {state.job_id} from {cfg.state_file} (last seen: {state.status})")
    else:
        save_config(cfg, cfg.path("config.json"))
        start_job(cfg, client, state)
    interval, started = cfg.poll_interval_s, time.monotonic()
    while True:
        if on_poll is not None:
            on_poll(state)
        job = client.job(state.job_id)
        _print_new_events(client, state)
        if job.status != state.status:
            print(f"job {job.id}: {state.status or '?'} -> {job.status}")
            interval = cfg.poll_interval_s  # something moved: look again soon
        state.status = job.status
        if job.status == "succeeded":
            state.fine_tuned_model = job.fine_tuned_model or ""
        elif job.status in TERMINAL:
            state.error = client.scrub(job_error(job))
        state.save(cfg.state_file)
        if job.status == "succeeded":
            print(f"fine-tuned model: {state.fine_tuned_model} (trained tokens: {job.trained_tokens})")
            return state
        if state.error:
            raise JobFailed(state.error)
        elapsed = time.monotonic() - started
        if cfg.max_poll_s and elapsed >= cfg.max_poll_s:
            print(
                f"max_poll_s={cfg.max_poll_s:g} reached; job {job.id} is still {job.status}: run train again to resume"
            )
            return state
        sleep(interval)
        interval = min(interval * 2, cfg.poll_max_interval_s)


def status(cfg: JudgeConfig) -> JobState:
    """Print the job's state and new events once, without waiting; the state file is updated."""
    client = FineTuneClient(cfg)
    state = JobState.load(cfg.state_file)
    if not state.job_id:
        print(f"no job yet in {cfg.state_file} (uploaded files: {state.files or 'none'})")
        return state
    job = client.job(state.job_id)
    _print_new_events(client, state)
    state.status = job.status
    state.fine_tuned_model = job.fine_tuned_model or state.fine_tuned_model
    if job.status in ("failed", "cancelled"):
        state.error = client.scrub(job_error(job))
    state.save(cfg.state_file)
    print(f"job {job.id}: {job.status}" + (f"; model {state.fine_tuned_model}" if state.fine_tuned_model else ""))
    if state.error:
        print(state.error)
    return state


def cleanup(cfg: JudgeConfig) -> dict[str, str]:
    """Delete the uploaded files and (with ``delete_model``) the fine-tuned model; name -> "deleted" | "not found"."""
    client = FineTuneClient(cfg)
    state = JobState.load(cfg.state_file)
    if state.job_id and state.status not in TERMINAL:
        # its files are about to go: a job still running would fail on them anyway, and it costs while it runs
        job = client.cancel(state.job_id)
        state.status = job.status
        state.save(cfg.state_file)
        print(f"job {state.job_id} had not finished: cancel asked, now {job.status}")
    targets = [("file", fid) for fid in state.files.values()]
    if cfg.delete_model and state.fine_tuned_model:
        targets.append(("model", state.fine_tuned_model))
    done = {}
    for kind, name in targets:
        if name in state.deleted:
            continue
        done[name] = "deleted" if client.delete(kind, name) else "not found"
        state.deleted.append(name)
        state.save(cfg.state_file)
        print(f"{kind} {name}: {done[name]}")
    if state.fine_tuned_model and not cfg.delete_model:
        print(f"kept the model {state.fine_tuned_model} (set --delete-model true to delete it)")
    return done


# --- test and compare ----------------------------------------------------------------------------------------------


def judge_requests(
    client: ChatClient,
    rows: pd.DataFrame,
    models: Sequence[str],
    both_orders: bool,
    max_chars: int,
    shots: Callable[[int], list[dict[str, str]]] | None = None,
    tag: str = "judge",
    **meta: Any,
) -> list[ChatRequest]:
    """One request per (model, row, order); ``shots(i)`` adds example turns before row ``i`` (few-shot).

    The B/A order is ``schema.swap_ab`` of the row; its ``label`` is the answer in the order shown.
    """
    orders = [("ab", rows)] + ([("ba", schema.swap_ab(rows))] if both_orders else [])
    requests = []
    for order, shown in orders:
        labels = label_letters(shown)
        for i, (rid, p, a, b) in enumerate(
            zip(shown["id"], shown["prompt"], shown["response_a"], shown["response_b"], strict=True)
        ):
            system, user = judge_messages(p, a, b, max_chars)
            messages = [system, *(shots(i) if shots else []), user]
            for model in models:
                requests.append(
                    client.request(
                        model,
                        messages,
                        tag=f"{tag}:{rid}:{order}",
                        row_id=str(rid),
                        order=order,
                        label=labels[i],
                        **meta,
                    )
                )
    return requests


def answers_frame(requests: Sequence[ChatRequest], done: dict[str, ChatResult]) -> pd.DataFrame:
    """One row per request: status ("ok" | "invalid" | "failed" | "missing"), the parsed choice, and tokens."""
    rows = []
    for req in requests:
        res = done.get(req.key)
        choice = parse_choice(res.content) if res is not None and res.ok else None
        state = "missing" if res is None else ("failed" if not res.ok else ("ok" if choice else "invalid"))
        rows.append(
            {
                "model": req.model,
                **req.meta,
                "status": state,
                "answer": None if res is None else res.content,
                "choice": choice,
                "correct": choice == req.meta["label"],
                "input_tokens": (res.input_tokens or 0) if res else 0,
                "output_tokens": (res.output_tokens or 0) if res else 0,
            }
        )
    return pd.DataFrame(rows)


def row_votes(answers: pd.DataFrame) -> pd.DataFrame:
    """Per (model, group, row): the valid answers' votes for the original A (a B/A answer "B" is a vote for A)."""
    valid = answers[answers["status"] == "ok"].copy()
    valid["vote_a"] = (valid["choice"] == "A") == (valid["order"] == "ab")
    keys = [c for c in answers.columns if c not in _ANSWER_COLUMNS]
    return valid.groupby([*keys, "row_id"], dropna=False)["vote_a"].agg(["mean", "count"]).reset_index()


_ANSWER_COLUMNS = ("row_id", "order", "label", "status", "answer", "choice", "correct", "input_tokens", "output_tokens")


def score_table(answers: pd.DataFrame, prices: dict[str, list[float]], by: Sequence[str] = ("model",)) -> pd.DataFrame:
    """Per group: answers by status, accuracy with invalid and failed answers counted wrong, and cost.

    * ``accuracy``: correct / all answers (an invalid or failed answer is wrong: nothing is dropped);
    * ``accuracy_valid``: correct / valid answers;
    * ``row_accuracy``: per row, the majority of its valid answers in both orders; a tie or no valid answer is wrong;
    * ``consistency``: share of rows answered validly in both orders that get the same winner (NaN: one order).
    """
    by = list(by)
    truth = answers[answers["order"] == "ab"].drop_duplicates("row_id").set_index("row_id")["label"]
    votes = row_votes(answers)
    if votes.empty:  # no valid answer at all: keep the group columns so the filter below still works
        votes = pd.DataFrame(columns=[*by, "row_id", "mean", "count"])
    out = []
    for key, group in answers.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        n = len(group)
        status = group["status"].value_counts()
        valid = int(status.get("ok", 0))
        gv = votes.loc[(votes[by] == pd.Series(dict(zip(by, key, strict=True)))).all(1)]
        decided = gv[gv["mean"] != 0.5]
        right = ((decided["mean"] > 0.5) == (truth.reindex(decided["row_id"]).to_numpy() == "A")).sum()
        both = gv[gv["count"] == 2]
        models = group["model"].unique()
        costs = [
            cost_usd(m, g["input_tokens"].sum(), g["output_tokens"].sum(), prices) for m, g in group.groupby("model")
        ]
        out.append(
            {
                **dict(zip(by, key, strict=True)),
                "rows": group["row_id"].nunique(),
                "answers": n,
                "valid": valid,
                "invalid": int(status.get("invalid", 0)),
                "failed": int(status.get("failed", 0) + status.get("missing", 0)),
                "invalid_rate": (n - valid) / n,
                "accuracy": group["correct"].sum() / n,
                "accuracy_valid": group["correct"].sum() / valid if valid else math.nan,
                "row_accuracy": right / group["row_id"].nunique(),
                "consistency": ((both["mean"] != 0.5).mean() if len(both) else math.nan)
                if (group["order"] == "ba").any()
                else math.nan,
                "input_tokens": int(group["input_tokens"].sum()),
                "output_tokens": int(group["output_tokens"].sum()),
                "cost_usd": math.nan if any(c is None for c in costs) or len(models) == 0 else float(sum(costs)),
            }
        )
    return pd.DataFrame(out)


def agreement(answers: pd.DataFrame, first: str, second: str) -> float:
    """Share of rows both models decide (a valid majority) on which they pick the same winner."""
    votes = row_votes(answers)
    votes = votes[votes["mean"] != 0.5]
    a = votes[votes["model"] == first].set_index("row_id")["mean"] > 0.5
    b = votes[votes["model"] == second].set_index("row_id")["mean"] > 0.5
    both = a.index.intersection(b.index)
    return float((a[both] == b[both]).mean()) if len(both) else math.nan


@dataclass
class Evaluation:
    """What ``test`` and ``compare`` return: the table, every answer, and the run's summary."""

    table: pd.DataFrame
    answers: pd.DataFrame
    run: RunSummary
    counts: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        counts = "\n".join(f"{k}: {v}" for k, v in self.counts.items())
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            return f"{self.run}\n{counts}\n\n{self.table.to_string(index=False, float_format=lambda x: f'{x:.4f}')}"


def resolve_models(cfg: JudgeConfig, names: Sequence[str]) -> list[str]:
    """``test_models`` with "fine-tuned" replaced by the model in the state file."""
    state = JobState.load(cfg.state_file)
    if FINE_TUNED in names and not state.fine_tuned_model:
        raise ApiError(
            f"test_models names {FINE_TUNED!r} but {cfg.state_file} holds no fine-tuned model; fix: run train until "
            f"the job succeeds, or list model names in --test-models"
        )
    return [state.fine_tuned_model if m == FINE_TUNED else m for m in names]


def with_fine_tuned_prices(prices: dict[str, list[float]], models: Iterable[str]) -> dict[str, list[float]]:
    """Prices for fine-tuned models named ``ft:<base>:<org>:<suffix>:<id>``, from the recipe's ``ft:<base>`` entry.

    A fine-tuned model's name is known only after training; its price is the base model's fine-tuned price.
    """
    out = dict(prices)
    for model in models:
        base = "ft:" + model.split(":")[1] if model.startswith("ft:") and model.count(":") >= 2 else ""
        if model not in out and base in out:
            out[model] = out[base]
    return out


def evaluate(
    cfg: JudgeConfig, models: Sequence[str] | None = None, after_each: Callable[[ChatResult], None] | None = None
) -> Evaluation:
    """Ask every model about every validation row (both orders with ``both_orders``); score them side by side."""
    models = resolve_models(cfg, models or cfg.test_models)
    path = cfg.path("valid.parquet")
    if not path.is_file():
        raise ApiError(f"{path} not found; fix: run `python -m kaggle_utils.api.judge prepare` with this recipe")
    rows = pd.read_parquet(path)
    cfg = dataclasses.replace(cfg, prices=with_fine_tuned_prices(cfg.prices, models))
    client = ChatClient(cfg)
    store = JsonlStore(cfg.path("test.requests.jsonl"))
    requests = judge_requests(client, rows, models, cfg.both_orders, cfg.max_field_chars)
    run = client.run(requests, store, desc="judge answers", after_each=after_each)
    answers = answers_frame(requests, store.load())
    table = score_table(answers, cfg.prices)
    answers.to_parquet(cfg.path("test_answers.parquet"), index=False)
    table.to_csv(cfg.path("test_table.csv"), index=False)
    return Evaluation(table, answers, run, {"validation rows": len(rows), "models": ", ".join(models)})


def compare(cfg: JudgeConfig, after_each: Callable[[ChatResult], None] | None = None) -> Evaluation:
    """The two ``test_models`` on the same validation rows, plus how often they pick the same winner."""
    if len(cfg.test_models) != 2:
        raise ValueError(f"compare needs exactly two test_models, got {cfg.test_models}")
    result = evaluate(cfg, after_each=after_each)
    first, second = resolve_models(cfg, cfg.test_models)
    result.table["agreement"] = agreement(result.answers, first, second)
    result.table.to_csv(cfg.path("compare_table.csv"), index=False)
    result.counts["agreement (rows both decide)"] = f"{result.table['agreement'].iloc[0]:.4f}"
    return result


ACTIONS: dict[str, Callable[[JudgeConfig], Any]] = {
    "prepare": prepare,
    "train": train,
    "status": status,
    "test": evaluate,
    "compare": compare,
    "cleanup": cleanup,
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ACTIONS:
        sys.exit(f"usage: python -m kaggle_utils.api.judge {{{','.join(ACTIONS)}}} --recipe NAME [--flags]")
    action = argv.pop(0)
    cfg = parse_config(JudgeConfig, argv)
    try:
        result = ACTIONS[action](cfg)
    except ApiError as err:
        sys.exit(f"judge {action}: {err}")
    if isinstance(result, (Prepared, Evaluation)):
        print(result)


if __name__ == "__main__":
    main()
