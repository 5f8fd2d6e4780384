"""main(): config -> data -> model -> epochs of train / validate / checkpoint -> test report."""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt_io
from .config import RUN_IDENTITY_KEYS, config_to_dict, format_config, resolve_config, validate_config
from .data import DatasetInfo, get_dataset_entry
from .data.loaders import eval_loader, train_loader
from .data.presets import DevicePreset
from .distributed import (
    all_reduce_sum, broadcast_module_state, cleanup, convert_sync_batchnorm,
    init_distributed_mode, is_distributed, is_main_process, on_main_then_share,
)
from .engine import NonFiniteLossError, TrainState, evaluate, train_one_epoch
from .errors import UserError
from .models import build_model
from .modulation import Modulator

SELECT_ON = "acc"  # best.pt is chosen on validation accuracy, never on the test split


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def merge_resume_config(cfg: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """The checkpoint's config, overridden by options given explicitly now; identity changes refused."""
    ckpt = ckpt_io.load_checkpoint(cfg.resume)
    saved = ckpt["config"]
    changed = [
        f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}"
        for k in cfg.explicit
        if k in RUN_IDENTITY_KEYS and saved.get(k) != getattr(cfg, k)
    ]
    if changed:
        raise UserError(f"--resume {ckpt['path']}: these settings differ from the run's and would break it: {'; '.join(changed)}")
    merged = argparse.Namespace(**{**saved, **{k: getattr(cfg, k) for k in cfg.explicit}, "resume": ckpt["path"], "explicit": cfg.explicit})
    validate_config(merged)  # e.g. --modulation_ends given now against the run's --modulation_starts
    return merged, ckpt


def prepare_run_dir(cfg: argparse.Namespace) -> Path:
    """Create (or reuse, when resuming) the run directory, and prove it is writable now."""
    run_dir = Path(cfg.resume).parent if cfg.resume else Path(cfg.output_dir) / cfg.run_name
    if not cfg.resume and (run_dir / "last.pt").exists() and not cfg.overwrite:
        raise UserError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir / 'last.pt'}, "
            "or pass --overwrite or another --run_name"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))  # a full disk fails here, not after the first epoch
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        ckpt_io.remove_stale_temporaries(run_dir)  # what a kill left half-written; last.pt and best.pt are always whole
    except OSError as e:
        try:
            (run_dir / ".write_probe").unlink(missing_ok=True)
        except OSError:
            pass
        raise UserError(f"cannot write to the run directory {run_dir}: {e.strerror or e}") from None
    if not cfg.resume:  # --overwrite, or an attempt killed before its first checkpoint: start clean
        for name in ("metrics.jsonl", "last.pt", "best.pt", "test_metrics.json"):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
    return run_dir


def check_free_space(run_dir: Path, model: torch.nn.Module, cfg) -> None:
    """Refuse to start when the run directory cannot hold the checkpoints of the first epoch."""
    tensors = [*model.parameters(), *model.buffers()]
    slots = 2 if cfg.optimizer == "adamw" else (1 if cfg.momentum > 0 else 0)  # optimizer state per parameter
    size = sum(t.numel() * t.element_size() for t in tensors) + slots * sum(p.numel() * p.element_size() for p in model.parameters())
    needed = int(size * (1.1 if cfg.resume else 2.2))  # last.pt and best.pt (or one rewrite of them), + 10%
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise UserError(f"the run directory {run_dir} has {free / 2**20:.0f} MiB free; "
                        f"the checkpoints need about {needed / 2**20:.0f} MiB")


def build_optimizer(cfg, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.scheduler == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    elif cfg.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimizer, scheduler


def make_checkpoint(model, optimizer, scheduler, state: TrainState, cfg, info: DatasetInfo, rng_ranks: list | None = None) -> dict:
    inner = model.module if hasattr(model, "module") else model
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile wrapper
    return {
        "format": ckpt_io.FORMAT,
        "version": ckpt_io.VERSION,
        "model": inner.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": state.epoch,
        "global_step": state.global_step,
        "best": state.best,
        "config": config_to_dict(cfg),
        "dataset_info": info.to_dict(),
        "rng": ckpt_io.rng_state(),
        "rng_ranks": rng_ranks if rng_ranks is not None else [ckpt_io.rng_state()],
    }


def _best_weights(run_dir: Path) -> tuple[dict, str]:
    best = ckpt_io.load_checkpoint(run_dir / "best.pt")
    return best["model"], best["path"]


def print_table(title: str, metrics: dict[str, float]) -> None:
    print(title)
    for k, v in metrics.items():
        print(f"  {k:<14} {v:.4f}" if isinstance(v, float) else f"  {k:<14} {v}")


def train(cfg: argparse.Namespace) -> dict:
    ckpt = None
    if cfg.resume:
        cfg, ckpt = merge_resume_config(cfg)
    device = select_device(cfg.device)
    rank, world_size, local_rank = init_distributed_mode(device.type)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
    seed_everything(cfg.seed + rank, cfg.deterministic)
    amp_dtype = autocast_dtype(cfg.precision, device)

    entry = get_dataset_entry(cfg.dataset)
    info = entry.info(cfg)
    if ckpt is not None and json.dumps(ckpt["dataset_info"], sort_keys=True) != json.dumps(info.to_dict(), sort_keys=True):
        raise UserError(f"--resume {ckpt['path']}: the dataset at --data no longer matches the one the run was trained on")
    if cfg.modality not in ("both", *info.modality_names):
        raise UserError(f"--modality: {cfg.dataset} has modalities {', '.join(info.modality_names)} (or 'both')")
    # Before any data or model is built: an unwritable or full disk is reported now. Rank 0
    # creates the directory; every rank gets its path, or its error.
    run_dir = on_main_then_share(prepare_run_dir, cfg)
    pin = device.type == "cuda"
    try:
        train_data = train_loader(entry.build(cfg, "train"), cfg.batch_size, cfg.num_workers, cfg.seed, rank, world_size, pin)
    except ValueError as e:
        raise UserError(f"--batch_size {cfg.batch_size}: {e}") from None
    val_data = eval_loader(entry.build(cfg, "val"), cfg.batch_size, cfg.num_workers, rank, world_size, pin)
    preset = DevicePreset(info, device, cfg.channels_last)

    model = build_model(info, cfg.fusion, cfg.modality, cfg.init).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and is_distributed():
        model = convert_sync_batchnorm(model, device.type)  # BatchNorm statistics of the global batch
    optimizer, scheduler = build_optimizer(cfg, model)
    on_main_then_share(check_free_space, run_dir, model, cfg)
    state = TrainState()
    if ckpt is not None:
        ckpt_io.load_model_state(model, ckpt["model"], ckpt["path"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = TrainState(epoch=ckpt["epoch"], global_step=ckpt["global_step"], best=ckpt["best"])
        rng = ckpt_io.rng_state_for_rank(ckpt, rank, world_size)
        if rng is not None:
            ckpt_io.set_rng_state(rng)
    modulator = Modulator.from_config(cfg, model, reduce_fn=all_reduce_sum if is_distributed() else None)
    train_model = model
    if is_distributed():
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    writer = None
    if is_main_process():
        if ckpt is not None:  # epochs logged after the checkpoint was written are redone
            ckpt_io.trim_metrics_log(run_dir / "metrics.jsonl", state.epoch)
        ckpt_io.atomic_write_text(run_dir / "config.json", json.dumps(config_to_dict(cfg), indent=2))
        print(f"resolved configuration (saved in {run_dir / 'config.json'}):\n{format_config(cfg)}", end="", flush=True)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"), purge_step=state.global_step or None)
        print(f"run: {run_dir}  device: {device}  precision: {amp_dtype or torch.float32}  "
              f"train/val samples: {len(train_data.dataset)}/{len(val_data.dataset)}")

    for epoch in range(state.epoch, cfg.epochs):
        state.epoch = epoch
        resume_hint = (
            f"Resume from the end of epoch {epoch - 1} with: --resume {run_dir / 'last.pt'}" if epoch > 0
            else "No epoch was completed, so there is no checkpoint to resume from."
        ) + " (A lower --lr, or --nonfinite skip, may avoid it.)"
        train_data.sampler.set_epoch(epoch)
        started = time.time()
        train_stats = train_one_epoch(
            train_model, modulator, optimizer, train_data, preset, state, cfg, amp_dtype, writer, resume_hint
        )
        scheduler.step()
        broadcast_module_state(model, buffers_only=True)  # every rank evaluates what rank 0 saves
        val = evaluate(model, val_data, preset, amp_dtype, desc="val")
        state.epoch = epoch + 1
        improved = not state.best or val[SELECT_ON] > state.best["val_" + SELECT_ON]
        if improved:
            state.best = {"epoch": epoch, **{f"val_{k}": v for k, v in val.items()}}
        rng_ranks = ckpt_io.gather_rng_states()  # each rank's random streams, for --resume
        if is_main_process():
            record = {"epoch": epoch, "time_s": round(time.time() - started, 2),
                      **{f"train_{k}": v for k, v in train_stats.items()}, **{f"val_{k}": v for k, v in val.items()}}
            checkpoint = make_checkpoint(model, optimizer, scheduler, state, cfg, info, rng_ranks)
            save_epoch(run_dir, record, checkpoint, improved, writer, model.modality_names)

    result = {"run_dir": str(run_dir), "best": state.best}
    if cfg.eval_test:
        test_data = eval_loader(entry.build(cfg, "test"), cfg.batch_size, cfg.num_workers, rank, world_size, pin)
        result["test"] = evaluate_best_on_test(model, run_dir, test_data, preset, amp_dtype, state.best.get("epoch"))
    if writer is not None:
        writer.close()
    return result


def save_epoch(run_dir: Path, record: dict, checkpoint: dict, improved: bool, writer, modality_names) -> None:
    """Rank 0 after each epoch: metrics line, TensorBoard scalars, checkpoints, a printed summary."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    for k, v in record.items():
        if k != "epoch":
            writer.add_scalar(k.replace("_", "/", 1), v, record["epoch"])
    if improved:  # best.pt first: a kill between the two writes leaves last.pt behind, so the epoch is redone
        ckpt_io.atomic_torch_save(checkpoint, run_dir / "best.pt")
    ckpt_io.atomic_torch_save(checkpoint, run_dir / "last.pt")
    per_mod = "  ".join(f"{n} {record['val_acc_' + n]:.3f}" for n in modality_names)
    print(f"epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  train acc {record['train_acc']:.3f}  "
          f"val acc {record['val_acc']:.3f}  ({per_mod})  {record['time_s']:.1f}s", flush=True)


def evaluate_best_on_test(model, run_dir: Path, test_data, preset, amp_dtype, best_epoch) -> dict:
    """Load best.pt (chosen on validation) and evaluate it once on the test split."""
    # Rank 0 reads best.pt and sends its weights to every rank (no shared file system needed).
    on_main_then_share(lambda: ckpt_io.load_model_state(model, *_best_weights(run_dir)))
    broadcast_module_state(model)
    test = evaluate(model, test_data, preset, amp_dtype, desc="test")
    if is_main_process():
        ckpt_io.atomic_write_text(run_dir / "test_metrics.json", json.dumps({"best_epoch": best_epoch, **test}, indent=2))
        print_table(f"test metrics of best.pt (epoch {best_epoch}, chosen on validation {SELECT_ON}):", test)
    return test


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = resolve_config(argv)
        if cfg.print_config:
            print(format_config(cfg), end="")
            return 0
        train(cfg)
        return 0
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:  # raised by every rank at the same step
        if is_main_process():
            print(f"train.py: stopped: {e}", file=sys.stderr)
        return 3
    finally:
        cleanup()
