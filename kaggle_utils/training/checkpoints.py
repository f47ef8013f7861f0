"""Resumable runs: ``checkpoint.pt`` (adapter, optimiser, schedule, history, the config that guards it)."""

from __future__ import annotations

import torch

from kaggle_utils.config.cli import config_to_dict
from kaggle_utils.store import write_atomic
from kaggle_utils.training.config import TrainConfig
from kaggle_utils.training.parallel import Parallel
from kaggle_utils.training.run import Run

# fields that may change between a run and its resumption without changing what is trained
RESUMABLE_CHANGES = frozenset({"time_budget_minutes", "save_every", "device", "out_dir", "eval_every_steps"})


def _resume_blockers(saved: dict, current: dict, defaults: dict) -> list[str]:
    """Config fields whose change makes a checkpoint's schedule or weights meaningless for this run. A field the
    checkpoint does not record (added to the package after it was written) blocks only when set off its default:
    at its default it does what the run that wrote the checkpoint did."""
    changed = (k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    return sorted(k for k in changed if k in saved or current[k] != defaults.get(k))


def refuse_fsdp_resume(cfg: TrainConfig, parallel: Parallel) -> None:
    """Under FSDP no checkpoint is written (the optimiser state is sharded): an existing one cannot be resumed."""
    path = cfg.data.out_dir / "checkpoint.pt"
    if parallel.fsdp and path.is_file():
        raise RuntimeError(
            f"{path} exists, and resuming a checkpoint under FSDP is not supported: use a new --out-dir (under "
            "FSDP a run starts from scratch and writes no checkpoints), or resume it with the launch that wrote it"
        )
    if parallel.fsdp and parallel.is_main and cfg.schedule.save_every:
        every = cfg.schedule.save_every
        print(f"FSDP: no checkpoints are written (save_every={every} ignored); a stopped run starts over")


def resumed_batch_tokens(cfg: TrainConfig, parallel: Parallel) -> TrainConfig:
    """``cfg`` with batch_tokens=0 resolved to the budget of the checkpoint it resumes, if any.

    A new measurement could give another budget, hence other micro-batches: the checkpoint's step would then
    point into another schedule. The checkpoint's own config (what ``load_checkpoint`` guards with) holds it.
    """
    path = cfg.data.out_dir / "checkpoint.pt"
    if cfg.optim.batch_tokens or not path.is_file():
        return cfg
    # mmap: only the config's bytes are read, not the adapter's and the optimiser's
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("config", {})
    tokens = saved.get("batch_tokens")
    if not tokens:
        raise RuntimeError(
            f"{path} records no batch_tokens to resume with, and batch_tokens=0 would measure a new budget (another "
            "schedule): pass the batch_tokens of the run that wrote it (its train_config.json), or use a new --out-dir"
        )
    if parallel.is_main:
        print(f"batch_tokens=0: resuming with the budget {path} was trained with, {tokens:,} padded tokens")
    return cfg.replace(batch_tokens=int(tokens))


def load_checkpoint(run: Run) -> None:
    """Restore adapter, optimiser, schedule, step, history and evaluations from ``checkpoint.pt``, if any."""
    path = run.checkpoint_path
    if not path.is_file():
        return
    from peft import set_peft_model_state_dict

    state = torch.load(path, map_location="cpu", weights_only=False)
    changed = _resume_blockers(state.get("config", {}), config_to_dict(run.cfg), config_to_dict(type(run.cfg)()))
    if changed:
        raise RuntimeError(
            f"{path} was written with a different config ({', '.join(changed)}); "
            "use a new --out-dir, or delete the checkpoint to start over"
        )
    saved_world, world = state.get("world", 1), run.parallel.world
    if saved_world != world:
        # a step is grad_accum x processes micro-batches: another world size replays another schedule
        raise RuntimeError(
            f"{path} was written by {saved_world} process(es) and this launch has {world}; relaunch with "
            f"--num_processes {saved_world}, or use a new --out-dir"
        )
    set_peft_model_state_dict(run.model, state["adapter"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if "scaler" in state:
        run.scaler.load_state_dict(state["scaler"])
    run.step, run.history = state["step"], state["history"]
    run.evals, run.best = state.get("evals", []), state.get("best")
    if run.parallel.is_main:
        print(f"resuming from {path} at step {run.step}/{run.total_steps}")


def save_checkpoint(run: Run) -> None:
    """Everything ``load_checkpoint`` needs to continue at ``run.step``, with the config that guards it.

    Written by rank 0 alone: under DDP every process holds the same weights and optimiser state. Under FSDP
    nothing is written: the optimiser state is sharded, and such a checkpoint is not resumed (see setup).
    """
    from peft import get_peft_model_state_dict

    if not run.parallel.is_main or run.parallel.fsdp:
        return
    state = {
        "adapter": get_peft_model_state_dict(run.model),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "step": run.step,
        "history": run.history,
        "evals": run.evals,
        "best": run.best,
        "config": config_to_dict(run.cfg),
        "world": run.parallel.world,
    }
    write_atomic(run.checkpoint_path, lambda tmp: torch.save(state, tmp))  # a kill mid-save keeps the old one
