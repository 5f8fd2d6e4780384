"""Distributed set-up: the same script runs under `python` and `torchrun`.

Under torchrun every process (rank) trains on its own shard of each global batch; DDP averages
the gradients, the modulation scores are summed over ranks (see Modulator's reduce_fn), and
only rank 0 writes files. Helpers here are no-ops in a single process.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def init_distributed_mode(device_type: str) -> tuple[int, int, int]:
    """Join the process group when launched by torchrun; returns (rank, world_size, local_rank).

    A group that the caller has already initialised (an embedding launcher, the tests) is reused.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    if not is_distributed():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return rank, world, local


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def _all_reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    if not is_distributed():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=op)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity in a single process). Returns a new tensor under DDP."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    """Minimum over ranks (identity in a single process). Returns a new tensor under DDP."""
    return _all_reduce(tensor, dist.ReduceOp.MIN)


def all_gather_objects(obj):
    """List of `obj` from every rank (just [obj] in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (`obj` itself in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main_then_share(fn, *args, **kwargs):
    """Run `fn` on rank 0 only; every rank returns its result or raises its exception.

    For work that only rank 0 may do (creating the run directory) but whose failure must stop
    every rank, instead of leaving the others waiting in the next collective.
    """
    result, error = None, None
    if is_main_process():
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # re-raised below, on every rank
            error = e
    if is_distributed():
        sent = error
        try:
            pickle.dumps(error)
        except Exception:  # an exception that cannot travel: its text can
            sent = RuntimeError(f"on rank 0: {type(error).__name__}: {error}")
        result, received = broadcast_object((result, sent))
        error = error or received  # rank 0 raises its own exception, with its traceback
    if error is not None:
        raise error
    return result


@torch.no_grad()
def broadcast_module_state(module: nn.Module, src: int = 0, buffers_only: bool = False) -> None:
    """Copy rank `src`'s parameters and buffers (or buffers only) to every rank; no-op in a single process."""
    if not is_distributed():
        return
    for tensor in [*([] if buffers_only else module.parameters()), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


@contextmanager
def shared_randomness(seed: int, device: torch.device) -> Iterator[None]:
    """Inside the block every rank draws the same random numbers; outside, each rank's own
    streams continue untouched. For randomness applied to already-averaged gradients (OGM-GE's
    noise): different draws per rank would make the model replicas drift apart.
    No-op in a single process, which keeps its single random stream.
    """
    if not is_distributed():
        yield
        return
    cuda = device.type == "cuda"
    index = device.index if device.index is not None else (torch.cuda.current_device() if cuda else None)
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch, on any device and backend.

    torch.nn.SyncBatchNorm only runs on accelerators; this one all-reduces (differentiably)
    the per-channel sums over ranks, so it also runs on CPU with gloo. Same parameters,
    buffers and state_dict keys as BatchNorm; in eval mode, or in a single process, it is
    plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and is_distributed() and dist.get_world_size() > 1):
            return super().forward(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

        from torch.distributed.nn.functional import all_reduce  # differentiable: backward sums gradients

        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input if input.dtype in (torch.float32, torch.float64) else input.float()  # statistics in fp32 at least
        local_count = x.new_tensor([x.numel() // x.shape[1]])
        total = all_reduce(torch.cat([x.sum(dims), local_count]))
        count = total[-1].detach()
        mean = total[:-1] / count
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count  # two passes: no E[x^2] - E[x]^2 loss
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var.detach() * (count / (count - 1).clamp_min(1))
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every BatchNorm*d of `module` synchronised over ranks: torch's SyncBatchNorm on CUDA
    (NCCL), CPUSyncBatchNorm elsewhere. Parameters and buffers are shared, not copied."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device_type))
    return out


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
