#!/usr/bin/env python
"""Training-step benchmark: our step vs the official-style step, side by side in one process.

    python bench/bench_step.py --device cuda --batch_size 64 --shape cremad --out results.json
    python bench/bench_step.py --device cpu --small --batch_size 4 --iters 3 --warmup 1 --rounds 1

(with onthefly installed by the README's set-up; elsewhere prefix PYTHONPATH=code, as gpu_check.sh does)

For one input shape, every configuration is built from the same initial weights and fed
the same synthetic batches (already on the device unless --source host), then timed in
interleaved rounds (each round times every configuration once; the median round is
reported), so slow drifts of clock or temperature hit every row alike:

  official  the reference step of official_style.py: float32, NCHW, nn.DataParallel on
            CUDA, per-sample Python score loop, host branch on the ratio, per-parameter
            grad.std().item(), three loss.item() per step. Methods none (the official
            "Normal"), OGM, OGM_GE.
  ours      the project's step: onthefly's model, Modulator, compute_loss and (by default)
            engine.train_one_epoch itself, with uint8 frames normalised on the device,
            bf16 autocast on CUDA, channels_last, cudnn.benchmark. Methods none, OGM,
            OGM_GE, OPM.

Extra variants of ours (--variants, comma separated, tokens joined by '+') are measured in
the same run: precision (auto, fp32, bf16), layout (cl, nchw), audio/visual stem
(apad4, apad8: the 1-channel audio stem conv zero-padded to 4/8 input channels; pad8: both
stems padded to 8; astem32, stem32: the audio stem / both stems run in float32 NCHW
outside autocast), compile, compile-ro (reduce-overhead), compile-max
(max-autotune-no-cudagraphs) (torch.compile of the encoders), fusedsgd, graph (the whole
step captured once as a CUDA graph and replayed; CUDA only). Compiled and graphed variants
run in a second phase, after the others are written, next to a fresh measurement of the
default `none` row. A variant that fails to build or run is reported and left out.

Work per step is counted once per shape with torch.utils.flop_counter.FlopCounterMode
(forward + backward of the fp32 model); TFLOP/s = that count x steps per second.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import official_style as off  # bench/ is the script's own directory, hence on the path
import torch
import torch.nn.functional as F
from torch import nn

from onthefly.data.presets import DevicePreset
from onthefly.data.spec import DatasetInfo, ModalitySpec
from onthefly.engine import TrainState, compute_loss, train_one_epoch
from onthefly.models import build_model
from onthefly.modulation import ModulationConfig, Modulator, modulation_defaults

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (audio (C, F, T), frames per clip, frame side, classes); --small shrinks the sizes
SHAPES = {
    "cremad": ((1, 257, 188), 1, 224, 6),
    "kinetics_sounds": ((1, 257, 188), 3, 224, 31),
}
SMALL_AUDIO = (1, 65, 47)
SMALL_SIDE = 56
OURS_METHODS = ("none", "OGM", "OGM_GE", "OPM")


# ----------------------------------------------------------------------------- inputs


def synthetic_info(shape: str, small: bool = False) -> DatasetInfo:
    """A DatasetInfo with the shapes of `shape` (see SHAPES): audio spectrogram + RGB frames."""
    if shape not in SHAPES:
        raise SystemExit(f"--shape: choose one of {', '.join(SHAPES)}")
    audio, frames, side, classes = SHAPES[shape]
    if small:
        audio, side = SMALL_AUDIO, SMALL_SIDE
    return DatasetInfo(
        name=f"synthetic_{shape}{'_small' if small else ''}",
        num_classes=classes,
        class_names=tuple(f"class{i}" for i in range(classes)),
        modalities=(
            ModalitySpec("audio", "spectrogram", audio[0], tuple(audio)),
            ModalitySpec("visual", "frames", 3, (3, frames, side, side), IMAGENET_MEAN, IMAGENET_STD),
        ),
    )


def make_batches(
    info: DatasetInfo, batch_size: int, count: int, seed: int, device: torch.device, source: str = "device"
):
    """`count` batches, each as ours (dict: float audio, uint8 frames, label) and as the
    official step sees it (float audio, float frames normalised as DevicePreset does, label).

    source="device": every tensor already on `device` (no transfer is timed).
    source="host":   tensors in (pinned, on CUDA) host memory; each step copies them, ours
                     with uint8 frames and non_blocking copies, the official float32, blocking.
    """
    g = torch.Generator().manual_seed(seed)
    spec_a, spec_v = info.modalities
    plain = DevicePreset(info, torch.device("cpu"))
    out = []
    for _ in range(count):
        audio = torch.randn((batch_size, *spec_a.shape), generator=g)
        frames = torch.randint(0, 256, (batch_size, *spec_v.shape), generator=g, dtype=torch.uint8)
        label = torch.randint(0, info.num_classes, (batch_size,), generator=g)
        ours = {spec_a.name: audio, spec_v.name: frames, "label": label, "index": torch.arange(batch_size)}
        inputs, _ = plain(ours)  # the official loader hands over normalised float frames
        official = (audio, inputs[spec_v.name], label)
        if source == "device":
            ours = {k: v.to(device) for k, v in ours.items()}
            official = tuple(t.to(device) for t in official)
        elif device.type == "cuda":
            ours = {k: v.pin_memory() for k, v in ours.items()}
            official = tuple(t.pin_memory() for t in official)
        out.append((ours, official))
    return out


# ----------------------------------------------------------------------------- stems


class PaddedStem(nn.Module):
    """A stem conv whose input (and weight) are zero-padded to `channels` input channels.

    The same function and the same parameter (the padding of the weight is not a
    parameter, so its gradient is the original one): only the kernel cuDNN picks changes.
    """

    def __init__(self, conv: nn.Conv2d, channels: int, channels_last: bool):
        super().__init__()
        self.weight = conv.weight
        self.stride, self.padding = conv.stride, conv.padding
        self.channels, self.channels_last = channels, channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.channels - x.shape[1]
        w = self.weight
        if pad > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
            w = F.pad(w, (0, 0, 0, 0, 0, pad))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            w = w.contiguous(memory_format=torch.channels_last)
        return F.conv2d(x, w, None, self.stride, self.padding)


class Float32Stem(nn.Module):
    """A stem conv run in float32 NCHW outside autocast; its output goes back to the model's layout."""

    def __init__(self, conv: nn.Conv2d, channels_last: bool):
        super().__init__()
        self.weight = conv.weight
        self.stride, self.padding = conv.stride, conv.padding
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(x.float().contiguous(), self.weight.float().contiguous(), None, self.stride, self.padding)
        return y.contiguous(memory_format=torch.channels_last) if self.channels_last else y


STEMS = ("", "apad4", "apad8", "pad8", "astem32", "stem32")


def apply_stem(model: nn.Module, stem: str, channels_last: bool) -> None:
    """Replace the stem conv of the audio encoder (a-prefixed) or of both encoders, in place."""
    if not stem:
        return
    names = [model.modality_names[0]] if stem.startswith("a") else list(model.modality_names)
    for name in names:
        net = model.encoders[name].net
        if "stem32" in stem:
            net.conv1 = Float32Stem(net.conv1, channels_last)
        else:
            channels = int(stem.rsplit("pad", 1)[1])
            if net.conv1.in_channels < channels:
                net.conv1 = PaddedStem(net.conv1, channels, channels_last)


# ----------------------------------------------------------------------------- variants


@dataclass
class Variant:
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16
    layout: str = "auto"  # auto (channels_last on CUDA), cl, nchw
    stem: str = ""
    compile: str = ""  # "", default, reduce-overhead, max-autotune-no-cudagraphs
    fused_sgd: bool = False
    graph: bool = False  # the whole step captured once as a CUDA graph, then replayed

    @property
    def phase(self) -> int:
        return 2 if (self.compile or self.graph) else 1

    @property
    def name(self) -> str:
        parts = [self.precision]
        if self.layout != "auto":
            parts.append(self.layout)
        if self.stem:
            parts.append(self.stem)
        if self.compile:
            parts.append(
                {"default": "compile", "reduce-overhead": "compile-ro", "max-autotune-no-cudagraphs": "compile-max"}[
                    self.compile
                ]
            )
        if self.fused_sgd:
            parts.append("fusedsgd")
        if self.graph:
            parts.append("graph")
        return "+".join(parts)

    def amp_dtype(self, device: torch.device) -> torch.dtype | None:
        if self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda"):
            return torch.bfloat16
        return None

    def channels_last(self, device: torch.device) -> bool:
        return self.layout == "cl" or (self.layout == "auto" and device.type == "cuda")


def parse_variant(text: str) -> Variant:
    v = Variant()
    for tok in filter(None, text.strip().split("+")):
        if tok in ("auto", "fp32", "bf16"):
            v.precision = tok
        elif tok in ("cl", "nchw"):
            v.layout = tok
        elif tok in STEMS:
            v.stem = tok
        elif tok in ("compile", "compile-ro", "compile-max"):
            v.compile = {
                "compile": "default",
                "compile-ro": "reduce-overhead",
                "compile-max": "max-autotune-no-cudagraphs",
            }[tok]
        elif tok == "fusedsgd":
            v.fused_sgd = True
        elif tok == "graph":
            v.graph = True
        else:
            raise SystemExit(f"--variants: unknown token {tok!r} in {text!r}")
    return v


# ----------------------------------------------------------------------------- our step


def build_ours(base: nn.Module, info: DatasetInfo, device: torch.device, variant: Variant, method: str, alpha: float):
    """Our model (a copy of `base`), optimizer, Modulator and DevicePreset for one configuration."""
    model = copy.deepcopy(base).to(device)
    cl = variant.channels_last(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    apply_stem(model, variant.stem, cl)
    if variant.compile:
        for enc in model.encoders.values():
            enc.compile(mode=None if variant.compile == "default" else variant.compile)
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {"fused": True} if variant.fused_sgd else {}
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4, **kw)
    modulator = Modulator(ModulationConfig(modulation=method, alpha=alpha), model.encoder_parameters())
    preset = DevicePreset(info, device, cl)
    return model, optimizer, modulator, preset


def ours_forward_backward(model, modulator, optimizer, preset, batch, amp_dtype, epoch: int = 0):
    """The engine's step up to (not including) the modulation: returns (out, labels, loss)."""
    inputs, labels = preset(batch)
    device = labels.device
    ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    with ctx:
        out = model(inputs, feature_hook=modulator.feature_hook(labels, epoch))
        loss = compute_loss(out, labels, model.head)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return out, labels, loss


def ours_step(model, modulator, optimizer, preset, batch, amp_dtype, epoch: int = 0) -> torch.Tensor:
    """One step of engine.train_one_epoch's body, without its finiteness bookkeeping."""
    out, labels, loss = ours_forward_backward(model, modulator, optimizer, preset, batch, amp_dtype, epoch)
    modulator.modulate_gradients(out, labels, epoch)
    optimizer.step()
    return loss.detach()


class GraphedStep:
    """Our whole step (device preset, forward, loss, backward, modulation, SGD) captured once
    as a CUDA graph and replayed for every batch: possible because the step never waits on
    the host. Each replay copies the batch into the captured input buffers first.

    As torch.cuda.graph's whole-network recipe: warm-up steps on a side stream (cudnn
    autotuning, optimizer state), gradients set to None before the capture so backward
    allocates them from the graph's pool, and autocast without its weight-cast cache.
    """

    def __init__(self, model, modulator, optimizer, preset, amp_dtype, example: dict, warmup: int = 3):
        self.parts = (model, modulator, optimizer, preset, amp_dtype)
        self.static = {k: v.clone() for k, v in example.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                optimizer.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._body()

    def _body(self) -> torch.Tensor:
        model, modulator, optimizer, preset, amp = self.parts
        inputs, labels = preset(self.static)
        ctx = torch.autocast("cuda", dtype=amp, cache_enabled=False) if amp else contextlib.nullcontext()
        with ctx:
            out = model(inputs, feature_hook=modulator.feature_hook(labels, 0))
            loss = compute_loss(out, labels, model.head)
        loss.backward()
        modulator.modulate_gradients(out, labels, 0)
        optimizer.step()
        return loss.detach()

    def __call__(self, batch: dict) -> torch.Tensor:
        for k, v in self.static.items():
            v.copy_(batch[k], non_blocking=True)
        self.graph.replay()
        return self.loss


# ----------------------------------------------------------------------------- configurations


@dataclass
class Config:
    impl: str  # official | ours
    variant: str
    method: str
    run: Callable[[list], None] = field(repr=False)  # runs one step per batch given
    step_once: Callable[[Any], None] = field(repr=False)  # one step (for sync and profile checks)
    phase: int = 1
    rounds: list[float] = field(default_factory=list)  # samples/s per round

    @property
    def label(self) -> str:
        return f"{self.impl}/{self.variant}/{self.method}"


_DEVNULL = open(os.devnull, "w")


def make_official_config(base, device, method: str, alpha: float, source: str) -> Config:
    model = copy.deepcopy(base)
    net = off.wrap_official(model, device)
    optimizer = off.official_optimizer(net)
    criterion = nn.CrossEntropyLoss()

    def step(pair):
        batch = pair[1]
        if source == "host":
            batch = tuple(t.to(device) for t in batch)
        off.official_step(net, optimizer, batch, method, alpha, criterion)

    def run(pairs):
        net.train()
        for pair in pairs:
            step(pair)

    name = "fp32+nchw+dp" if device.type == "cuda" else "fp32+nchw"
    return Config("official", name, method, run, step)


def make_ours_config(base, info, device, variant: Variant, method: str, alpha: float, loop: str) -> Config:
    if variant.graph and device.type != "cuda":
        raise SystemExit(f"variant {variant.name}: CUDA graphs need --device cuda")
    model, optimizer, modulator, preset = build_ours(base, info, device, variant, method, alpha)
    amp = variant.amp_dtype(device)
    if variant.graph:
        graphed: list[GraphedStep] = []

        def run_graph(pairs):
            model.train()
            if not graphed:  # captured on first use (the warm-up)
                graphed.append(GraphedStep(model, modulator, optimizer, preset, amp, pairs[0][0]))
            for pair in pairs:
                graphed[0](pair[0])

        return Config("ours", variant.name, method, run_graph, lambda pair: run_graph([pair]), phase=2)
    state = TrainState()
    cfg = SimpleNamespace(nonfinite="stop", log_every=10**9)

    def step(pair):
        ours_step(model, modulator, optimizer, preset, pair[0], amp)

    def run(pairs):
        if loop == "engine":
            with contextlib.redirect_stderr(_DEVNULL):  # the engine's progress bar
                train_one_epoch(model, modulator, optimizer, [p[0] for p in pairs], preset, state, cfg, amp)
        else:
            model.train()
            for pair in pairs:
                step(pair)

    return Config("ours", variant.name, method, run, step, phase=variant.phase)


# ----------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(base, info, device, batch_pair) -> int:
    """FLOPs of one forward + backward of the fp32 model on one batch (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(base).to(device)
    preset = DevicePreset(info, device)
    inputs, labels = preset(batch_pair[0])
    with FlopCounterMode(display=False) as counter:
        out = model(inputs)
        compute_loss(out, labels, model.head).backward()
    del model
    return int(counter.get_total_flops())


def count_host_syncs(cfg: Config, pair, device: torch.device) -> int | None:
    """Synchronising CUDA calls in one step (torch.cuda.set_sync_debug_mode); None off CUDA."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            cfg.step_once(pair)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(device)
    return sum("synchroniz" in str(w.message) for w in caught)


def count_ops(cfg: Config, pair) -> dict:
    """Operators dispatched in one step (each one a kernel launch or more on a GPU, and host
    work either way), and how many of them read a device value on the host (.item(),
    bool(tensor), ...: a host sync on CUDA). Counted below autograd and autocast, so the
    backward pass and the casts are included; device-independent, so a CPU run counts too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        ops = 0
        host_reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.ops += 1
            if func is torch.ops.aten._local_scalar_dense.default:
                Counter.host_reads += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        cfg.step_once(pair)
    return {"ops": Counter.ops, "host_reads": Counter.host_reads}


def profile_config(cfg: Config, pairs, device: torch.device, steps: int) -> tuple[dict, str]:
    """Device (kernel) time per step vs wall time per step, and the top kernels, for one config."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    batches = [pairs[i % len(pairs)] for i in range(steps)]
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        cfg.run(batches)
        sync(device)
        wall = time.perf_counter() - t0
    kernels: dict[str, list[float]] = {}
    syncs = 0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0.0, 0])
            k[0] += e.device_time_total
            k[1] += 1
        elif "Synchronize" in e.name:
            syncs += 1
    busy_us = sum(v[0] for v in kernels.values())
    summary = {
        "wall_ms_per_step": 1e3 * wall / steps,
        "kernels_per_step": sum(v[1] for v in kernels.values()) / steps,
        "device_ms_per_step": busy_us / 1e3 / steps,
        "device_busy": (busy_us / 1e6) / wall if wall > 0 else None,
        "sync_calls_per_step": syncs / steps,
        "note": "measured under the profiler (its overhead included in wall time)",
    }
    lines = [
        f"== {cfg.label}: {steps} steps; wall {summary['wall_ms_per_step']:.2f} ms/step, "
        f"device kernels {summary['device_ms_per_step']:.2f} ms/step ({summary['kernels_per_step']:.0f} launches), "
        f"sync calls {summary['sync_calls_per_step']:.1f}/step",
        "top device kernels (ms per step, launches per step):",
    ]
    for name, (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:20]:
        lines.append(f"  {us / 1e3 / steps:8.3f} ms  {n / steps:6.1f}  {name[:150]}")
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        lines.append(prof.key_averages().table(sort_by=sort_key, row_limit=25, max_name_column_width=60))
    except Exception as e:  # the table is a convenience; the numbers above are what matter
        lines.append(f"(no table: {e})")
    return summary, "\n".join(lines)


def measure(
    configs: list[Config],
    pairs,
    iters: int,
    rounds: int,
    batch_size: int,
    device,
    on_round=None,
    failed: dict | None = None,
) -> None:
    batches = [pairs[i % len(pairs)] for i in range(iters)]
    live = list(configs)
    for r in range(rounds):
        for cfg in list(live):
            sync(device)
            t0 = time.perf_counter()
            try:
                cfg.run(batches)
                sync(device)
            except Exception as e:
                if failed is None:
                    raise
                failed[cfg.label] = f"round {r}: {type(e).__name__}: {e}"[:2000]
                cfg.rounds.clear()
                live.remove(cfg)
                print(f"  {cfg.label}: FAILED {failed[cfg.label][:300]}", flush=True)
                continue
            cfg.rounds.append(iters * batch_size / (time.perf_counter() - t0))
        if on_round:
            on_round(r)


def warm(configs: list[Config], pairs, warmup: int, device, failed: dict) -> list[Config]:
    """Warm every config up; one that raises is reported in `failed` and left out (the rest go on)."""
    batches = [pairs[i % len(pairs)] for i in range(max(warmup, 1))]
    kept = []
    for cfg in configs:
        t0 = time.perf_counter()
        try:
            cfg.run(batches)
            sync(device)
        except Exception as e:  # a variant that cannot run here must not cost the other rows
            failed[cfg.label] = f"{type(e).__name__}: {e}"[:2000]
            print(f"  warm-up {cfg.label}: FAILED {failed[cfg.label][:300]}", flush=True)
            continue
        kept.append(cfg)
        print(f"  warm-up {cfg.label}: {time.perf_counter() - t0:.1f} s", flush=True)
    return kept


# ----------------------------------------------------------------------------- report


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["tf32_conv"] = torch.backends.cudnn.allow_tf32
    else:
        cpu = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        env["device"] = f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    return env


def summarize(
    configs: list[Config],
    flops_per_step: int,
    batch_size: int,
    default_variant: Variant,
    ops_per_step: dict | None = None,
) -> dict:
    rows = []
    for c in configs:
        if not c.rounds:
            continue
        sps = statistics.median(c.rounds)
        rows.append(
            {
                "impl": c.impl,
                "variant": c.variant,
                "method": c.method,
                "phase": c.phase,
                "samples_per_s": sps,
                "rounds": c.rounds,
                "step_ms": 1e3 * batch_size / sps,
                "tflops": flops_per_step * sps / batch_size / 1e12,
            }
        )
        counted = (ops_per_step or {}).get(c.label) if c.phase == 1 else None
        if isinstance(counted, dict):
            rows[-1].update(ops_per_step=counted["ops"], host_reads_per_step=counted["host_reads"])
    find = {(r["impl"], r["variant"], r["method"], r["phase"]): r for r in rows}
    ratios, overhead = {}, {}
    official_variant = next((r["variant"] for r in rows if r["impl"] == "official"), None)
    for r in rows:
        if r["impl"] != "ours":
            continue
        o = find.get(("official", official_variant, r["method"], 1))
        r["vs_official"] = r["samples_per_s"] / o["samples_per_s"] if o else None
        none = find.get(("ours", r["variant"], "none", r["phase"]))
        r["vs_own_none"] = r["samples_per_s"] / none["samples_per_s"] - 1 if none else None
        if r["variant"] == default_variant.name and r["phase"] == default_variant.phase:
            if r["vs_official"] is not None:
                ratios[r["method"]] = r["vs_official"]
            if r["vs_own_none"] is not None and r["method"] != "none":
                overhead[r["method"]] = r["vs_own_none"]
    return {"rows": rows, "ours_over_official": ratios, "modulation_overhead_vs_none": overhead}


def print_table(result: dict) -> None:
    m = result["meta"]
    print()
    print(
        f"shape {m['shape']}{' (small)' if m['small'] else ''}  batch {m['batch_size']}  device {m['env']['device']}  "
        f"torch {m['env']['torch']}  loop {m['loop']}  source {m['source']}"
    )
    print(
        f"work per step {result['flops_per_step'] / 1e12:.3f} TFLOP "
        f"({result['flops_per_step'] / m['batch_size'] / 1e9:.2f} GFLOP per sample, fwd+bwd)"
    )
    head = (
        f"{'impl':<9} {'variant':<22} {'method':<7} {'samples/s':>10} {'step ms':>9} {'TFLOP/s':>8} {'vs none':>8} "
        f"{'ours/off':>8} {'ops/step':>8} {'host rd':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        vs_none = (
            f"{100 * r['vs_own_none']:+.1f}%" if r.get("vs_own_none") is not None and r["method"] != "none" else ""
        )
        vs_off = f"x{r['vs_official']:.2f}" if r.get("vs_official") is not None else ""
        variant = r["variant"] + (" (p2)" if r["phase"] == 2 else "")
        print(
            f"{r['impl']:<9} {variant:<22} {r['method']:<7} {r['samples_per_s']:>10.1f} {r['step_ms']:>9.2f} "
            f"{r['tflops']:>8.3g} {vs_none:>8} {vs_off:>8} {r.get('ops_per_step', ''):>8} "
            f"{r.get('host_reads_per_step', ''):>7}"
        )
    if result.get("host_syncs_per_step"):
        print("host syncs per step (cuda sync debug mode):", result["host_syncs_per_step"])
    print(f"rounds: {m['rounds']} x {m['iters']} steps after {m['warmup']} warm-up steps; median round shown")
    for label, why in result.get("failed", {}).items():
        print(f"not measured: {label}: {why[:300]}")


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="cremad", choices=sorted(SHAPES))
    p.add_argument(
        "--small",
        action="store_true",
        help=f"reduced sizes for CPU runs: audio {SMALL_AUDIO}, frames {SMALL_SIDE}x{SMALL_SIDE}",
    )
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--iters", type=int, default=20, help="timed steps per configuration per round")
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed steps per configuration first (cudnn.benchmark, compile)"
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the median is reported")
    p.add_argument("--pool", type=int, default=4, help="distinct batches cycled through")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="ours: auto = bf16 autocast on CUDA, fp32 elsewhere",
    )
    p.add_argument("--compile", action="store_true", help="ours: torch.compile the encoders (default variant)")
    p.add_argument(
        "--audio_stem",
        default="plain",
        choices=("plain", "pad4", "pad8", "fp32"),
        help="ours: audio stem conv variant (default variant)",
    )
    p.add_argument(
        "--variants",
        default="",
        help="extra variants of ours, e.g. 'fp32,bf16+apad8,bf16+compile,bf16+graph@all' "
        "(@all or @none/OGM_GE: methods for that variant; else --variant_methods)",
    )
    p.add_argument(
        "--variant_methods", default="none", help="methods measured for the extra variants ('all' = --methods)"
    )
    p.add_argument("--methods", default=",".join(OURS_METHODS))
    p.add_argument("--no_official", action="store_true", help="skip the official-style rows")
    p.add_argument(
        "--loop", default="engine", choices=("engine", "step"), help="ours: engine.train_one_epoch or the bare step"
    )
    p.add_argument(
        "--source",
        default="device",
        choices=("device", "host"),
        help="batches already on the device, or copied from host memory each step",
    )
    p.add_argument("--alpha", type=float, default=modulation_defaults()["alpha"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile the `none` rows (and official OGM_GE): kernel time vs wall, top kernels",
    )
    p.add_argument("--profile_steps", type=int, default=5)
    p.add_argument("--no_sync_check", action="store_true", help="skip counting host syncs per step (CUDA only)")
    p.add_argument("--no_count_ops", action="store_true", help="skip counting operators and host reads per step")
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 is steadiest on a shared CPU"
    )
    p.add_argument("--out", default=None, help="write the results as JSON here (profile tables beside it)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # both implementations
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in OURS_METHODS:
            raise SystemExit(f"--methods: unknown {m!r}; choose from {', '.join(OURS_METHODS)}")
    variant_methods = (
        methods if args.variant_methods == "all" else [m.strip() for m in args.variant_methods.split(",") if m.strip()]
    )

    default = Variant(
        precision=args.precision,
        stem={"plain": "", "pad4": "apad4", "pad8": "apad8", "fp32": "astem32"}[args.audio_stem],
        compile="default" if args.compile else "",
    )
    variants, own_methods = [default], {default.name: methods}
    for text in filter(None, (t.strip() for t in args.variants.split(","))):
        spec, _, which = text.partition("@")  # "bf16+graph@none/OGM_GE": this variant's own methods
        v = parse_variant(spec)
        if v.name in own_methods:
            continue
        chosen = variant_methods if not which else methods if which == "all" else which.split("/")
        bad = [m for m in chosen if m not in OURS_METHODS]
        if bad:
            raise SystemExit(f"--variants {text!r}: unknown methods {bad}")
        variants.append(v)
        own_methods[v.name] = chosen

    if device.type != "cuda" and any(v.graph for v in variants):
        raise SystemExit("--variants: CUDA graph variants need --device cuda")
    info = synthetic_info(args.shape, args.small)
    torch.manual_seed(args.seed)
    base = build_model(info, "concat")
    pairs = make_batches(info, args.batch_size, args.pool, args.seed, device, args.source)

    result: dict[str, Any] = {
        "meta": {
            "shape": args.shape,
            "small": args.small,
            "batch_size": args.batch_size,
            "iters": args.iters,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "loop": args.loop,
            "source": args.source,
            "alpha": args.alpha,
            "input_shapes": {m.name: list(m.shape) for m in info.modalities},
            "num_classes": info.num_classes,
            "variants": [asdict(v) | {"name": v.name} for v in variants],
            "env": environment(device),
        },
    }
    print(f"counting FLOPs ({args.shape}, batch {args.batch_size}) ...", flush=True)
    result["flops_per_step"] = count_flops(base, info, device, pairs[0])
    result["flops_per_sample"] = result["flops_per_step"] / args.batch_size

    configs: list[Config] = []
    failed: dict[str, str] = {}
    result["failed"] = failed

    def add(label: str, make: Callable[[], Config]) -> None:
        try:
            configs.append(make())
        except SystemExit:
            raise
        except Exception as e:  # reported, and the other rows go on
            failed[label] = f"{type(e).__name__}: {e}"[:2000]
            print(f"  setup {label}: FAILED {failed[label][:300]}", flush=True)

    if not args.no_official:
        for m in off.OFFICIAL_METHODS:
            if m in methods:
                add(f"official/{m}", lambda m=m: make_official_config(base, device, m, args.alpha, args.source))
    for v in variants:
        for m in own_methods[v.name]:
            add(
                f"ours/{v.name}/{m}", lambda v=v, m=m: make_ours_config(base, info, device, v, m, args.alpha, args.loop)
            )

    out_path = Path(args.out) if args.out else None

    def write(_round=None):
        result.update(
            summarize(configs, result["flops_per_step"], args.batch_size, default, result.get("ops_per_step"))
        )
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=2))

    phase1 = [c for c in configs if c.phase == 1]
    phase2 = [c for c in configs if c.phase == 2]
    print(f"phase 1: {len(phase1)} configurations", flush=True)
    phase1 = warm(phase1, pairs, args.warmup, device, failed)
    if not args.no_count_ops:
        ops: dict[str, Any] = {}
        for c in phase1:
            try:
                ops[c.label] = count_ops(c, pairs[0])
            except Exception as e:
                ops[c.label] = f"{type(e).__name__}: {e}"[:300]
        result["ops_per_step"] = ops
    if not args.no_sync_check and device.type == "cuda":
        syncs: dict[str, Any] = {}
        for c in phase1:
            try:
                syncs[c.label] = count_host_syncs(c, pairs[0], device)
            except Exception as e:
                syncs[c.label] = f"{type(e).__name__}: {e}"[:300]
        result["host_syncs_per_step"] = syncs
    measure(phase1, pairs, args.iters, args.rounds, args.batch_size, device, write, failed)
    write()
    print_table(result)

    if phase2:
        again = []
        if default.phase == 1 and "none" in methods:  # the default `none` row again, beside these
            ref2 = make_ours_config(base, info, device, default, "none", args.alpha, args.loop)
            ref2.phase = 2
            configs.append(ref2)
            again.append(ref2)
        print(f"phase 2: {len(phase2)} compiled / graphed configurations", flush=True)
        phase2 = warm(again + phase2, pairs, args.warmup, device, failed)
        measure(phase2, pairs, args.iters, args.rounds, args.batch_size, device, write, failed)
        write()
        print_table(result)

    if args.profile:
        texts = []
        result["profile"] = {}
        chosen = [
            c
            for c in configs
            if c.rounds
            and ((c.impl == "ours" and c.method == "none") or (c.impl == "official" and c.method in ("none", "OGM_GE")))
        ]
        for c in chosen:
            try:
                summary, text = profile_config(c, pairs, device, args.profile_steps)
            except Exception as e:
                failed[f"profile {c.label}"] = f"{type(e).__name__}: {e}"[:2000]
                continue
            result["profile"][c.label + (" (p2)" if c.phase == 2 else "")] = summary
            texts.append(text)
            print(texts[-1].split("\n", 1)[0], flush=True)
        write()
        if out_path:
            out_path.with_suffix(".profile.txt").write_text("\n\n".join(texts) + "\n")
    return result


if __name__ == "__main__":
    main()
