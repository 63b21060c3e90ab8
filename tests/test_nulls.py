"""Null inputs, null-forcing metrics, the class-lookup loss and the kept budget of the tau rule."""

import math

import pytest
import torch
import torch.nn.functional as F

from gencnp.banks.bank import choose_tau
from gencnp.evaluation.report import same_class_partners
from gencnp.pathways import losses as LS
from gencnp.pathways import nulls as NL
from gencnp.pathways.metrics import PathwayMetrics, per_sample


def _images(n=6, c=1, s=16, seed=0):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", NL.FAMILIES)
def test_null_inputs_do_not_depend_on_the_batch(family):
    x = _images(6, 2)
    mean, std = torch.tensor([0.1, -0.2]), torch.tensor([1.5, 0.5])
    whole = NL.null_inputs(family, x, mean, std)
    parts = torch.cat([NL.null_inputs(family, x[i : i + 1], mean, std) for i in range(len(x))])
    assert whole.shape == x.shape and whole.dtype == x.dtype
    assert torch.equal(whole, parts)
    assert not torch.equal(NL.null_inputs(family, x, mean, std, salt=3), whole)  # the salt changes the draw
    assert not torch.equal(whole[0], whole[1])  # paired images get different null inputs


@pytest.mark.parametrize("family", ["gaussian", "uniform", "smooth"])
def test_noise_families_have_the_data_statistics(family):
    x = _images(64, 2, 28)
    mean, std = torch.tensor([0.3, -1.0]), torch.tensor([2.0, 0.5])
    z = NL.null_inputs(family, x, mean, std).transpose(0, 1).reshape(2, -1).double()
    assert torch.allclose(z.mean(1), mean.double(), atol=0.08)
    assert torch.allclose(z.std(1), std.double(), rtol=0.08)


def test_shuffle_permutes_each_image_and_constant_is_flat():
    x = _images(4, 3)
    sh = NL.null_inputs("shuffle", x, torch.zeros(3), torch.ones(3))
    for i in range(4):
        for c in range(3):
            assert torch.equal(torch.sort(sh[i, c].flatten()).values, torch.sort(x[i, c].flatten()).values)
        assert not torch.equal(sh[i], x[i])
    # one permutation for every colour channel: the channel stack of a pixel moves together
    stack = sh.flatten(2).transpose(1, 2)  # [B, HW, C]
    src = {tuple(v.tolist()) for v in x[0].flatten(1).T}
    assert all(tuple(v.tolist()) in src for v in stack[0])
    const = NL.null_inputs("constant", x, torch.zeros(3), torch.ones(3))
    assert torch.equal(const.amax((2, 3)), const.amin((2, 3)))
    assert bool((const.abs() <= 2.0 + 1e-6).all())


def test_smooth_noise_is_low_frequency_and_gaussian_is_not():
    x = _images(32, 1, 28)

    def neighbour_corr(z):
        a, b = z[..., :, :-1].flatten(), z[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert neighbour_corr(NL.null_inputs("smooth", x, torch.zeros(1), torch.ones(1))) > 0.7
    assert abs(neighbour_corr(NL.null_inputs("gaussian", x, torch.zeros(1), torch.ones(1)))) < 0.1


def test_hash_uniform_is_uniform_and_families_are_checked():
    u = NL.hash_uniform(torch.arange(200), 500)
    assert bool(((u > 0) & (u < 1)).all())
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    with pytest.raises(ValueError, match="unknown null families"):
        NL.check_families(["gaussian", "pink"], "null_train")
    with pytest.raises(TypeError, match="list of family names"):
        NL.check_families("gaussian", "null_train")
    with pytest.raises(ValueError, match="twice"):
        NL.check_families(["shuffle", "shuffle"], "null_families")


def test_null_forcing_and_chance_in_metrics():
    k, b, d = 3, 4, 5
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0], [3.0, 0, 0]])
    y_hat = logits.argmax(1)
    null = {"gaussian": torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 0, 5.0], [0, 5.0, 0]])}
    chance = {"gaussian": torch.tensor([[0, 5.0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 5.0, 0]])}
    v = per_sample(logits, logits, y_hat, torch.ones(b, d), null_logits=null, null_chance_logits=chance)
    assert v["null_forced/gaussian"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert v["null_chance/gaussian"].tolist() == [0.0, 1.0, 0.0, 0.0]
    m = PathwayMetrics(["a", "b"], [2, 3], null_families=["gaussian"])
    m.update(logits, logits, y_hat, torch.ones(b, d, dtype=torch.bool), null_logits=null, null_chance_logits=chance)
    out = m.compute()
    assert out["null_forcing/gaussian"] == 0.5 and out["null_chance/gaussian"] == 0.25
    with pytest.raises(ValueError, match="null_logits"):
        m.update(logits, logits, y_hat, torch.ones(b, d, dtype=torch.bool))
    assert k == logits.shape[1]


def test_lookup_loss_matches_a_loop_reference():
    g = torch.Generator().manual_seed(1)
    logits, masked, lookup = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    y = logits.argmax(1)
    margin = 0.05
    ref = 0.0
    for i in range(6):
        p = F.softmax(logits[i], 0)
        kl_m = float((p * (p.log() - F.log_softmax(masked[i], 0))).sum())
        kl_l = float((p * (p.log() - F.log_softmax(lookup[i], 0))).sum())
        ref += max(0.0, kl_m - kl_l + margin)
    got = LS.lookup(logits, masked, lookup, margin)
    assert math.isclose(float(got), ref / 6, rel_tol=1e-10)
    masked.requires_grad_(True)
    LS.lookup(logits, masked, lookup, margin).backward()
    assert masked.grad is not None and float(masked.grad.abs().sum()) > 0
    assert y.shape == (6,)


def test_tau_rule_respects_the_kept_budget():
    taus = [0.2, 0.4, 0.6]
    agree, swap, zero, kept = [0.99, 0.98, 0.97], [0.1, 0.1, 0.1], [0.0, 0.0, 0.0], [0.40, 0.36, 0.30]
    tau, rule, _ = choose_tau(taus, agree, swap, zero, kept, 0.95, 1.0, 0.5, 0.0)
    assert tau == 0.2  # highest agreement without a budget
    tau, rule, _ = choose_tau(taus, agree, swap, zero, kept, 0.95, 1.0, 0.5, 0.0, max_kept=0.35)
    assert tau == 0.6 and "kept <= 0.35" in rule
    tau, rule, _ = choose_tau(taus, agree, swap, zero, kept, 0.99, 1.0, 0.5, 0.0, max_kept=0.35)
    assert tau == 0.6 and "no tau reached" in rule  # within budget, agreement short: best score within budget
    with pytest.raises(ValueError, match="max_kept"):
        choose_tau(taus, agree, swap, zero, kept, max_kept=1.5)


def test_same_class_partners():
    classes = torch.tensor([0, 1, 0, 2, 0, 1])
    p = same_class_partners(classes)
    assert p.tolist() == [2, 5, 4, -1, 0, 1]


def test_lookup_frontier_on_the_synthetic_generator(synthetic_runs, tmp_path):
    from gencnp import GenCNP, SyntheticDataModule
    from gencnp.evaluation.lookup import lookup_frontier

    dm = SyntheticDataModule(num_classes=4, image_size=16, n_train=1200, n_test=400, val_size=200)
    out = tmp_path / "lookup.json"
    r = lookup_frontier(
        str(synthetic_runs["gencnp"]), data=dm, split="val", fractions=[1.0, 0.5], limit=120, out=str(out)
    )
    assert out.is_file() and r["n"] == 120 and [row["fraction"] for row in r["rows"]] == [1.0, 0.5]
    model = GenCNP.load_from_checkpoint(synthetic_runs["gencnp"])
    x = torch.stack([dm.split("val")[i][0] for i in range(120)])
    ex = model.explain(x)
    full = r["rows"][0]
    assert full["gencnp_agreement"] == pytest.approx(float((ex["prediction"] == ex["y_hat"]).double().mean()))
    assert full["kept_mean"] == pytest.approx(float(ex["kept"].double().mean()))
    assert r["rows"][1]["kept_mean"] <= full["kept_mean"]
    assert full["gain"] == pytest.approx(full["gencnp_agreement"] - full["lookup_agreement"])
    assert full["ci95"][0] <= full["gain"] <= full["ci95"][1]
    # fixed kept budgets: GEN-CNP's row is explain(x, kept=b) through the target
    rb = lookup_frontier(str(synthetic_runs["gencnp"]), data=dm, budgets=[0.25, 0.1], limit=120, bootstrap_samples=50)
    assert [row["budget"] for row in rb["rows"]] == [0.1, 0.25] and all(row["kind"] == "budget" for row in rb["rows"])
    exb = model.explain(x, kept=0.25)
    assert (exb["pathway"].sum(1) == round(0.25 * exb["pathway"].shape[1])).all()
    top = torch.topk(exb["scores"], int(exb["pathway"].sum(1)[0]), dim=1).indices
    assert exb["pathway"].gather(1, top).all()  # the highest scores over all taps
    assert rb["rows"][1]["gencnp_agreement"] == pytest.approx(
        float((exb["prediction"] == exb["y_hat"]).double().mean())
    )
    assert rb["rows"][1]["kept_mean"] == pytest.approx(float(exb["kept"].double().mean()))
    with pytest.raises(ValueError, match="kept must lie"):
        model.explain(x, kept=0.0)
    with pytest.raises(ValueError, match="budgets"):
        lookup_frontier(str(synthetic_runs["gencnp"]), data=dm, budgets=[0.0])
    with pytest.raises(ValueError, match="fractions"):
        lookup_frontier(str(synthetic_runs["gencnp"]), data=dm, fractions=[1.5])
    with pytest.raises(ValueError, match="split"):
        lookup_frontier(str(synthetic_runs["gencnp"]), data=dm, split="train")
