"""Metrics by hand, baselines with known answers, batching invariance, and attributions against slow references."""

from __future__ import annotations

import math

import pytest
import torch

from gencnp.pathways import baselines as B
from gencnp.pathways.gradients import grad_cam, pathway_gradient
from gencnp.pathways.metrics import class_iou, per_sample, summarize
from gencnp.targets.loading import FrozenTarget, channel_toy_batch, create_target
from gencnp.targets.taps import MaskedForward

K = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def toy() -> FrozenTarget:
    return FrozenTarget(
        create_target("channel_toy", num_classes=K, in_chans=K), input_shape=(K, 8, 8), arch="channel_toy"
    )


def tiny(in_chans: int = 1, seed: int = 0, dtype=torch.float32) -> FrozenTarget:
    torch.manual_seed(seed)
    model = create_target("tiny_cnn", num_classes=4, in_chans=in_chans)
    for m in model.modules():  # non-trivial BatchNorm statistics, so eval-mode BN matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return FrozenTarget(model, input_shape=(in_chans, 16, 16), arch="tiny_cnn").to(dtype)


def raw_copy(t: FrozenTarget, in_chans: int = 1) -> torch.nn.Module:
    """The same weights in a plain module without FrozenTarget's hooks: an independent reference path."""
    model = create_target("tiny_cnn", num_classes=4, in_chans=in_chans)
    model.load_state_dict(t.model.state_dict())
    return model.to(next(t.model.parameters()).dtype).eval()


def route(t: FrozenTarget, flat: torch.Tensor) -> torch.Tensor:
    return B.split_pathway(flat, t.tap_channels)[t.tap_names.index("route")]


# ----- metrics against hand-computed values -----
def test_class_iou_by_hand():
    p = torch.tensor(
        [
            [1, 1, 0, 0],
            [1, 0, 0, 0],  # class 0: J = 1/2
            [0, 0, 1, 1],
            [0, 0, 1, 1],
            [0, 0, 0, 1],  # class 1: J = 1, 1/2, 1/2 -> 2/3
            [1, 0, 1, 0],
        ]
    ).bool()  # class 2: one sample, skipped within, used between
    c = torch.tensor([0, 0, 1, 1, 1, 2])
    ac, bc = class_iou(p, c)
    assert ac == pytest.approx((0.5 + 2 / 3) / 2)
    # between: (0,1) all disjoint = 0; (0,2): J([1100],[1010]) = 1/3, J([1000],[1010]) = 1/2 -> 5/12;
    # (1,2): J([0011],[1010]) = 1/3 twice, J([0001],[1010]) = 0 -> 2/9. Each class pair weighted equally.
    assert bc == pytest.approx((0 + 5 / 12 + 2 / 9) / 3)
    empty = torch.zeros(2, 4, dtype=torch.bool)  # two empty pathways count 0, not 1
    assert class_iou(empty, torch.tensor([0, 0]))[0] == 0.0


def test_faithfulness_and_forcing_metrics_by_hand():
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, ln3], [0.0, ln3], [ln3, 0.0]])  # p_yhat = 0.75 for every sample
    masked = torch.tensor([[0.0, 0.0], [0.0, 2 * ln3], [0.0, ln3]])  # O = 0.5, 0.9, 0.25
    y_hat = torch.tensor([1, 1, 0])
    labels = torch.tensor([1, 0, 0])
    pathways = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # forced, not forced, (invalid)
    zero = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # forced, forced, not forced
    nec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # complement keeps y_hat only for sample 2
    valid = torch.tensor([True, True, False])
    v = per_sample(logits, masked, y_hat, pathways, labels, swap, zero, nec, valid)
    assert v["dc"].tolist() == pytest.approx([100 * (0.75 - 0.5) / 0.75, 0.0, 100 * (0.75 - 0.25) / 0.75])
    assert v["ic"].tolist() == [0.0, 100.0, 0.0]
    s = summarize(v, pathways, y_hat, ["a", "b"], [2, 2])
    assert s["agreement"] == pytest.approx(1 / 3)  # argmax of masked: 0 (tie -> 0), 1, 1
    assert s["masked_accuracy"] == pytest.approx(0.0)
    assert s["target_accuracy"] == pytest.approx(2 / 3)
    assert s["mDC"] == pytest.approx((100 / 3 + 0 + 200 / 3) / 3)
    assert s["mIC"] == pytest.approx(100 / 3)
    assert s["swap_forcing"] == pytest.approx(0.5)  # invalid pair excluded
    assert s["zero_forcing"] == pytest.approx(2 / 3)
    assert s["necessity"] == pytest.approx(1 / 3)
    assert s["kept_mean"] == pytest.approx((0.25 + 0.5 + 1.0) / 3)
    assert s["kept/a"] == pytest.approx((0.5 + 1 + 1) / 3) and s["kept/b"] == pytest.approx((0 + 0 + 1) / 3)


# ----- selection helpers -----
def test_random_pathways_match_per_tap_counts_exactly_and_are_uniform():
    chans = [3, 5, 8]
    g = torch.Generator().manual_seed(0)
    counts = torch.stack([torch.randint(0, c + 1, (64,), generator=g) for c in chans], dim=1)
    p = B.random_pathways(counts, chans, generator=torch.Generator().manual_seed(1))
    assert p.dtype == torch.bool and p.shape == (64, 16)
    assert torch.equal(B.tap_counts(p, chans), counts)
    many = B.random_pathways(torch.tensor([[1, 2, 4]]).repeat(4000, 1), chans, torch.Generator().manual_seed(2))
    freq = many.double().mean(0)  # channel frequency = k / C per tap
    expect = torch.tensor([1 / 3] * 3 + [2 / 5] * 5 + [4 / 8] * 8, dtype=torch.float64)
    assert torch.allclose(freq, expect, atol=0.04), freq
    other = B.random_pathways(counts, chans, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(other, p)


def test_topk_per_tap_and_global_percentile_keep_the_highest_scores():
    chans = [2, 3]
    s = torch.tensor([[0.9, 0.1, 0.3, 0.8, 0.5], [0.2, 0.7, 0.6, 0.1, 0.4]])
    m = B.topk_per_tap(s, torch.tensor([[1, 2], [2, 0]]), chans)
    assert m.tolist() == [[True, False, False, True, True], [True, True, False, False, False]]
    gp = B.global_percentile(s, 0.4)  # round(0.4 * 5) = 2 per sample, one ranking over both taps
    assert gp.tolist() == [[True, False, False, True, False], [False, True, True, False, False]]
    assert B.global_percentile(s, 0.0).sum() == 0 and B.global_percentile(s, 1.0).all()
    with pytest.raises(ValueError, match=r"counts must be \[B, L\] with L = 2 taps"):
        B.topk_per_tap(s, torch.tensor([1, 2]), chans)
    with pytest.raises(ValueError, match=r"counts must lie in \[0, C_l\]"):
        B.topk_per_tap(s, torch.tensor([[3, 0], [0, 0]]), chans)
    with pytest.raises(ValueError, match=r"keep_fraction must lie in \[0, 1\]"):
        B.global_percentile(s, 1.5)


def test_unknown_method_lists_the_known_ones(toy):
    x, y = channel_toy_batch(2, K)
    with pytest.raises(KeyError, match="unknown pathway method 'neuron_mtc'; known methods: random, neuron_mct"):
        B.run_method("neuron_mtc", toy, x, y)
    assert set(B.METHODS) == {"random", "neuron_mct", "neuron_intgrad", "dgr"}


# ----- known answers on channel_toy (class k lives only in channel k of tap 'route') -----
@pytest.mark.parametrize("name", ["neuron_mct", "neuron_intgrad"])
def test_neuron_scores_rank_channel_k_of_route_first(toy, name):
    x, y = channel_toy_batch(32, K, seed=1)
    fn = B.neuron_mct_scores if name == "neuron_mct" else B.neuron_intgrad_scores
    s = route(toy, fn(toy, x, y))
    assert torch.equal(s.argmax(1), y)
    others = s.masked_fill(torch.nn.functional.one_hot(y, K).bool(), 0.0)
    assert float(others.abs().max()) == 0.0  # every other route channel is exactly zero
    # At tap 'post' (last), S_k = 4 mean(a_k) - 1 is linear in a_k: both scores equal S_k - S_k(a = 0) = S_k + 1.
    # (At 'route' IG's first path point sits on post's ReLU kink, whose gradient torch takes as 0.)
    post = B.split_pathway(fn(toy, x, y), toy.tap_channels)[toy.tap_names.index("post")]
    logits = toy(x)
    assert torch.allclose(post.gather(1, y[:, None])[:, 0], logits.gather(1, y[:, None])[:, 0] + 1, atol=1e-5)
    if name == "neuron_mct":
        assert torch.allclose(s.gather(1, y[:, None])[:, 0], logits.gather(1, y[:, None])[:, 0] + 1, atol=1e-5)


def test_neuron_mct_matches_a_per_sample_autograd_reference():
    t = tiny(seed=3, dtype=torch.float64)
    x = torch.randn(5, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 1])
    fast = B.neuron_mct_scores(t, x, y)
    ref_model = raw_copy(t)
    for i in range(5):
        feats: dict[str, torch.Tensor] = {}
        handles = [
            ref_model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n, f=feats: f.__setitem__(n, o))
            for n in t.tap_names
        ]
        xi = x[i : i + 1].clone().requires_grad_(True)  # features require grad through the input
        try:
            out = ref_model(xi)
        finally:
            for h in handles:
                h.remove()
        grads = torch.autograd.grad(out[0, y[i]], [feats[n] for n in t.tap_names])
        ref = torch.cat([(feats[n] * g).abs().sum(dim=(2, 3))[0] for n, g in zip(t.tap_names, grads)])
        assert torch.allclose(fast[i], ref, rtol=1e-10, atol=1e-12)


def test_dgr_keeps_channel_k_of_route(toy):
    x, y = channel_toy_batch(16, K, seed=2)
    out = B.dgr(toy, x, y)
    assert out["faithful"].all()
    assert torch.equal(route(toy, out["pathway"]), torch.nn.functional.one_hot(y, K).bool())
    masked = toy(x, masks=B.split_pathway(out["pathway"].float(), toy.tap_channels))
    assert torch.equal(masked.argmax(1), y)
    assert float(out["gates"].min()) >= 0.0 and float(out["gates"].max()) <= 5.0


def test_dgr_batched_equals_one_sample_at_a_time():
    t = tiny(seed=1, dtype=torch.float64)
    t.model.head.weight.data *= 20  # confident predictions: sparse iterates stay faithful
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    batched = B.dgr(t, x)  # the paper's settings: 30 steps, lr 0.1, momentum 0.9, l1 0.05
    singles = [B.dgr(t, x[i : i + 1]) for i in range(6)]
    gates = torch.cat([s["gates"] for s in singles])
    assert torch.allclose(batched["gates"], gates, rtol=0, atol=1e-9)
    assert torch.equal(batched["pathway"], torch.cat([s["pathway"] for s in singles]))
    assert torch.equal(batched["step"], torch.cat([s["step"] for s in singles]))
    assert 0 < float(batched["pathway"].double().mean()) < 1, batched["step"]  # the optimisation did remove channels


def test_dgr_falls_back_to_all_ones_when_no_iterate_is_faithful(toy):
    x, y = channel_toy_batch(4, K, seed=5)
    wrong = (y + 1) % K  # never the masked argmax: channel y+1 of route is zero for these inputs
    out = B.dgr(toy, x, wrong, steps=3)
    assert not out["faithful"].any()
    assert out["gates"].eq(1).all() and out["pathway"].all()


def test_run_method_gives_matched_and_native_pathways(toy):
    x, y = channel_toy_batch(8, K, seed=6)
    counts = torch.tensor([[1, 1, 1, 1]]).repeat(8, 1)
    for name in B.METHODS:
        out = B.run_method(
            name,
            toy,
            x,
            y,
            counts=counts,
            keep_fraction=0.25,
            generator=torch.Generator().manual_seed(0),
            **({"steps": 5} if name == "dgr" else {}),
        )
        assert torch.equal(B.tap_counts(out["matched"], toy.tap_channels), counts), name
        assert out["native"].shape == (8, 16)
        if name != "dgr":  # global percentile: round(0.25 * 16) = 4 channels per sample
            assert out["native"].sum(1).eq(4).all(), name
        if name in ("neuron_mct", "neuron_intgrad", "dgr"):
            assert torch.equal(route(toy, out["matched"]), torch.nn.functional.one_hot(y, K).bool()), name


# ----- attributions against slow references -----
def test_pathway_gradient_equals_a_slow_autograd_reference():
    t = tiny(in_chans=3, seed=2, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=g)
    y = torch.tensor([3, 0, 2, 1])
    pathway = torch.rand(4, t.num_channels, generator=g) < 0.6
    fast = pathway_gradient(t, x, pathway, y)
    assert fast.shape == (4, 16, 16)
    ref_model = raw_copy(t, in_chans=3)
    for i in range(4):
        xi = x[i : i + 1].clone().requires_grad_(True)
        masks = [m[i : i + 1].double() for m in B.split_pathway(pathway, t.tap_channels)]
        with MaskedForward(ref_model, t.tap_names, masks):  # a second, independent hook path
            ref_model(xi)[0, y[i]].backward()
        grad = xi.grad[0]
        for r in range(16):
            for c in range(16):
                v = grad[:, r, c]
                expect = v[v.abs().argmax()]  # signed value of largest magnitude over colour channels
                assert float(fast[i, r, c]) == pytest.approx(float(expect), abs=1e-12)
    unmasked = pathway_gradient(t, x, None, y)
    assert not torch.allclose(unmasked, fast)  # the pathway changes the gradient


def test_grad_cam_equals_a_slow_reference_and_vanishes_without_the_last_tap():
    t = tiny(seed=4, dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64, generator=g)
    y = torch.tensor([1, 2, 0])
    pathway = torch.rand(3, t.num_channels, generator=g) < 0.7
    fast = grad_cam(t, x, pathway, y)
    assert fast.shape == (3, 16, 16) and float(fast.min()) >= 0
    ref_model = raw_copy(t)
    for i in range(3):
        masks = [m[i : i + 1].double() for m in B.split_pathway(pathway, t.tap_channels)]
        xi = x[i : i + 1].clone().requires_grad_(True)
        with MaskedForward(ref_model, t.tap_names, masks, record=True) as mf:
            out = ref_model(xi)
            a = mf.features[-1]
        (ga,) = torch.autograd.grad(out[0, y[i]], a)
        cam = torch.relu((ga.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
        ref = torch.nn.functional.interpolate(cam, size=(16, 16), mode="bilinear", align_corners=False)[0, 0]
        assert torch.allclose(fast[i], ref.detach(), atol=1e-12)
    cut = pathway.clone()
    cut[:, -t.tap_channels[-1] :] = False
    assert float(grad_cam(t, x, cut, y).abs().max()) == 0.0
