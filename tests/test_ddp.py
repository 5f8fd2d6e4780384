"""DistributedDataParallel on CPU: 2 processes (gloo), started with torch.multiprocessing.

What is checked, with the real MultimodalClassifier, Modulator and training loop (on tiny
encoders, conftest's `tiny_encoders`: the distributed plumbing is under test, not ResNet18):
  * OGM with SyncBatchNorm: 2 ranks at batch B/2 each follow one process at batch B step for
    step: the same k_m every step and the same weights (float64, so no rounding noise can
    build up in a few steps of a tiny-batch ResNet);
  * OPM: both ranks use the same drop probabilities q_m every step; OGM-GE (whose noise is
    drawn after DDP averaged the gradients) and OGM+OPM leave both replicas identical, with
    every fusion head;
  * evaluation gathers the shards: every sample counted exactly once;
  * train.py under torchrun's environment (RANK, WORLD_SIZE): --sync_bn, --resume, only rank
    0 writes, and the final test uses best.pt's weights on every rank; its weights match a
    one-process run at twice the batch. An unwritable run directory stops both ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from onthefly import runner
from onthefly.data.avdigits import avdigits_info
from onthefly.data.loaders import eval_loader
from onthefly.distributed import all_reduce_sum, convert_sync_batchnorm, is_distributed
from onthefly.engine import TrainState, predict, train_one_epoch
from onthefly.models import ENCODERS, build_model
from onthefly.modulation import Modulator

WORLD = 2
BATCH = 4  # the global batch of the step-by-step cases; each rank takes BATCH // WORLD
STEPS = 3
RUN_BATCH = 8  # train.py's global batch: one step per epoch on 8 samples
# (modulation, fusion, steps): each fusion head and each method once under DDP (in float32)
REPLICA_CASES = [("OPM", "sum", 2), ("OGM_GE", "film", 1), ("OGM_OPM", "gated", 1)]
RUN_ARGS = [
    "--limit_samples",
    "8",
    "--device",
    "cpu",
    "--deterministic",
    "--modulation",
    "OGM",
    "--scheduler",
    "none",
    "--log_every",
    "1",
    "--run_name",
    "run",
]


class Recorder:
    """A stand-in for the TensorBoard writer: every logged scalar, in step order."""

    def __init__(self):
        self.scalars: dict[str, list[float]] = {}

    def add_scalar(self, key, value, step):
        self.scalars.setdefault(key, []).append(value)


def fixed_data(steps: int):
    g = torch.Generator().manual_seed(1)
    n = BATCH * steps
    return {
        "audio": torch.randn(n, 1, 13, 32, generator=g, dtype=torch.float64).to(torch.get_default_dtype()),
        "visual": torch.randint(0, 256, (n, 3, 1, 28, 28), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, 10, (n,), generator=g),
        "index": torch.arange(n),
    }


def preset(batch):
    """DevicePreset's job, in the default dtype (float64 for the step-by-step comparison)."""
    return {"audio": batch["audio"], "visual": (batch["visual"].to(torch.get_default_dtype()) - 127.5) / 64}, batch[
        "label"
    ]


def train_steps(modulation: str, fusion: str, steps: int, rank: int, world: int) -> dict:
    """`steps` steps of train_one_epoch on fixed data; this rank's share of each global batch."""
    torch.manual_seed(0)
    model = build_model(avdigits_info(argparse.Namespace(data=None)), fusion).to(torch.get_default_dtype())
    if world > 1:
        model = convert_sync_batchnorm(model, "cpu")
    cfg = argparse.Namespace(modulation=modulation, alpha=0.5, nonfinite="stop", log_every=1, seed=0)
    modulator = Modulator.from_config(cfg, model, reduce_fn=all_reduce_sum if world > 1 else None)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data, share = fixed_data(steps), BATCH // world
    batches = [
        {k: v[t * BATCH + rank * share : t * BATCH + (rank + 1) * share] for k, v in data.items()} for t in range(steps)
    ]
    recorder = Recorder()
    train_one_epoch(train_model, modulator, optimizer, batches, preset, TrainState(), cfg, None, recorder)
    return {"scalars": recorder.scalars, "weights": model.state_dict()}


def fingerprint(state: dict) -> str:
    """Equal for bit-identical state dicts (cheaper to pass around than the weights)."""
    h = hashlib.sha1()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _init_group(rank: int, init_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )


def _worker(rank: int, tmp: str, encoders: dict) -> None:
    ENCODERS.update(encoders)  # a spawned process starts from the real registry
    torch.set_num_threads(1)
    tmp_path = Path(tmp)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    _init_group(rank, str(tmp_path / "group0"))
    ogm = train_steps("OGM", "concat", STEPS, rank, WORLD)
    single = torch.load(tmp_path / "single_ogm.pt", weights_only=False, mmap=True)
    out = {
        "OGM": {
            "scalars": ogm["scalars"],
            "weights": fingerprint(ogm["weights"]),
            "diff_to_single": max_diff(ogm["weights"], single),
        }
    }
    del ogm, single
    torch.set_default_dtype(default_dtype)
    for modulation, fusion, steps in REPLICA_CASES:
        result = train_steps(modulation, fusion, steps, rank, WORLD)
        out[modulation] = {"scalars": result["scalars"], "weights": fingerprint(result["weights"])}

    # evaluation: 7 samples over 2 ranks (4 + 3), gathered
    data = fixed_data(1)
    samples = [{k: v[i % BATCH] for k, v in data.items()} | {"index": i} for i in range(7)]
    model = build_model(avdigits_info(argparse.Namespace(data=None)), "concat")
    out["predicted_index"] = predict(model, eval_loader(samples, 2, 0, rank, WORLD, False), preset, None)["index"]
    dist.destroy_process_group()

    # train.py under torchrun's environment: one epoch, then --resume for a second one
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    test_weights = []

    def evaluate_spy(model, loader, preset, amp, desc="eval", epoch=None):
        if desc == "test":
            test_weights.append(fingerprint(model.state_dict()))
        return evaluate(model, loader, preset, amp, desc, epoch)

    evaluate = runner.evaluate
    runner.evaluate = evaluate_spy
    # an unwritable run directory: rank 0 finds out, and every rank stops (none waits forever)
    _init_group(rank, str(tmp_path / "group_unwritable"))  # runner joins the existing group
    out["rc_unwritable"] = runner.main(
        [*RUN_ARGS, "--batch_size", "4", "--epochs", "1", "--output_dir", str(tmp_path / "blocker" / "sub")]
    )
    _init_group(rank, str(tmp_path / "group1"))
    rcs = [
        runner.main(
            [
                *RUN_ARGS,
                "--batch_size",
                str(RUN_BATCH // WORLD),
                "--epochs",
                "1",
                "--sync_bn",
                "--no-eval_test",
                "--output_dir",
                str(tmp_path / "ddp"),
            ]
        )
    ]
    assert not is_distributed()  # runner.main leaves the group
    _init_group(rank, str(tmp_path / "group2"))
    rcs.append(runner.main(["--resume", str(tmp_path / "ddp" / "run" / "last.pt"), "--epochs", "2", "--eval_test"]))
    out["rc"], out["test_weights"] = rcs, test_weights
    torch.save(out, tmp_path / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, tiny_encoders_within):
    """Both ranks' results, and the one-process references."""
    tmp = tmp_path_factory.mktemp("ddp")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tiny_encoders_within():
            dtype = torch.get_default_dtype()
            torch.set_default_dtype(torch.float64)
            try:
                single = train_steps("OGM", "concat", STEPS, 0, 1)
            finally:
                torch.set_default_dtype(dtype)
            torch.save(single["weights"], tmp / "single_ogm.pt")  # each rank compares its weights with these
            (tmp / "blocker").write_text("a file where the run directory's parent should be")
            mp.spawn(_worker, args=(str(tmp), dict(ENCODERS)), nprocs=WORLD, join=True)
            assert (
                runner.main(
                    [*RUN_ARGS, "--batch_size", str(RUN_BATCH), "--epochs", "2", "--output_dir", str(tmp / "single")]
                )
                == 0
            )
    finally:
        torch.set_num_threads(threads)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"tmp": tmp, "ranks": ranks, "single": single}


def test_ogm_under_ddp_follows_one_process_at_the_global_batch(ddp):
    single, ranks = ddp["single"], ddp["ranks"]
    for m in ("audio", "visual"):
        k_single = single["scalars"][f"modulation/coeff_{m}"]
        assert len(k_single) == STEPS
        for r in ranks:
            assert r["OGM"]["scalars"][f"modulation/coeff_{m}"] == pytest.approx(
                k_single, abs=1e-6
            )  # scores are float32
    assert any(
        k < 1 for k in single["scalars"]["modulation/coeff_audio"] + single["scalars"]["modulation/coeff_visual"]
    )  # OGM acted
    for r in ranks:
        # float64 weights, but k comes from float32 scores: they agree to k's float32 rounding times the update
        assert r["OGM"]["diff_to_single"] < 1e-7
    assert ranks[0]["OGM"]["weights"] == ranks[1]["OGM"]["weights"]


@pytest.mark.parametrize("modulation,fusion,steps", REPLICA_CASES)
def test_every_rank_modulates_alike_and_replicas_stay_identical(ddp, modulation, fusion, steps):
    a, b = (r[modulation] for r in ddp["ranks"])
    assert a["weights"] == b["weights"]
    assert a["scalars"].keys() == b["scalars"].keys()
    assert ("modulation/coeff_audio" in a["scalars"]) == ("OGM" in modulation)
    assert ("modulation/drop_prob_audio" in a["scalars"]) == ("OPM" in modulation)
    for name in a["scalars"]:
        if name.startswith("modulation/") and "kept" not in name:  # kept: each rank's own samples
            assert a["scalars"][name] == b["scalars"][name], name  # scores, ratios, k_m, q_m
    if "OPM" in modulation:
        q = a["scalars"]["modulation/drop_prob_audio"] + a["scalars"]["modulation/drop_prob_visual"]
        assert len(q) == 2 * steps and any(v > 0 for v in q)  # OPM acted


def test_evaluation_counts_every_sample_once(ddp):
    for r in ddp["ranks"]:
        assert sorted(r["predicted_index"].tolist()) == list(range(7))


def test_train_py_under_ddp_with_sync_bn_and_resume(ddp):
    tmp, ranks = ddp["tmp"], ddp["ranks"]
    assert [r["rc_unwritable"] for r in ranks] == [2, 2]
    assert [r["rc"] for r in ranks] == [[0, 0], [0, 0]]
    run, single = tmp / "ddp" / "run", tmp / "single" / "run"
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in single.iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]  # one line per epoch: only rank 0 writes
    for got, want in zip(records, reference):
        assert got["val_acc"] == want["val_acc"] and got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-4)

    last = torch.load(run / "last.pt", weights_only=False, mmap=True)
    assert last["config"]["sync_bn"] and len(last["rng_ranks"]) == WORLD
    # 2 ranks x 4 samples, SyncBatchNorm, summed scores == 1 process x 8 samples (float32)
    assert max_diff(last["model"], torch.load(single / "last.pt", weights_only=False, mmap=True)["model"]) < 1e-5

    best = fingerprint(torch.load(run / "best.pt", weights_only=False, mmap=True)["model"])
    for r in ranks:  # every rank tested best.pt's weights
        assert r["test_weights"] == [best]
    got, want = (json.loads((d / "test_metrics.json").read_text()) for d in (run, single))
    assert got["acc"] == want["acc"] and got["best_epoch"] == want["best_epoch"]
