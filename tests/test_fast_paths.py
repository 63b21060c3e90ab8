"""Speed paths against the slow paths they replace: same numbers, same hooks, same errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from gencnp import GenCNP
from gencnp.pathways import baselines as B
from gencnp.pathways.generator import _ReluMeanMax
from gencnp.pathways.metrics import _jaccard, class_iou
from gencnp.targets.loading import FrozenTarget, create_target
from gencnp.targets.taps import apply_mask

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(seed: int = 0) -> FrozenTarget:
    torch.manual_seed(seed)
    model = create_target("tiny_cnn", num_classes=4)
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return FrozenTarget(model, input_shape=(1, 16, 16), arch="tiny_cnn")


def slow(target: FrozenTarget):
    """The same target with first-tap reuse switched off (``first_tap`` is then ignored)."""
    target.hooks.can_skip_first = False
    return target


# ----- masking -----
def test_fused_mean_fill_equals_the_two_step_formula_for_binary_masks():
    out = torch.randn(4, 6, 5, 5)
    m = (torch.rand(4, 6) > 0.4).float()
    fill = torch.randn(6)
    ref = out * m[:, :, None, None] + fill[None, :, None, None] * (1 - m[:, :, None, None])
    assert torch.equal(apply_mask(out, m, fill), ref)
    tokens = torch.randn(4, 7, 6)
    ref = tokens * m[:, None, :] + fill[None, None, :] * (1 - m[:, None, :])
    assert torch.equal(apply_mask(tokens, m, fill), ref)


# ----- first-tap reuse -----
@pytest.mark.parametrize("with_fill", [False, True])
def test_first_tap_reuse_equals_the_full_masked_pass(with_fill):
    target = tiny()
    x = torch.randn(6, 1, 16, 16)
    fill = [torch.randn(c) for c in target.tap_channels] if with_fill else None
    with torch.no_grad():
        logits, feats = target(x, record=True)
    masks = [(torch.rand(6, c) > 0.3).float().requires_grad_() for c in target.tap_channels]
    fast, fast_feats = target(x, masks=masks, fill=fill, record=True, first_tap=feats[0])
    fast_grads = torch.autograd.grad(fast.logsumexp(1).sum(), masks)
    ref, ref_feats = slow(target)(x, masks=masks, fill=fill, record=True, first_tap=feats[0])
    ref_grads = torch.autograd.grad(ref.logsumexp(1).sum(), masks)
    assert torch.equal(fast, ref)
    assert all(torch.equal(a, b) for a, b in zip(fast_feats, ref_feats))
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, ref_grads))
    assert torch.equal(feats[0], target(x, record=True)[1][0])  # the given output is not modified in place


def test_first_tap_module_is_skipped_and_restored_even_when_the_forward_raises():
    target = tiny()
    first = target.model.get_submodule(target.tap_names[0])
    calls = []
    conv = first[0]  # the block's convolution: it must not run in the masked pass
    handle = conv.register_forward_pre_hook(lambda m, a: calls.append(1))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        _, feats = target(x, record=True)
        target(x, masks=[torch.ones(2, c) for c in target.tap_channels], first_tap=feats[0])
    handle.remove()
    assert len(calls) == 1  # the recorded pass only
    bad_masks = [torch.ones(2, c + 1) for c in target.tap_channels]
    with pytest.raises(RuntimeError):
        target(x, masks=bad_masks, first_tap=feats[0])
    assert "forward" not in vars(first)  # the class's forward is back
    with pytest.raises(ValueError, match="first_tap must be the first tap's output"):
        target(x, first_tap=feats[1])


def test_first_tap_is_not_skipped_when_it_contains_another_tap():
    torch.manual_seed(0)
    model = create_target("tiny_cnn", num_classes=4)
    target = FrozenTarget(model, taps=["blocks", "blocks.2"], input_shape=(1, 16, 16))
    assert not target.hooks.can_skip_first
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        _, feats = target(x, record=True)
        masks = [torch.ones(3, target.tap_channels[0]), torch.zeros(3, target.tap_channels[1])]
        assert torch.equal(target(x, masks=masks, first_tap=feats[0]), target(x, masks=masks))


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_gencnp_step_and_explain_equal_the_paths_without_reuse(ablation):
    x, y = torch.randn(12, 1, 16, 16), torch.randint(0, 4, (12,))
    results = []
    for reuse in (True, False):
        torch.manual_seed(0)
        model = GenCNP(
            target="tiny_cnn",
            target_checkpoint=None,
            num_classes=4,
            image_size=16,
            ablation=ablation,
            generator={"d": 8, "class_prior": 0.0},
            losses={"lambda_zero": 1.0, "lambda_null": 0.0},
            sparsity={"dependence_gate": 0.5},
            controls={"swap_probes_per_class": 1},
        )
        if ablation == "mean":
            model.compute_fill([(torch.randn(16, 1, 16, 16), None)])
        model.target.hooks.can_skip_first = reuse
        loss = model.training_step((x, y), 0)
        loss.backward()
        grads = [p.grad.clone() for p in model.generator.parameters()]
        results.append((loss.detach(), grads, model.explain(x)["masked_logits"]))
    (loss_a, grads_a, ex_a), (loss_b, grads_b, ex_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(ex_a, ex_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


@pytest.mark.parametrize("name", ["neuron_mct", "neuron_intgrad", "dgr"])
def test_baselines_equal_their_paths_without_reuse(name):
    x = torch.randn(5, 1, 16, 16)
    fill = [torch.rand(c) for c in tiny().tap_channels]
    opts = {"steps": 6} if name != "neuron_mct" else {}
    fast = B.run_method(name, tiny(), x, None, fill=fill, **opts)["scores"]
    ref = B.run_method(name, slow(tiny()), x, None, fill=fill, **opts)["scores"]
    assert torch.equal(fast, ref)


def test_baselines_run_inside_inference_mode():
    target, x = tiny(), torch.randn(3, 1, 16, 16)
    ref = {n: B.run_method(n, target, x, None, steps=4)["scores"] for n in ("neuron_mct", "neuron_intgrad", "dgr")}
    with torch.inference_mode():
        for n, scores in ref.items():
            assert torch.equal(B.run_method(n, target, x, None, steps=4)["scores"], scores)


# ----- control_fraction (opt-in) -----
def test_control_fraction_runs_the_controls_on_the_first_part_of_the_batch():
    """Batch [a, a] with controls on its first half gives the loss of batch a with controls on every sample."""
    a = torch.randn(8, 1, 16, 16)

    def loss(x, fraction):
        torch.manual_seed(0)
        model = GenCNP(
            target="tiny_cnn",
            target_checkpoint=None,
            num_classes=4,
            image_size=16,
            ablation="zero",
            generator={"d": 8, "class_prior": 0.0},
            losses={"lambda_zero": 1.0, "lambda_null": 0.0},
            sparsity={"dependence_gate": 0.5},
            controls={"swap_probes_per_class": 1, "control_fraction": fraction},
        )
        return model.training_step((x, torch.zeros(len(x), dtype=torch.long)), 0)

    assert torch.allclose(loss(torch.cat([a, a]), 0.5), loss(a, 1.0), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="control_fraction must lie in"):
        GenCNP(
            target="tiny_cnn", target_checkpoint=None, num_classes=4, image_size=16, controls={"control_fraction": 0.0}
        )


# ----- generator pooling -----
def test_relu_mean_max_pooling_equals_autograd_of_the_plain_ops():
    torch.manual_seed(0)
    n = torch.randn(6, 8, 5, 5)
    n[0, 0] = -1.0  # a map the ReLU zeroes entirely: max 0, no gradient
    n[1, 1, 0] = 0.0
    g = torch.randn(6, 16)
    a, b = n.clone().requires_grad_(), n.clone().requires_grad_()
    h = torch.relu(a)
    ref = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
    ref.backward(g)
    out = _ReluMeanMax.apply(b)
    out.backward(g)
    assert torch.equal(out, ref) and torch.equal(a.grad, b.grad)
    assert torch.autograd.gradcheck(
        _ReluMeanMax.apply, (torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True),)
    )


# ----- acIOU -----
def slow_class_iou(p: torch.Tensor, c: torch.Tensor) -> tuple[float, float]:
    """Loops over pairs in float64: the definition of docs/design.md section 8."""

    def j(u, v):
        inter, union = float((u & v).sum()), float((u | v).sum())
        return inter / union if union else 0.0

    classes = sorted(set(c.tolist()))
    rows = {k: [p[i] for i in range(len(p)) if int(c[i]) == k] for k in classes}
    within = [
        sum(j(u, v) for s, u in enumerate(r) for t, v in enumerate(r) if s != t) / (len(r) * (len(r) - 1))
        for r in rows.values()
        if len(r) >= 2
    ]
    between = [
        sum(j(u, v) for u in rows[k] for v in rows[q]) / (len(rows[k]) * len(rows[q]))
        for k, q in itertools.combinations(classes, 2)
    ]
    return sum(within) / len(within), sum(between) / len(between)


def test_class_iou_equals_the_pair_loop_and_ignores_sample_order(monkeypatch):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(60, 12, generator=g) < 0.4
    p[:4] = False  # empty pathways: two empty ones count 0
    c = torch.randint(0, 4, (60,), generator=g)
    c[-1] = 3 if int((c == 3).sum()) > 1 else c[-1]
    ac, bc = class_iou(p, c)
    ref_ac, ref_bc = slow_class_iou(p, c)
    assert ac == pytest.approx(ref_ac, rel=1e-6) and bc == pytest.approx(ref_bc, rel=1e-6)
    perm = torch.randperm(60, generator=g)
    assert class_iou(p[perm], c[perm]) == (ac, bc)
    # Chunked rows (bounded memory for large classes) give the same numbers.
    import gencnp.pathways.metrics as M

    monkeypatch.setattr(M, "_jaccard_sum", lambda a, b, block=7, f=M._jaccard_sum: f(a, b, block))
    assert class_iou(p, c) == pytest.approx((ac, bc), rel=1e-12)
    assert float(_jaccard(p[:3].double(), p[:3].double()).diagonal()[0]) == 0.0  # p[0] is empty


# ----- channels_last (opt-in) -----
def test_channels_last_target_and_training_step_agree_with_the_default_layout():
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 4, (8,))
    out = []
    for cl in (False, True):
        torch.manual_seed(0)
        model = GenCNP(
            target="tiny_cnn",
            target_checkpoint=None,
            num_classes=4,
            image_size=16,
            channels_last=cl,
            ablation="zero",
            generator={"d": 8, "class_prior": 0.0},
            losses={"lambda_zero": 1.0, "lambda_null": 0.0},
            controls={"swap_probes_per_class": 1},
        )
        loss = model.training_step((x, y), 0)
        loss.backward()
        out.append((loss.detach(), model.generator.rpd.heads[0].bias.grad.clone(), model.explain(x)))
    assert torch.allclose(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(out[0][1], out[1][1], rtol=1e-4, atol=1e-6)
    assert torch.allclose(out[0][2]["masked_logits"], out[1][2]["masked_logits"], rtol=1e-5, atol=1e-5)
