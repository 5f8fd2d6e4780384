"""The fast training step computes what the official-style step computes (CPU, float32).

bench/official_style.py is the reference step (per-sample score loop, host branch, per-
parameter loop); bench/bench_step.py drives our step (Modulator, compute_loss, model).
"""

import copy
import json

import bench_step as bs  # bench/ is on pytest's pythonpath (pyproject.toml)
import official_style as off
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from onthefly.data.spec import DatasetInfo, ModalitySpec
from onthefly.models import build_model
from onthefly.modulation import discrepancy_ratios, ogm_coefficients, unimodal_scores

ALPHA = 0.8


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and far steadier on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_info(frames: int = 1, classes: int = 4) -> DatasetInfo:
    return DatasetInfo(
        name="tiny",
        num_classes=classes,
        class_names=tuple(str(i) for i in range(classes)),
        modalities=(
            ModalitySpec("audio", "spectrogram", 1, (1, 16, 12)),
            ModalitySpec("visual", "frames", 3, (3, frames, 16, 16), bs.IMAGENET_MEAN, bs.IMAGENET_STD),
        ),
    )


def official_and_ours(method: str, seed: int = 0, frames: int = 1):
    """Identical weights and batch; both steps run up to (not including) the modulation."""
    info = tiny_info(frames)
    torch.manual_seed(seed)
    base = build_model(info, "concat")
    ((ours_batch, official_batch),) = bs.make_batches(info, 4, 1, seed, torch.device("cpu"))

    net = off.wrap_official(copy.deepcopy(base), torch.device("cpu"))
    net.train()
    out_a, out_b, *_ = off.official_forward_backward(net, *official_batch)

    model, optimizer, modulator, preset = bs.build_ours(
        base, info, torch.device("cpu"), bs.Variant("fp32"), method, ALPHA
    )
    model.train()
    out, labels, _ = bs.ours_forward_backward(model, modulator, optimizer, preset, ours_batch, None)
    return net, (out_a, out_b, official_batch[2]), model, modulator, (out, labels)


def grads(module: torch.nn.Module) -> dict:
    names = {n.removeprefix("module."): p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return names


def test_coefficients_match_the_official_branch_for_either_dominant_modality():
    g = torch.Generator().manual_seed(0)
    hits = set()
    for _trial in range(40):
        b, k = 16, 6
        label = torch.randint(0, k, (b,), generator=g)
        out_a = torch.randn(b, k, generator=g) * (0.2 + 3 * torch.rand((), generator=g))
        out_b = torch.randn(b, k, generator=g) * (0.2 + 3 * torch.rand((), generator=g))
        out_a[torch.arange(b), label] += 2 * torch.rand((), generator=g)
        alpha = float(0.05 + torch.rand((), generator=g))
        coeff_a, coeff_b = off.official_coefficients(out_a, out_b, label, alpha)
        ratios = discrepancy_ratios(unimodal_scores((out_a, out_b), label))
        ours = ogm_coefficients(ratios, alpha, "official")
        expected = torch.tensor([float(coeff_a), float(coeff_b)])
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
        hits.add(int(ours.argmin()))
    assert hits == {0, 1}  # both branches of the official `if ratio > 1:` were exercised


def test_step_gradients_before_modulation_are_identical():
    net, _, model, _, _ = official_and_ours("none")
    theirs, ours = grads(net), grads(model)
    assert theirs.keys() == ours.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("frames", [1, 3])
def test_ogm_gradients_match_the_official_step(frames):
    net, (out_a, out_b, label), model, modulator, (out, labels) = official_and_ours("OGM", seed=1, frames=frames)
    coeff_a, coeff_b = off.official_coefficients(out_a, out_b, label, ALPHA)
    off.official_modulate(net, coeff_a, coeff_b, "OGM")
    modulator.modulate_gradients(out, labels, epoch=0)
    expected = torch.tensor([float(torch.as_tensor(c).detach()) for c in (coeff_a, coeff_b)])
    torch.testing.assert_close(modulator.stats["coeff"], expected, rtol=1e-6, atol=1e-6)
    assert float(modulator.stats["coeff"].min()) < 1  # one modality was actually scaled
    theirs, ours = grads(net), grads(model)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-9, msg=name)


def test_ogm_ge_gradients_match_the_official_step_with_the_same_random_draws():
    net, (out_a, out_b, label), model, modulator, (out, labels) = official_and_ours("OGM_GE", seed=2)
    raw = grads(model)
    coeff_a, coeff_b = off.official_coefficients(out_a, out_b, label, ALPHA)
    # Both draw one standard normal tensor per conv gradient, audio encoder first, in
    # parameter order, so with the same seed the noise is the same up to rounding.
    torch.manual_seed(123)
    off.official_modulate(net, coeff_a, coeff_b, "OGM_GE")
    torch.manual_seed(123)
    modulator.modulate_gradients(out, labels, epoch=0)
    k = dict(zip(model.modality_names, modulator.stats["coeff"].tolist()))
    theirs, ours = grads(net), grads(model)
    noisy = 0
    for name, g in ours.items():
        scale = raw[name].abs().max().item() + 1e-12
        torch.testing.assert_close(g, theirs[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
        modality = name.split(".")[1]
        if raw[name].ndim == 4:
            noisy += 1
            noise = g.double() - k[modality] * raw[name].double()
            assert noise.abs().max() > 0, name
            if raw[name].numel() >= 100_000:  # enough draws for the std to be close
                assert noise.std().item() == pytest.approx(raw[name].double().std().item() + 1e-8, rel=0.02), name
        else:  # BN and head parameters are left alone
            torch.testing.assert_close(g, raw[name], rtol=0, atol=0, msg=name)
    assert noisy == 2 * 20  # ResNet18: 20 conv weights per encoder


@pytest.mark.parametrize("stem", ["apad4", "pad8", "astem32", "stem32"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_stem_variants_keep_the_function_and_the_gradient(stem, channels_last):
    info = tiny_info()
    torch.manual_seed(0)
    model = build_model(info, "concat")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    names = [n for n, _ in model.named_parameters()]
    stems = {m: model.encoders[m].net.conv1 for m in model.modality_names}
    bs.apply_stem(model, stem, channels_last)
    assert [n for n, _ in model.named_parameters()] == names  # the same parameters, same names
    replaced = {m for m in model.modality_names if model.encoders[m].net.conv1 is not stems[m]}
    assert replaced == ({"audio"} if stem.startswith("a") else {"audio", "visual"})
    for m in replaced:
        conv, new = stems[m], model.encoders[m].net.conv1
        assert new.weight is conv.weight
        x = torch.randn(4, conv.in_channels, 20, 18)
        w64 = conv.weight.detach().double().requires_grad_()
        ref = torch.nn.functional.conv2d(x.double(), w64, None, conv.stride, conv.padding)
        grad_out = torch.randn_like(ref)
        ref.backward(grad_out)
        conv.weight.grad = None
        y = new(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        y.backward(grad_out.float())
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        torch.testing.assert_close(
            conv.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5 * w64.grad.abs().max().item()
        )
    ((batch, _),) = bs.make_batches(info, 4, 1, 0, torch.device("cpu"))
    inputs, labels = bs.DevicePreset(info, torch.device("cpu"))(batch)
    bs.compute_loss(model(inputs), labels, model.head).backward()  # the whole model still trains


def test_bench_runs_every_row_and_writes_json(tiny_encoders, tmp_path, monkeypatch):
    # Every row, variant and output of the script, on tiny encoders: what is timed does not matter here.
    monkeypatch.setattr(bs, "SMALL_AUDIO", (1, 16, 12))
    monkeypatch.setattr(bs, "SMALL_SIDE", 16)
    out = tmp_path / "r.json"
    result = bs.main(
        [
            "--device",
            "cpu",
            "--small",
            "--shape",
            "kinetics_sounds",
            "--batch_size",
            "2",
            "--iters",
            "1",
            "--warmup",
            "1",
            "--rounds",
            "2",
            "--pool",
            "2",
            "--variants",
            "fp32+apad8,fp32+stem32",
            "--profile",
            "--profile_steps",
            "1",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["failed"] == {}
    rows = {(r["impl"], r["variant"], r["method"]) for r in saved["rows"]}
    for m in ("none", "OGM", "OGM_GE"):
        assert ("official", "fp32+nchw", m) in rows
    for m in ("none", "OGM", "OGM_GE", "OPM"):
        assert ("ours", "auto", m) in rows
    assert ("ours", "fp32+apad8", "none") in rows and ("ours", "fp32+stem32", "none") in rows
    assert set(saved["ours_over_official"]) == {"none", "OGM", "OGM_GE"}
    assert set(saved["modulation_overhead_vs_none"]) == {"OGM", "OGM_GE", "OPM"}
    assert saved["flops_per_step"] > 0 and all(r["tflops"] > 0 and len(r["rounds"]) == 2 for r in saved["rows"])
    assert saved["meta"]["input_shapes"] == {"audio": [1, 16, 12], "visual": [3, 3, 16, 16]}
    assert out.with_suffix(".profile.txt").read_text().startswith("== ")
    assert result["rows"] == saved["rows"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs are a CUDA matter")
@pytest.mark.parametrize("method", ["none", "OGM", "OGM_GE"])
def test_our_step_does_not_sync_with_the_host(method):
    info = tiny_info()
    device = torch.device("cuda")
    torch.manual_seed(0)
    base = build_model(info, "concat")
    pairs = bs.make_batches(info, 4, 1, 0, device)
    variant = bs.Variant()
    model, optimizer, modulator, preset = bs.build_ours(base, info, device, variant, method, ALPHA)
    bs.ours_step(model, modulator, optimizer, preset, pairs[0][0], variant.amp_dtype(device))  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bs.ours_step(model, modulator, optimizer, preset, pairs[0][0], variant.amp_dtype(device))
    finally:
        torch.cuda.set_sync_debug_mode("default")


class HostReads(TorchDispatchMode):
    """Counts the operations that copy a tensor's value to the host (.item(), bool(), int(), float(),
    .tolist()): on a GPU each is a sync, and on a CPU the same call shows where one would be."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_host_read_detector_sees_item_and_bool():
    x = torch.ones(2)
    with HostReads() as reads:
        x.sum().item()
        bool(x.sum() > 1)
    assert len(reads.seen) >= 2


def modality_info(m: int) -> DatasetInfo:
    extra = (ModalitySpec("flow", "frames", 2, (2, 1, 16, 16), (0.5, 0.5), (0.25, 0.25)),)
    return DatasetInfo(
        name=f"tiny{m}", num_classes=4, class_names=tuple("abcd"), modalities=(*tiny_info().modalities, *extra[: m - 2])
    )


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize(
    "method",
    ["none", "OGM", "OGM_GE", "OPM", "OGM_GE_OPM", "OGM_CONST", "DROPOUT_UNIFORM", "UNIMODAL_AUX", "MMPARETO", "PMR"],
)
def test_our_step_reads_nothing_on_the_host_for_any_number_of_modalities(tiny_encoders, method, m):
    """The engine's step (forward with the OPM hook, loss, backward, modulation, finiteness flag,
    SGD step) on a CPU: no host read after the first step (whose labels are checked once)."""
    from onthefly.engine import _all_finite, compute_loss
    from onthefly.modulation import ModulationConfig, Modulator

    info = modality_info(m)
    torch.manual_seed(0)
    model = build_model(info, "concat")
    modulator = Modulator.for_model(
        model, ModulationConfig(modulation=method, alpha=ALPHA, p_exe=1.0, const_dominant="audio")
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    inputs = {s.name: torch.randn(4, *s.shape) for s in info.modalities}
    labels = torch.tensor([0, 1, 2, 3])
    modulator.begin_epoch(model, [(inputs, labels)], lambda batch: batch, 0)  # PMR's prototypes: once an epoch

    def step():
        out = model(inputs, feature_hook=modulator.feature_hook(labels, 0))
        loss = compute_loss(out, labels, model.head)
        loss = loss + modulator.auxiliary_loss(out, labels, 0, loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        modulator.modulate_gradients(out, labels, 0)
        finite = loss.detach().isfinite() & _all_finite([p.grad for p in model.parameters() if p.grad is not None])
        optimizer.step()
        return finite

    step()  # the first step checks the labels' range once
    with HostReads() as reads:
        step()
    assert reads.seen == []
    assert len(modulator.stats["ratio"]) == m
