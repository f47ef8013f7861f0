"""Model inputs: a template, a truncation strategy, token ids that never exceed the max length.

With the default template (``tagged``) a row becomes::

    [special prefix] <PROMPT>{prompt}</PROMPT>\\n<RESPONSE A>{a}</RESPONSE A>\\n<RESPONSE B>{b}</RESPONSE B>
    \\nWhich response is better?

Every template is four fixed pieces around the three fields. Pieces and fields are tokenised separately and
joined as ids, so truncation never decodes text (no special token can be decoded into the middle of a field)
and never cuts a template marker. The ``chat`` template is rendered once through the tokenizer's own chat
template with placeholder strings in place of the fields, and cut into its pieces at the placeholders: the
turn markers (``<|im_start|>`` …) are pieces and survive any truncation.
The last token is fixed text: decoder classifiers pool the last real token, and that token then sees both
responses in full context.

Truncation strategies (``InputConfig.truncation``), all symmetric in A and B, all within ``max_length``
including special tokens:

* ``right``: prompt capped at ``prompt_fraction`` of the field budget, the responses share the rest equally;
  each cut field keeps its head (:func:`allocate`);
* ``head_tail``: the same shares; a cut field keeps its head and its tail around a visible snip marker;
* ``proportional``: prompt capped the same way, the responses share the rest in proportion to their lengths;
  each cut field keeps its head (:func:`allocate_proportional`).

Unused shares always go to the other fields. ``encode`` tokenises in chunks of rows, with tiktoken's BPE over the
tokenizer's own vocabulary where that provably gives the same ids (Qwen2.5's byte-level BPE: ~2-3x faster than
the Hugging Face tokenizer here), else with the fast tokenizer's batch call; optionally over several processes.
With ``cache_dir`` set the ids are stored on disk (:mod:`kaggle_utils.inputs.cache`) and a second call with the
same data and settings loads them.

``encode_pairs`` packs the rows into a :class:`~kaggle_utils.inputs.tokens.PairTokens` store instead: one int32 copy
of the cut fields, either A/B orientation built per batch, memory-mappable (560K rows at max length 2,500: 2.6 GB
instead of ~64 GB of lists in both orientations; ``benchmarks/bench_train_memory.py``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import unicodedata
import weakref
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kaggle_utils.data.schema import TEXT_COLUMNS
from kaggle_utils.inputs import tokens
from kaggle_utils.store import rows_fingerprint

TEMPLATES = ("tagged", "chat", "plain")
TRUNCATIONS = ("right", "head_tail", "proportional")

# Template text around the three fields; edit here and nowhere else.
TAGGED_PIECES = (
    "<PROMPT>",
    "</PROMPT>\n<RESPONSE A>",
    "</RESPONSE A>\n<RESPONSE B>",
    "</RESPONSE B>\nWhich response is better?",
)
PLAIN_PIECES = (
    "Prompt:\n",
    "\n\nResponse A:\n",
    "\n\nResponse B:\n",
    "\n\nWhich response is better, A or B?",
)
# The chat form: an MT-bench-style pairwise judge instruction and user turn.
CHAT_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user question displayed below. Choose the assistant that follows the user's instructions and answers "
    "the user's question better. Do not let the order of the responses or their length influence your decision."
)
CHAT_USER = (
    "[User Question]\n{prompt}\n\n"
    "[The Start of Assistant A's Answer]\n{response_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{response_b}\n[The End of Assistant B's Answer]\n\n"
    "Which assistant is better, A or B?"
)
# Stand-ins for the fields while the chat template is rendered; no real text contains them.
_PLACEHOLDERS = ("\ue000FIELD-PROMPT\ue000", "\ue000FIELD-A\ue000", "\ue000FIELD-B\ue000")
# Shown where ``head_tail`` cut the middle out of a field; tokenised once, spliced in as ids.
SNIP_MARKER = " … "
# Byte-level BPE tokens rarely span more than this many characters; text beyond
# max_length * this is never shown, so it is cut before tokenising (30K-token prompts exist).
# ``head_tail`` tokenises the same number of characters from the end of such a text for its tail.
MAX_CHARS_PER_TOKEN = 16
# Rows tokenised per batch call: bounds the memory held by untruncated field ids.
CHUNK_ROWS = 4096


@dataclass
class InputConfig:
    """How a row becomes token ids."""

    # total tokens per row, special tokens and template included (the seed trained at 2500)
    max_length: int = 2500
    # share of the field budget the prompt may take before the responses get theirs
    prompt_fraction: float = 0.25
    # how the fields are framed: "tagged" (<PROMPT>…</PROMPT>…), "chat" (judge instruction and user turn through
    # the tokenizer's chat template) or "plain" ("Prompt:" / "Response A:" / "Response B:")
    template: str = "tagged"
    # how over-long fields are cut: "right" (keep the head), "head_tail" (head + snip marker + tail) or
    # "proportional" (responses share their budget in proportion to their lengths; keep the head)
    truncation: str = "right"
    # share of a cut field's kept tokens taken from its head under "head_tail" (the rest from its tail)
    head_fraction: float = 0.5
    # tokenise special-token text inside fields (a literal "<|im_end|>") as plain text, so that user text can
    # never end a turn or end the sequence; off by default to keep the ids of earlier runs
    split_special_tokens: bool = False
    # worker processes for tokenising; 1 uses the tokenizer's own threads only
    num_proc: int = 1
    # tokenise with tiktoken's BPE (2-3x faster here) when the tokenizer is a byte-level BPE with tiktoken's rules
    # (ids are merge ranks, whole words looked up first) and both agree on a probe text; else the Hugging Face one
    fast_bpe: bool = True
    # folder of the on-disk token cache (parquet of token ids, keyed by settings, tokenizer and rows); None: off
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.max_length < 64:
            raise ValueError(f"max_length={self.max_length} is too small to hold the template")
        if not 0 < self.prompt_fraction < 1:
            raise ValueError(f"prompt_fraction={self.prompt_fraction} must be in (0, 1)")
        if self.template not in TEMPLATES:
            raise ValueError(f"template={self.template!r}; expected one of {TEMPLATES}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation={self.truncation!r}; expected one of {TRUNCATIONS}")
        if not 0 <= self.head_fraction <= 1:
            raise ValueError(f"head_fraction={self.head_fraction} must be in [0, 1]")
        if self.num_proc < 1:
            raise ValueError(f"num_proc={self.num_proc} must be at least 1")
        # an empty string (a recipe or a flag left empty) means no cache
        self.cache_dir = Path(self.cache_dir) if self.cache_dir else None


# the InputConfig fields that decide a row's token ids: a model must see at inference what it was trained on
INPUT_CONTRACT = ("max_length", "template", "truncation", "prompt_fraction", "head_fraction", "split_special_tokens")


def allocate(lengths: tuple[int, int, int], budget: int, prompt_fraction: float) -> tuple[int, int, int]:
    """Token counts kept for (prompt, a, b) within ``budget``.

    The prompt is capped at ``prompt_fraction`` of the budget; the responses share the rest equally, and a
    short field's unused share goes to the other fields. A and B are treated symmetrically, so swapping
    them swaps their allocations (an odd spare token is left unused rather than given to one side).
    """
    lp, la, lb = lengths
    keep_p = min(lp, int(budget * prompt_fraction))
    rest = budget - keep_p
    half = rest // 2
    if la <= half or lb <= half:
        short = min(la, lb)
        long_keep = min(max(la, lb), rest - short)
        keep_a, keep_b = (short, long_keep) if la <= lb else (long_keep, short)
    else:
        keep_a = keep_b = half
    # hand back what the responses did not use to the prompt
    keep_p = min(lp, budget - keep_a - keep_b)
    return keep_p, keep_a, keep_b


def allocate_proportional(lengths: tuple[int, int, int], budget: int, prompt_fraction: float) -> tuple[int, int, int]:
    """Token counts kept for (prompt, a, b): responses share their budget in proportion to their lengths.

    The prompt is capped at ``prompt_fraction`` of the budget; when the responses do not fit in the rest,
    each keeps ``rest * len / (len_a + len_b)`` (floored, so swapping A and B swaps the counts); what they
    leave goes back to the prompt. At most one token of the budget is left unused while a field is cut.
    """
    lp, la, lb = lengths
    keep_p = min(lp, int(budget * prompt_fraction))
    rest = budget - keep_p
    if la + lb <= rest:
        keep_a, keep_b = la, lb
    else:
        # rest < la + lb, so each share is below its field's length
        keep_a, keep_b = rest * la // (la + lb), rest * lb // (la + lb)
    keep_p = min(lp, budget - keep_a - keep_b)
    return keep_p, keep_a, keep_b


ALLOCATORS = {"right": allocate, "head_tail": allocate, "proportional": allocate_proportional}


def _split_chat_template(tokenizer) -> tuple[str, str, str, str]:
    """The four text pieces of the chat form, rendered through ``tokenizer.apply_chat_template``."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"template='chat' needs a tokenizer with a chat template; {type(tokenizer).__name__} has none "
            "(use template='tagged' or 'plain', or set tokenizer.chat_template)"
        )
    user = CHAT_USER.format(prompt=_PLACEHOLDERS[0], response_a=_PLACEHOLDERS[1], response_b=_PLACEHOLDERS[2])
    try:
        messages = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - Gemma's template raises on a system turn: fold it into the user turn
        messages = [{"role": "user", "content": CHAT_SYSTEM + "\n\n" + user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pieces, rest = [], text
    for ph in _PLACEHOLDERS:
        if rest.count(ph) != 1:
            raise ValueError(f"the chat template must render each field exactly once; rendered: {text!r}")
        head, rest = rest.split(ph)
        pieces.append(head)
    pieces.append(rest)
    return tuple(pieces)


def template_pieces(tokenizer, template: str) -> tuple[str, str, str, str]:
    """Text before the prompt, between prompt and A, between A and B, and after B."""
    if template == "tagged":
        return TAGGED_PIECES
    if template == "plain":
        return PLAIN_PIECES
    if template == "chat":
        return _split_chat_template(tokenizer)
    raise ValueError(f"template={template!r}; expected one of {TEMPLATES}")


@contextmanager
def _special_tokens_as_text(tokenizer, enabled: bool):
    """Within the block the fast tokenizer encodes special-token text (``<|im_end|>``) as ordinary text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not enabled or backend is None:
        yield
        return
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        yield
    finally:
        backend.encode_special_tokens = before


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the character each byte is written as in a byte-level BPE vocabulary."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


# Tokenised by both paths before tiktoken is trusted; covers scripts, emoji, digits, whitespace runs, tags.
_PROBE = (
    "Hello, world! It's 2026: 3.14159 × 42 = 131.95\n\n  indented\tcode() {return x;}\r\n"
    "Привет, мир! 你好，世界！こんにちは 안녕하세요 مرحبا بالعالم שלום עולם xin chào thế giới Grüße "
    "👍🏽👨‍👩‍👧 \u200f\u200d\ufe0f <PROMPT></RESPONSE A> <|im_end|> <|endoftext|>   \n\n\n    end"
)


class _TiktokenBPE:
    """tiktoken's BPE over a Hugging Face byte-level BPE tokenizer's own vocabulary, ids unchanged.

    Used only when the tokenizer's semantics are tiktoken's (byte-level BPE whose ids are merge ranks, one split
    regex, whole words looked up first, no normaliser but NFC): then the ids are the same by construction, and
    a probe text checks it. Texts that NFC would change go to the Hugging Face tokenizer (it normalises between
    special tokens, which a whole-text NFC cannot reproduce exactly).
    """

    def __init__(self, tokenizer, encoding, nfc: bool):
        self.tokenizer = tokenizer
        self.encoding = encoding
        self.nfc = nfc
        self.threads = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def build(cls, tokenizer) -> _TiktokenBPE | None:
        try:
            import tiktoken
        except ImportError:
            return None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        spec = json.loads(backend.to_str())
        model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        if (
            model.get("type") != "BPE"
            or not model.get("ignore_merges")
            or model.get("dropout")
            or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix")
            or len(steps) != 2
            or steps[0].get("type") != "Split"
            or steps[0].get("behavior") != "Isolated"
            or steps[0].get("invert")
            or "Regex" not in steps[0].get("pattern", {})
            or steps[1].get("type") != "ByteLevel"
            or steps[1].get("use_regex")
            or steps[1].get("add_prefix_space")
            or norm not in (None, {"type": "NFC"})
        ):
            return None
        added = spec.get("added_tokens", [])
        if any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") or t.get("normalized") for t in added):
            return None
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        try:
            ranks = {bytes(byte_of[c] for c in token): idx for token, idx in model["vocab"].items()}
            encoding = tiktoken.Encoding(
                name="hf-byte-level-bpe",
                pat_str=steps[0]["pattern"]["Regex"],
                mergeable_ranks=ranks,
                special_tokens={t["content"]: t["id"] for t in added},
            )
        except (KeyError, ValueError):  # a character outside the byte alphabet, duplicate ids, a bad regex
            return None
        fast = cls(tokenizer, encoding, nfc=norm is not None)
        for split in (False, True):
            with _special_tokens_as_text(tokenizer, split):
                if fast.encode([_PROBE], split) != _hf_tokenize(tokenizer, [_PROBE]):
                    return None
        return fast

    def _encode_slice(self, texts: list[str], split_special_tokens: bool) -> list[list[int]]:
        enc = self.encoding
        if split_special_tokens:
            return [enc.encode_ordinary(t) for t in texts]
        return [enc.encode(t, allowed_special="all", disallowed_special=()) for t in texts]

    def encode(self, texts: list[str], split_special_tokens: bool) -> list[list[int]]:
        # one task per thread over a contiguous slice: tiktoken releases the GIL inside each encode, and a task
        # per text (tiktoken's own encode_batch) costs more in locking than the short fields take to encode
        if self.threads == 1 or len(texts) < 2 * self.threads:
            out = self._encode_slice(texts, split_special_tokens)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads)
            step = -(-len(texts) // self.threads)
            parts = self._pool.map(
                self._encode_slice,
                [texts[i : i + step] for i in range(0, len(texts), step)],
                [split_special_tokens] * self.threads,
            )
            out = [ids for part in parts for ids in part]
        if self.nfc:
            odd = [i for i, t in enumerate(texts) if not unicodedata.is_normalized("NFC", t)]
            if odd:
                with _special_tokens_as_text(self.tokenizer, split_special_tokens):
                    for i, ids in zip(odd, _hf_tokenize(self.tokenizer, [texts[i] for i in odd]), strict=True):
                        out[i] = ids
        return out


# Built once per tokenizer (~2 s: the vocabulary is read from tokenizer.json); rebuilt if its pipeline changes.
_FAST_BPE: dict[int, tuple[weakref.ref, tuple, _TiktokenBPE | None]] = {}


def _fast_bpe_for(tokenizer) -> _TiktokenBPE | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    model = backend.model
    state = (
        len(tokenizer),
        repr(backend.normalizer),
        repr(backend.pre_tokenizer),
        type(model).__name__,
        getattr(model, "ignore_merges", None),
    )
    hit = _FAST_BPE.get(id(tokenizer))
    if hit is not None and hit[0]() is tokenizer and hit[1] == state:
        return hit[2]
    fast = _TiktokenBPE.build(tokenizer)
    _FAST_BPE[id(tokenizer)] = (weakref.ref(tokenizer), state, fast)
    return fast


def _hf_tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of each text, no special tokens added; the Rust batch call (all cores, no offsets) when available."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return [list(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


# The formatter of a worker process (set once per process by the pool's initializer).
_WORKER_FORMATTER: PromptFormatter | None = None


def _init_worker(fmt: PromptFormatter) -> None:
    global _WORKER_FORMATTER
    if fmt._fast is not None:
        # the parent's thread pool did not survive the fork; one thread per worker process
        fmt._fast._pool = None
        fmt._fast.threads = 1
    _WORKER_FORMATTER = fmt


def _worker_encode(columns: tuple[list[str], list[str], list[str]]) -> list[list[int]]:
    return _WORKER_FORMATTER.encode_texts(*columns)


def _worker_segments(columns: tuple[list[str], list[str], list[str]]) -> tuple[np.ndarray, np.ndarray]:
    return _WORKER_FORMATTER.encode_segments(*columns)


class PromptFormatter:
    """Turns rows of (prompt, response_a, response_b) into token ids of at most ``max_length``."""

    def __init__(self, tokenizer, cfg: InputConfig):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.piece_texts = template_pieces(tokenizer, cfg.template)
        # the chat template writes its own BOS (Gemma's "<bos>") as text; the others get the tokenizer's prefix
        self.prefix = [] if cfg.template == "chat" else list(tokenizer("", add_special_tokens=True)["input_ids"])
        self.pieces = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in self.piece_texts]
        self.snip = list(tokenizer(SNIP_MARKER, add_special_tokens=False)["input_ids"])
        self.fixed_length = len(self.prefix) + sum(len(p) for p in self.pieces)
        self.budget = cfg.max_length - self.fixed_length
        if self.budget < 3:
            raise ValueError(
                f"max_length={cfg.max_length} leaves {self.budget} tokens for the fields after the "
                f"{cfg.template!r} template's {self.fixed_length}; raise max_length"
            )
        self._allocate = ALLOCATORS[cfg.truncation]
        self._char_limit = cfg.max_length * MAX_CHARS_PER_TOKEN
        self._fast = _fast_bpe_for(tokenizer) if cfg.fast_bpe else None
        # which BPE implementation tokenises the fields (the ids are the same either way)
        self.bpe_backend = "tiktoken" if self._fast else "huggingface"

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return self._fast.encode(texts, self.cfg.split_special_tokens)
        with _special_tokens_as_text(self.tokenizer, self.cfg.split_special_tokens):
            return _hf_tokenize(self.tokenizer, texts)

    # --- one chunk -------------------------------------------------------------------------------------------
    def _field_ids(self, texts: list[str]) -> tuple[list[list[int]], dict[int, list[int]]]:
        """Head ids of each text (cut at the character limit) and, for ``head_tail``, the tail ids of cut texts."""
        limit = self._char_limit
        heads = self._tokenize([t[:limit] for t in texts])
        tails: dict[int, list[int]] = {}
        if self.cfg.truncation == "head_tail":
            long_rows = [i for i, t in enumerate(texts) if len(t) > limit]
            if long_rows:
                tail_ids = self._tokenize([texts[i][-limit:] for i in long_rows])
                tails = dict(zip(long_rows, tail_ids, strict=True))
        return heads, tails

    def _cut(self, ids: list[int], tail: list[int] | None, keep: int) -> list[int]:
        """``keep`` tokens of one field: its head, or (``head_tail``) head + snip marker + tail."""
        if self.cfg.truncation != "head_tail" or (tail is None and keep >= len(ids)):
            return ids[:keep]
        room = keep - len(self.snip)
        if room < 2:  # no room for both ends around the marker: keep the head
            return ids[:keep]
        tail = ids if tail is None else tail
        n_head = int(room * self.cfg.head_fraction)
        n_tail = room - n_head
        return ids[:n_head] + self.snip + (tail[max(0, len(tail) - n_tail) :] if n_tail else [])

    def _cut_rows(
        self, fields: list[tuple[list[list[int]], dict[int, list[int]]]], check_swap: bool = False
    ) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """The kept (prompt, a, b) ids of each row, from each field's head ids and ``head_tail`` tail ids.

        ``check_swap``: fail unless the allocation of the A/B-swapped row is this one's with A and B exchanged,
        the property that lets :class:`~kaggle_utils.inputs.tokens.PairTokens` build the B-first row from A-first
        segments.
        """
        (p_ids, p_tail), (a_ids, a_tail), (b_ids, b_tail) = fields
        alloc, budget, fraction = self._allocate, self.budget, self.cfg.prompt_fraction
        out_p, out_a, out_b = [], [], []
        for i, (p, a, b) in enumerate(zip(p_ids, a_ids, b_ids, strict=True)):
            kp, ka, kb = alloc((len(p), len(a), len(b)), budget, fraction)
            if check_swap and alloc((len(p), len(b), len(a)), budget, fraction) != (kp, kb, ka):
                raise ValueError(
                    f"truncation={self.cfg.truncation!r} is not symmetric in A and B for field lengths "
                    f"{(len(p), len(a), len(b))}: the swapped row cannot be built from the stored segments; "
                    "make its allocator swap the response shares when the responses are swapped"
                )
            out_p.append(self._cut(p, p_tail.get(i), kp))
            out_a.append(self._cut(a, a_tail.get(i), ka))
            out_b.append(self._cut(b, b_tail.get(i), kb))
        return out_p, out_a, out_b

    def cut_fields(
        self, prompts: list[list[int]], as_: list[list[int]], bs: list[list[int]]
    ) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """Allocate and cut fields that are already token ids (heads only, no ``head_tail`` tails)."""
        return self._cut_rows([(prompts, {}), (as_, {}), (bs, {})], check_swap=True)

    def encode_texts(self, prompts: list[str], as_: list[str], bs: list[str]) -> list[list[int]]:
        """Token ids of rows given as three lists of texts (no cache, no processes)."""
        cut_p, cut_a, cut_b = self._cut_rows([self._field_ids(texts) for texts in (prompts, as_, bs)])
        pre = self.prefix + self.pieces[0]
        t1, t2, t3 = self.pieces[1:]
        return [pre + p + t1 + a + t2 + b + t3 for p, a, b in zip(cut_p, cut_a, cut_b, strict=True)]

    def encode_segments(self, prompts: list[str], as_: list[str], bs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The cut fields of rows as (ids, fields): ids (T,) int32 each row's P, A, B back to back, fields (n, 3)
        int32 their lengths; what :meth:`encode_pairs` stores (no cache, no processes)."""
        return tokens.pack_segments(*self._cut_rows([self._field_ids(texts) for texts in (prompts, as_, bs)], True))

    # --- a frame ---------------------------------------------------------------------------------------------
    def _encode_uncached(self, df: pd.DataFrame) -> list[list[int]]:
        columns = [df[c].tolist() for c in TEXT_COLUMNS]
        chunks = [tuple(col[i : i + CHUNK_ROWS] for col in columns) for i in range(0, len(df), CHUNK_ROWS)]
        if self.cfg.num_proc > 1 and len(chunks) > 1:
            # fork: workers inherit the formatter (tokenizer included) without pickling it
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(
                self.cfg.num_proc, mp_context=ctx, initializer=_init_worker, initargs=(self,)
            ) as ex:
                parts = list(ex.map(_worker_encode, chunks))
        else:
            parts = [self.encode_texts(*chunk) for chunk in chunks]
        return [row for part in parts for row in part]

    def cache_key(self, df: pd.DataFrame) -> dict:
        """What the ids depend on: settings, template ids, tokenizer and the rows' text."""
        from kaggle_utils.inputs import cache as tokenize_cache

        cfg = self.cfg
        return {
            "version": tokenize_cache.FORMAT_VERSION,
            "template": cfg.template,
            "truncation": cfg.truncation,
            "max_length": cfg.max_length,
            "prompt_fraction": cfg.prompt_fraction,
            "head_fraction": cfg.head_fraction,
            "split_special_tokens": cfg.split_special_tokens,
            "max_chars_per_token": MAX_CHARS_PER_TOKEN,
            "prefix": self.prefix,
            "pieces": self.pieces,
            "snip": self.snip,
            "tokenizer": tokenize_cache.tokenizer_fingerprint(self.tokenizer),
            "rows": rows_fingerprint(df, TEXT_COLUMNS),
        }

    def encode(self, df: pd.DataFrame) -> list[list[int]]:
        """Token ids per row, in row order; every list is at most ``max_length`` long.

        With ``cfg.cache_dir`` set, ids are loaded from the cache when an entry with the same key exists,
        and written there otherwise.
        """
        if self.cfg.cache_dir is None:
            return self._encode_uncached(df)
        from kaggle_utils.inputs import cache as tokenize_cache

        key = self.cache_key(df)
        path = tokenize_cache.entry_path(self.cfg.cache_dir, key)
        if path.is_file():
            return tokenize_cache.load_rows(path)
        rows = self._encode_uncached(df)
        tokenize_cache.save_rows(path, rows, key)
        return rows

    def encode_pairs(self, df: pd.DataFrame, chunk_rows: int | None = None) -> tokens.PairTokens:
        """The rows as a :class:`~kaggle_utils.inputs.tokens.PairTokens` store: one int32 copy of the cut fields,
        rows in either A/B orientation built on demand (``store.rows(idx, swapped)``).

        Rows are tokenised ``chunk_rows`` (default ``CHUNK_ROWS``) at a time and packed into int32 at once, so no
        more than one chunk is ever held as Python lists (over ``num_proc`` processes: one chunk per process).
        With ``cfg.cache_dir`` set the store is a folder ``<key>.pairs`` there, loaded memory-mapped when it
        exists and written otherwise.
        """
        chunk_rows = chunk_rows or CHUNK_ROWS
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows} must be at least 1")
        missing = [c for c in TEXT_COLUMNS if c not in df.columns]
        if missing:
            raise KeyError(f"encode_pairs needs the columns {TEXT_COLUMNS}; the frame lacks {missing}")
        folder = None
        if self.cfg.cache_dir is not None:
            from kaggle_utils.inputs import cache as tokenize_cache

            key = {**self.cache_key(df), "layout": f"pair_tokens/{tokens.FORMAT_VERSION}"}
            folder = tokenize_cache.entry_path(self.cfg.cache_dir, key).with_suffix(".pairs")
            if (folder / "template.json").is_file():
                return tokens.PairTokens.load(folder)
        builder = tokens.PairTokensBuilder(self.prefix, self.pieces)
        # slices of the frame, not whole columns as lists: only the chunks in flight exist as Python strings
        chunks = (
            tuple(df[c].iloc[i : i + chunk_rows].tolist() for c in TEXT_COLUMNS) for i in range(0, len(df), chunk_rows)
        )
        if self.cfg.num_proc > 1 and len(df) > chunk_rows:
            ctx = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(
                self.cfg.num_proc, mp_context=ctx, initializer=_init_worker, initargs=(self,)
            ) as ex:
                # at most two chunks per process in flight (Executor.map would submit, and hold, them all)
                pending: deque = deque()
                for chunk in chunks:
                    pending.append(ex.submit(_worker_segments, chunk))
                    if len(pending) >= 2 * self.cfg.num_proc:
                        builder.append(*pending.popleft().result())
                while pending:
                    builder.append(*pending.popleft().result())
        else:
            for chunk in chunks:
                builder.append(*self.encode_segments(*chunk))
        store = builder.finish()
        if folder is None:
            return store
        store.save(folder)
        del store  # the memory map below replaces the in-memory arrays
        return tokens.PairTokens.load(folder)

    @staticmethod
    def lengths(rows: list[list[int]]) -> np.ndarray:
        return np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
