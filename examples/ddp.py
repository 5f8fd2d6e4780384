"""DistributedDataParallel via torchrun, three modalities (gloo on CPU here; nccl on GPUs is the same code).

    torchrun --standalone --nproc_per_node 2 examples/ddp.py --steps 20

Each rank trains on its own shard of every global batch. `Modulator.for_ddp` does what DDP
needs: the scores s_m are summed over ranks (every rank computes the global batch's ratio and
the same k) and OGM-GE's noise, added to gradients DDP has already averaged, is drawn alike on
every rank. Without either, the model replicas drift apart; the last line checks they did not.
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from onthefly.models.fusion import ConcatFusion
from onthefly.modulation import ModulationConfig, Modulator


class MLPStreams(nn.Module):
    def __init__(self, names: tuple[str, ...], in_dim: int, num_classes: int, width: int = 32):
        super().__init__()
        self.modality_names = names
        self.encoders = nn.ModuleDict(
            {
                n: nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width))
                for n in self.modality_names
            }
        )
        self.head = ConcatFusion(width, num_classes, num_modalities=len(names))

    def encoder_parameters(self):
        return tuple(list(self.encoders[n].parameters()) for n in self.modality_names)

    def forward(self, inputs, feature_hook=None):
        features = tuple(self.encoders[n](inputs[n]) for n in self.modality_names)
        out = {"features": features, "unimodal_logits": self.head.unimodal_logits(*features), "sample_weight": None}
        if feature_hook is not None:
            features, out["sample_weight"] = feature_hook(out)
        out["logits"] = self.head(*features)
        return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global_batch", type=int, default=32)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)  # the same data and batches on every rank
    n, classes = 512, 4
    labels = torch.randint(0, classes, (n,), generator=g)
    signal = F.one_hot(labels, classes).float() @ torch.randn(classes, 10, generator=g)
    data = {name: signal * strength + torch.randn(n, 10, generator=g) for name, strength in zip("abc", (1.5, 0.6, 0.3))}
    model = DistributedDataParallel(MLPStreams(tuple(data), 10, classes))  # DDP copies rank 0's initial weights
    torch.manual_seed(rank)  # each rank's own random stream, as with per-rank augmentation
    modulator = Modulator.for_ddp(model, ModulationConfig(modulation="OGM_GE", alpha=0.5), seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    share = args.global_batch // world
    for _step in range(args.steps):
        idx = torch.randint(0, n, (args.global_batch,), generator=g)[rank * share : (rank + 1) * share]  # rank's shard
        inputs, y = {k: v[idx] for k, v in data.items()}, labels[idx]
        out = model(inputs, feature_hook=modulator.feature_hook(y, epoch=0))
        loss = F.cross_entropy(out["logits"], y)
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients over ranks
        modulator.modulate_gradients(out, y, epoch=0)
        optimizer.step()
    flat = torch.cat([q.detach().flatten() for q in model.parameters()])
    replicas = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(replicas, flat)
    same = all(torch.equal(r, replicas[0]) for r in replicas)
    if rank == 0:
        print(f"ranks {world}, coeff {modulator.stats['coeff'].tolist()}, replicas identical: {same}", flush=True)
    del model, modulator, optimizer  # DDP's reducer uses the group: release it first
    dist.barrier()  # every rank is done with the group before any leaves it
    dist.destroy_process_group()
    if not same:
        raise SystemExit("the model replicas differ")


if __name__ == "__main__":
    main()
