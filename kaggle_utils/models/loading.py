"""Loading sequence classifiers: full precision or 4-bit nf4, with a LoRA adapter to train or to apply.

One loader for every stage and every size: a tiny demo model and Qwen2.5-14B take the same path
(``AutoModelForSequenceClassification.from_pretrained`` on a local folder).
"""

from __future__ import annotations

import functools
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from kaggle_utils.models.broadcast import receive_model, send_model
from kaggle_utils.models.packing import packed_name


def pick_device(requested: str = "auto") -> torch.device:
    """``cuda`` when a GPU is visible (first GPU), else ``cpu``; or exactly what was requested (of a layer split
    ``"cuda:0+cuda:1"``, the first device: where the inputs go)."""
    if requested != "auto":
        return torch.device(requested.split("+")[0])
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def compute_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """bf16 on compute capability >= 8.0 (A100/H100), fp16 on older GPUs, fp32 on the CPU; or ``requested``.

    Not ``torch.cuda.is_bf16_supported()``: it counts emulated bf16, which it reports on a T4 (sm_75).
    """
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return torch.float32


# Loading swaps process-wide state in transformers (the default dtype): one load at a time, whatever the thread.
LOAD_LOCK = threading.Lock()
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelFilesError(FileNotFoundError):
    """A model, adapter or tokenizer folder is missing or incomplete; the message names the path and the fix."""


def _check_safetensors(folder: Path) -> None:
    """Every ``.safetensors`` file's header is readable and its data fully present (catches truncated copies)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, "pt"):
                pass
        except Exception as err:  # SafetensorError and OSError: both mean the file cannot be used
            why = f"{path}: unreadable weights ({err}); copy the file again (a truncated upload or download?)"
            raise ModelFilesError(why) from err


def check_model_dir(path: Path | None, what: str = "model", read_weights: bool = True) -> None:
    """A base-model folder: config.json, weights and a tokenizer, before any load is attempted (no hub lookup).

    ``read_weights`` false: the weight files are not opened (their headers not checked), for a process that will not
    read them (a rank that receives rank 0's weights under FSDP; rank 0 checks them)."""
    folder = Path(path or "")
    fix = "attach the model to the notebook (Add input) or pass the folder that save_pretrained wrote"
    if not folder.is_dir():
        raise ModelFilesError(f"{what} folder {folder} does not exist: {fix}")
    if not (folder / "config.json").is_file():
        raise ModelFilesError(f"{what} folder {folder} has no config.json: {fix}")
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ModelFilesError(f"{what} folder {folder} has no weights (*.safetensors / *.bin): {fix}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFilesError(
            f"{what} folder {folder} has no tokenizer ({' / '.join(TOKENIZER_FILES)}): save the tokenizer with "
            "the model (tokenizer.save_pretrained(folder))"
        )
    if read_weights:
        _check_safetensors(folder)


def check_adapter_dir(path: Path | None, what: str = "adapter") -> None:
    """A peft LoRA folder: adapter_config.json and adapter weights, checked before the base model is loaded."""
    folder = Path(path or "")
    fix = "pass the adapter/ folder the train stage wrote, or attach the dataset make upload-model published"
    if not (folder / "adapter_config.json").is_file():
        raise ModelFilesError(f"{what} folder {folder} has no adapter_config.json: {fix}")
    if not any(folder.glob("adapter_model.*")):
        raise ModelFilesError(f"{what} folder {folder} has no adapter_model.safetensors: {fix}")
    _check_safetensors(folder)


@dataclass
class ModelConfig:
    """Which weights to load and how."""

    # local folder of a sequence-classification model (config.json + weights + tokenizer)
    model_path: Path = Path("demo/models/qwen2-tiny")
    # load the base weights as 4-bit nf4 with bitsandbytes (double quantisation); else full precision
    load_in_4bit: bool = True
    # "auto" (first GPU if any, else CPU), or a torch device string such as "cuda:1"
    device: str = "auto"
    # attention kernel; "auto" picks eager for Gemma2 (its logit soft-capping is ignored by sdpa), sdpa otherwise
    attn_implementation: str = "auto"
    # compute dtype: "auto" (bf16 on sm_80+, fp16 on older GPUs, fp32 on the CPU), or "fp16" / "bf16" / "fp32"
    # (fp16 on an H100 rehearses a T4)
    dtype: str = "auto"
    # with the layers split across GPUs (device "cuda:0+cuda:1"): GiB kept free on each for activations
    split_reserve_gib: float = 2.0

    def __post_init__(self) -> None:
        self.model_path = Path(self.model_path)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; expected 'auto' or one of {sorted(DTYPES)}")


@dataclass
class LoraSettings:
    """LoRA on every linear layer of the base; the classification head is trained in full.

    With ``init_adapter`` the LoRA starts from a saved adapter (its A/B weights and targets; ``r`` and ``alpha``
    must be the adapter's) instead of peft's initialisation (A random, B zero): a second training stage.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # adapter folder (``out_dir/adapter`` of an earlier run) whose LoRA weights training continues from
    init_adapter: Path | None = None
    # with init_adapter: keep its trained head; False starts from the head a run without init_adapter starts from
    init_head: bool = False


def load_tokenizer(model_path: Path):
    """The folder's tokenizer, with a pad token. One object per folder and process while its files are unchanged:
    transformers parses tokenizer.json in Python (1.3 s for Qwen2.5's on a laptop core), and a notebook or a test
    session runs several stages on one base. Stages only read it; do not modify the object returned."""
    folder = Path(model_path).resolve()
    files = sorted(p for p in folder.glob("*") if p.is_file() and not p.match("*.safetensors"))
    return _load_tokenizer(folder, tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(folder: Path, _files: tuple):
    from transformers import AutoTokenizer

    # local_files_only: a missing folder is an error here, never a 50-second attempt to reach the hub offline
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tok.pad_token_id is None:
        # decoder models often ship without a pad token; the classifier needs one to find the last real token
        tok.pad_token = tok.eos_token
    return tok


def _attn_impl(cfg: ModelConfig) -> str:
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(cfg.model_path).model_type
    return "eager" if model_type.startswith("gemma2") else "sdpa"


def split_max_memory(spec: str, reserve_gib: float) -> dict:
    """accelerate's ``max_memory`` for a layer split ``"cuda:0+cuda:1"``: each GPU's limit (its memory times the
    per-process fraction) less ``reserve_gib`` for activations; nothing on the CPU (no offloading: too slow)."""
    memory: dict = {"cpu": 0}
    for name in spec.split("+"):
        device = torch.device(name)
        if device.type != "cuda":
            raise ValueError(f"a layer split needs CUDA devices, got {name!r} in {spec!r}")
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        fraction = 1.0 if get_fraction is None else get_fraction(device)
        limit = torch.cuda.get_device_properties(device).total_memory * fraction
        memory[device.index] = int(limit - reserve_gib * 2**30)
    return memory


def portable_cpu_4bit(model) -> int:
    """Keep every bitsandbytes ``Linear4bit`` of ``model`` on its portable CPU path; returns how many were set.

    Why: on a CPU with AVX512-BF16 (AMD Zen 4/5, Intel Sapphire Rapids and later), bitsandbytes 0.50's
    ``Linear4bit.forward`` repacks the nf4 weights *in place* into a CPU-only layout the first time it runs in eval
    mode on an input that needs no gradient, and from then on multiplies in bf16 (``gemv_4bit``). Two things break:
    a model evaluated once (validation during training, a teacher scoring) fails its next training step
    (``result += bias`` on a leaf that requires grad, in ``matmul_4bit``), and no-grad logits move by ~2e-3 from
    ``x @ dequant(W).T``, so results would depend on the CPU's instruction set. With the flag off every CPU
    dequantises and multiplies in the compute dtype, as one without the instruction set does. On a GPU the flag is
    never read (the repack is for CPU inputs only).
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_classifier(
    cfg: ModelConfig,
    pad_token_id: int,
    adapter: Path | None = None,
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    packing: bool = False,
    quant_storage: torch.dtype | None = None,
    on_meta: bool = False,
    read_once: bool = False,
    fp32_residual: bool = True,
    recompute_every: int = 1,
):
    """Load the base classifier; apply a saved ``adapter`` (frozen), or attach a trainable ``lora`` (new, or
    continued from ``lora.init_adapter``).

    ``packing``: attention that takes rows packed into one sequence (:mod:`kaggle_utils.models.packing`) and
    behaves as usual on padded batches.

    ``quant_storage``: the dtype the packed 4-bit weights are stored in (None: bitsandbytes' uint8). FSDP shards
    parameters only as floating tensors: training under FSDP passes the compute dtype (bf16), the dtype of the
    base's other weights, so the nf4 codes travel in bf16-typed storage (the same bytes, four 4-bit codes to a
    bf16 element; the arithmetic is unchanged).

    ``on_meta``: build the model from config.json with its parameters on the meta device, reading no weight file
    (full precision only): under FSDP the ranks other than 0 do so and receive rank 0's weights while the model is
    sharded (:meth:`kaggle_utils.training.parallel.Parallel.wrap`), so the weights are read once, not once a rank.

    ``read_once``: a 4-bit base in a launch of several processes (``torch.distributed`` set up; a collective, every
    rank calls it): rank 0 reads the weight files and quantises, the other ranks build the quantised structure
    without weights and receive rank 0's packed codes, quant_state and other tensors
    (:mod:`kaggle_utils.models.broadcast`). Every rank then holds rank 0's model on its own device, and attaches the
    LoRA as usual.

    ``fp32_residual`` false (4-bit, ``lora``): embeddings and norms kept as loaded (:func:`_residual_in_compute_dtype`).
    ``recompute_every`` (with ``gradient_checkpointing``): one layer in k recomputed (:func:`recompute_only_every`).

    Returns the model on ``pick_device(cfg.device)``, in train mode with LoRA, else in eval mode.
    """
    if not (cfg.model_path / "config.json").is_file():
        raise FileNotFoundError(f"{cfg.model_path}: no config.json; expected a model folder saved by save_pretrained")
    device = pick_device(cfg.device)
    model = _base(cfg, _from_pretrained_kwargs(cfg, device, packing, quant_storage), device, on_meta, read_once)
    if cfg.load_in_4bit:
        portable_cpu_4bit(model)
    model.config.pad_token_id = pad_token_id
    model.config.use_cache = False

    if adapter is not None:
        from peft import PeftModel

        with LOAD_LOCK:
            model = PeftModel.from_pretrained(model, adapter, local_files_only=True)
        model.eval()
        return model
    if lora is None:
        model.eval()
        return model
    return _attach_lora(model, cfg, lora, gradient_checkpointing, fp32_residual, recompute_every)


def _base(cfg: ModelConfig, kwargs: dict, device: torch.device, on_meta: bool, read_once: bool):
    """The base classifier, on ``device``: read from the weight files, built on the meta device (``on_meta``), or
    received from rank 0 (``read_once``, ranks > 0; rank 0 reads the files and sends it)."""
    from transformers import AutoModelForSequenceClassification

    if on_meta and cfg.load_in_4bit:
        raise ValueError(
            f"{cfg.model_path}: a 4-bit model is not built on the meta device and filled while it is sharded "
            "(accelerate does not broadcast Params4bit); pass read_once: rank 0 sends it whole"
        )
    if read_once and not cfg.load_in_4bit:
        raise ValueError(
            f"{cfg.model_path}: read_once is for a 4-bit base; at full precision the ranks > 0 build the model "
            "on_meta and receive rank 0's weights while it is sharded"
        )
    receives = read_once and torch.distributed.get_rank() > 0
    with LOAD_LOCK:
        if on_meta:
            return _empty_classifier(cfg, kwargs)  # stays on meta: Parallel.wrap fills it on the device
        if receives:
            model = _empty_4bit_classifier(cfg, kwargs)
            receive_model(model, device)
            return model
        model = AutoModelForSequenceClassification.from_pretrained(cfg.model_path, local_files_only=True, **kwargs)
        if read_once:
            send_model(model, device)
        if not (cfg.load_in_4bit or "+" in cfg.device):  # device_map placed the 4-bit model and the layer split
            model.to(device)
    return model


def _from_pretrained_kwargs(
    cfg: ModelConfig, device: torch.device, packing: bool, quant_storage: torch.dtype | None
) -> dict:
    """``from_pretrained``'s keyword arguments: dtype, 2 labels, attention; nf4 quantisation and where the layers go."""
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(device, cfg.dtype)
    attention = packed_name(_attn_impl(cfg)) if packing else _attn_impl(cfg)
    kwargs = {"dtype": dtype, "num_labels": 2, "attn_implementation": attention}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # the 2-way head is new and tiny: keep it in full precision so it can be trained
            llm_int8_skip_modules=["score"],
            **({} if quant_storage is None else {"bnb_4bit_quant_storage": quant_storage}),
        )
        kwargs["device_map"] = {"": str(device)}
    if "+" in cfg.device:  # a layer split: accelerate places the layers within each GPU's limit
        kwargs["device_map"], kwargs["max_memory"] = "auto", split_max_memory(cfg.device, cfg.split_reserve_gib)
    return kwargs


def _empty_classifier(cfg: ModelConfig, kwargs: dict):
    """The classifier ``from_pretrained(**kwargs)`` builds at full precision, with its parameters on the meta device
    and no weight file read; buffers stay real on the CPU (rotary tables: not in the checkpoint, so no rank sends them
    at full precision). The 4-bit structure starts from it (:func:`_empty_4bit_classifier`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(cfg.model_path, local_files_only=True, num_labels=kwargs["num_labels"])
    with init_empty_weights(include_buffers=False):
        return AutoModelForSequenceClassification.from_config(
            config, dtype=kwargs["dtype"], attn_implementation=kwargs["attn_implementation"]
        )


def _empty_4bit_classifier(cfg: ModelConfig, kwargs: dict):
    """The 4-bit classifier ``from_pretrained(**kwargs)`` builds, before any weight is read: parameters on the meta
    device, ``Linear4bit`` wherever transformers' bitsandbytes quantizer puts them, and the model's quantisation
    attributes (``is_loaded_in_4bit``, ``hf_quantizer``, ``config.quantization_config``) that peft reads.

    To be filled with a loaded model's tensors (:func:`kaggle_utils.models.broadcast.receive_model`): a Params4bit
    takes its packed codes and quant_state from there, so none is made here.
    """
    from transformers.quantizers import AutoHfQuantizer

    model = _empty_classifier(cfg, kwargs)
    quantizer = AutoHfQuantizer.from_config(kwargs["quantization_config"], pre_quantized=False)
    quantizer.preprocess_model(model=model, dtype=kwargs["dtype"], device_map=kwargs["device_map"])
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    model.eval()  # as from_pretrained leaves it
    return model


def _attach_lora(
    model, cfg: ModelConfig, lora: LoraSettings, gradient_checkpointing: bool, fp32_residual: bool, recompute_every: int
):
    """A trainable LoRA on ``model``: new on every linear layer, or continued from ``lora.init_adapter``; with
    ``gradient_checkpointing``, one decoder layer in every ``recompute_every`` recomputed in backward."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if cfg.load_in_4bit:
        loaded = {name: p.dtype for name, p in model.named_parameters()}
        # freezes the base, upcasts every parameter that is not 4-bit to fp32, and with gradient checkpointing hooks
        # the embeddings' output to require grad (reentrant checkpointing needs an input that does)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        if not fp32_residual:
            _residual_in_compute_dtype(model, loaded)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if gradient_checkpointing and recompute_every > 1:
        recompute_only_every(model, recompute_every)
    if lora.init_adapter is not None:
        model = _continue_adapter(model, lora)
        model.train()
        return model
    peft_cfg = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear",
    )
    model = get_peft_model(model, peft_cfg)
    model.train()
    return model


def _residual_in_compute_dtype(model, loaded: dict[str, torch.dtype]) -> None:
    """Undo ``prepare_model_for_kbit_training``'s fp32 upcast: each parameter back to the dtype it was ``loaded`` in
    (the round trip bf16/fp16 -> fp32 -> back is exact), except the classification head, trained in fp32.

    Why: with fp32 embeddings and norms the residual stream is fp32 under autocast (each norm's output is its fp32
    weight times its input), so every norm, residual add and the copy that autocast and bitsandbytes make before each
    matmul reads and writes, and keeps for backward, twice the bytes of the compute dtype. Without autocast (the CPU
    in half precision) the head would then get half-precision features: a pre-hook casts them to its fp32 weight.
    """
    head = model.score
    kept = {f"score.{name}" for name, _ in head.named_parameters()}
    for name, param in model.named_parameters():
        if name not in kept and param.dtype != loaded[name]:
            param.data = param.data.to(loaded[name])
    if any(dtype != torch.float32 for dtype in loaded.values()):
        head.register_forward_pre_hook(_features_in_head_dtype)


def _features_in_head_dtype(head: torch.nn.Module, args: tuple) -> tuple | None:
    """The head's input in its weight's dtype where no autocast does it (peft's copy of the head keeps this hook)."""
    features, *rest = args
    if torch.is_autocast_enabled(features.device.type) or features.dtype == head.weight.dtype:
        return None
    return (features.to(head.weight.dtype), *rest)


def recompute_only_every(model, every: int) -> list[int]:
    """With gradient checkpointing on, recompute only decoder layers 0, ``every``, 2 x ``every``, ...; the others keep
    their activations for backward. Returns the indices of the recomputed layers.

    transformers' decoder layers (``GradientCheckpointingLayer``) checkpoint their forward while their
    ``gradient_checkpointing`` flag is set (``activation_checkpointing_enable(every_n_layers=...)`` sets the same flags,
    but peft's ``prepare_model_for_kbit_training`` enables checkpointing without that argument).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not any(layer.gradient_checkpointing for layer in layers):
        raise ValueError("recompute_only_every: gradient checkpointing is not enabled on this model")
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every == 0
    return [i for i, layer in enumerate(layers) if layer.gradient_checkpointing]


def _continue_adapter(model, lora: LoraSettings):
    """The saved adapter ``lora.init_adapter`` on ``model``, trainable: LoRA weights as saved, the head as asked.

    The adapter fixes rank, alpha and target layers; a different ``r`` / ``alpha`` in ``lora`` is refused rather
    than silently ignored (the run's saved config would then misstate what was trained). Dropout is the run's.
    """
    from peft import LoraConfig, PeftModel

    folder = Path(lora.init_adapter)
    check_adapter_dir(folder, "init_adapter")
    peft_cfg = LoraConfig.from_pretrained(folder)
    if (peft_cfg.r, peft_cfg.lora_alpha) != (lora.r, lora.alpha):
        raise ValueError(
            f"init_adapter {folder} has LoRA r={peft_cfg.r}, alpha={peft_cfg.lora_alpha}; this run asks for "
            f"r={lora.r}, alpha={lora.alpha}: set lora_r={peft_cfg.r} and lora_alpha={peft_cfg.lora_alpha}"
        )
    peft_cfg.lora_dropout = lora.dropout
    peft_cfg.inference_mode = False
    with LOAD_LOCK, warnings.catch_warnings():
        # a model on meta (a rank receiving rank 0's weights under FSDP) takes none of the adapter's values: torch
        # warns once per tensor that the copy is a no-op, and rank 0's values arrive while the model is sharded
        warnings.filterwarnings("ignore", "copying from a non-meta parameter", UserWarning)
        model = PeftModel.from_pretrained(model, folder, is_trainable=True, config=peft_cfg, local_files_only=True)
    if not lora.init_head:
        # peft keeps the base's head as ``original_module`` beside the trained copy: copying it back gives the head
        # a run without init_adapter starts from (the checkpoint's, or the one drawn under the run's seed)
        from peft.utils.other import ModulesToSaveWrapper

        for wrapper in model.modules():
            if isinstance(wrapper, ModulesToSaveWrapper):
                for copy in wrapper.modules_to_save.values():
                    copy.load_state_dict(wrapper.original_module.state_dict())
    return model


def model_device(model) -> torch.device:
    return next(p.device for p in model.parameters())
