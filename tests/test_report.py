"""The evaluation report: paired bootstrap, configs, and an end-to-end run on the synthetic pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FASHION, ROOT
from jsonargparse import ArgumentParser

from gencnp import GenCNP, SyntheticDataModule
from gencnp.banks.bank import PathwayBank
from gencnp.evaluation.report import CI_KEYS, paired_bootstrap, report
from gencnp.io.checkpoint_io import seal
from gencnp.pathways.baselines import tap_counts, topk_per_tap
from gencnp.pathways.metrics import KEYS

NAMES = ["gencnp", "random", "neuron_mct", "neuron_intgrad", "dgr"]
FIGURES = ["agreement_vs_kept.png", "kept_hist.png", "bank_heatmap.png", "attribution_grid.png", "null_forcing.png"]
NULLS = ["gaussian", "shuffle", "smooth"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared CPU: spinning OpenMP workers only stall
    yield
    torch.set_num_threads(n)


# ----- paired bootstrap -----
def test_bootstrap_of_constant_differences_is_exact_and_columns_stay_paired():
    d = torch.tensor([[0.25, 1.0, 1.0]]).repeat(50, 1)
    d[:, 2] = torch.linspace(-1, 1, 50)  # a varying column
    d2 = torch.cat([d, d[:, 2:3]], dim=1)  # the same column twice: identical draws give identical intervals
    mean, lo, hi = paired_bootstrap(d2, n_boot=300, seed=0)
    assert mean[:2].tolist() == [0.25, 1.0] and lo[:2].tolist() == [0.25, 1.0] and hi[:2].tolist() == [0.25, 1.0]
    assert lo[2] == lo[3] and hi[2] == hi[3] and lo[2] < 0 < hi[2]


def test_bootstrap_interval_width_and_nan_handling():
    g = torch.Generator().manual_seed(1)
    x = 0.3 + torch.randn(2000, 1, generator=g, dtype=torch.float64)
    with_nan = x.clone()
    with_nan[::2] = float("nan")  # half the images undefined (e.g. no probe of another class)
    mean, lo, hi = paired_bootstrap(torch.cat([x, with_nan], 1), n_boot=1000, seed=2)
    assert float(mean[0]) == pytest.approx(float(x.mean()))
    assert float(mean[1]) == pytest.approx(float(x[1::2].mean()))
    width = 2 * 1.96 * float(x.std()) / 2000**0.5
    assert float(hi[0] - lo[0]) == pytest.approx(width, rel=0.15)
    assert float(hi[1] - lo[1]) == pytest.approx(width * 2**0.5, rel=0.15)  # half the samples
    assert lo[0] < 0.3 < hi[0]
    with pytest.raises(ValueError, match=r"diffs must be \[N, M\] with N >= 1"):
        paired_bootstrap(torch.zeros(0, 2))


# ----- configs -----
@pytest.mark.parametrize("name", ["synthetic", "fashion_mnist"])
def test_evaluate_configs_parse_and_name_report_arguments(name):
    if name == "fashion_mnist" and not FASHION.exists():
        pytest.skip("Fashion-MNIST is not installed (dataset-fashion-mnist)")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(report)
    parser.add_argument("--config", action="config")
    cfg = parser.instantiate(parser.parse_args(["--config", str(ROOT / f"configs/{name}/evaluate.yaml")]))
    assert cfg.generator == f"runs/{name}/gencnp/best.ckpt" and cfg.bank == f"runs/{name}/bank.safetensors"
    assert cfg.out_dir == f"runs/{name}/eval" and cfg.split == "test"
    assert type(cfg.data).__name__ == ("SyntheticDataModule" if name == "synthetic" else "FashionMNISTDataModule")
    if name == "fashion_mnist":
        assert cfg.subset_n >= 1000 and cfg.bootstrap_samples >= 1000


def test_missing_inputs_fail_with_the_command_that_makes_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; train one with python train.py fit"):
        report(generator=str(tmp_path / "none.ckpt"), out_dir=str(tmp_path))
    gen = tmp_path / "g.ckpt"
    gen.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="export it with python train.py predict"):
        report(generator=str(gen), bank=str(tmp_path / "none.safetensors"), out_dir=str(tmp_path))


# ----- end to end -----
@pytest.fixture(scope="module")
def sparse_run(synthetic_runs, tmp_path_factory) -> dict[str, Path]:
    """The trained synthetic generator with per-channel biases spread around 0.5, so pathways are sparse and
    vary per tap and sample; plus a bank of its train pathways (tau 0.5) built with the PathwayBank API."""
    out = tmp_path_factory.mktemp("report")
    ckpt = torch.load(synthetic_runs["gencnp"], map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for key in [k for k in ckpt["state_dict"] if k.startswith("generator.rpd.heads.")]:
        t = ckpt["state_dict"][key]
        ckpt["state_dict"][key] = 1.5 * torch.randn(t.shape, generator=g) if key.endswith("bias") else 4 * t
    seal(ckpt)  # deliberately edited weights: record the integrity hashes of the edited checkpoint
    gen = out / "sparse.ckpt"
    torch.save(ckpt, gen)
    model = GenCNP.load_from_checkpoint(gen)
    dm = SyntheticDataModule(num_classes=4, image_size=16, n_train=1200, n_test=400, val_size=200)
    bank = PathwayBank.for_target(model.target, dm.class_names)
    for x, _, _ in dm.loader(dm.split("train"), batch_size=500):
        ex = model.explain(x)
        bank.update(ex["pathway"], ex["y_hat"])
    bank.tau = 0.5
    bank.save(out / "bank.safetensors")
    return {"generator": gen, "bank": out / "bank.safetensors", "dir": out}


@pytest.mark.slow
def test_report_end_to_end_on_the_synthetic_config(sparse_run, capsys):
    from jsonargparse import CLI

    out = sparse_run["dir"] / "eval"
    limit, subset = 160, 48
    CLI(
        report,
        as_positional=False,
        args=[
            "--config",
            str(ROOT / "configs/synthetic/evaluate.yaml"),
            "--generator",
            str(sparse_run["generator"]),
            "--bank",
            str(sparse_run["bank"]),
            "--out_dir",
            str(out),
            "--limit",
            str(limit),
            "--subset_n",
            str(subset),
            "--grad_batch_size",
            "48",
            "--bootstrap_samples",
            "100",
            "--dgr_steps",
            "10",
        ],
    )
    assert "GEN-CNP report (160 test images" in capsys.readouterr().out
    for f in ["report.json", "report.md", *FIGURES]:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))
    r = json.loads((out / "report.json").read_text())
    assert {"provenance", "methods", "methods_native", "transfer", "subset", "curves", "bootstrap"} <= set(r)
    assert set(r["seconds_by_phase"]) == {
        "setup",
        "gencnp",
        "whole_split",
        "subset",
        "same_class_transfer",
        "summaries_bootstrap",
        "figures",
    }
    cost = r["cost"]  # the pass budget: every phase that ran the target counted
    assert set(cost["phases"]) == set(r["seconds_by_phase"])
    assert cost["phases"]["gencnp"]["parts_per_image"]["gencnp explain"] == 2.0  # recording + masked pass
    assert cost["passes_per_image_all"] > 10 and cost["passes_per_image_subset"] > cost["passes_per_image_all"]
    assert "## Cost" in (out / "report.md").read_text()
    prov = r["provenance"]
    for key in (
        "target",
        "target_hash",
        "generator",
        "bank",
        "dataset",
        "split",
        "class_source",
        "taps",
        "tau",
        "seed",
        "git_commit",
        "versions",
    ):
        assert key in prov, key
    assert prov["split"] == "test" and prov["tau"] == 0.5 and list(prov["taps"]) == ["blocks.0", "blocks.1", "blocks.2"]
    taps = list(prov["taps"])

    def check_entry(e: dict, n: int, compared: bool) -> None:
        assert e["n"] == n and isinstance(e["images"], str) and e["seconds_per_image"] > 0
        for key in [
            *KEYS,
            *(f"kept/{t}" for t in taps),
            *(f"null_{w}/{f}" for f in NULLS for w in ("forcing", "chance")),
        ]:
            assert key in e, key
        if compared:
            assert set(e["vs_gencnp"]) == set(CI_KEYS) | {f"null_forcing/{f}" for f in NULLS}
            for c in e["vs_gencnp"].values():
                assert c["ci95"][0] <= c["ci95"][1] and c["winner"] in ("gencnp", "method", "tie")

    assert list(r["methods"]) == [*NAMES, "class_lookup"] and list(r["methods_native"]) == NAMES
    for section in ("methods", "methods_native"):
        for m in r[section]:
            check_entry(r[section][m], subset if m in ("neuron_intgrad", "dgr") else limit, m != "gencnp")
    check_entry(r["transfer"], limit, True)
    assert r["subset"]["n"] == subset and list(r["subset"]["methods"]) == [*NAMES, "class_lookup"]
    for m in NAMES:
        check_entry(r["subset"]["methods"][m], subset, m != "gencnp")
    # Matched sparsity: every baseline keeps exactly GEN-CNP's per-sample and per-tap counts, on the same images.
    gen, gen_sub = r["methods"]["gencnp"], r["subset"]["methods"]["gencnp"]
    assert 0.2 < gen["kept_mean"] < 0.8 and gen["kept_std"] > 0  # the sparsified generator is not trivial
    for m in [*NAMES[1:], "class_lookup"]:
        ref = gen_sub if m in ("neuron_intgrad", "dgr") else gen
        for t in taps:
            assert r["methods"][m][f"kept/{t}"] == pytest.approx(ref[f"kept/{t}"], abs=1e-12), (m, t)
        assert r["methods"][m]["vs_gencnp"]["kept_mean"]["diff"] == pytest.approx(0.0, abs=1e-12)
    # Native settings: one global percentile at GEN-CNP's mean kept fraction (rounded to whole channels).
    d = 40
    k = round(gen["kept_mean"] * d) / d
    assert r["methods_native"]["neuron_mct"]["kept_mean"] == pytest.approx(k)
    assert r["methods_native"]["neuron_mct"]["kept_std"] == pytest.approx(0.0, abs=1e-12)
    assert r["methods_native"]["random"]["kept_mean"] == pytest.approx(k)
    # The numbers are the pipeline's, not placeholders: recompute GEN-CNP and transfer agreement directly.
    model = GenCNP.load_from_checkpoint(sparse_run["generator"]).eval()
    bank = PathwayBank.load(sparse_run["bank"], target=model.target)
    dm = SyntheticDataModule(num_classes=4, image_size=16, n_train=1200, n_test=400, val_size=200)
    x = torch.stack([dm.split("test")[i][0] for i in range(limit)])
    ex = model.explain(x)
    assert gen["agreement"] == pytest.approx(float((ex["prediction"] == ex["y_hat"]).double().mean()))
    transfer_agree = (
        (bank.apply(model.target, x, ex["y_hat"], fill=model.fills()).argmax(1) == ex["y_hat"]).double().mean()
    )
    assert r["transfer"]["agreement"] == pytest.approx(float(transfer_agree))
    assert gen["kept_mean"] == pytest.approx(float(ex["kept"].double().mean()))
    # The class lookup: the bank's f_c ranking of the predicted class at GEN-CNP's own per-tap counts.
    chans = model.target.tap_channels
    lookup = topk_per_tap(bank.frequencies()[ex["y_hat"]], tap_counts(ex["pathway"], chans), chans)
    lk_logits = model.target(x, masks=list(torch.split(lookup.float(), chans, dim=1)), fill=model.fills())
    assert r["methods"]["class_lookup"]["agreement"] == pytest.approx(
        float((lk_logits.argmax(1) == ex["y_hat"]).double().mean())
    )
    # Null forcing: recomputed from the model's own null inputs and masked forward.
    for fam in NULLS:
        z = model.null_inputs(fam, x)
        forced = model.target(z, masks=model.generator.split(ex["pathway"].float()), fill=model.fills()).argmax(1)
        assert gen[f"null_forcing/{fam}"] == pytest.approx(float((forced == ex["y_hat"]).double().mean())), fam
        assert gen[f"null_chance/{fam}"] == pytest.approx(
            float((model.target(z).argmax(1) == ex["y_hat"]).double().mean())
        )
    # Same-class transfer: every method on the subset, with its own agreement on the same images.
    sc = r["same_class_transfer"]
    assert "gencnp/matched" in sc and "class_lookup/matched" in sc and "dgr/native" in sc
    assert all(0 <= e["same_class_transfer"] <= 1 and 0 < e["n"] <= subset for e in sc.values())
    md = (out / "report.md").read_text()
    for text in (
        "## Provenance",
        "## Matched sparsity",
        "## Native settings",
        "## Transfer",
        "Where GEN-CNP loses",
        "## Common subset",
        "against the class lookup",
        "## Same-class transfer",
        "## Null inputs",
        *NAMES,
        *FIGURES,
    ):
        assert text in md, text


@pytest.mark.slow
def test_baselines_on_subset_moves_the_cheap_baselines_off_the_whole_split(sparse_run):
    """``baselines_on: subset``: random and NeuronMCT (and the lookup frontier) run on the seeded subset only, so the
    whole split costs GEN-CNP, transfer and the class lookup; GEN-CNP's own numbers do not move."""
    common = dict(
        generator=str(sparse_run["generator"]),
        bank=str(sparse_run["bank"]),
        data=SyntheticDataModule(num_classes=4, image_size=16, n_train=1200, n_test=400, val_size=200),
        limit=96,
        subset_n=24,
        bootstrap_samples=20,
        dgr_steps=2,
        intgrad_steps=2,
        progress=False,
    )
    full = report(out_dir=str(sparse_run["dir"] / "all"), **common)
    lean = report(out_dir=str(sparse_run["dir"] / "lean"), baselines_on="subset", **common)
    timed = ("seconds_per_image",)
    for a, b in [
        (lean["methods"]["gencnp"], full["methods"]["gencnp"]),
        (lean["methods"]["class_lookup"], full["methods"]["class_lookup"]),
        (lean["transfer"], full["transfer"]),
    ]:
        assert {k: v for k, v in a.items() if k not in timed} == {k: v for k, v in b.items() if k not in timed}
    assert lean["methods"]["random"]["n"] == 24 and full["methods"]["random"]["n"] == 96
    assert lean["lookup_frontier"][0]["n"] == 24 and full["lookup_frontier"][0]["n"] == 96
    assert lean["cost"]["passes_per_image_all"] < full["cost"]["passes_per_image_all"] - 20
    assert "neuron_mct scores" in lean["cost"]["phases"]["subset"]["parts_per_image"]
    with pytest.raises(ValueError, match="baselines_on"):
        report(out_dir=str(sparse_run["dir"] / "bad"), baselines_on="half", **common)
