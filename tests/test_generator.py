import math

import pytest
import torch

from gencnp.pathways.generator import PathwayGenerator, daq, straight_through


def _daq_reference(a: torch.Tensor, sigma: float = 2.0, t0: float = 2.0) -> torch.Tensor:
    """Slow float64 soft-argmax of docs/design.md section 5, element by element."""
    out = torch.empty_like(a)
    off = 1 / (math.exp(t0) - 1)
    levels = torch.tensor([-off, 1 + off], dtype=torch.float64)
    flat_a, flat_o = a.reshape(-1), out.reshape(-1)
    for i in range(flat_a.numel()):
        v = flat_a[i]
        q_star = 1.0 if float(v) > 0.5 else 0.0
        s = torch.stack([torch.exp(-(v - q).abs()) * math.exp(-((q - q_star) ** 2) / sigma**2) for q in (0.0, 1.0)])
        beta = (t0 / (s[0] - s[1]).abs()).detach()
        pi = torch.softmax(beta * s, dim=0)
        flat_o[i] = (levels * pi).sum()
    return out


def test_daq_forward_is_exactly_binary():
    a = torch.rand(4096)
    assert torch.equal(daq(a), (a > 0.5).float())


def test_daq_gradient_matches_float64_soft_argmax():
    a = torch.rand(64, dtype=torch.float64) * 0.98 + 0.01
    w = torch.randn(64, dtype=torch.float64)
    a1 = a.clone().requires_grad_(True)
    (daq(a1).double() * w).sum().backward()
    a2 = a.clone().requires_grad_(True)
    (_daq_reference(a2) * w).sum().backward()
    assert torch.allclose(a1.grad, a2.grad.float().double(), rtol=1e-4, atol=1e-6)
    assert a1.grad.abs().sum() > 0


def test_straight_through_gradient_is_identity():
    a = torch.rand(10, requires_grad=True)
    m = straight_through(a)
    m.sum().backward()
    assert torch.equal(m.detach(), (a > 0.5).float()) and torch.equal(a.grad, torch.ones(10))


def test_generator_shapes_and_initial_scores():
    torch.manual_seed(0)
    gen = PathwayGenerator([8, 16, 16, 32], n_shallow=2, num_classes=5, d=16)
    feats = [torch.randn(3, 8, 16, 16), torch.randn(3, 16, 8, 8), torch.randn(3, 16, 8, 8), torch.randn(3, 32, 4, 4)]
    out = gen(feats)
    assert out["scores"].shape == (3, 72) and out["masks"].shape == (3, 72) and out["class_logits"].shape == (3, 5)
    assert abs(float(out["scores"].mean()) - 0.9) < 0.05  # heads start near 0.9: everything kept
    assert torch.all(out["masks"] == 1)
    assert [t.shape[1] for t in gen.split(out["masks"])] == [8, 16, 16, 32]


def test_generator_accepts_token_features():
    gen = PathwayGenerator([6, 10], n_shallow=1, num_classes=3, d=8)
    out = gen([torch.randn(2, 5, 6), torch.randn(2, 5, 10)])
    assert out["masks"].shape == (2, 16)


def test_generator_is_batch_independent():
    torch.manual_seed(0)
    gen = PathwayGenerator([8, 16], n_shallow=1, num_classes=3, d=16).eval()
    feats = [torch.randn(6, 8, 8, 8), torch.randn(6, 16, 4, 4)]
    full = gen(feats)["scores"]
    single = gen([f[2:3] for f in feats])["scores"]
    assert torch.allclose(full[2:3], single, atol=1e-6)


def test_bad_binarizer_named():
    with pytest.raises(ValueError, match="binarizer must be one of"):
        PathwayGenerator([4, 4], 1, 2, binarizer="sign")
