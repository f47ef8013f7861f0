"""kaggle_utils.models.machine: the facts that decide a run's path, as make demo / make test print them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kaggle_utils.models import machine


def test_cpu_flags_are_read_from_cpuinfo(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert machine.cpu_flags(info) == ["avx2", "avx512f", "avx512_bf16"]
    assert machine.cpu_flags(tmp_path / "missing") == []


def test_cpu_run_reports_fp32_and_the_portable_4bit_path(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    facts = machine.describe()
    assert facts["gpu"].startswith("none") and facts["compute dtype"] == "float32"
    assert "repack turned off" in facts["4-bit path"]
    assert facts["torch"] == torch.__version__ and facts["bitsandbytes"][0].isdigit()


def test_a_t4_reports_fp16(monkeypatch) -> None:
    """sm_75 (a T4): fp16, whatever torch says of emulated bf16."""

    class Props:
        name, total_memory = "Tesla T4", 15 * 2**30

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: Props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    facts = machine.describe()
    assert facts["gpu"].startswith("2 × Tesla T4 (sm_75, 15 GiB)")
    assert facts["compute dtype"] == "float16" and "computed in float16" in facts["4-bit path"]


@pytest.mark.slow  # a subprocess
def test_command_prints_one_line_a_fact() -> None:
    out = subprocess.run([sys.executable, "-m", "kaggle_utils.models.machine"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == len(machine.describe()) and all(line.startswith("machine: ") for line in lines)
