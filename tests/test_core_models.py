"""Every fusion head with every modulation: shapes, finite values, which parameters learn.

The training test checks the wiring of heads and methods, so it runs on tiny encoders
(conftest's `tiny_encoders`); the others build the real ResNet18s."""

import pytest
import torch

from onthefly.engine import compute_loss
from onthefly.models import FUSIONS, build_model
from onthefly.modulation import METHODS, ModulationConfig, Modulator

NUM_CLASSES = 5


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_forward_output_shapes(tiny_info, tiny_batch, fusion):
    torch.manual_seed(0)
    model = build_model(tiny_info(NUM_CLASSES), fusion)
    inputs, _ = tiny_batch(batch=3, num_classes=NUM_CLASSES)
    out = model(inputs)
    assert out["logits"].shape == (3, NUM_CLASSES)
    assert [h.shape for h in out["features"]] == [(3, 512), (3, 512)]
    assert [z.shape for z in out["unimodal_logits"]] == [(3, NUM_CLASSES)] * 2
    assert out["sample_weight"] is None
    assert all(torch.isfinite(t).all() for t in (out["logits"], *out["features"], *out["unimodal_logits"]))


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_unimodal_logits_send_no_gradient_to_encoders_or_head(tiny_info, tiny_batch, fusion):
    torch.manual_seed(0)
    model = build_model(tiny_info(NUM_CLASSES), fusion)
    inputs, labels = tiny_batch(batch=3, num_classes=NUM_CLASSES)
    out = model(inputs)
    z_a, z_v = out["unimodal_logits"]
    if not model.head.has_auxiliary_classifiers:
        assert not z_a.requires_grad and not z_v.requires_grad
        return
    # FiLM / gated: only the auxiliary classifiers learn from z_m
    (torch.nn.functional.cross_entropy(z_a, labels) + torch.nn.functional.cross_entropy(z_v, labels)).backward()
    for name, p in model.named_parameters():
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert has_grad == name.startswith(("head.aux_a", "head.aux_b")), name


@pytest.mark.parametrize("modulation", list(METHODS))
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_every_fusion_trains_with_every_modulation(tiny_encoders, tiny_info, tiny_batch, fusion, modulation):
    torch.manual_seed(0)
    model = build_model(tiny_info(NUM_CLASSES), fusion)
    config = ModulationConfig(modulation=modulation, alpha=0.5, q_base=0.5, p_exe=1.0, const_dominant="audio")
    if METHODS[modulation].loss == "unimodal" and model.head.has_auxiliary_classifiers:
        with pytest.raises(ValueError, match="concat or sum"):  # z_m are not shares of the fused output
            Modulator.for_model(model, config)
        return
    modulator = Modulator.for_model(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    inputs, labels = tiny_batch(batch=6, num_classes=NUM_CLASSES)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    modulator.begin_epoch(model, [(inputs, labels)], lambda batch: batch, epoch=0)
    for _ in range(3):
        out = model(inputs, feature_hook=modulator.feature_hook(labels, epoch=0))
        loss = compute_loss(out, labels, model.head)
        loss = loss + modulator.auxiliary_loss(out, labels, 0, loss)
        optimizer.zero_grad()
        loss.backward()
        modulator.modulate_gradients(out, labels, epoch=0)
        optimizer.step()
        assert torch.isfinite(loss)
        assert out["logits"].shape == (6, NUM_CLASSES)
    stats = modulator.stats
    assert torch.isfinite(stats["ratio"]).all() and stats["ratio"].shape == (2,)
    if modulation in ("OGM", "OGM_GE", "OGM_OPM"):
        assert ((stats["coeff"] > 0) & (stats["coeff"] <= 1)).all()
    if modulation == "OGM_CONST":
        assert stats["coeff"].tolist() == [0.5, 1.0]  # audio named: always k, whatever the ratio
    if modulation == "DROPOUT_UNIFORM":
        assert stats["drop_prob"].tolist() == pytest.approx([0.3, 0.3])
    if modulation == "PMR":
        assert stats["pmr_weight"].tolist() in ([0.0, 1.0], [1.0, 0.0], [0.0, 0.0])
    if modulation in ("OPM", "OGM_OPM"):
        assert ((stats["drop_prob"] >= 0) & (stats["drop_prob"] <= 1)).all()
        assert (stats["drop_prob"] == 0).any()  # only the dominant modality is ever dropped
    # every parameter of both encoders and of the head moved
    for name, p in model.named_parameters():
        if name.startswith(("encoders.", "head.")):
            assert not torch.equal(p.detach(), start[name]), f"{name} did not change"


@pytest.mark.parametrize("modality", ["audio", "visual"])
def test_unimodal_reference_model(tiny_info, tiny_batch, modality):
    torch.manual_seed(0)
    model = build_model(tiny_info(NUM_CLASSES), "concat", modality=modality)
    inputs, labels = tiny_batch(batch=3, num_classes=NUM_CLASSES)
    out = model(inputs)
    assert out["logits"].shape == (3, NUM_CLASSES) and len(out["unimodal_logits"]) == 1
    compute_loss(out, labels, model.head).backward()
    assert list(model.encoders) == [modality]
    assert all(p.grad is not None for p in model.parameters())


def test_narrow_encoder_keeps_resnet18_layout(tiny_info, tiny_batch):
    from torchvision.models import resnet18

    from onthefly.models.encoders import _narrow_resnet18, feature_dim

    # At ResNet18's own width the hand-built trunk has exactly torchvision's parameters (less its fc).
    reference = resnet18(weights=None)
    expected = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in _narrow_resnet18(3, 64).parameters()) == expected
    torch.manual_seed(0)
    model = build_model(tiny_info(NUM_CLASSES), "concat", width=16)
    inputs, _ = tiny_batch(batch=3, num_classes=NUM_CLASSES)
    out = model(inputs)
    assert feature_dim(16) == 128 and [h.shape for h in out["features"]] == [(3, 128), (3, 128)]
    assert out["logits"].shape == (3, NUM_CLASSES)
    # Convolution weights scale with width^2: a quarter width has about 1/16 of the parameters.
    full = sum(p.numel() for p in build_model(tiny_info(NUM_CLASSES), "concat").encoders.parameters())
    narrow = sum(p.numel() for p in model.encoders.parameters())
    assert 1 / 17 < narrow / full < 1 / 15


def test_a_sum_head_loads_two_modality_weights_saved_as_fc_a_and_fc_b():
    """Checkpoints from before the M-branch sum head keep loading (strictly) into the same weights."""
    from onthefly.models.fusion import SumFusion

    head = SumFusion(dim=4, num_classes=3)
    legacy = {
        f"fc_{m}.{p}": torch.randn_like(getattr(head.branches[i], p))
        for i, m in enumerate("ab")
        for p in ("weight", "bias")
    }
    head.load_state_dict(legacy, strict=True)
    for i, m in enumerate("ab"):
        assert torch.equal(head.branches[i].weight, legacy[f"fc_{m}.weight"])
        assert torch.equal(head.branches[i].bias, legacy[f"fc_{m}.bias"])
