"""The pathway detector: every score against a hand-computed value, the metrics against torchmetrics, the
combination, OOD sources (ImageFolder path, class path, shape refusal) and an end-to-end run on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import FASHION, ROOT, says
from jsonargparse import ArgumentParser
from PIL import Image

from gencnp import GenCNP, SyntheticDataModule
from gencnp.banks import PathwayBank
from gencnp.detection import detect
from gencnp.detection import scores as S
from gencnp.detection.combine import LogisticCombination, orient
from gencnp.detection.features import Scorer
from gencnp.detection.metrics import point, weighted_metrics
from gencnp.detection.perturb import CORRUPTIONS, corrupt
from gencnp.detection.sources import parse_sources
from gencnp.io.checkpoints import seal

# the attacks come from torchattacks, installed apart (`pip install --no-deps torchattacks==3.5.1`; .ci/run does)
needs_attacks = pytest.mark.skipif(
    importlib.util.find_spec("torchattacks") is None, reason="torchattacks is not installed"
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----- scores, by hand -----
def test_tap_and_pooled_distances_match_hand_counts():
    m = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    paths = torch.tensor([[1, 0, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    y = torch.tensor([0, 1])
    taps = S.tap_distances(m, paths, y, [2, 3])
    # sample 0: tap 0 {0,1} vs {0}: 1 - 1/2; tap 1 {4} vs {3,4}: 1 - 1/2; sample 1: both empty -> 0
    assert torch.allclose(taps, torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=torch.float64))
    pooled = S.pathway_distance(m, paths, y)  # {0,1,4} vs {0,3,4}: 1 - 2/4
    assert torch.allclose(pooled, torch.tensor([0.5, 0.0], dtype=torch.float64))


def test_pathway_surprise_is_the_bernoulli_nll_per_channel():
    f = torch.tensor([[0.9, 0.1, 0.5]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    expected = -(math.log(0.9) + math.log(0.1) + math.log(0.5)) / 3
    assert S.pathway_surprise(m, f, torch.tensor([0])).item() == pytest.approx(expected)
    # a pathway that follows its class costs less than one that contradicts it
    typical = S.pathway_surprise(torch.tensor([[1, 0, 1]]).bool(), f, torch.tensor([0]))
    assert typical < S.pathway_surprise(torch.tensor([[0, 1, 1]]).bool(), f, torch.tensor([0]))


def test_class_standardisation_uses_each_predicted_class_statistics():
    v = torch.tensor([1.0, 3.0, 10.0, 14.0, 7.0])
    y = torch.tensor([0, 0, 1, 1, 2])  # class 2 has one input: pooled statistics; class 3 none: pooled too
    mean, std = S.class_stats(v, y, 4)
    assert mean[:2].tolist() == [2.0, 12.0] and std[0].item() == pytest.approx(math.sqrt(2))
    assert mean[2].item() == pytest.approx(v.mean().item()) and mean[3].item() == pytest.approx(v.mean().item())
    z = S.class_standardise(torch.tensor([2.0, 12.0]), torch.tensor([0, 1]), mean, std)
    assert torch.allclose(z, torch.zeros(2, dtype=torch.float64))


def test_kept_fraction_score_margin_and_logit_gaps():
    assert S.kept_fraction(torch.tensor([[1, 0, 0, 1]]).bool()).item() == pytest.approx(0.5)
    a = torch.tensor([[0.0, 1.0, 0.5, 0.75]])
    assert S.score_margin(a).item() == pytest.approx(1 - (1 + 1 + 0 + 0.5) / 4)
    z = torch.tensor([[3.0, 1.0, 0.0]])
    zm = torch.tensor([[1.0, 2.0, 0.0]])
    y = torch.tensor([0])
    assert S.class_margin(z, y).item() == pytest.approx(2.0)
    assert S.masked_logit_gap(z, zm, y).item() == pytest.approx(2.0 - (-1.0))
    assert S.class_pathway_gap(z, z, y).item() == pytest.approx(0.0)


# ----- metrics -----
def test_weighted_metrics_equal_torchmetrics_with_ties():
    g = torch.Generator().manual_seed(0)
    clean = (torch.randn(300, generator=g) * 2).round().double()  # many ties, like kept fractions
    flagged = (torch.randn(120, generator=g) * 2 + 1).round().double()
    ref = point(clean, flagged)
    got = weighted_metrics(clean, flagged, torch.ones(1, 300), torch.ones(1, 120))
    for k in ref:
        assert got[k].item() == pytest.approx(ref[k], abs=1e-6), k
    # a resample given as multiplicities equals the metric of the resampled tensors
    i0, i1 = torch.randint(0, 300, (300,), generator=g), torch.randint(0, 120, (120,), generator=g)
    w0 = torch.zeros(1, 300).index_add_(1, i0, torch.ones(1, 300))
    w1 = torch.zeros(1, 120).index_add_(1, i1, torch.ones(1, 120))
    ref = point(clean[i0], flagged[i1])
    got = weighted_metrics(clean, flagged, w0, w1)
    for k in ref:
        assert got[k].item() == pytest.approx(ref[k], abs=1e-6), k


def test_orientation_and_combination_are_fitted_on_their_inputs():
    g = torch.Generator().manual_seed(0)
    clean = {"up": torch.randn(200, generator=g), "down": torch.randn(200, generator=g)}
    flagged = {"up": torch.randn(200, generator=g) + 2, "down": torch.randn(200, generator=g) - 2}
    signs = orient(clean, flagged)
    assert signs == {"up": 1.0, "down": -1.0}
    combo = LogisticCombination(["up", "down"]).fit(clean, flagged)
    w = combo.weights()
    assert w["up"] > 0 > w["down"]
    assert point(combo.score(clean), combo.score(flagged))["auroc"] > 0.95


def test_corruptions_change_images_more_at_higher_severity():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    for kind in CORRUPTIONS:
        d1 = (corrupt(x, kind, 1, [0.5], [0.5]) - x).abs().mean()
        d5 = (corrupt(x, kind, 5, [0.5], [0.5]) - x).abs().mean()
        assert d5 > d1 > 0, kind
    with pytest.raises(ValueError, match=says("unknown corruption", "gaussian_noise")):
        corrupt(x, "fog", 1, [0.5], [0.5])


# ----- OOD sources -----
def _folder(root: Path, n: int = 3, size: int = 20, mode: str = "RGB") -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new(mode, (size, size), color=(40 * i, 90, 200) if mode == "RGB" else 30 * i).save(
                root / c / f"{i}.png"
            )
    return root


def test_imagefolder_source_converts_to_the_target_shape(tmp_path):
    (src,) = parse_sources([{"name": "mine", "path": str(_folder(tmp_path / "ood"))}], (1, 16, 16))
    x = src.images((1, 16, 16), [0.5], [0.25], n=100, seed=0)
    assert x.shape == (6, 1, 16, 16)
    assert x.min() >= (0 - 0.5) / 0.25 - 1e-6 and x.max() <= (1 - 0.5) / 0.25 + 1e-6


def test_class_path_source_and_shape_refusal():
    entry = {
        "name": "syn",
        "data": {"class_path": "gencnp.SyntheticDataModule", "init_args": {"image_size": 16, "n_test": 30}},
    }
    (src,) = parse_sources([entry], (1, 16, 16))
    assert src.images((1, 16, 16), [0.0], [1.0], n=10, seed=0).shape == (10, 1, 16, 16)
    wrong = {"name": "rgb", "data": {"class_path": "gencnp.SyntheticDataModule", "init_args": {"in_chans": 3}}}
    with pytest.raises(ValueError, match=says("OOD set 'rgb'", "in_chans: 1", "image_size: 16")):
        parse_sources([wrong], (1, 16, 16))
    with pytest.raises(ValueError, match=says("cannot be imported")):
        parse_sources([{"name": "x", "data": {"class_path": "gencnp.NoSuchModule"}}], (1, 16, 16))
    with pytest.raises(FileNotFoundError, match=says("not a folder holding images")):
        parse_sources([{"name": "x", "path": "/nonexistent/folder"}], (1, 16, 16))


# ----- a tiny model end to end -----
class PixelSynthetic(SyntheticDataModule):
    """The synthetic patterns with a declared normalisation (attacks and corruptions work in [0, 1] pixels)."""

    mean = 0.5
    std = 1.0


@pytest.fixture(scope="module")
def tiny_run(synthetic_runs, tmp_path_factory) -> dict[str, Path]:
    """The synthetic generator with spread score biases (sparse, varied pathways) and a bank of its train pathways."""
    out = tmp_path_factory.mktemp("detect")
    ckpt = torch.load(synthetic_runs["gencnp"], map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for key in [k for k in ckpt["state_dict"] if k.startswith("generator.rpd.heads.")]:
        t = ckpt["state_dict"][key]
        ckpt["state_dict"][key] = 1.5 * torch.randn(t.shape, generator=g) if key.endswith("bias") else 4 * t
    seal(ckpt)
    torch.save(ckpt, out / "gen.ckpt")
    model = GenCNP.load_from_checkpoint(out / "gen.ckpt")
    dm = SyntheticDataModule(num_classes=4, image_size=16, n_train=600, n_test=200, val_size=200)
    bank = PathwayBank.for_target(model.target, dm.class_names)
    for x, _, _ in dm.loader(dm.split("train"), batch_size=300):
        ex = model.explain(x)
        bank.update(ex["pathway"], ex["y_hat"])
    bank.tau = 0.5
    bank.save(out / "bank.safetensors")
    return {
        "generator": out / "gen.ckpt",
        "bank": out / "bank.safetensors",
        "dir": out,
        "model": model,
        "bank_obj": bank,
    }


def test_scorer_gives_every_score_per_image_and_a_differentiable_surprise(tiny_run):
    model, bank = tiny_run["model"], tiny_run["bank_obj"]
    scorer = Scorer(model, bank.class_pathways(), bank.frequencies())
    x = SyntheticDataModule(num_classes=4, image_size=16, n_test=12).split("test").images[:12]
    out = scorer.batch(x)
    for name in scorer.names():
        assert out[name].shape == (12,) and torch.isfinite(out[name]).all(), name
    ex = model.explain(x)
    assert torch.allclose(out["kept_fraction"], ex["pathway"].double().mean(1))
    assert out["features"].shape == (12, model.target.model.head.in_features)
    assert torch.allclose(scorer.embed(x, 5), out["features"])
    scorer.calibrate(out)
    calibrated = scorer.batch(x)
    assert scorer.names()[-1].endswith("@class") and len(scorer.names()) == 2 * (
        len(S.PATHWAY_SCORES) + len(model.target.tap_names)
    )
    for name in scorer.names():
        assert calibrated[name].shape == (12,) and torch.isfinite(calibrated[name]).all(), name
    xg = x.clone().requires_grad_(True)
    for name in ("pathway_surprise", "masked_logit_gap", "pathway_surprise@class", "masked_logit_gap@class"):
        logits, feats = model.target(xg, record=True)
        s = scorer.adaptive_score(name, xg, logits, feats)
        assert s.shape == (12,)
        (grad,) = torch.autograd.grad(s.sum(), xg)
        assert grad.abs().sum() > 0, name  # the adaptive attack gets a gradient through the generator
    # the soft masked gap equals the scored one (DAQ's forward is exactly the binary pathway)
    with torch.no_grad():
        logits, feats = model.target(x, record=True)
        soft = scorer.adaptive_score("masked_logit_gap", x, logits, feats)
    assert torch.allclose(soft, out["masked_logit_gap"], atol=1e-4)
    with pytest.raises(ValueError, match=says("adaptive_target must be one of")):
        scorer.adaptive_score("kept_fraction", x, logits, feats)


@pytest.mark.slow
@needs_attacks
def test_detect_end_to_end_with_folder_and_class_path_sets(tiny_run, tmp_path):
    folder = _folder(tmp_path / "folder", n=6, size=24)
    out = tmp_path / "out"
    res = detect(
        generator=str(tiny_run["generator"]),
        bank=str(tiny_run["bank"]),
        data=PixelSynthetic(num_classes=4, image_size=16, n_train=600, n_test=200, val_size=200),
        out_dir=str(out),
        n=120,
        val_n=80,
        fit_n=200,
        attack_n=60,
        ood_n=40,
        fgsm_eps=[0.3],
        pgd_eps=[0.3],
        pgd_steps=3,
        adaptive_eps=0.3,
        adaptive_steps=3,
        corruptions=["gaussian_noise", "contrast"],
        severities=[5],
        ood=[
            {"name": "folder", "path": str(folder)},
            {
                "name": "other_patterns",
                "data": {
                    "class_path": "gencnp.SyntheticDataModule",
                    "init_args": {"num_classes": 4, "image_size": 16, "seed": 7},
                },
            },
        ],
        knn_k=5,
        vim_dim=8,
        bootstrap_samples=20,
        progress=False,
    )
    saved = json.loads((out / "detect.json").read_text())
    assert saved["sets"].keys() == res["sets"].keys()
    assert {
        "folder",
        "other_patterns",
        "pgd_eps0.3",
        "adaptive_pgd_eps0.3_w1",
        "adaptive_pgd_eps0.3_w10",
        "contrast_s5",
    } <= set(res["sets"])
    e = res["sets"]["folder"]
    assert e["inputs"] == 12 and e["family"] == "ood"
    for m in [*res["methods"]["pathway"], *res["methods"]["baselines"]]:
        lo, hi = e["metrics"][m]["ci"]["auroc"]
        assert 0 <= lo <= e["metrics"][m]["auroc"] + 1e-9 and e["metrics"][m]["auroc"] <= hi + 1e-9 <= 1 + 1e-9
    assert set(res["methods"]["baselines"]) == {"msp", "energy", "mahalanobis", "vim", "knn"}
    assert "best pathway score" in (out / "detect.md").read_text()
    assert (out / "roc_ood.png").is_file() and (out / "roc_attack.png").is_file()


def test_missing_bank_fails_before_anything_is_written(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=says("pathway bank", "does not exist")):
        detect(
            generator=str(tiny_run["generator"]), bank=str(tmp_path / "none.safetensors"), out_dir=str(tmp_path / "o")
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["fashion_mnist", "fashion_mnist_open"])
def test_detect_configs_parse(name):
    parser = ArgumentParser()
    parser.add_function_arguments(detect)
    cfg = parser.parse_path(str(ROOT / "configs" / name / "detect.yaml"))
    assert cfg.generator == f"runs/{name}/gencnp/best.ckpt" and cfg.out_dir == f"runs/{name}/detect"


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_classes_keeps_and_relabels():
    from gencnp import FashionMNISTDataModule

    dm = FashionMNISTDataModule(classes=[8, 9], val_size=100)
    test = dm.split("test")
    assert dm.num_classes == 2 and dm.class_names == ["Bag", "Ankle boot"]
    assert len(test) == 2000 and set(test.labels.tolist()) == {0, 1}
    with pytest.raises(ValueError, match=says("classes must be distinct", "[0, 9]")):
        FashionMNISTDataModule(classes=[3, 3])


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
def test_class_path_set_converted_by_its_image_size_is_accepted():
    entry = {
        "name": "fmnist_small",
        "data": {"class_path": "gencnp.FashionMNISTDataModule", "init_args": {"image_size": 16, "classes": [8]}},
    }
    (src,) = parse_sources([entry], (1, 16, 16))
    x = src.images((1, 16, 16), [0.5], [0.25], n=5, seed=0)
    assert x.shape == (5, 1, 16, 16)
    with pytest.raises(ValueError, match=says("image_size: 16")):
        parse_sources([{**entry, "data": {"class_path": "gencnp.FashionMNISTDataModule"}}], (1, 16, 16))


def test_detect_without_torchattacks_names_the_install_command(tiny_run, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchattacks" else real(name, *a)
    )
    out = tmp_path / "out"
    with pytest.raises(ImportError, match=r"torchattacks.*pip install --no-deps torchattacks==3\.5\.1"):
        detect(
            generator=str(tiny_run["generator"]),
            bank=str(tiny_run["bank"]),
            out_dir=str(out),
        )
    assert not out.exists()
