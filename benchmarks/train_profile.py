"""Where a train-stage step's GPU time and memory go: ``bench_train --profile VARIANT`` (CUDA only).

The variant's run is set up by the stage itself (``kaggle_utils.train.setup``) and stepped by its own
``train_step``; after ``warmup`` steps, ``steps`` more are recorded by ``torch.profiler`` (CPU and CUDA activities)
with the allocator's peak read at the end of each phase of a step:

* ``forward``: from the previous step's end to the end of the model's forward (inputs, zeroed grads, forward);
* ``loss + backward``: to the optimiser's step (loss, backward, gradient clipping, the finite check);
* ``optimizer``: AdamW's step.

Printed: the top kernels by self CUDA time, each with its share of the recorded steps' wall time, the kernels' busy
share of that wall time (the rest is the GPU waiting on the CPU: launches, Python, syncs), and the phase table.
The profiler's own table (top ops by self CUDA time) is written to ``<work>/profile-<variant>.txt``. The profiler
adds a little to each launch, so the recorded steps run slower than the bench's timed ones: read the shares, not the
seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from kaggle_utils.train import TrainConfig, setup
from kaggle_utils.training.schedule import schedule
from kaggle_utils.training.step import train_step

PHASES = ("forward", "loss + backward", "optimizer")


class PhasePeaks:
    """Peak and held bytes at the end of each phase of a step, over the steps it is attached for.

    ``read_peak`` / ``reset_peak`` / ``read_held``: the allocator's counters (``torch.cuda.max_memory_allocated``,
    ``reset_peak_memory_stats``, ``memory_allocated``), passed in so that the phases are testable off a GPU.
    """

    def __init__(self, read_peak: Callable[[], int], reset_peak: Callable[[], None], read_held: Callable[[], int]):
        self.read_peak, self.reset_peak, self.read_held = read_peak, reset_peak, read_held
        self.peak = dict.fromkeys(PHASES, 0)
        self.held = dict.fromkeys(PHASES, 0)
        self.handles: list = []

    def _end(self, phase: str) -> None:
        self.peak[phase] = max(self.peak[phase], self.read_peak())
        self.held[phase] = max(self.held[phase], self.read_held())
        self.reset_peak()

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> PhasePeaks:
        self.reset_peak()
        self.handles = [
            model.register_forward_hook(lambda *_: self._end("forward")),
            optimizer.register_step_pre_hook(lambda *_: self._end("loss + backward")),
            optimizer.register_step_post_hook(lambda *_: self._end("optimizer")),
        ]
        return self

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()

    def table(self) -> str:
        lines = [f"{'phase':<18}{'peak GiB':>10}{'held GiB':>10}"]
        lines += [f"{p:<18}{self.peak[p] / 2**30:>10.1f}{self.held[p] / 2**30:>10.1f}" for p in PHASES]
        return "\n".join(lines)


def top_kernels(events, wall_us: float, n: int = 15) -> tuple[list[tuple[str, int, float, float]], float]:
    """The ``n`` GPU kernels with the most self time among profiler ``events`` (``key_averages()``), each as
    ``(name, calls, milliseconds, share of wall_us)``; and the share of ``wall_us`` that all kernels together take.

    Only kernel events (device type CUDA) count: an operator's self device time is its kernels' time again."""
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    busy = sum(e.self_device_time_total for e in kernels)
    rows = [(e.key, e.count, e.self_device_time_total / 1e3, e.self_device_time_total / wall_us) for e in kernels[:n]]
    return rows, busy / wall_us


def kernel_table(rows: list[tuple[str, int, float, float]], busy: float, steps: int) -> str:
    lines = [f"{'kernel (self CUDA time)':<72}{'calls':>7}{'ms/step':>9}{'share':>7}"]
    lines += [f"{name[:71]:<72}{calls // steps:>7}{ms / steps:>9.1f}{share:>7.1%}" for name, calls, ms, share in rows]
    lines.append(f"{'all kernels: GPU busy for this share of the steps':<88}{busy:>7.1%}")
    return "\n".join(lines)


def profile_stage(cfg: TrainConfig, out: Path, warmup: int = 2, steps: int = 2) -> str | None:
    """Profile ``steps`` steps of the stage under ``cfg`` after ``warmup`` steps; print and return the report (None,
    with a message, off CUDA: the profile is of CUDA kernels and the allocator)."""
    if not cfg.model.device.startswith("cuda") or not torch.cuda.is_available():
        print(f"profile: {cfg.model.device} is not a CUDA device; nothing recorded (the profile reads CUDA kernels)")
        return None
    run = setup(cfg)
    batches = schedule(cfg.batching, run.data.lengths)
    for _ in range(warmup):  # the first step holds the largest micro-batch: the allocator's pool is sized there
        train_step(run, *_step_args(next(batches)))
    torch.cuda.synchronize()
    cuda = torch.cuda
    phases = PhasePeaks(cuda.max_memory_allocated, cuda.reset_peak_memory_stats, cuda.memory_allocated)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        phases.attach(run.model, run.optimizer)
        t0 = time.perf_counter()
        tokens = sum(train_step(run, *_step_args(next(batches)))["tokens"] for _ in range(steps))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        phases.detach()
    events = prof.key_averages()
    out.write_text(events.table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90))
    rows, busy = top_kernels(events, wall * 1e6)
    report = (
        f"profile: {steps} step(s), {tokens:,} tokens, {wall / steps:.2f} s a step under the profiler\n"
        f"{kernel_table(rows, busy, steps)}\n\n{phases.table()}\nprofiler table: {out}"
    )
    print(report)
    del run
    return report


def _step_args(step: tuple) -> tuple:
    """``schedule``'s ``(epoch, swapped, micro_batches)`` as ``train_step``'s ``(epoch, micro_batches, swapped)``."""
    epoch, swapped, micro = step
    return epoch, micro, swapped
