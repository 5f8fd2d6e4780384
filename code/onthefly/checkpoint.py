"""Checkpoints: written atomically, checked on load, with everything needed to resume or rebuild.

A checkpoint is a dict with:
  format, version      -- identifies our files; anything else is refused as foreign
  model, optimizer, scheduler, epoch (completed), global_step, best
  config               -- the resolved run config (JSON-safe)
  dataset_info         -- what build_model needs to rebuild the network for inference
  rng                  -- Python, NumPy, torch CPU and CUDA generator states (rank 0's)
  rng_ranks            -- the same for every rank of a torchrun run (optional; rank order)
  splits               -- per split, what identifies its samples (`split_fingerprint`), so
                          inference can refuse a dataset that was split differently since

A resumed run rebuilds the learning-rate schedule from its settings (they may change on
--resume) rather than loading `scheduler`, which is kept for information.

`CheckpointSaver` is the one place a run's record is written (after timm's CheckpointSaver):
each epoch a metrics.jsonl line, then best.pt when validation improved, then last.pt; at the
end test_metrics.json. Checkpoints, config.json and test_metrics.json are replaced atomically
(temporary file, fsync, rename), so a run killed at any moment leaves each of them whole: the
old version or the new one. A resumed run deletes the temporary files a kill left behind,
drops from metrics.jsonl the epochs its checkpoint does not hold, and, when it trains further,
removes test_metrics.json (it scored a best.pt those epochs may replace).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError
from .fileio import atomic_write, atomic_write_text

FORMAT = "onthefly-checkpoint"
VERSION = 1


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(run_dir: str | Path, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files that `_atomic_write` of the files `names` left when a kill
    interrupted it (never a finished file, nor any other file)."""
    run_dir = Path(run_dir)
    stale = [p for name in names for p in run_dir.glob(f".{glob.escape(name)}.*.tmp") if p.is_file()]
    stale += [p for p in [run_dir / ".write_probe"] if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def trim_metrics_log(path: str | Path, epochs_done: int) -> int:
    """Keep only the records of epochs < `epochs_done` in a metrics.jsonl (and drop a torn last
    line): a run killed after logging an epoch but before checkpointing it redoes that epoch,
    which must not appear twice. Returns the number of records dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = int(record["epoch"]) < epochs_done
        except (ValueError, TypeError, KeyError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


class WriteFailed(Exception):
    """A file of the run folder could not be written (a full disk, say); the files written
    before are whole, so the run can be resumed once the cause is gone."""


class CheckpointSaver:
    """The run folder's record of training, written by rank 0: metrics.jsonl, best.pt,
    last.pt and test_metrics.json (see the module docstring for the order and why)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    @property
    def last(self) -> Path | None:
        """The checkpoint to resume from, or None before the first epoch ends."""
        path = self.run_dir / "last.pt"
        return path if path.is_file() else None

    def resume(self, epochs_done: int, epochs: int) -> None:
        """Continue after `epochs_done` epochs: forget what the checkpoint does not hold."""
        with self._writing("metrics.jsonl"):  # epochs logged after the checkpoint was written are redone
            trim_metrics_log(self.run_dir / "metrics.jsonl", epochs_done)
        if epochs_done < epochs:
            with self._writing("test_metrics.json"):
                (self.run_dir / "test_metrics.json").unlink(missing_ok=True)

    def save_epoch(self, record: dict[str, Any], checkpoint: dict[str, Any], improved: bool) -> None:
        with self._writing("metrics.jsonl"):
            with open(self.run_dir / "metrics.jsonl", "a") as f:  # a torn line is dropped on --resume
                f.write(json.dumps(record) + "\n")
        if improved:  # best.pt first: a kill between the two writes leaves last.pt behind, so the epoch is redone
            with self._writing("best.pt"):
                atomic_torch_save(checkpoint, self.run_dir / "best.pt")
        with self._writing("last.pt"):
            atomic_torch_save(checkpoint, self.run_dir / "last.pt")

    def save_test(self, best_epoch: int | None, metrics: dict[str, float]) -> None:
        with self._writing("test_metrics.json"):
            text = json.dumps({"best_epoch": best_epoch, **metrics}, indent=2)
            atomic_write_text(self.run_dir / "test_metrics.json", text)

    @contextlib.contextmanager
    def _writing(self, name: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise WriteFailed(f"cannot write {self.run_dir / name}: {e.strerror or e}") from None


def rng_state_for_rank(ckpt: dict[str, Any], rank: int, world_size: int) -> dict[str, Any] | None:
    """The random state rank `rank` resumes with: its own when the checkpoint was written by a
    run with as many processes, rank 0's in a single process, otherwise None (keep the fresh
    per-rank seed: the run continues, but not bit for bit)."""
    per_rank = ckpt.get("rng_ranks")
    if per_rank and len(per_rank) == world_size:
        return per_rank[rank]
    return ckpt["rng"] if world_size == 1 or rank == 0 else None


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's `rng_state()`, in rank order, on every rank (a one-element list in a single
    process). Sent as torch.save bytes: all_gather_object cannot carry the uint32 NumPy keys."""
    from .distributed import all_gather_objects, is_distributed

    if not is_distributed():
        return [rng_state()]
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    return [torch.load(io.BytesIO(b), weights_only=False) for b in all_gather_objects(buf.getvalue())]


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check one of our checkpoints; a clear UserError names the file otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(
            f"checkpoint {path} is unreadable (truncated or not a torch file): {type(e).__name__}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not a checkpoint of this project")
    if ckpt.get("version") != VERSION:
        raise UserError(f"checkpoint {path} has format version {ckpt.get('version')}, expected {VERSION}")
    missing = [k for k in ("model", "config", "dataset_info", "epoch") if k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}")
    ckpt["path"] = str(path)
    return ckpt


def split_fingerprint(dataset: Any, count: int | None = None) -> dict[str, Any] | None:
    """{"count", "sha1"} of the ids of a split's first `count` samples (all by default), in
    order: a cache's clip ids, or AV-Digits' rows of its arrays. None when the dataset exposes
    none (nothing to compare)."""
    ids = getattr(dataset, "clip_ids", None)
    if ids is None:
        return None
    ids = [str(i) for i in list(ids)[: min(len(dataset), len(dataset) if count is None else count)]]
    return {"count": len(ids), "sha1": hashlib.sha1("\n".join(ids).encode()).hexdigest()}


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Strict load; a mismatch is reported as the user's error, naming the checkpoint."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "state_dict mismatch"
        raise UserError(f"checkpoint {path} does not match the model: {first}") from None
