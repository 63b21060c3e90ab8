"""Input attributions: one verb over Captum and pathway gradients, their measures, and the evaluation command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import ROOT

from gencnp.evaluation.attributions import (
    ATTRIBUTION_METHODS,
    AttributionModel,
    attribute,
    auc,
    bootstrap,
    cascade_layers,
    deletion_insertion,
    normalise,
    pointing_game,
    randomised,
    relevance_mass,
    spearman,
    ssim,
)
from gencnp.targets.loading import FrozenTarget, channel_toy_batch, create_target


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _toy(k: int = 4, size: int = 8) -> FrozenTarget:
    return FrozenTarget(
        create_target("channel_toy", num_classes=k, in_chans=k), "auto", (k, size, size), arch="channel_toy"
    )


def _tiny(seed: int = 0) -> FrozenTarget:
    torch.manual_seed(seed)
    return FrozenTarget(create_target("tiny_cnn", num_classes=4), "auto", (1, 16, 16), arch="tiny_cnn")


# ----- methods on a toy with a known answer -----
def test_gradient_and_integrated_gradients_match_the_toy_by_hand():
    """channel_toy: logit y = 4 * mean over pixels of relu(x_y) - 1, so dS_y/dx_y = 4 / (H W) where x_y > 0 and
    integrated gradients from zero equal x_y * 4 / (H W) (completeness along a path where the ReLU stays open)."""
    target = _toy()
    x, y = channel_toy_batch(6, size=8, seed=1)
    am = AttributionModel(target, ig_steps=16)
    g = attribute("gradient", am, x, y)
    assert g.shape == (6, 8, 8)
    assert torch.allclose(g, torch.full_like(g, 4 / 64), atol=1e-6)
    ig = attribute("integrated_gradients", am, x, y)
    assert torch.allclose(ig, x[torch.arange(6), y] * 4 / 64, atol=1e-5)
    sal = attribute("saliency", am, x, y)
    assert torch.allclose(sal, g.abs())
    # Another class's logit does not depend on channel y: its gradient there is zero, its map is not ours.
    other = (y + 1) % 4
    assert not torch.allclose(attribute("gradient", am, x, other), g)


def test_pathway_gradient_goes_through_the_masked_forward():
    """Keeping channel y at every tap reproduces the plain gradient; removing channel y at 'route' leaves no path
    from the input to logit y (zero map)."""
    target = _toy()
    x, y = channel_toy_batch(5, size=8, seed=2)
    k, taps = 4, len(target.tap_names)
    keep = torch.eye(k, dtype=torch.bool).repeat(1, taps)  # class c keeps channel c in every tap
    plain = attribute("gradient", AttributionModel(target), x, y)
    through = attribute("pathway_gradient_class", AttributionModel(target, class_pathways=keep), x, y)
    assert torch.allclose(through, plain, atol=1e-7)
    cut = keep.clone()
    cut[:, k : 2 * k] = ~torch.eye(k, dtype=torch.bool)  # tap 'route': every channel but c
    dropped = attribute("pathway_gradient_class", AttributionModel(target, class_pathways=cut), x, y)
    assert float(dropped.abs().max()) == 0.0


class FixedPathways:
    """A pathway source standing in for GEN-CNP (``explain`` gives the pathway of each class index ``y``)."""

    def __init__(self, by_class: torch.Tensor, y: torch.Tensor):
        self.by_class, self.y = by_class, y

    def explain(self, x: torch.Tensor) -> dict:
        return {"pathway": self.by_class[self.y[: len(x)]]}


def test_pathway_integrated_gradients_and_grad_cam_go_through_the_masked_forward():
    """Keeping channel y in every tap: pathway IG equals plain IG (by hand on the toy, x_y * 4 / (H W)); removing
    channel y at 'route' leaves nothing to integrate (zero map). Pathway Grad-CAM keeping every channel equals
    Grad-CAM; keeping none of the last tap gives a zero map."""
    target = _toy()
    x, y = channel_toy_batch(5, size=8, seed=3)
    k, taps = 4, len(target.tap_names)
    keep = torch.eye(k, dtype=torch.bool).repeat(1, taps)
    am = AttributionModel(target, generator=FixedPathways(keep, y), ig_steps=16)
    ig = attribute("pathway_integrated_gradients", am, x, y)
    assert torch.allclose(ig, x[torch.arange(5), y] * 4 / 64, atol=1e-5)
    cut = keep.clone()
    cut[:, k : 2 * k] = ~torch.eye(k, dtype=torch.bool)
    am_cut = AttributionModel(target, generator=FixedPathways(cut, y), ig_steps=16)
    assert float(attribute("pathway_integrated_gradients", am_cut, x, y).abs().max()) == 0.0

    tiny = _tiny()
    xt, yt = torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 2])
    d = tiny.num_channels
    everything = AttributionModel(tiny, generator=FixedPathways(torch.ones(4, d, dtype=torch.bool), yt))
    assert torch.allclose(
        attribute("pathway_grad_cam", everything, xt, yt),
        attribute("grad_cam", AttributionModel(tiny), xt, yt),
        atol=1e-5,
    )
    no_last = torch.ones(4, d, dtype=torch.bool)
    no_last[:, d - tiny.tap_channels[-1] :] = False
    none = AttributionModel(tiny, generator=FixedPathways(no_last, yt))
    assert float(attribute("pathway_grad_cam", none, xt, yt).abs().max()) == 0.0


def test_grad_cam_is_captum_layer_grad_cam_upsampled():
    target = _tiny()
    x = torch.randn(3, 1, 16, 16)
    y = torch.tensor([0, 1, 2])
    cam = attribute("grad_cam", AttributionModel(target), x, y)
    assert cam.shape == (3, 16, 16) and float(cam.min()) >= 0
    from gencnp.pathways.gradients import grad_cam

    # gencnp's own Grad-CAM of the unmasked target is the same quantity (bilinear upsampling of one last-tap map).
    assert torch.allclose(cam, grad_cam(target, x, None, y), atol=1e-5)


def test_attribute_refuses_bad_input():
    am = AttributionModel(_tiny())
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(KeyError, match="known methods"):
        attribute("lrp", am, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs a GEN-CNP generator"):
        attribute("pathway_gradient_gencnp", am, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs class pathways"):
        attribute("pathway_gradient_class", am, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one class per image"):
        attribute("gradient", am, x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        attribute("gradient", am, x, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="expects images of shape"):
        attribute("gradient", am, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    assert am.methods() == ["gradient", "saliency", "integrated_gradients", "grad_cam"]


# ----- randomisation -----
def test_cascade_layers_run_from_the_top():
    groups = cascade_layers(_tiny())
    assert [name for name, _ in groups] == ["head", "blocks.2", "blocks.1", "blocks.0"]
    assert isinstance(groups[0][1][0], torch.nn.Linear) and len(groups[1][1]) == 2  # conv + BatchNorm


def test_randomisation_changes_maps_and_restores_the_weights_even_on_error():
    target = _tiny()
    am = AttributionModel(target)
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8) % 4
    before = attribute("gradient", am, x, y)
    state = {k: v.clone() for k, v in target.model.state_dict().items()}
    groups = cascade_layers(target)
    with randomised(target, groups[0][1], seed=3):
        after = attribute("gradient", am, x, y)
    s = ssim(normalise(before), normalise(after))
    assert float(s.mean()) < 0.9 and float(spearman(normalise(before), normalise(after)).mean()) < 0.9
    assert torch.equal(attribute("gradient", am, x, y), before)
    with pytest.raises(RuntimeError, match="boom"), randomised(target, [m for _, ms in groups for m in ms]):
        raise RuntimeError("boom")
    assert all(torch.equal(v, state[k]) for k, v in target.model.state_dict().items())


def test_generator_reads_the_randomised_targets_features():
    from gencnp.systems.gencnp import GenCNP

    torch.manual_seed(0)
    model = GenCNP(
        target="tiny_cnn",
        target_checkpoint=None,
        num_classes=4,
        in_chans=1,
        image_size=16,
        ablation="zero",
        generator={"d": 8},
    ).eval()
    x = torch.randn(4, 1, 16, 16)
    before = model.explain(x)["scores"]
    with randomised(model.target, cascade_layers(model.target)[1][1]):
        during = model.explain(x)["scores"]
    assert not torch.allclose(before, during)
    assert torch.equal(model.explain(x)["scores"], before)


# ----- measures -----
def test_ssim_hand_computed_and_against_torchmetrics():
    a, b = torch.full((1, 9, 9), 0.2), torch.full((1, 9, 9), 0.6)
    c1 = 0.01**2
    # Constant maps: zero variances, so SSIM is the luminance term alone.
    assert math.isclose(float(ssim(a, b)), (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1), rel_tol=1e-6)
    g = torch.Generator().manual_seed(0)
    x, z = torch.rand(3, 16, 16, generator=g), torch.rand(3, 16, 16, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    # torchmetrics: an 11 x 11 window at sigma 1.5 over the reflect-padded maps, mean over the full image.
    ref = tm_ssim(x[:, None].double(), z[:, None].double(), sigma=1.5, data_range=1.0, reduction="none")
    pad = torch.nn.functional.pad
    ours = ssim(
        pad(x[:, None], (5, 5, 5, 5), mode="reflect")[:, 0],
        pad(z[:, None], (5, 5, 5, 5), mode="reflect")[:, 0],
        window=11,
        sigma=1.5,
    )
    assert torch.allclose(ours, ref, atol=1e-9)
    assert not torch.allclose(ssim(x, z, window=11), ref, atol=1e-3)  # the unpadded (valid) SSIM differs
    with pytest.raises(ValueError, match="window"):
        ssim(x, z, window=8)


def test_spearman_with_ties_by_hand():
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    b = torch.tensor([[1.0, 3.0, 2.0, 4.0]])
    # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4): covariance 4.5, variances 4.5 and 5
    assert math.isclose(float(spearman(a, b)), 4.5 / math.sqrt(4.5 * 5), rel_tol=1e-12)
    assert float(spearman(a, -a)) == pytest.approx(-1.0)
    assert float(spearman(a, torch.ones_like(a))) == 0.0


def test_relevance_mass_and_pointing_game_by_hand():
    maps = torch.tensor([[[3.0, -1.0], [1.0, 0.0]], [[0.0, 5.0], [1.0, -2.0]]])
    region = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    # map 0: positives 3 (inside) + 1 (outside) -> 0.75; map 1: positives 5 + 1, none inside -> 0
    assert torch.allclose(relevance_mass(maps, region), torch.tensor([0.75, 0.0], dtype=torch.float64))
    assert pointing_game(maps, region).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="one \\[H, W\\] region per map"):
        relevance_mass(maps, region[:, :1])


def test_deletion_and_insertion_on_a_pixel_counting_model():
    """Logit 0 = 8 * (number of bright pixels among the first four) : deleting those first drops p fast."""

    def forward(x):
        s = x.flatten(1)[:, :4].sum(1)
        return torch.stack([8 * s / 4, torch.zeros_like(s)], 1)

    x = torch.zeros(1, 1, 4, 4)
    x.view(-1)[:4] = 1.0
    good = torch.zeros(1, 4, 4)
    good.view(-1)[:4] = 1.0
    bad = -good
    y = torch.tensor([0])
    out_good = deletion_insertion(forward, x, good, y, steps=4)
    out_bad = deletion_insertion(forward, x, bad, y, steps=4)
    fr = out_good["fractions"]
    assert fr.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    # After deleting the top quarter (the four bright pixels), the logit is 0 on both classes: p = 0.5.
    assert out_good["deletion"][0, 1] == pytest.approx(0.5)
    assert float(auc(out_good["deletion"], fr)) < float(auc(out_bad["deletion"], fr))
    assert float(auc(out_good["insertion"], fr)) > float(auc(out_bad["insertion"], fr))


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    g = torch.Generator().manual_seed(0)
    small, large = torch.rand(20, generator=g), torch.rand(2000, generator=g)
    s, big = bootstrap(small, 500), bootstrap(large, 500)
    assert s["lo"] < s["mean"] < s["hi"] and big["lo"] < big["mean"] < big["hi"]
    assert big["hi"] - big["lo"] < s["hi"] - s["lo"]
    assert bootstrap(torch.ones(5), 100) == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 5}


# ----- the evaluation command -----
def test_attribution_command_end_to_end_on_the_synthetic_pair(synthetic_runs, tmp_path):
    from gencnp.evaluation.attributions.evaluate import attribution

    cfg = yaml.safe_load((ROOT / "configs/synthetic/attribution.yaml").read_text())
    from gencnp.data.modules import SyntheticDataModule

    out = tmp_path / "attr"
    r = attribution(
        generator=str(synthetic_runs["gencnp"]),
        bank=None,
        data=SyntheticDataModule(**cfg["data"]["init_args"]),
        out_dir=str(out),
        n=24,
        batch_size=12,
        ig_steps=4,
        sanity_n=6,
        deletion_steps=4,
        bootstrap_samples=50,
        grid_images=2,
        progress=False,
        threads=1,
    )
    methods = [m for m in ATTRIBUTION_METHODS if m != "pathway_gradient_class"]
    on_disk = json.loads((out / "attribution.json").read_text())
    for m in methods:
        for key in (
            f"relevance_mass/{m}",
            f"pointing/{m}",
            f"deletion_auc/{m}",
            f"insertion_auc/{m}",
            f"sanity_ssim/{m}/head",
            f"sanity_spearman/{m}/blocks.0",
        ):
            e = on_disk[key]
            assert e["lo"] <= e["mean"] <= e["hi"], key
    assert on_disk["settings"]["n"] == 24 and on_disk["sanity_layers"] == ["head", "blocks.2", "blocks.1", "blocks.0"]
    assert 0 <= r["relevance_mass/pathway_gradient_gencnp"]["mean"] <= 1
    assert "deletion_auc/pathway_gradient_gencnp-gradient" in on_disk["comparisons"]
    for fig in ("attribution_grid.png", "sanity_curves.png", "deletion_insertion.png"):
        assert (out / fig).read_bytes()[:4] == b"\x89PNG"
    md = (out / "attribution.md").read_text()
    assert "## Ground truth" in md and "cascading randomisation" in md and "| pathway_gradient_gencnp |" in md


def test_attribution_command_refuses_bad_input_before_writing(synthetic_runs, tmp_path):
    from gencnp.evaluation.attributions.evaluate import attribution

    out = tmp_path / "attr"
    with pytest.raises(KeyError, match="known methods"):
        attribution(generator=str(synthetic_runs["gencnp"]), bank=None, out_dir=str(out), methods=["lrp"])
    with pytest.raises(ValueError, match="must include 'pathway_gradient_gencnp'"):
        attribution(generator=str(synthetic_runs["gencnp"]), bank=None, out_dir=str(out), methods=["gradient"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        attribution(generator=str(tmp_path / "none.ckpt"), bank=None, out_dir=str(out))
    with pytest.raises(ValueError, match="sanity_n must be >= 0"):
        attribution(generator=str(synthetic_runs["gencnp"]), bank=None, out_dir=str(out), sanity_n=-1)
    assert not out.exists()


def test_attribution_configs_parse_and_the_synthetic_pipeline_lists_the_stage():
    from jsonargparse import ArgumentParser

    from gencnp.evaluation.attributions.evaluate import attribution

    for name in ("synthetic", "fashion_mnist"):
        parser = ArgumentParser()
        parser.add_function_arguments(attribution)
        cfg = parser.parse_path(str(ROOT / f"configs/{name}/attribution.yaml"))
        assert cfg.out_dir == f"runs/{name}/attribution" and cfg.generator == f"runs/{name}/gencnp/best.ckpt"
    stages = yaml.safe_load((ROOT / "configs/synthetic/pipeline.yaml").read_text())["stages"]
    st = next(s for s in stages if s["name"] == "attribution")
    assert st["config"] == "configs/synthetic/attribution.yaml" and st["command"] == "attribution"
    assert "runs/synthetic/attribution/attribution.json" in st["outputs"]
