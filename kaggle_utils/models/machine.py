"""What decides how the stages run on this machine: the accelerator, the compute dtype, the 4-bit path, versions.

``python -m kaggle_utils.models.machine`` prints it; ``make demo`` and ``make test`` print it at the end, pass or
fail, so that a log from a user's machine says which path it took. The CPU flags listed are the ones that change a
library's path: bitsandbytes has a bf16 CPU kernel for AVX512-BF16 (which :func:`portable_cpu_4bit` keeps out of
use) and torch picks its CPU kernels by AVX2 / AVX512.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

import torch

from kaggle_utils.models.loading import compute_dtype, pick_device

# the CPU features that select a code path in torch or bitsandbytes
PATH_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """Which of :data:`PATH_FLAGS` the CPU reports (Linux); an empty list where ``cpuinfo`` is not readable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in PATH_FLAGS if f in flags]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _four_bit_path(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        return f"bitsandbytes CUDA kernels, nf4 computed in {str(dtype).removeprefix('torch.')}"
    return "bitsandbytes on the CPU: dequantise, then matmul in fp32 (its AVX512-BF16 repack turned off)"


def describe() -> dict[str, str]:
    """The facts, as ``name → value`` strings, in the order they are printed."""
    device = pick_device()
    dtype = compute_dtype(device)
    facts = {
        "python": platform.python_version(),
        "cpu": f"{platform.machine()}, flags: {' '.join(cpu_flags()) or 'none of ' + ' '.join(PATH_FLAGS)}",
        "torch cpu kernels": torch.backends.cpu.get_cpu_capability(),
    }
    # torch's own string says which build it is (+cpu, +cu130); the rest as installed
    facts |= {name: torch.__version__ if name == "torch" else _version(name) for name in PACKAGES}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        major, minor = torch.cuda.get_device_capability(device)
        count = torch.cuda.device_count()
        memory = f"{props.total_memory / 2**30:.0f} GiB"
        facts["gpu"] = f"{count} × {props.name} (sm_{major}{minor}, {memory}), CUDA {torch.version.cuda}"
    else:
        facts["gpu"] = "none: every stage runs on the CPU"
    facts["compute dtype"] = str(dtype).removeprefix("torch.")
    facts["4-bit path"] = _four_bit_path(device, dtype)
    return facts


def report() -> str:
    return "\n".join(f"machine: {name}: {value}" for name, value in describe().items())


if __name__ == "__main__":
    print(report())
