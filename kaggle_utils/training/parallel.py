"""A training process's place in a multi-process launch, and the collectives the training loop needs.

Two ways to train on the GPUs of one machine, both started by ``accelerate launch`` with a shipped config:

* **DDP** (``kaggle_utils/recipes/accelerate/ddp.yaml``): every process holds the whole model; gradients are
  all-reduced in the backward of a process's last micro-batch of a step. Forwards hold no collective, so
  evaluation and saving are each process's own business.
* **FSDP2** (``kaggle_utils/recipes/accelerate/fsdp.yaml``): every process holds 1/N of every parameter
  (``torch.distributed.fsdp.fully_shard``, one unit per decoder layer, applied by accelerate's
  ``fsdp2_prepare_model``) and all-gathers a layer for its forward and backward. Every forward is then a
  collective: evaluation runs the same number of forward calls on every rank (:meth:`Parallel.predict_proba`),
  and the full values of the trainable weights (adapter, best adapter) are gathered by every rank
  (:meth:`Parallel.gathered_trainable`). Resuming a checkpoint is not supported: none is written.
  The weight files are read once, by rank 0 (:attr:`Parallel.load_once`). Full precision: the other ranks build the
  model on the meta device, and :meth:`Parallel.wrap` broadcasts rank 0's weights into the shards (accelerate's
  ``cpu_ram_efficient_loading``, set by :meth:`Parallel.from_env`). 4-bit: accelerate 1.15 does not broadcast
  bitsandbytes' Params4bit into the shards, so rank 0 sends its quantised model whole while loading (packed nf4
  codes, quant_state, other tensors: :mod:`kaggle_utils.models.broadcast`); every rank then holds the full nf4 model
  on its device, as when each loaded its own, until :meth:`Parallel.wrap` shards it.

Started with plain ``python`` there is no accelerator and every method is a pass-through.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kaggle_utils.inputs.batching import pad
from kaggle_utils.models.loading import ModelConfig, model_device
from kaggle_utils.scoring.predict import plan_batches, predict_proba
from kaggle_utils.scoring.shards import Shard

FSDP_CONFIG = "kaggle_utils/recipes/accelerate/fsdp.yaml"
DDP_CONFIG = "kaggle_utils/recipes/accelerate/ddp.yaml"


def _fsdp_plugin(accelerator):
    """accelerate's FSDP plugin for this launch, or None when the launch is not FSDP.

    accelerate shards only on accelerators: on the CPU it sets up MULTI_CPU even under an FSDP config. The plugin
    is then built from the same environment (``ACCELERATE_USE_FSDP``, ``FSDP_*``) and the model is sharded by the
    same ``fsdp2_prepare_model`` (gloo runs FSDP2), so a CPU launch tests what a GPU launch runs.
    """
    if accelerator.distributed_type == "FSDP":
        return accelerator.state.fsdp_plugin
    if accelerator.distributed_type == "MULTI_CPU" and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        accelerator.state.fsdp_plugin = plugin  # where fsdp2_prepare_model reads it
        return plugin
    return None


def _check_launch(accelerator, world: int, plugin) -> None:
    """The launch is one this loop trains correctly: DDP, or FSDP2; anything else is refused, naming the fix."""
    if accelerator.num_processes != world:
        raise RuntimeError(
            f"WORLD_SIZE={world} but accelerate set up {accelerator.num_processes} process(es) "
            f"({accelerator.distributed_type}); launch with accelerate launch --num_processes {world}"
        )
    if plugin is not None and plugin.fsdp_version != 2:
        # FSDP1 flattens each unit into one FlatParameter of one dtype and wraps the model in a new module:
        # the nf4 weights, fp32 norms and fp32 LoRA of a decoder layer cannot share it as this loop trains
        raise RuntimeError(
            f"accelerate is set up for FSDP version {plugin.fsdp_version}; kaggle_utils.train shards with FSDP2 "
            f"only: launch with --config_file {FSDP_CONFIG} (fsdp_version: 2)"
        )
    if plugin is None and accelerator.distributed_type not in ("MULTI_GPU", "MULTI_CPU"):
        raise RuntimeError(
            f"accelerate is set up for {accelerator.distributed_type}; kaggle_utils.train trains data-parallel "
            f"(--config_file {DDP_CONFIG}: each GPU holds the whole model) or sharded (--config_file {FSDP_CONFIG})"
        )


def _reshard(model: torch.nn.Module) -> None:
    """Free the gathered weights of every FSDP unit: the root and the head's unit stay gathered after a forward
    until the backward (reshard_after_forward false), and an evaluation forward has no backward."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def check_fsdp_dtypes(model: torch.nn.Module) -> None:
    """FSDP2 reduce-scatters the gradients of a unit's trainable parameters together: they need one dtype."""
    dtypes: dict[torch.dtype, str] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            dtypes.setdefault(p.dtype, name)
    if len(dtypes) > 1:
        found = ", ".join(f"{d} ({n})" for d, n in dtypes.items())
        raise TypeError(f"FSDP needs the trainable parameters in one dtype (fp32 masters); found {found}")


@dataclass
class Parallel:
    """This process's place in a launch of several processes, and the few collectives training needs.

    ``accelerate launch --num_processes N -m kaggle_utils.train ...`` starts N processes. Each reads its rank
    from the environment (:class:`~kaggle_utils.scoring.shards.Shard`, as pseudo-labelling does) and loads the
    model on its own GPU; accelerate wraps it in DDP, or :meth:`wrap` shards it (FSDP2, ``fsdp`` true).
    """

    shard: Shard = field(default_factory=Shard)
    accelerator: Any = None  # accelerate.Accelerator, in a launch of several processes only
    # the model is sharded (FSDP2): forwards and weight gathers are collectives of every rank
    fsdp: bool = False

    @classmethod
    def from_env(cls, cfg: ModelConfig) -> Parallel:
        shard = Shard.from_env()
        if shard.world == 1:
            return cls(shard)
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        # buffers (rotary tables) are the same on every rank: not broadcasting them in every forward leaves a
        # forward without collectives, so a rank may run more forwards than another (an out-of-memory split)
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
        accelerator = Accelerator(cpu=cfg.device == "cpu" or not torch.cuda.is_available(), kwargs_handlers=[ddp])
        plugin = _fsdp_plugin(accelerator)
        _check_launch(accelerator, shard.world, plugin)
        if plugin is not None:
            # read by fsdp2_prepare_model: the model goes to meta, is sharded, and rank 0's full state dict is
            # broadcast into the shards (full precision; a 4-bit model arrives whole at load). Set here, not in
            # fsdp.yaml: the launcher would also export it to transformers (FSDP_CPU_RAM_EFFICIENT_LOADING), whose
            # from_pretrained then changes for 4-bit loads too
            plugin.cpu_ram_efficient_loading = not cfg.load_in_4bit
        return cls(shard, accelerator, fsdp=plugin is not None)

    @property
    def world(self) -> int:
        return self.shard.world

    @property
    def is_main(self) -> bool:
        return self.shard.is_main

    @property
    def load_once(self) -> bool:
        """Only rank 0 reads the weight files (FSDP2). Full precision: the others build the model on the meta device
        and receive rank 0's weights while it is sharded; 4-bit: they receive rank 0's quantised model as it is
        loaded. Under DDP every process loads its own copy."""
        return self.fsdp

    @property
    def reads_weights(self) -> bool:
        """This process reads the base's weight files (else it receives rank 0's: on meta while sharding at full
        precision, whole while loading in 4-bit)."""
        return self.is_main or not self.load_once

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the training step calls: DDP around ``model``, ``model`` sharded in place (FSDP2), or
        ``model``. Under FSDP2 the parameters are replaced by sharded DTensors: collect them after this; at full
        precision rank 0's values (base, LoRA initialisation, head) are broadcast into every rank's shards."""
        if self.accelerator is None:
            return model
        if self.fsdp:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            check_fsdp_dtypes(model)
            # the function accelerate's prepare() calls for FSDP2, without its optimiser swap: the optimiser is
            # built afterwards on the sharded parameters
            return fsdp2_prepare_model(self.accelerator, model)
        import warnings

        with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers; accelerate still passes that name
            warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
            return self.accelerator.prepare_model(model)

    @contextlib.contextmanager
    def no_sync(self, wrapped: torch.nn.Module, skip: bool):
        """Gradients stay on this process (``skip``: not the process's last micro-batch of the step).

        DDP: ``no_sync``. FSDP2: no reduce-scatter; the unsharded gradients accumulate until the synchronised
        backward (what ``accelerator.no_sync`` does for FSDP2).
        """
        if not skip or self.accelerator is None:
            yield
        elif self.fsdp:
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        else:
            with wrapped.no_sync():
                yield

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the gradients to a total norm of ``max_norm``; returns the norm before clipping.

        Under FSDP2 the gradients are shards (DTensors): their norm is reduced over every rank (a collective)
        before it scales them, so every rank clips by the norm of the whole gradient.
        """
        if not self.fsdp:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        from torch.distributed.tensor import DTensor

        total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def sum(self, value: float) -> float:
        """``value`` summed over the processes."""
        return self._reduce(value, torch.float64, torch.distributed.ReduceOp.SUM)

    def max(self, value: int) -> int:
        """The largest ``value`` of the processes."""
        return int(self._reduce(value, torch.int64, torch.distributed.ReduceOp.MAX))

    def min(self, value: int) -> int:
        """The smallest ``value`` of the processes."""
        return int(self._reduce(value, torch.int64, torch.distributed.ReduceOp.MIN))

    def _reduce(self, value, dtype: torch.dtype, op) -> float:
        if self.accelerator is None:
            return value
        t = torch.tensor([value], dtype=dtype, device=self.accelerator.device)
        torch.distributed.all_reduce(t, op=op)
        return t.item()

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every process: decisions taken on a clock (time budget, evaluation) must be one."""
        if self.accelerator is None:
            return flag
        t = torch.tensor([int(flag)], device=self.accelerator.device)
        torch.distributed.broadcast(t, src=0)
        return bool(t.item())

    def gather_rows(self, local: np.ndarray, n: int) -> np.ndarray:
        """Rows ``rank::world`` of an (n, ...) array from every process, put back in row order."""
        if self.accelerator is None:
            return local
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, local)
        out = np.empty((n, *local.shape[1:]), dtype=local.dtype)
        for rank, part in enumerate(parts):
            out[rank :: self.world] = part
        return out

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def predict_proba(
        self, model, rows: list[list[int]], pad_id: int, batch_tokens: int, max_rows: int, desc: str
    ) -> np.ndarray:
        """(len(rows), 2) probabilities of this process's ``rows``; NaN where a row could not be scored.

        Unsharded: :func:`~kaggle_utils.scoring.predict.predict_proba` (out-of-memory splits, fp32 rescoring of
        overflowing rows: extra forwards that only this process runs). Sharded, every forward all-gathers each
        layer from every rank, so every rank makes the same number of forward calls: the most batches any rank
        has, a one-token forward standing in for a batch a rank does not have. There is no retry: an out-of-memory
        batch stops the run (lower batch_tokens), a non-finite row stays NaN.
        """
        if not self.fsdp:
            return predict_proba(model, rows, pad_id, batch_tokens, max_rows, desc=desc).probs
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        batches = plan_batches(lengths, batch_tokens, max_rows) if len(rows) else []
        probs = np.full((len(rows), 2), np.nan, dtype=np.float32)
        device = model_device(model)
        with torch.no_grad():
            for i in range(self.max(len(batches))):
                enc = pad([rows[j] for j in batches[i]] if i < len(batches) else [[pad_id]], pad_id)
                logits = model(**{k: v.to(device) for k, v in enc.items()}).logits.float()  # (B, 2)
                if i < len(batches):
                    probs[batches[i]] = torch.softmax(logits, dim=-1).cpu().numpy()
        _reshard(model)  # the root keeps its weights gathered after a forward with no backward: free them
        probs[~np.isfinite(probs).all(1)] = np.nan
        return probs

    def gathered_trainable(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """FSDP2: the full value of every trainable parameter by name, on the CPU of every rank; else None.

        A collective: every rank calls it, in the same place. Names are the model's own (fully_shard keeps
        them), so peft's ``get_peft_model_state_dict(model, state_dict=...)`` maps them to adapter keys.
        """
        if not self.fsdp:
            return None
        _reshard(model)  # every parameter a shard (a DTensor) again, also those a forward left gathered
        return {n: p.full_tensor().detach().cpu() for n, p in model.named_parameters() if p.requires_grad}

    def adapter_copy(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """A CPU copy of the trainable weights that :meth:`restore_adapter` puts back (peft's adapter keys
        unsharded; the parameters' names, full values, under FSDP2: a collective)."""
        gathered = self.gathered_trainable(model)
        if gathered is not None:
            return gathered
        from peft import get_peft_model_state_dict

        return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}

    def restore_adapter(self, model: torch.nn.Module, copy: dict[str, torch.Tensor]) -> None:
        """Put an :meth:`adapter_copy` back into ``model`` (under FSDP2 each rank keeps its own shard of it)."""
        if not self.fsdp:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, copy)
            return
        from torch.distributed.tensor import distribute_tensor

        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, full in copy.items():
                p = params[name]
                # src_data_rank=None: every rank holds the full value and cuts its own shard, no communication
                shard = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(shard.to_local())
