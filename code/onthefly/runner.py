"""main(): config -> data -> model -> epochs of train / validate / checkpoint -> test report.

The run folder (lock, resume merging, writability, free space) is rundir.py's; what is
written into it, and in which order, is checkpoint.CheckpointSaver's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt_io
from .config import config_to_dict, format_config, resolve_config, schedule_warnings
from .data import DatasetInfo, get_dataset_entry
from .data.loaders import eval_loader, train_loader
from .data.presets import DevicePreset
from .distributed import (
    all_reduce_sum,
    broadcast_module_state,
    broadcast_object,
    cleanup,
    convert_sync_batchnorm,
    init_distributed_mode,
    is_distributed,
    is_main_process,
    on_main_then_share,
)
from .engine import NonFiniteError, TrainState, evaluate, train_one_epoch
from .errors import UserError
from .models import build_model
from .modulation import Modulator, check_labels
from .provenance import ENVIRONMENT_FILE, record_environment
from .rundir import check_free_space, merge_resume_config, prepare_run_dir
from .utils import autocast_dtype, print_table, seed_everything, select_device, unwrap_model

SELECT_ON = "acc"  # best.pt is chosen on validation accuracy, never on the test split
SPLITS = ("train", "val", "test")
# Optimisation settings a resumed run applies by rebuilding its optimiser values and schedule.
SCHEDULE_KEYS = ("lr", "momentum", "weight_decay", "scheduler", "lr_step", "lr_gamma", "epochs")


class Stopped(Exception):
    """A run stopped by a non-finite loss, gradient or weight, or a failed write; the message
    says how to resume."""


class CannotWrite(Stopped):
    """A file of the run folder could not be written (exit status 1: not the run's own fault)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled as Ctrl-C is: the files stay whole and the run can be resumed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP during a run: where it stopped, by what, and the last.pt to
    resume from (None: none yet)."""

    def __init__(self, where: str, last: Path | None, by: KeyboardInterrupt):
        super().__init__(where)
        self.where, self.last, self.by = where, last, by


def _how_stopped(e: KeyboardInterrupt) -> tuple[str, int]:
    """(words, exit status): ('interrupted', 130) for Ctrl-C, ('stopped by SIGTERM', 143) for a signal."""
    if isinstance(e, Terminated):
        return f"stopped by {signal.Signals(e.signum).name}", 128 + e.signum
    return "interrupted", 130


@contextlib.contextmanager
def _signals_stop_training() -> Iterator[None]:
    """While main() runs, SIGTERM and SIGHUP raise Terminated (in the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


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


def build_scheduler(
    cfg, optimizer: torch.optim.Optimizer, epochs_done: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
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


def make_checkpoint(
    model,
    optimizer,
    scheduler,
    state: TrainState,
    cfg,
    info: DatasetInfo,
    splits: dict,
    rng_ranks: list | None = None,
    modulator: Modulator | None = None,
) -> dict:
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
        "modulator": modulator.state_dict() if modulator is not None else {},  # PMR's prototypes
    }


@dataclass
class Placement:
    """Where this process trains: its device and precision, and its place among torchrun's ranks."""

    device: torch.device
    amp_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"


def place_process(cfg) -> Placement:
    device = select_device(cfg.device)
    rank, world_size, local_rank = init_distributed_mode(device.type)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", local_rank)
    return Placement(device, autocast_dtype(cfg.precision, device), rank, world_size, local_rank)


def train(cfg: argparse.Namespace) -> dict:
    ckpt = None
    if cfg.resume:
        cfg, ckpt = merge_resume_config(cfg)
    where = place_process(cfg)
    if ckpt is None:  # names this run in config.json and its checkpoints: --resume checks they match
        cfg.run_id = broadcast_object(uuid.uuid4().hex)
    seed_everything(cfg.seed + where.rank, cfg.deterministic)
    entry = get_dataset_entry(cfg.dataset)
    info = entry.info(cfg)
    if ckpt is not None and json.dumps(ckpt["dataset_info"], sort_keys=True) != json.dumps(
        info.to_dict(), sort_keys=True
    ):
        raise UserError(
            f"--resume {ckpt['path']}: the dataset at --data no longer matches the one the run was trained on"
        )
    if cfg.modality not in ("both", *info.modality_names):
        raise UserError(f"--modality: {cfg.dataset} has modalities {', '.join(info.modality_names)} (or 'both')")
    if is_main_process():
        for warning in schedule_warnings(cfg):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    # Before any data or model is built: a folder in use, an unwritable or a full disk is
    # reported now. Rank 0 creates and locks the folder; every rank gets its path, or its error.
    run_dir, lock = on_main_then_share(prepare_run_dir, cfg)
    try:
        return _train_in(run_dir, cfg, ckpt, info, where)
    finally:
        lock.release()


def _train_in(run_dir: Path, cfg, ckpt: dict | None, info: DatasetInfo, where: Placement) -> dict:
    """train() inside its locked run folder."""
    datasets = {split: get_dataset_entry(cfg.dataset).build(cfg, split) for split in SPLITS}
    _check_labels(datasets, info, cfg.dataset)
    splits = {split: ckpt_io.split_fingerprint(ds) for split, ds in datasets.items()}
    loaders = _loaders(datasets, cfg, where)
    preset = DevicePreset(info, where.device, cfg.channels_last)
    model, optimizer = _model_and_optimizer(cfg, info, where)
    on_main_then_share(check_free_space, run_dir, model, cfg)
    state = _restore(ckpt, model, optimizer, cfg, where) if ckpt is not None else TrainState()
    scheduler = build_scheduler(cfg, optimizer, state.epoch)
    try:  # e.g. an --ogm_params set that selects nothing of an encoder
        modulator = Modulator.from_config(cfg, model, reduce_fn=all_reduce_sum if is_distributed() else None)
    except ValueError as e:
        raise UserError(f"--modulation {cfg.modulation}: {e}") from None
    if ckpt is not None:  # checkpoints written before the modulator had state hold none
        modulator.load_state_dict(ckpt.get("modulator", {}))
    train_model = model
    if is_distributed():
        device_ids = [where.local_rank] if where.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        train_model = torch.compile(train_model)

    saver, writer = ckpt_io.CheckpointSaver(run_dir), None
    try:
        if is_main_process():
            if ckpt is not None:
                saver.resume(state.epoch, cfg.epochs)
            writer = _start_logging(run_dir, cfg, state, where, loaders)
        for epoch in range(state.epoch, cfg.epochs):
            state.epoch = epoch
            loaders["train"].sampler.set_epoch(epoch)
            started = time.time()
            train_stats = train_one_epoch(
                train_model, modulator, optimizer, loaders["train"], preset, state, cfg, where.amp_dtype, writer
            )
            scheduler.step()
            broadcast_module_state(model, buffers_only=True)  # every rank evaluates what rank 0 saves
            val = evaluate(model, loaders["val"], preset, where.amp_dtype, desc="val", epoch=epoch)
            state.epoch = epoch + 1
            improved = not state.best or val[SELECT_ON] > state.best["val_" + SELECT_ON]
            if improved:
                state.best = {"epoch": epoch, **{f"val_{k}": v for k, v in val.items()}}
            rng_ranks = ckpt_io.gather_rng_states()  # each rank's random streams, for --resume
            if is_main_process():
                record = {
                    "epoch": epoch,
                    "time_s": round(time.time() - started, 2),
                    **{f"train_{k}": v for k, v in train_stats.items()},
                    **{f"val_{k}": v for k, v in val.items()},
                }
                checkpoint = make_checkpoint(
                    model, optimizer, scheduler, state, cfg, info, splits, rng_ranks, modulator
                )
                saver.save_epoch(record, checkpoint, improved)
                log_epoch(record, writer, model.modality_names)

        result = {"run_dir": str(run_dir), "best": state.best}
        if cfg.eval_test:
            state.epoch = cfg.epochs  # for the message of an interruption from here on
            test_data = eval_loader(
                datasets["test"], cfg.batch_size, cfg.num_workers, where.rank, where.world_size, where.pin_memory
            )
            result["test"] = evaluate_best_on_test(
                model, saver, test_data, preset, where.amp_dtype, state.best.get("epoch")
            )
    except KeyboardInterrupt as e:
        at = f"during epoch {state.epoch}" if state.epoch < cfg.epochs else "during the test evaluation"
        raise Interrupted(at, saver.last, e) from None
    except NonFiniteError as e:
        raise Stopped(f"{e} {_resume_hint(e.epoch, saver.last)} {NONFINITE_ADVICE[e.kind]}") from None
    except ckpt_io.WriteFailed as e:
        raise CannotWrite(
            f"{e}; the files written before it are whole. {_resume_hint(state.epoch, saver.last)} "
            "once the cause is fixed."
        ) from None
    finally:
        if writer is not None:
            writer.close()
    return result


def _check_labels(datasets: dict, info: DatasetInfo, name: str) -> None:
    """Every split's labels are class indices of `info` (once, here: the step checks only its first batch)."""
    for split, dataset in datasets.items():
        labels = getattr(dataset, "labels", None)
        if labels is None:
            continue
        try:
            check_labels(torch.as_tensor(labels), info.num_classes)
        except ValueError as e:
            raise UserError(f"--dataset {name}, {split} split: {e}") from None


def _loaders(datasets: dict, cfg, where: Placement) -> dict:
    try:
        train = train_loader(
            datasets["train"],
            cfg.batch_size,
            cfg.num_workers,
            cfg.seed,
            where.rank,
            where.world_size,
            where.pin_memory,
            drop_last=getattr(cfg, "drop_last", True),
        )
    except ValueError as e:
        raise UserError(f"--batch_size {cfg.batch_size}: {e}") from None
    val = eval_loader(datasets["val"], cfg.batch_size, cfg.num_workers, where.rank, where.world_size, where.pin_memory)
    return {"train": train, "val": val}


def _model_and_optimizer(cfg, info: DatasetInfo, where: Placement) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    try:  # e.g. --fusion film on a dataset of three modalities
        model = build_model(info, cfg.fusion, cfg.modality, cfg.init, cfg.encoder_width).to(where.device)
    except ValueError as e:
        raise UserError(f"--fusion {cfg.fusion}: {e}") from None
    if cfg.channels_last and where.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and is_distributed():
        model = convert_sync_batchnorm(model, where.device.type)  # BatchNorm statistics of the global batch
    return model, build_optimizer(cfg, model)


def _restore(ckpt: dict, model, optimizer, cfg, where: Placement) -> TrainState:
    """A checkpoint's weights, optimiser state and this rank's random streams; its counters."""
    ckpt_io.load_model_state(model, ckpt["model"], ckpt["path"])
    optimizer.load_state_dict(ckpt["optimizer"])
    rng = ckpt_io.rng_state_for_rank(ckpt, where.rank, where.world_size)
    if rng is not None:
        ckpt_io.set_rng_state(rng)
    changed = _changed_schedule(ckpt["config"], cfg)
    if changed and is_main_process():
        print(f"resuming with {', '.join(changed)}: the learning-rate schedule is recomputed for them", flush=True)
    return TrainState(epoch=ckpt["epoch"], global_step=ckpt["global_step"], best=ckpt["best"])


def _start_logging(run_dir: Path, cfg, state: TrainState, where: Placement, loaders: dict):
    """Rank 0: config.json and environment.json, the resolved configuration printed; returns a TensorBoard writer."""
    try:
        ckpt_io.atomic_write_text(run_dir / "config.json", json.dumps(config_to_dict(cfg), indent=2))
        record_environment(run_dir / ENVIRONMENT_FILE, resumed=state.epoch > 0)
    except OSError as e:
        raise ckpt_io.WriteFailed(f"cannot write {e.filename or run_dir}: {e.strerror or e}") from None
    print(f"resolved configuration (saved in {run_dir / 'config.json'}):\n{format_config(cfg)}", end="", flush=True)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "tb"), purge_step=state.global_step or None)
    print(
        f"run: {run_dir}  device: {where.device}  precision: {where.amp_dtype or torch.float32}  "
        f"train/val samples: {len(loaders['train'].dataset)}/{len(loaders['val'].dataset)}"
    )
    return writer


# Epoch means of the modulation coefficients in an epoch record (engine.EPOCH_MEANS), as printed.
EPOCH_MODULATION = (("k", "OGM k"), ("q", "OPM q"))


def log_epoch(record: dict, writer, modality_names) -> None:
    """Rank 0 after each epoch: TensorBoard scalars (`epoch/<record key>`, x = the epoch, 0-based
    as in metrics.jsonl; the per-step ones are engine's `step/...`) and the summary line."""
    for k, v in record.items():
        if k != "epoch":
            writer.add_scalar(f"epoch/{k}", v, record["epoch"])
    per_mod = "  ".join(f"{n} {record['val_acc_' + n]:.3f}" for n in modality_names)
    line = (
        f"epoch {record['epoch']:3d}  loss {record['train_loss']:.4f}  train acc {record['train_acc']:.3f}  "
        f"val acc {record['val_acc']:.3f}  ({per_mod})"
    )
    for key, name in EPOCH_MODULATION:
        if all(f"train_{key}_{n}" in record for n in modality_names):
            line += f"  {name} " + " ".join(f"{n} {record[f'train_{key}_{n}']:.3f}" for n in modality_names)
    print(f"{line}  {record['time_s']:.1f}s", flush=True)


def evaluate_best_on_test(model, saver: ckpt_io.CheckpointSaver, test_data, preset, amp_dtype, best_epoch) -> dict:
    """Load best.pt (chosen on validation) and evaluate it once on the test split."""

    def load_best() -> None:
        best = ckpt_io.load_checkpoint(saver.run_dir / "best.pt")
        ckpt_io.load_model_state(model, best["model"], best["path"])

    # Rank 0 reads best.pt and sends its weights to every rank (no shared file system needed).
    on_main_then_share(load_best)
    broadcast_module_state(model)
    test = evaluate(model, test_data, preset, amp_dtype, desc="test", epoch=best_epoch)
    if is_main_process():
        saver.save_test(best_epoch, test)
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
        with _signals_stop_training():
            cfg = resolve_config(argv)
            if cfg.print_config:  # with --resume: the settings the resumed run would use
                print(format_config(merge_resume_config(cfg)[0] if cfg.resume else cfg), end="")
                return 0
            train(cfg)
            return 0
    except UserError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except CannotWrite as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return 1
    except Stopped as e:  # raised by every rank at the same step
        if is_main_process():
            print(f"train.py: stopped: {e}", file=sys.stderr)
        return 3
    except Interrupted as e:
        words, status = _how_stopped(e.by)
        if is_main_process():
            then = (
                f"resume with: python code/train.py --resume {e.last}"
                if e.last
                else "no epoch was completed, so there is nothing to resume"
            )
            print(f"train.py: {words} {e.where}; {then}", file=sys.stderr)
        return status
    except KeyboardInterrupt as e:
        words, status = _how_stopped(e)
        print(f"train.py: {words} before training started; nothing to resume", file=sys.stderr)
        return status
    finally:
        cleanup()
