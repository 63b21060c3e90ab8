import csv
from pathlib import Path

import pytest
import torch
from conftest import QUIET, ROOT, cli

from gencnp import GenCNP
from gencnp.targets.loading import channel_toy_batch, load_target, tensor_hash

# A GEN-CNP built without data: zero ablation, no null inputs, no class prior (they need the data's statistics).
NO_DATA = {"ablation": "zero", "losses": {"lambda_null": 0.0}, "generator": {"class_prior": 0.0}}


def no_data(**groups: dict) -> dict:
    """``NO_DATA`` with more grouped settings merged into its groups."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in NO_DATA.items()}
    for name, values in groups.items():
        out[name] = {**out.get(name, {}), **values}
    return out


def test_target_classifier_fast_dev_run(tmp_path):
    result = cli(
        "fit",
        "--config",
        str(ROOT / "configs/synthetic/target.yaml"),
        *QUIET,
        "--trainer.fast_dev_run",
        "2",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.callbacks.init_args.dirpath",
        str(tmp_path),
    )
    trainer, metrics = result.trainer, result.trainer.callback_metrics
    assert trainer.state.finished and trainer.global_step == 2  # two training batches, then validation
    assert [int(s["step"]) for s in trainer.optimizers[0].state.values()] == [2] * len(list(result.model.parameters()))
    assert torch.isfinite(metrics["train/loss_epoch"]) and 0 <= float(metrics["val/acc"]) <= 1


def test_timm_resnet18_target_through_the_cli(tmp_path):
    result = cli(
        "fit",
        "--config",
        str(ROOT / "configs/synthetic/target.yaml"),
        *QUIET,
        "--trainer.fast_dev_run",
        "1",
        "--model.init_args.arch",
        "resnet18",
        "--model.init_args.in_chans",
        "3",
        "--model.init_args.image_size",
        "32",
        "--data.init_args.in_chans",
        "3",
        "--data.init_args.image_size",
        "32",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.callbacks.init_args.dirpath",
        str(tmp_path),
    )
    net = next(m for m in result.model.modules() if type(m).__module__.startswith("timm."))  # inside gencnp's wrapper
    assert type(net).__name__ == "ResNet"
    assert net.conv1.in_channels == 3 and net.get_classifier().out_features == 4
    assert result.trainer.state.finished and result.trainer.global_step == 1
    assert torch.isfinite(result.trainer.callback_metrics["train/loss_epoch"])


def test_class_count_mismatch_fails_before_any_directory(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="num_classes=5 but the data has 4 classes"):
        cli(
            "fit",
            "--config",
            str(ROOT / "configs/synthetic/target.yaml"),
            *QUIET,
            "--model.init_args.num_classes",
            "5",
            "--trainer.logger.init_args.save_dir",
            str(out),
            "--trainer.callbacks.init_args.dirpath",
            str(out),
        )
    assert not out.exists()


def test_gencnp_fit_keeps_target_frozen_and_embeds_it(synthetic_runs):
    target = load_target("tiny_cnn", str(synthetic_runs["target"]), num_classes=4)
    ckpt = torch.load(synthetic_runs["gencnp"], map_location="cpu", weights_only=True)
    embedded = {k.removeprefix("target.model."): v for k, v in ckpt["state_dict"].items() if k.startswith("target.")}
    assert embedded.keys() == target.state_dict().keys()  # embed_target (default): self-contained checkpoints
    assert ckpt["gencnp"]["target_hash"] == tensor_hash(target)
    model = GenCNP.load_from_checkpoint(synthetic_runs["gencnp"])
    assert tensor_hash(model.target.model) == tensor_hash(target)  # parameters and BatchNorm statistics unchanged
    assert not model.target.model.training


def test_generator_checkpoint_for_another_target_is_refused(synthetic_runs, tmp_path):
    other = load_target("tiny_cnn", str(synthetic_runs["target"]), num_classes=4)
    with torch.no_grad():
        other.head.bias.add_(1.0)
    path = tmp_path / "other_target.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(ValueError, match="was trained for target 'tiny_cnn'.*point target_checkpoint at the original"):
        GenCNP.load_from_checkpoint(synthetic_runs["gencnp"], target_checkpoint=str(path))


def test_validation_logs_every_metric_key(synthetic_runs):
    logs = sorted(Path(synthetic_runs["dir"], "gencnp", "logs").glob("version_*/metrics.csv"))[-1]
    header = next(csv.reader(open(logs)))
    keys = [
        "agreement",
        "masked_accuracy",
        "mDC",
        "mIC",
        "kept_mean",
        "kept_std",
        "kept_class_std",
        "acIOU",
        "between_class_iou",
        "swap_forcing",
        "zero_forcing",
        "score",
        "kept/blocks.0",
        "loss_kd",
    ]
    assert all(f"val/{k}" in header for k in keys), [k for k in keys if f"val/{k}" not in header]
    assert all(f"train/loss_{t}" in header for t in ("kd", "sparsity", "swap", "cls", "con"))


def test_explain_returns_masks_kept_and_prediction(synthetic_runs):
    model = GenCNP.load_from_checkpoint(synthetic_runs["gencnp"]).eval()
    x = torch.randn(5, 1, 16, 16)
    out = model.explain(x)
    assert list(out["masks"]) == model.target.tap_names  # masks by tap name, in tap order
    assert [m.shape for m in out["masks"].values()] == [(5, 8), (5, 16), (5, 16)]
    assert out["pathway"].dtype == torch.bool and out["kept"].shape == (5,)
    assert torch.allclose(out["kept"], out["pathway"].float().mean(1))
    again = model.target(x, masks=[m.float() for m in out["masks"].values()])
    assert torch.equal(again.argmax(1), out["prediction"])
    by_name = model.target(x, masks={k: m.float() for k, m in out["masks"].items()})
    assert torch.equal(by_name, again)


def test_masks_get_gradients_through_the_frozen_target():
    model = GenCNP(
        target="tiny_cnn",
        target_checkpoint=None,
        num_classes=4,
        image_size=16,
        **no_data(generator={"d": 8}, controls={"swap_probes_per_class": 1}),
    )
    x = torch.randn(16, 1, 16, 16)
    loss = model.training_step((x, torch.randint(0, 4, (16,))), 0)
    loss.backward()
    grads = [p.grad for p in model.generator.parameters()]
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert all(p.grad is None for p in model.target.parameters())


@pytest.mark.slow
def test_toy_target_pathways_find_the_deciding_channel():
    """Class k is decided only by channel k of tap 'route'; the generator must keep exactly it there."""
    torch.manual_seed(0)
    k = 4
    model = GenCNP(
        target="channel_toy",
        target_checkpoint=None,
        num_classes=k,
        in_chans=k,
        image_size=4,
        **no_data(
            generator={"d": 16},
            losses={"lambda_swap": 1.0, "lambda_con": 0.0, "temperature": 4.0, "lambda_zero": 0.0},
            sparsity={
                "lambda_sp": 1.0,
                "sparsity_ramp_epochs": 0.0,
                "kappa": 0.9,
                "sparsity_per": "tap",
                "dependence_gate": None,
            },
            controls={"swap_probes_per_class": 1},
        ),
    )
    opt = torch.optim.Adam(model.generator.parameters(), lr=5e-3)
    for step in range(200):
        x, y = channel_toy_batch(64, k, size=4, seed=step)
        loss = model.training_step((x, y), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = channel_toy_batch(400, k, size=4, seed=10_000)
    out = model.explain(x)
    route = out["masks"]["route"].float()
    truth = torch.nn.functional.one_hot(y, k).float()
    iou = (route * truth).sum(1) / ((route + truth) > 0).float().sum(1)
    assert float(iou.mean()) >= 0.9, float(iou.mean())
    assert float((out["prediction"] == out["y_hat"]).float().mean()) >= 0.95


@pytest.mark.slow
def test_null_lookup_and_nested_losses_train_and_log(synthetic_runs, tmp_path):
    """The input-specificity losses run end to end: logged terms, null metrics per family, the lookup comparison."""
    cli(
        "fit",
        "--config",
        str(ROOT / "configs/synthetic/gencnp.yaml"),
        *QUIET,
        "--trainer.max_epochs",
        "1",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.callbacks.init_args.dirpath",
        str(tmp_path),
        "--model.init_args.target_checkpoint",
        str(synthetic_runs["target"]),
        "--model.init_args.controls.null_train",
        "[uniform, constant]",
        "--model.init_args.losses.lambda_null",
        "1",
        "--model.init_args.losses.lambda_lookup",
        "1",
        "--model.init_args.losses.lambda_nested",
        "1",
        "--model.init_args.losses.lambda_budget",
        "1",
        "--model.init_args.controls.null_families",
        "[gaussian, smooth]",
    )
    rows = list(csv.DictReader(open(sorted(tmp_path.glob("logs/version_*/metrics.csv"))[-1])))
    header = set(rows[0])
    assert {"train/loss_null", "train/loss_lookup", "train/loss_nested", "train/loss_budget"} <= header
    for fam in ("gaussian", "smooth"):
        assert {f"val/null_forcing/{fam}", f"val/null_chance/{fam}"} <= header
    assert "val/null_forcing/shuffle" not in header  # only the families asked for
    null_losses = [float(r["train/loss_null"]) for r in rows if r.get("train/loss_null")]
    assert null_losses and all(v >= 0 for v in null_losses) and max(null_losses) > 0
    val = [r for r in rows if r.get("val/lookup_agreement")]
    assert val and all(0 <= float(r["val/lookup_agreement"]) <= 1 for r in val)
    gain = float(val[-1]["val/lookup_gain"])
    assert gain == pytest.approx(float(val[-1]["val/agreement"]) - float(val[-1]["val/lookup_agreement"]))
    model = GenCNP.load_from_checkpoint(tmp_path / "best.ckpt")
    assert bool(model.input_ready) and bool(model.freq_seen.all())
    assert 0 <= float(model.class_freq.min()) and float(model.class_freq.max()) <= 1


def tiny_gencnp(**groups) -> GenCNP:
    """An untrained GenCNP on the tiny CNN (4 classes, 16 px), with the given setting groups."""
    return GenCNP(target="tiny_cnn", target_checkpoint=None, num_classes=4, image_size=16, **groups)


def test_budget_masks_keep_the_top_channels_and_pass_gradient_to_every_score():
    from types import SimpleNamespace

    from gencnp.pathways.baselines import global_percentile
    from gencnp.systems.training import budget_masks

    torch.manual_seed(0)
    scores = torch.rand(5, 16).requires_grad_()
    h = SimpleNamespace(budget_min=0.25, budget_max=0.25, budget_temperature=1.0)
    m = budget_masks(scores, h)
    assert torch.equal(m.detach(), global_percentile(scores.detach(), 0.25).float())
    assert (m.detach().sum(1) == 4).all()
    (m * torch.arange(1.0, 17.0)).sum().backward()  # a loss that wants every channel kept, high indices most
    assert (scores.grad > 0).all()  # dropped channels get gradient too: the ranking is trained
    with pytest.raises(ValueError, match="budget_min"):
        tiny_gencnp(losses={"budget_min": 0.5, "budget_max": 0.2})


def test_null_settings_are_checked():
    with pytest.raises(ValueError, match="null_train is empty"):
        tiny_gencnp(losses={"lambda_null": 1.0}, controls={"null_train": []})
    with pytest.raises(ValueError, match="unknown null families"):
        tiny_gencnp(controls={"null_families": ["pink"]})
    with pytest.raises(ValueError, match="nested_min"):
        tiny_gencnp(losses={"nested_min": 0.0})


def test_class_prior_shifts_score_logits_by_the_class_frequencies():
    torch.manual_seed(0)
    model = GenCNP(
        target="tiny_cnn",
        target_checkpoint=None,
        num_classes=4,
        image_size=16,
        ablation="zero",
        generator={"class_prior": 4.0},
    ).eval()
    x = torch.randn(3, 1, 16, 16)
    assert model.prior(torch.tensor([0, 1, 2])) is None  # no class frequencies learnt yet
    model.class_freq.copy_(torch.rand(model.class_freq.shape))
    model.freq_seen.fill_(True)
    logits, feats = model.target(x, record=True)
    y = logits.argmax(1)
    prior = model.prior(y)
    f = model.class_freq[y]
    assert torch.allclose(prior, 4.0 * (f - f.mean(1, keepdim=True)))
    plain = model.generator(feats)["scores"].double()
    shifted = model.explain(x)["scores"].double()
    assert torch.allclose(torch.logit(shifted), torch.logit(plain) + prior.double(), atol=1e-4)
