"""benchmarks.gpu_clocks: nvidia-smi's samples read and summarised; a fake nvidia-smi on PATH stands in for the card."""

from __future__ import annotations

import os
import time

from benchmarks.gpu_clocks import GpuSampler, Sample, parse


def test_a_line_of_nvidia_smi_is_read_and_a_card_without_a_field_is_skipped():
    assert parse("1980, 695.12, 71, 0x0000000000000004") == Sample(1980.0, 695.12, 71.0, 4)
    assert parse("1980, [N/A], 71, 0x0") is None
    assert parse("garbage") is None


def test_the_summary_shows_a_clock_that_fell_and_every_throttle_reason_seen():
    gpu = GpuSampler()
    gpu.samples = [Sample(1980, 500, 60, 0)] * 3 + [Sample(1500, 700, 80, 0x4)] * 3 + [Sample(1200, 700, 85, 0x20)] * 3
    assert gpu.summary() == {
        "sm MHz first/last third": "1980/1200",
        "sm MHz min": 1200,
        "max W": 700,
        "max C": 85,
        "throttle": "0x24",
    }


def test_the_sampler_runs_nvidia_smi_while_its_block_runs(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '1410, 400.5, 55, 0x0000000000000000'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with GpuSampler(period_s=0.05) as gpu:
        time.sleep(0.5)
    assert gpu.samples and set(gpu.samples) == {Sample(1410.0, 400.5, 55.0, 0)}
    assert gpu.summary()["sm MHz min"] == 1410
    with GpuSampler(enabled=False, period_s=0.05) as off:  # a CPU run on a GPU machine
        time.sleep(0.2)
    assert off.samples == [] and off.summary() == {}
