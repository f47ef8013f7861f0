"""kaggle_utils.models.broadcast through load_classifier(read_once=True): 2 gloo processes on the CPU load a 4-bit nf4
tiny Qwen2, and a tiny Llama, once. Rank 0 reads the weight files; rank 1 opens none of them and ends with the model
it would have loaded itself (today's every-rank load): the same packed codes, quant_state, other tensors, LoRA draws
and training step. The base's checkpoint has no classification head, as a real base has none: rank 0 draws it while
loading."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

# launches processes: make test runs these, make test-fast does not
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

# One rank: every safetensors file it opens is recorded (tests/counting_open.py). It loads the base with read_once
# (rank 0 reads, rank 1 receives), then the way every rank loads it today, both from the same seed, with a LoRA and
# without one (the base as loaded: which of its parameters require a gradient), and saves what each gave (tensors,
# attributes, one training step) to rank<RANK>.pt.
RANK_MAIN = """
import datetime, os, sys
from counting_open import opened  # tests/counting_open.py: before transformers is imported
import torch
from kaggle_utils.models.loading import LoraSettings, ModelConfig, load_classifier

torch.set_num_threads(1)
model_path, out = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
torch.distributed.init_process_group(
    "gloo", init_method=f"file://{out}/store", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
)
cfg = ModelConfig(model_path=model_path, load_in_4bit=True, device="cpu")
lora = LoraSettings(r=4, alpha=8, dropout=0.0)
ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))  # (B, T)

def record(model):
    import bitsandbytes as bnb
    loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, torch.tensor([0, 1]))
    loss.backward()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        "tensors": {**model.state_dict(), **{f"buffer {n}": b for n, b in model.named_buffers()}},
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
        "types": {n: type(p).__name__ for n, p in model.named_parameters()},
        "4bit": {
            n: (m.weight.blocksize, m.weight.quant_type, m.weight.compress_statistics, m.weight.quant_storage,
                m.weight.bnb_quantized, m.weight.module is m, m.quant_state is m.weight.quant_state,
                m.weight.quant_state.shape, m.weight.quant_state.dtype, m.compute_dtype, m.quant_storage)
            for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
        },
        "model": (base.is_loaded_in_4bit, base.is_quantized, type(base.hf_quantizer).__name__, base.training),
        "config": base.config.to_dict(),
        "loss": loss.detach(),
        "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
    }

records, opened_once = {}, []
for name, settings in (("", lora), (" base", None)):
    torch.manual_seed(0)
    already = len(opened)
    once = load_classifier(cfg, 0, lora=settings, quant_storage=torch.float32, read_once=True)
    opened_once += opened[already:]
    records["once" + name] = record(once)
    torch.manual_seed(0)
    records["own" + name] = record(load_classifier(cfg, 0, lora=settings, quant_storage=torch.float32))
torch.save({"opened": opened_once, **records}, f"{out}/rank{rank}.pt")
torch.distributed.destroy_process_group()
"""


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def headless(request, qwen_path: Path, tmp_path_factory) -> Path:
    """A tiny base without its classification head in the checkpoint (a base model's files): loading draws it. The
    project's tiny Qwen2, and a tiny Llama (the structure of the Llama-3.3-70B teacher)."""
    folder = tmp_path_factory.mktemp("headless") / f"{request.param}-tiny"
    if request.param == "qwen2":
        shutil.copytree(qwen_path, folder)
    else:
        from benchmarks.bench_infer import build

        build("llama-tiny", folder, device="cpu")
    for path in folder.glob("*.safetensors"):
        weights = load_file(path)
        save_file({k: v for k, v in weights.items() if not k.startswith("score.")}, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def ranks(headless: Path, tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks recorded (RANK_MAIN)."""
    out = tmp_path_factory.mktemp("read_once")
    (out / "rank_main.py").write_text(RANK_MAIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(out / "rank_main.py"), str(headless), str(out)]
    procs = [
        subprocess.Popen(cmd, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {rank}:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_only_rank_0_reads_the_weight_files(ranks, headless) -> None:
    weights = sorted(str(p.resolve()) for p in headless.glob("*.safetensors"))
    assert weights and set(weights) <= set(ranks[0]["opened"])
    assert ranks[1]["opened"] == []


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes: packed nf4 codes stored as float32 may read as NaN, which equals nothing."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same(got: dict, expected: dict, what: str) -> None:
    """Two records (RANK_MAIN's ``record``) equal: every tensor bit for bit (dtype and shape too), every attribute."""
    assert got["tensors"].keys() == expected["tensors"].keys(), what
    for name, value in expected["tensors"].items():
        mine = got["tensors"][name]
        assert (mine.dtype, mine.shape) == (value.dtype, value.shape), f"{what}: {name}"
        assert torch.equal(_bits(mine), _bits(value)), f"{what}: {name}"
    for key in ("trainable", "types", "4bit", "model", "config"):
        assert got[key] == expected[key], f"{what}: {key}"
    torch.testing.assert_close(got["loss"], expected["loss"], rtol=0, atol=0)
    assert got["grads"].keys() == expected["grads"].keys() and got["grads"]
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=0, msg=f"{what}: grad of {name}")


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "base"])
def test_each_rank_holds_the_model_it_would_have_loaded_itself(ranks, rank, lora) -> None:
    """Read once or read by every rank: the same packed nf4 codes and quant_state (absmax, nested absmax and code,
    code; blocksize, shape, dtype, offset in bitsandbytes' packed entry), the same other tensors and trainable set,
    the same LoRA drawn after the load (rank 0's generator state travels), the same loss and gradients."""
    key = "" if lora else " base"
    once, own = ranks[rank]["once" + key], ranks[rank]["own" + key]
    packed = [n for n in own["tensors"] if n.endswith("weight.quant_state.bitsandbytes__nf4")]
    assert len(packed) == len(own["4bit"]) == 14  # 2 layers x 7 linears, each with its quant_state
    assert any("lora_A" in n for n in own["trainable"]) == lora
    assert "model.embed_tokens.weight" in own["trainable"] or lora  # from_pretrained leaves the base trainable
    _assert_same(once, own, f"rank {rank}")


def test_the_ranks_hold_one_model(ranks) -> None:
    """The head rank 0 drew while loading is the one rank 1 holds: sharding cuts one model, not two."""
    _assert_same(ranks[1]["once"], ranks[0]["once"], "rank 1 vs rank 0")
    head = [n for n in ranks[0]["once"]["tensors"] if n.endswith("score.original_module.weight")]
    assert head
