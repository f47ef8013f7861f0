"""kaggle_utils.train with batch_tokens=0: the micro-batch budget measured by a training forward and backward.

A fake gauge stands in for the GPU's memory: a hook on the tiny model charges it ``PER_TOKEN`` bytes per padded
token in the forward, and raises ``torch.OutOfMemoryError`` in the backward of a batch above its true limit (where
training's memory peaks: the activations kept for backward).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from kaggle_utils import train as train_module
from kaggle_utils.scoring.memory import GiB, MiB
from kaggle_utils.train import TrainConfig, train
from kaggle_utils.training import memory as train_memory
from kaggle_utils.training.checkpoints import resumed_batch_tokens
from kaggle_utils.training.memory import probe_batch_tokens
from kaggle_utils.training.parallel import Parallel

# every test here probes or runs the train stage: make test runs these, make test-fast does not
pytestmark = pytest.mark.slow

MAX_LENGTH = 256
STATIC, PER_TOKEN = 1 * GiB, 1 * MiB


def _cfg(prepared, qwen_path: Path, out_dir: Path, **kw) -> TrainConfig:
    params = dict(
        model_path=qwen_path,
        load_in_4bit=False,
        train_file=prepared["train"],
        out_dir=out_dir,
        val_fold=-1,
        max_length=MAX_LENGTH,
        max_train_rows=96,
        batch_tokens=1024,
        max_rows=64,
        lr=2e-3,
        epochs=1.0,
        save_every=0,
        lora_dropout=0.0,
    )
    return TrainConfig.flat(**(params | kw))


class FakeGauge:
    """``static`` bytes held after load; ``limit`` is what it reports, ``true_limit`` what the backward may use."""

    def __init__(self, limit: float, true_limit: float | None = None) -> None:
        self.reported, self.true_limit = int(limit), int(limit if true_limit is None else true_limit)
        self.current = self.high = STATIC

    def limit(self) -> int:
        return self.reported

    def allocated(self) -> int:
        return self.current

    def reserved(self) -> int:
        return self.current

    def reset_peak(self) -> None:
        self.high = self.current

    def peak(self) -> int:
        return self.high

    def clear(self) -> None:
        pass


class _OutOfMemoryInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class Charged:
    """Charges ``gauge`` for every forward of ``model``; a batch above its true limit fails in the backward."""

    def __init__(self, model: torch.nn.Module, gauge: FakeGauge) -> None:
        self.gauge, self.shapes, self.backwards = gauge, [], 0
        param = next(p for p in model.parameters() if p.requires_grad)
        self.hooks = [model.register_forward_hook(self._after, with_kwargs=True), param.register_hook(self._count)]

    def _count(self, grad):
        self.backwards += 1
        return grad

    def _after(self, module, args, kwargs, output):
        b, t = kwargs["input_ids"].shape
        self.shapes.append((b, t))
        used = STATIC + PER_TOKEN * b * t
        if used > self.gauge.true_limit:
            output.logits = _OutOfMemoryInBackward.apply(output.logits)
        else:
            self.gauge.high = max(self.gauge.high, used)
        return output


@pytest.fixture(scope="module")
def tiny_run(prepared, qwen_path, tmp_path_factory):
    """A run as setup builds it (a given budget), whose model and rows the probe is run on (dropout: draws)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return train_module.setup(_cfg(prepared, qwen_path, tmp_path_factory.mktemp("probe"), lora_dropout=0.1))


def _probe(run, gauge: FakeGauge) -> tuple:
    charged, lines = Charged(run.model, gauge), []
    try:
        budget = probe_batch_tokens(
            run.cfg, run.model, run.data, run.tok.pad_token_id, run.device, run.precision, gauge=gauge, log=lines.append
        )
    finally:  # the model is shared by this module's tests
        for hook in charged.hooks:
            hook.remove()
    return budget, charged, lines


def test_the_budget_comes_from_the_gauge_and_the_optimiser_state_is_kept_off_it(tiny_run) -> None:
    reserve = 2 * 4 * sum(p.numel() for p in tiny_run.params)  # AdamW's two fp32 moments per trainable weight
    free = 4096 * MiB  # left for batches once the optimiser's state is kept
    budget, charged, lines = _probe(tiny_run, FakeGauge(STATIC + reserve + free))
    longest = int(tiny_run.data.lengths.max())
    assert (budget.limit, budget.static, budget.longest) == (STATIC + free, STATIC, longest)
    assert budget.bytes_per_token == PER_TOKEN  # measured on 4 of the longest rows
    assert budget.tokens == int(0.85 * free / PER_TOKEN) and budget.reason == "set by memory"
    assert charged.shapes[:2] == [(1, longest), (4, longest)]
    assert charged.backwards == len(charged.shapes)  # every probe ran its backward
    assert "GiB of the limit kept for the optimiser's state" in lines[0]


def test_out_of_memory_in_the_backward_is_a_batch_that_did_not_fit(tiny_run) -> None:
    longest = int(tiny_run.data.lengths.max())
    reserve = 2 * 4 * sum(p.numel() for p in tiny_run.params)
    # the gauge reports room for ~3.5k tokens; the device only has room for 6 of the longest rows
    gauge = FakeGauge(STATIC + reserve + 4096 * MiB, true_limit=STATIC + 6.5 * longest * PER_TOKEN)
    budget, charged, lines = _probe(tiny_run, gauge)
    assert not all(ok for _, _, ok in budget.probes) and any("ran out of memory" in line for line in lines)
    assert "lowered" in budget.reason
    assert longest <= budget.tokens <= 6.5 * longest
    # every batch the budget allows of the longest rows fits
    assert (budget.tokens // longest) * longest * PER_TOKEN + STATIC <= gauge.true_limit


def test_probing_leaves_weights_gradients_mode_and_random_state_alone(tiny_run) -> None:
    model = tiny_run.model
    model.eval()
    for p in tiny_run.params:  # a gradient already there (accumulating micro-batches) must survive as it was
        p.grad = torch.full_like(p, 0.5)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = [p.grad.clone() for p in tiny_run.params]
    optimiser = tiny_run.optimizer.state_dict()
    rng = torch.get_rng_state()
    reserve = 2 * 4 * sum(p.numel() for p in tiny_run.params)
    budget, charged, _ = _probe(tiny_run, FakeGauge(STATIC + reserve + 4096 * MiB))
    assert charged.backwards >= 2 and budget.measured
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    for p, g in zip(tiny_run.params, grads, strict=True):
        assert torch.equal(p.grad, g)
    assert tiny_run.optimizer.state_dict() == optimiser and not tiny_run.optimizer.state
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    for p in tiny_run.params:
        p.grad = None


def test_zero_on_the_cpu_trains_with_the_fallback_and_a_resume_keeps_the_budget(
    prepared, qwen_path, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(train_memory, "FALLBACK_BATCH_TOKENS", 1024)
    cfg = _cfg(prepared, qwen_path, tmp_path / "run", batch_tokens=0, max_rows=8)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = train(cfg)
    out = buf.getvalue()
    assert "batch_tokens=0: 1,024 padded tokens per micro-batch" in out, out
    assert "fallback: no GPU memory to measure on cpu" in out
    for path in (cfg.data.out_dir / "train_config.json", result.adapter_dir / "train_config.json"):
        assert json.loads(path.read_text())["batch_tokens"] == 1024, path
    assert result.metrics["steps"] == result.metrics["total_steps"] == 15  # 1,024-token micro-batches
    # a rerun with batch_tokens=0 resumes with the checkpoint's budget, not the fallback it would measure now
    monkeypatch.setattr(train_memory, "FALLBACK_BATCH_TOKENS", 8192)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        again = train(cfg)
    assert "resuming with the budget" in buf.getvalue() and "1,024 padded tokens" in buf.getvalue()
    assert again.metrics["steps"] == again.metrics["total_steps"] == 15


def test_every_process_takes_the_smallest_budget(tiny_run, monkeypatch) -> None:
    class TwoProcesses(Parallel):
        def min(self, value: int) -> int:
            return min(value, 300)  # the other process measured 300

    monkeypatch.setattr(train_memory, "FALLBACK_BATCH_TOKENS", 1024)
    run = tiny_run
    with contextlib.redirect_stdout(io.StringIO()):
        cfg = train_memory.measured_batch_tokens(
            run.cfg.replace(batch_tokens=0),
            run.model,
            run.data,
            0,
            run.device,
            run.precision,
            TwoProcesses(),
        )
    assert cfg.optim.batch_tokens == 300


def test_zero_is_refused_where_it_cannot_be_measured(tmp_path) -> None:
    assert TrainConfig.flat(batch_tokens=0).optim.batch_tokens == 0
    with pytest.raises(ValueError, match="batch_tokens >= max_length"):
        TrainConfig.flat(batch_tokens=-1)
    with pytest.raises(ValueError, match="not available with packing=True: give batch_tokens"):
        TrainConfig.flat(batch_tokens=0, packing=True)
    with pytest.raises(ValueError, match="not available under FSDP: give batch_tokens"):
        train_memory.refuse_measured_budget_under_fsdp(TrainConfig.flat(batch_tokens=0).optim, Parallel(fsdp=True))
    train_memory.refuse_measured_budget_under_fsdp(TrainConfig.flat(batch_tokens=4096).optim, Parallel(fsdp=True))


def test_a_checkpoint_without_a_budget_is_not_resumed_with_zero(tmp_path) -> None:
    cfg = TrainConfig.flat(batch_tokens=0, out_dir=tmp_path)
    torch.save({"config": {"batch_tokens": None}}, tmp_path / "checkpoint.pt")
    with pytest.raises(RuntimeError, match="records no batch_tokens to resume with"):
        resumed_batch_tokens(cfg, Parallel())
    assert resumed_batch_tokens(TrainConfig.flat(out_dir=tmp_path), Parallel()).optim.batch_tokens == 8192
