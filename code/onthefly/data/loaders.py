"""DataLoaders for single-process and torchrun runs alike.

Exact resumption: the training order depends only on (seed, epoch) (DistributedSampler with
`set_epoch`), and every sample's random augmentation is seeded from (seed, epoch, index)
just before it is loaded. So a resumed run sees exactly the batches an uninterrupted run
would, whatever the number of workers and even with persistent workers.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which a container or taskset narrows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _workers(requested: int) -> int:
    """More loader processes than CPUs only compete for them (and PyTorch warns about it)."""
    return min(requested, available_cpus())


class EpochSampler(DistributedSampler):
    """DistributedSampler that yields (index, epoch) so the dataset can seed each sample."""

    def __iter__(self):
        return ((i, self.epoch) for i in super().__iter__())


class SeededSamples(Dataset):
    """Loads dataset[i] with Python, NumPy and torch RNGs seeded from (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        sample_seed = (self.seed * 1_000_003 + epoch * 10_007 + index) % 2**32
        in_main_process = torch.utils.data.get_worker_info() is None
        if in_main_process:  # leave the training loop's own random streams untouched
            saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        torch.random.default_generator.manual_seed(sample_seed)  # CPU only: CUDA streams untouched
        try:
            return self.dataset[index]
        finally:
            if in_main_process:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


class ShardSampler(torch.utils.data.Sampler):
    """Rank r of w takes samples r, r+w, r+2w, ...: no padding, so evaluation counts each sample once."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int,
    world_size: int,
    pin_memory: bool,
    drop_last: bool = True,
) -> DataLoader:
    """Call `loader.sampler.set_epoch(epoch)` before each epoch. `drop_last` drops the last
    incomplete batch (said once, with how many samples each epoch loses); without it a last
    batch of a single sample is refused, as BatchNorm cannot train on it."""
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    per_process = len(sampler)
    if per_process < batch_size:
        raise ValueError(
            f"the training split has {per_process} samples per process, fewer than one batch of {batch_size}"
        )
    rest = per_process % batch_size
    if not drop_last and rest == 1:
        raise ValueError(
            f"the last training batch would hold 1 of {per_process} samples, which BatchNorm cannot "
            "train on; choose another batch size or use --drop_last"
        )
    lost = (rest if drop_last else 0) * world_size + len(dataset) - per_process * world_size  # sharding drops the tail
    if lost and rank == 0:
        print(
            f"drop_last {'on' if drop_last else 'off'}: batch {batch_size} on {len(dataset)} training clips: "
            f"{lost} dropped each epoch",
            flush=True,
        )
    elif rank == 0:
        print(f"drop_last {'on' if drop_last else 'off'}: every training clip is used each epoch", flush=True)
    return DataLoader(
        SeededSamples(dataset, seed),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=_workers(num_workers),
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=_workers(num_workers) > 0,
    )


def eval_loader(
    dataset: Dataset, batch_size: int, num_workers: int, rank: int, world_size: int, pin_memory: bool
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), rank, world_size),
        num_workers=_workers(num_workers),
        pin_memory=pin_memory,
    )
