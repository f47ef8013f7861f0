"""What the GPU did while a benchmark ran: SM clock, power, temperature and throttle reasons, sampled by nvidia-smi.

A timed window whose steps slow down half-way (seen on the lent H200: ~1.2 s a step, then ~2.5 s after ~30 s) is
either the code or the card; these samples say which. ``GpuSampler`` runs ``nvidia-smi`` once a second on a thread
while its ``with`` block runs and summarises the samples; without ``nvidia-smi`` (a CPU machine), or not
``enabled``, it records nothing and its summary is empty.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from dataclasses import dataclass, field

QUERY = "clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"


@dataclass(frozen=True)
class Sample:
    sm_mhz: float
    watts: float
    celsius: float
    reasons: int  # the bit mask of active clock-event (throttle) reasons; 0 or 1 (idle) when unthrottled


def parse(line: str) -> Sample | None:
    """One ``nvidia-smi --format=csv,noheader,nounits`` line of ``QUERY``; None where a field is not a number."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 4:
        return None
    try:
        return Sample(float(parts[0]), float(parts[1]), float(parts[2]), int(parts[3], 16))
    except ValueError:  # "[N/A]" on a card that does not report one
        return None


@dataclass
class GpuSampler:
    """``with GpuSampler(index) as gpu: ...`` then ``gpu.summary()``."""

    index: int = 0
    enabled: bool = True  # False: a run on the CPU, nothing sampled
    period_s: float = 1.0
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if self.enabled and shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        cmd = ["nvidia-smi", "-i", str(self.index), f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"]
        while not self._stop.wait(self.period_s):
            out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
            sample = parse(out.strip().splitlines()[0]) if out.strip() else None
            if sample is not None:
                self.samples.append(sample)

    def summary(self) -> dict:
        """SM clock first / last third / min (MHz), max power and temperature, and the throttle reasons seen."""
        s = self.samples
        if not s:
            return {}
        third = max(1, len(s) // 3)
        reasons = 0
        for x in s:
            reasons |= x.reasons
        return {
            "sm MHz first/last third": f"{_mean_clock(s[:third])}/{_mean_clock(s[-third:])}",
            "sm MHz min": round(min(x.sm_mhz for x in s)),
            "max W": round(max(x.watts for x in s)),
            "max C": round(max(x.celsius for x in s)),
            "throttle": hex(reasons),
        }


def _mean_clock(samples: list[Sample]) -> int:
    return round(sum(x.sm_mhz for x in samples) / len(samples))
