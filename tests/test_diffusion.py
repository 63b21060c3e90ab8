"""Pixel diffusion pathways (gencnp.evaluation.diffusion): exactness against autograd, known routes, batching, errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gencnp.evaluation.diffusion import (
    PixelDiffusion,
    UnsupportedModuleError,
    _class_sums,
    _within_between,
    channel_importance,
    class_similarity,
    crossing_counts,
    diffusion,
    exact_pathways,
    hypergeom_sf,
    overlap_test,
    perturb,
)
from gencnp.targets.loading import ConvBlockNet, FrozenTarget, create_target

ROOT = Path(__file__).resolve().parents[1]


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.data.copy_(0.3 * torch.randn(c, generator=g))
    return model.eval()


def _odd_chain() -> tuple[nn.Module, list[str]]:
    """Strided, dilated, padded convs and an overlapping padded max-pool: every window rule gets exercised."""
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )
    return _randomise_bn(net.double()), ["3", "6", "8"]


def _tap_fn(model: nn.Module, taps: list[str]):
    """x [C, H, W] -> (tap outputs..., logits) of the real (nonlinear) network, for autograd."""
    modules = dict(model.named_modules())

    def fn(x):
        feats = {}
        handles = [modules[t].register_forward_hook(lambda m, a, o, t=t: feats.__setitem__(t, o)) for t in taps]
        try:
            logits = model(x[None])
        finally:
            for h in handles:
                h.remove()
        return tuple(feats[t][0] for t in taps) + (logits[0],)

    return fn


@pytest.mark.parametrize("window", [True, False])
@pytest.mark.parametrize("which", ["convblock", "odd"])
def test_impulse_response_is_the_jacobian_column(window, which):
    """Under the frozen pattern, a pixel impulse's response at every tap and at the logits is d output / d pixel."""
    if which == "convblock":
        torch.manual_seed(0)
        model = _randomise_bn(ConvBlockNet((4, 6, 5), (0, 1), num_classes=3).double())
        taps, shape = model.default_taps, (1, 12, 12)
    else:
        model, taps = _odd_chain()
        shape = (1, 11, 11)
    x = torch.randn(2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eng = PixelDiffusion(model, taps, shape, window=window)
    pattern = eng.freeze(x)
    assert torch.allclose(pattern.logits, model(x))
    pos = torch.tensor([[0, 0], [5, 7], [shape[1] - 1, shape[2] - 1], [3, 0], [shape[1] - 1, 2]])
    img = torch.tensor([0, 1, 1, 0, 1])
    res = eng.responses(pattern, img, pos, logits=True)
    fn = _tap_fn(model, taps)
    for n in range(len(pos)):
        r, c = pos[n].tolist()
        impulse = torch.zeros(shape, dtype=torch.float64)
        impulse[:, r, c] = 1.0
        _, column = torch.func.jvp(fn, (x[img[n]],), (impulse,))  # forward-mode autograd: J @ e_pixel
        for t in range(len(taps)):
            assert torch.allclose(res[t].full()[n, 0], column[t], atol=1e-12), (n, t)
        assert torch.allclose(res[-1][n], column[-1], atol=1e-12)
    # Mis-frozen patterns must be caught: the response at another image's pattern differs.
    other = eng.responses(pattern, 1 - img, pos, logits=True)
    assert not torch.allclose(other[-1], res[-1])


def test_transfer_parts_add_up_to_the_next_tap():
    """Channel-restricted copies of a tap's response sum (signed) to the next tap's response; masses are their |.|."""
    torch.manual_seed(0)
    model = _randomise_bn(ConvBlockNet((4, 6, 5), (0, 1), num_classes=3).double())
    eng = PixelDiffusion(model, model.default_taps, (1, 12, 12))
    pattern = eng.freeze(torch.randn(2, 1, 12, 12, dtype=torch.float64))
    img, pos = torch.tensor([0, 1, 1]), torch.tensor([[2, 3], [6, 6], [11, 0]])
    win = eng.segment(None, eng.impulses(pos), pattern, img)
    for t in range(2):
        c = win.data.shape[2]
        chans = torch.arange(c).expand(len(pos), c)
        parts = eng.segment(t, win, pattern, img, chans)
        nxt = eng.segment(t, win, pattern, img)
        assert torch.allclose(parts.data.sum(1), nxt.data[:, 0], atol=1e-12)
        assert torch.allclose(eng.transfer(t, win, pattern, img, chans), parts.data.abs().sum((3, 4)))
        win = nxt


def _route_toy() -> nn.Module:
    """1x1 convolutions with hand-set weights: the pixel's mass goes 0 -> 2 -> 1 (score 0.5 * 0.75 * 0.8 = 0.3)."""
    blocks = [nn.Sequential(nn.Conv2d(i, 3, 1, bias=False), nn.ReLU()) for i in (1, 3, 3)]
    net = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with torch.no_grad():
        blocks[0][0].weight.copy_(torch.tensor([2.0, 1.0, 1.0]).reshape(3, 1, 1, 1))
        blocks[1][0].weight.copy_(torch.tensor([[1.0, 0, 0], [1.0, 1, 0], [6.0, 0, 1]]).reshape(3, 3, 1, 1))
        blocks[2][0].weight.copy_(torch.tensor([[1.0, 0, 1], [0, 1, 8], [0, 0, 1]]).reshape(3, 3, 1, 1))
    return net.eval()


def test_beam_search_finds_the_known_route():
    net = _route_toy()
    eng = PixelDiffusion(net, ["0", "1", "2"], (1, 4, 4))
    pattern = eng.freeze(torch.rand(1, 1, 4, 4) + 0.1)  # positive input: every ReLU on
    res = eng.pathways(pattern, torch.tensor([0]), torch.tensor([[1, 2]]), top_k=3, beam_width=3)
    assert res["chains"][0].tolist() == [[0, 2, 1], [1, 1, 1], [2, 2, 1]]
    assert torch.allclose(res["log_scores"][0].exp(), torch.tensor([0.3, 0.25, 0.2]), atol=1e-6)
    assert res["valid"].all()
    # links: M_1[c_1], then the transferred masses along the chain (hand-computed for the route).
    assert torch.allclose(res["links"][0, 0], torch.tensor([2.0, 12.0, 104.0]))
    ex = exact_pathways(eng, pattern, torch.tensor([0]), torch.tensor([[1, 2]]), top_k=3)
    assert torch.equal(ex["chains"], res["chains"])


def test_beam_equals_exhaustive_search_when_wide_enough():
    torch.manual_seed(3)
    model = _randomise_bn(ConvBlockNet((3, 4, 3), (0,), num_classes=3).double())
    eng = PixelDiffusion(model, model.default_taps, (1, 10, 10))
    pattern = eng.freeze(torch.randn(3, 1, 10, 10, dtype=torch.float64))
    img, pos = torch.tensor([0, 1, 2, 2]), torch.tensor([[0, 0], [4, 5], [9, 9], [2, 7]])
    ex = exact_pathways(eng, pattern, img, pos, top_k=5)
    bs = eng.pathways(pattern, img, pos, top_k=5, beam_width=12)  # 3 * 4 prefixes before the last tap
    assert torch.equal(bs["chains"], ex["chains"])
    assert torch.allclose(bs["log_scores"], ex["log_scores"])
    # scores of all chains of a pixel sum to 1 (Markov routing)
    total = exact_pathways(eng, pattern, img, pos, top_k=36)["log_scores"].exp().sum(1)
    assert torch.allclose(total, torch.ones(4, dtype=torch.float64))


def test_batched_equals_one_pixel_at_a_time_and_windows_equal_full_maps():
    torch.manual_seed(4)
    model = _randomise_bn(ConvBlockNet((4, 6, 5), (0, 2), num_classes=3).double())
    x = torch.randn(3, 1, 14, 14, dtype=torch.float64)
    img, pos = torch.tensor([0, 0, 1, 2, 2, 1]), torch.tensor([[0, 0], [7, 3], [13, 13], [5, 9], [1, 12], [6, 6]])
    eng = PixelDiffusion(model, model.default_taps, (1, 14, 14))
    batched = eng.pathways(eng.freeze(x), img, pos, top_k=4, beam_width=8)
    full = PixelDiffusion(model, model.default_taps, (1, 14, 14), window=False)
    full_res = full.pathways(full.freeze(x), img, pos, top_k=4, beam_width=8)
    for n in range(len(pos)):
        single = eng.pathways(
            eng.freeze(x[img[n] : img[n] + 1]), torch.tensor([0]), pos[n : n + 1], top_k=4, beam_width=8
        )
        assert torch.equal(single["chains"][0], batched["chains"][n])
        assert torch.allclose(single["log_scores"][0], batched["log_scores"][n], atol=1e-10)
        for a, b in zip(single["masses"], batched["masses"]):
            assert torch.allclose(a[0], b[n], atol=1e-10)
    assert torch.equal(full_res["chains"], batched["chains"])
    assert torch.allclose(full_res["log_scores"], batched["log_scores"], atol=1e-10)


class _Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        h = self.a(x)
        return self.head((h + self.b(h)).mean((2, 3)))


def test_unsupported_modules_and_structures_are_refused_clearly():
    gelu = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU()), nn.Flatten(), nn.Linear(2 * 6 * 6, 2)).eval()
    with pytest.raises(UnsupportedModuleError, match=r"'0\.1' of type GELU.*supported: Conv2d"):
        PixelDiffusion(gelu, ["0"], (1, 8, 8))
    with pytest.raises(ValueError, match="plain chain"):
        PixelDiffusion(_Skip().eval(), ["a", "b"], (1, 8, 8))
    toy = create_target("channel_toy", num_classes=3, in_chans=3).eval()  # head reads a functional mean
    with pytest.raises(ValueError, match="plain chains"):
        PixelDiffusion(toy, ["stem", "route"], (3, 4, 4))
    net = ConvBlockNet((2, 3), (0,), num_classes=2)
    with pytest.raises(ValueError, match="training mode.*eval"):
        PixelDiffusion(net.train(), net.default_taps, (1, 8, 8))
    circ = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2, 2),
    ).eval()
    with pytest.raises(UnsupportedModuleError, match="padding_mode='circular'"):
        PixelDiffusion(circ, ["0"], (1, 6, 6))


def test_crossing_counts_by_hand():
    chains = torch.tensor([[[0, 1], [1, 1]], [[1, 0], [0, 2]]])  # 2 impulses, top-2, 2 taps of 2 and 3 channels
    valid = torch.tensor([[True, True], [True, False]])
    out = crossing_counts(chains, valid, torch.tensor([0, 1]), 2, [2, 3])
    assert out.tolist() == [[1, 1, 0, 2, 0], [0, 1, 1, 0, 0]]


def test_masked_forward_and_suffix_give_the_same_causal_test():
    torch.manual_seed(5)
    model = _randomise_bn(create_target("tiny_cnn", num_classes=4))
    target = FrozenTarget(model, "auto", (1, 12, 12))
    eng = PixelDiffusion(target.model, target.tap_names, (1, 12, 12))
    x = torch.randn(6, 1, 12, 12)
    y = target(x).argmax(1)
    f1, d1 = channel_importance(target, x, y, engine=None, batch_size=4)
    f2, d2 = channel_importance(target, x, y, engine=eng, batch_size=4)
    assert f1.shape == (6, target.num_channels)
    assert torch.equal(f1, f2)
    assert torch.allclose(d1, d2, atol=1e-9)
    assert d1.abs().sum() > 0


def test_class_similarity_matches_a_loop_reference():
    g = torch.Generator().manual_seed(0)
    prof = torch.randint(0, 4, (14, 6), generator=g).double()
    prof[3] = 0  # an empty profile counts as similarity 0
    cls = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 1, 1, 3, 2])
    res = class_similarity(prof, cls, 5, permutations=20, seed=0)
    unit = torch.nn.functional.normalize(prof, dim=1)
    cos = unit @ unit.T
    within = [
        np.mean([float(cos[i, j]) for i in range(14) for j in range(14) if i != j and cls[i] == cls[j] == k])
        for k in range(4)
        if (cls == k).sum() >= 2
    ]
    between = [
        np.mean([float(cos[i, j]) for i in range(14) for j in range(14) if cls[i] == a and cls[j] == b])
        for a, b in itertools.combinations(range(4), 2)
    ]
    assert res["within"] == pytest.approx(np.mean(within))
    assert res["between"] == pytest.approx(np.mean(between))
    assert 0 < res["p_permutation"] <= 1
    mat, n = _class_sums(cos, torch.stack([cls, cls.flip(0)], 1), 5)
    w, b = _within_between(mat, n)
    assert w[0] == pytest.approx(np.mean(within)) and b[0] == pytest.approx(np.mean(between))


def test_class_structured_profiles_are_detected():
    g = torch.Generator().manual_seed(1)
    cls = torch.arange(40) % 4
    prof = torch.rand(40, 8, generator=g) + 3 * torch.nn.functional.one_hot(cls * 2, 8)
    res = class_similarity(prof, cls, 4, permutations=200, seed=0)
    assert res["within"] > res["between"] and res["p_permutation"] < 0.01
    flat = class_similarity(torch.rand(40, 8, generator=g), cls, 4, permutations=200, seed=0)
    assert flat["p_permutation"] > 0.01


def test_overlap_test_and_hypergeometric_tail():
    for total, good, draws in [(8, 3, 4), (10, 5, 5), (6, 2, 2)]:
        combos = list(itertools.combinations(range(total), draws))
        for x in range(draws + 1):
            brute = sum(len(set(c) & set(range(good))) >= x for c in combos) / len(combos)
            assert hypergeom_sf(x, total, good, draws) == pytest.approx(brute)
    crossed = np.arange(32, dtype=float)
    same = overlap_test(crossed, crossed * 2, 4, permutations=200, seed=0)
    assert same["overlap"] == 4 and same["p_permutation"] < 0.01 and same["spearman"] == pytest.approx(1.0)
    opposite = overlap_test(crossed, -crossed, 4, permutations=200, seed=0)
    assert opposite["overlap"] == 0 and opposite["p_permutation"] > 0.5
    with pytest.raises(ValueError, match="set size m"):
        overlap_test(crossed, crossed, 32)


def test_perturbations():
    torch.manual_seed(0)
    model = _randomise_bn(create_target("tiny_cnn", num_classes=4))
    target = FrozenTarget(model, "auto", (1, 12, 12))
    x = torch.randn(5, 1, 12, 12)
    y = target(x).argmax(1)
    occ = perturb("occlusion", x, y, occlusion_size=4)
    assert torch.equal(occ[:, :, 4:8, 4:8], x.amin(dim=(1, 2, 3), keepdim=True).expand(-1, 1, 4, 4))
    assert torch.equal(occ[:, :, :4], x[:, :, :4])
    assert torch.equal(perturb("noise", x, y, seed=3), perturb("noise", x, y, seed=3))
    adv = perturb("fgsm", x, y, target, fgsm_eps=0.1)
    step = (adv - x).abs()
    assert bool((((step - 0.1).abs() < 1e-6) | (step < 1e-7)).all()) and (step > 0).double().mean() > 0.5
    ce = torch.nn.functional.cross_entropy
    assert ce(target(adv), y) > ce(target(x), y)
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb("blur", x, y)


def test_diffusion_end_to_end_on_the_synthetic_config(tmp_path):
    from jsonargparse import CLI

    summary = CLI(
        diffusion,
        as_positional=False,
        args=["--config", str(ROOT / "configs/synthetic/diffusion.yaml"), "--out_dir", str(tmp_path)],
    )
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "diffusion.json",
        "diffusion.md",
        "diffusion_crossings.png",
        "diffusion_perturbations.png",
        "diffusion_pixel_pathways.png",
        "diffusion_similarity.png",
    ]  # no temp files left
    saved = json.loads((tmp_path / "diffusion.json").read_text())
    assert saved["settings"]["n"] == 24 and saved["settings"]["taps"] == ["blocks.0", "blocks.1", "blocks.2"]
    assert set(saved["perturbations"]) == {"clean", "noise", "occlusion", "fgsm"}
    assert saved["bank"] == {"skipped": "no bank path given"}
    assert summary["consistency"]["all"]["within"] == saved["consistency"]["all"]["within"]
    md = (tmp_path / "diffusion.md").read_text()
    assert "Do large pathways cross the causally important feature maps more often than chance?" in md
    assert "Are within-class crossing profiles more similar than between-class ones?" in md


def test_fashion_config_parses_and_bad_arguments_fail_early(tmp_path):
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(diffusion)
    cfg = parser.parse_args(["--config", str(ROOT / "configs/fashion_mnist/diffusion.yaml")])
    assert cfg.n_images == 1000 and cfg.pixels == 32 and cfg.out_dir == "runs/fashion_mnist/eval"
    assert cfg.data["class_path"] == "gencnp.FashionMNISTDataModule"
    with pytest.raises(ValueError, match="class_source must be"):
        diffusion(class_source="labels", out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="top_k <= beam_width"):
        diffusion(top_k=8, beam_width=4, out_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_bank_comparison_is_optional_and_counts_overlaps(tmp_path, monkeypatch):
    import gencnp.banks.bank
    from gencnp.evaluation.diffusion import _bank_overlap

    cross = torch.tensor([[5.0, 4, 0, 0, 9, 0, 0], [0, 0, 3, 2, 0, 1, 8]])  # 2 classes, taps of 4 and 3 channels
    mass = torch.ones(2, 7)
    args = (cross, mass, [4, 3], ["a", "b"], ["c0", "c1"])
    assert _bank_overlap(None, *args) == {"skipped": "no bank path given"}
    assert "does not exist" in _bank_overlap(str(tmp_path / "missing.safetensors"), *args)["skipped"]
    path = tmp_path / "bank.safetensors"
    path.write_bytes(b"x")

    class FakeBank:
        @staticmethod
        def load(p, target=None):
            return FakeBank()

        def class_pathways(self):
            return torch.tensor([[1, 1, 0, 0, 0, 1, 0], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)

    monkeypatch.setattr(gencnp.banks.bank, "PathwayBank", FakeBank)
    res = _bank_overlap(str(path), *args)
    # class 0, tap a: pathway {0, 1}, most crossed {0, 1}: 2 shared; tap b: pathway {1} (channel 5), most crossed {4}: 0.
    # class 1, tap a: pathway {2, 3}, most crossed {2, 3}: 2 shared; tap b keeps nothing: skipped.
    assert res["overlap"] == 4 and res["chance"] == pytest.approx(1 + 1 / 3 + 1)
    assert res["per_tap"]["a"]["overlap"] == 4 and res["per_tap"]["b"]["overlap"] == 0
