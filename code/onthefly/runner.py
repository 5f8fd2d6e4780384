"""main(): config -> data -> model -> epochs of train / validate / checkpoint -> test report."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
import warnings
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .config import RUN_IDENTITY_KEYS, config_to_dict, format_config, resolve_config, validate_config
from .data import DatasetInfo, get_dataset_entry
from .data.loaders import eval_loader, train_loader
from .data.presets import DevicePreset
from .distributed import (
    all_reduce_sum, broadcast_module_state, broadcast_object, cleanup, convert_sync_batchnorm,
    init_distributed_mode, is_distributed, is_main_process, on_main_then_share,
)
from .engine import NonFiniteError, TrainState, evaluate, train_one_epoch
from .errors import UserError
from .models import build_model
from .modulation import Modulator
from .rundir import RUN_FILES, RunLock, acquire_run_lock, check_new_run_folder, check_resume_source, remove_run_files
from .utils import autocast_dtype, print_table, seed_everything, select_device, unwrap_model

SELECT_ON = "acc"  # best.pt is chosen on validation accuracy, never on the test split
SPLITS = ("train", "val", "test")
# Optimisation settings a resumed run applies by rebuilding its optimiser values and schedule.
SCHEDULE_KEYS = ("lr", "momentum", "weight_decay", "scheduler", "lr_step", "lr_gamma", "epochs")


class Stopped(Exception):
    """A run stopped by a non-finite loss, gradient or weight; the message says how to resume."""


class Interrupted(Exception):
    """Ctrl-C during a run: where it stopped, and the last.pt to resume from (None: none yet)."""

    def __init__(self, where: str, last: Path | None):
        super().__init__(where)
        self.where, self.last = where, last


def merge_resume_config(cfg: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """The checkpoint's config, overridden by options given explicitly now; changes that would
    break the run, and a checkpoint outside its own run folder, are refused."""
    ckpt = ckpt_io.load_checkpoint(cfg.resume)
    saved = ckpt["config"]
    run_dir = check_resume_source(Path(ckpt["path"]), saved)
    changed = [
        f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}"
        for k in cfg.explicit
        if k in RUN_IDENTITY_KEYS and saved.get(k) != getattr(cfg, k)
    ]
    if changed:
        raise UserError(f"--resume {ckpt['path']}: these settings differ from the run's and would break it: {'; '.join(changed)}")
    if cfg.overwrite:
        raise UserError(f"--overwrite with --resume {ckpt['path']}: a resumed run keeps its files; use one or the other")
    if {"output_dir", "run_name"} & set(cfg.explicit):
        wanted = Path(cfg.output_dir if "output_dir" in cfg.explicit else run_dir.parent) / (
            cfg.run_name if "run_name" in cfg.explicit else run_dir.name)
        if wanted.resolve() != run_dir.resolve():
            raise UserError(f"--output_dir/--run_name: a resumed run continues in its own folder {run_dir}, not {wanted}; "
                            "drop these options")
    if "epochs" in cfg.explicit and cfg.epochs < ckpt["epoch"]:
        raise UserError(f"--epochs {cfg.epochs}: --resume {ckpt['path']} has already completed {ckpt['epoch']} epochs")
    merged = argparse.Namespace(**{
        **saved, **{k: getattr(cfg, k) for k in cfg.explicit},
        # the folder as it is now (it may have moved since the run started)
        "output_dir": str(run_dir.parent), "run_name": run_dir.name,
        "resume": ckpt["path"], "explicit": cfg.explicit,
    })
    validate_config(merged, cfg.explicit)  # e.g. --modulation_ends given now against the run's --modulation_starts
    return merged, ckpt


def prepare_run_dir(cfg: argparse.Namespace) -> tuple[Path, RunLock]:
    """Create (or reuse, when resuming) the run folder, lock it for this run, apply the
    run-folder rules (rundir.py) and prove the folder is writable now."""
    run_dir = Path(cfg.resume).parent if cfg.resume else Path(cfg.output_dir) / cfg.run_name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = acquire_run_lock(run_dir)
    except OSError as e:
        raise UserError(f"cannot write to the run directory {run_dir}: {e.strerror or e}") from None
    try:
        if not cfg.resume:
            check_new_run_folder(run_dir, cfg.overwrite)
        probe = run_dir / ".write_probe"
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))  # a full disk fails here, not after the first epoch
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        # what a kill left half-written; last.pt and best.pt are always whole
        ckpt_io.remove_stale_temporaries(run_dir, RUN_FILES)
        if not cfg.resume:  # --overwrite (checked above): the earlier run's files go
            remove_run_files(run_dir)
    except OSError as e:
        try:
            (run_dir / ".write_probe").unlink(missing_ok=True)
        except OSError:
            pass
        lock.release()
        raise UserError(f"cannot write to the run directory {run_dir}: {e.strerror or e}") from None
    except BaseException:
        lock.release()
        raise
    return run_dir, lock


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


OPTIMIZERS = {
    "sgd": lambda params, cfg: torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay),
    "adamw": lambda params, cfg: torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
}
SCHEDULERS = {
    "step": lambda opt, cfg: torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma),
    "cosine": lambda opt, cfg: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs),
    "none": lambda opt, cfg: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
}


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer]([p for p in model.parameters() if p.requires_grad], cfg)


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, epochs_done: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule of `cfg`, advanced past `epochs_done` epochs.

    A resumed run rebuilds it rather than loading the saved one, so changed --lr, --scheduler
    or --epochs take effect; with unchanged settings the rates are exactly those of an
    uninterrupted run (the same recurrence, stepped as often).
    """
    for group in optimizer.param_groups:  # the optimiser state loaded from a checkpoint holds the old values
        group["lr"] = group["initial_lr"] = cfg.lr
        group["weight_decay"] = cfg.weight_decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum
    scheduler = SCHEDULERS[cfg.scheduler](optimizer, cfg)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(epochs_done):
            scheduler.step()
    return scheduler


def _changed_schedule(saved: dict, cfg) -> list[str]:
    return [f"{k} {saved.get(k)} -> {getattr(cfg, k)}" for k in SCHEDULE_KEYS if saved.get(k) != getattr(cfg, k)]


def make_checkpoint(model, optimizer, scheduler, state: TrainState, cfg, info: DatasetInfo, splits: dict,
                    rng_ranks: list | None = None) -> dict:
    return {
        "format": ckpt_io.FORMAT,
        "version": ckpt_io.VERSION,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": state.epoch,
        "global_step": state.global_step,
        "best": state.best,
        "config": config_to_dict(cfg),
        "dataset_info": info.to_dict(),
        "rng": ckpt_io.rng_state(),
        "rng_ranks": rng_ranks if rng_ranks is not None else [ckpt_io.rng_state()],
        "splits": splits,
    }


def _best_weights(run_dir: Path) -> tuple[dict, str]:
    best = ckpt_io.load_checkpoint(run_dir / "best.pt")
    return best["model"], best["path"]


def train(cfg: argparse.Namespace) -> dict:
    ckpt = None
    if cfg.resume:
        cfg, ckpt = merge_resume_config(cfg)
    device = select_device(cfg.device)
    rank, world_size, local_rank = init_distributed_mode(device.type)
    if ckpt is None:  # names this run in config.json and its checkpoints: --resume checks they match
        cfg.run_id = broadcast_object(uuid.uuid4().hex)
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
    # Before any data or model is built: a folder in use, an unwritable or a full disk is
    # reported now. Rank 0 creates and locks the folder; every rank gets its path, or its error.
    run_dir, lock = on_main_then_share(prepare_run_dir, cfg)
    try:
        return _train_in(run_dir, cfg, ckpt, entry, info, device, amp_dtype, rank, world_size, local_rank)
    finally:
        lock.release()


def _train_in(run_dir: Path, cfg, ckpt, entry, info, device, amp_dtype, rank, world_size, local_rank) -> dict:
    """train() inside its locked run folder."""
    pin = device.type == "cuda"
    datasets = {split: entry.build(cfg, split) for split in SPLITS}
    splits = {split: ckpt_io.split_fingerprint(ds) for split, ds in datasets.items()}
    try:
        train_data = train_loader(datasets["train"], cfg.batch_size, cfg.num_workers, cfg.seed, rank, world_size, pin,
                                  drop_last=getattr(cfg, "drop_last", True))
    except ValueError as e:
        raise UserError(f"--batch_size {cfg.batch_size}: {e}") from None
    val_data = eval_loader(datasets["val"], cfg.batch_size, cfg.num_workers, rank, world_size, pin)
    preset = DevicePreset(info, device, cfg.channels_last)

    model = build_model(info, cfg.fusion, cfg.modality, cfg.init).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and is_distributed():
        model = convert_sync_batchnorm(model, device.type)  # BatchNorm statistics of the global batch
    optimizer = build_optimizer(cfg, model)
    on_main_then_share(check_free_space, run_dir, model, cfg)
    state = TrainState()
    if ckpt is not None:
        ckpt_io.load_model_state(model, ckpt["model"], ckpt["path"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = TrainState(epoch=ckpt["epoch"], global_step=ckpt["global_step"], best=ckpt["best"])
        rng = ckpt_io.rng_state_for_rank(ckpt, rank, world_size)
        if rng is not None:
            ckpt_io.set_rng_state(rng)
        changed = _changed_schedule(ckpt["config"], cfg)
        if changed and is_main_process():
            print(f"resuming with {', '.join(changed)}: the learning-rate schedule is recomputed for them", flush=True)
    scheduler = build_scheduler(cfg, optimizer, state.epoch)
    try:  # e.g. an --ogm_params set that selects nothing of an encoder
        modulator = Modulator.from_config(cfg, model, reduce_fn=all_reduce_sum if is_distributed() else None)
    except ValueError as e:
        raise UserError(f"--modulation {cfg.modulation}: {e}") from None
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

    try:
        for epoch in range(state.epoch, cfg.epochs):
            state.epoch = epoch
            train_data.sampler.set_epoch(epoch)
            started = time.time()
            train_stats = train_one_epoch(train_model, modulator, optimizer, train_data, preset, state, cfg, amp_dtype, writer)
            scheduler.step()
            broadcast_module_state(model, buffers_only=True)  # every rank evaluates what rank 0 saves
            val = evaluate(model, val_data, preset, amp_dtype, desc="val", epoch=epoch)
            state.epoch = epoch + 1
            improved = not state.best or val[SELECT_ON] > state.best["val_" + SELECT_ON]
            if improved:
                state.best = {"epoch": epoch, **{f"val_{k}": v for k, v in val.items()}}
            rng_ranks = ckpt_io.gather_rng_states()  # each rank's random streams, for --resume
            if is_main_process():
                record = {"epoch": epoch, "time_s": round(time.time() - started, 2),
                          **{f"train_{k}": v for k, v in train_stats.items()}, **{f"val_{k}": v for k, v in val.items()}}
                checkpoint = make_checkpoint(model, optimizer, scheduler, state, cfg, info, splits, rng_ranks)
                save_epoch(run_dir, record, checkpoint, improved, writer, model.modality_names)

        result = {"run_dir": str(run_dir), "best": state.best}
        if cfg.eval_test:
            state.epoch = cfg.epochs  # for the message of an interruption from here on
            test_data = eval_loader(datasets["test"], cfg.batch_size, cfg.num_workers, rank, world_size, pin)
            result["test"] = evaluate_best_on_test(model, run_dir, test_data, preset, amp_dtype, state.best.get("epoch"))
    except KeyboardInterrupt:
        last = run_dir / "last.pt"
        where = f"during epoch {state.epoch}" if state.epoch < cfg.epochs else "during the test evaluation"
        raise Interrupted(where, last if last.exists() else None) from None
    except NonFiniteError as e:
        last = run_dir / "last.pt"
        raise Stopped(f"{e} {_resume_hint(e.epoch, last if last.exists() else None)} {NONFINITE_ADVICE[e.kind]}") from None
    finally:
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
    test = evaluate(model, test_data, preset, amp_dtype, desc="test", epoch=best_epoch)
    if is_main_process():
        ckpt_io.atomic_write_text(run_dir / "test_metrics.json", json.dumps({"best_epoch": best_epoch, **test}, indent=2))
        print_table(f"test metrics of best.pt (epoch {best_epoch}, chosen on validation {SELECT_ON}):", test)
    return test


# What may avoid each kind of non-finite stop (engine.NonFiniteError.kind).
NONFINITE_ADVICE = {
    "step": "A lower --lr, or --nonfinite skip, may avoid it.",
    "weights": "A lower --lr may avoid it.",
    "all skipped": "A lower --lr may avoid it.",
    "outputs": "A lower --lr may avoid it.",
}


def _resume_hint(epoch: int, last: Path | None) -> str:
    """`last` holds the epochs before `epoch`, the one that failed (nothing of it is saved)."""
    if last is None:
        return "No epoch was completed, so there is no checkpoint to resume from."
    return f"Resume from the end of epoch {epoch - 1} with: --resume {last}"


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
    except Stopped as e:  # raised by every rank at the same step
        if is_main_process():
            print(f"train.py: stopped: {e}", file=sys.stderr)
        return 3
    except Interrupted as e:
        if is_main_process():
            then = (f"resume with: python code/train.py --resume {e.last}" if e.last
                    else "no epoch was completed, so there is nothing to resume")
            print(f"train.py: interrupted {e.where}; {then}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("train.py: interrupted before training started; nothing to resume", file=sys.stderr)
        return 130
    finally:
        cleanup()
