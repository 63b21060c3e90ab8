import csv
from pathlib import Path

import pytest
import torch
from conftest import QUIET, ROOT, cli

from gencnp import GenCNP
from gencnp.targets import channel_toy_batch, load_target, tensor_hash


def test_target_classifier_fast_dev_run(tmp_path):
    cli("fit", "--config", str(ROOT / "configs/synthetic/target.yaml"), *QUIET, "--trainer.fast_dev_run", "2",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.callbacks.init_args.dirpath", str(tmp_path))  # fmt: skip


def test_timm_resnet18_target_through_the_cli(tmp_path):
    cli("fit", "--config", str(ROOT / "configs/synthetic/target.yaml"), *QUIET, "--trainer.fast_dev_run", "1",
        "--model.init_args.arch", "resnet18", "--model.init_args.in_chans", "3", "--model.init_args.image_size", "32",
        "--data.init_args.in_chans", "3", "--data.init_args.image_size", "32",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.callbacks.init_args.dirpath", str(tmp_path))  # fmt: skip


def test_class_count_mismatch_fails_before_any_directory(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="num_classes=5 but the data has 4 classes"):
        cli("fit", "--config", str(ROOT / "configs/synthetic/target.yaml"), *QUIET, "--model.init_args.num_classes", "5",
            "--trainer.logger.init_args.save_dir", str(out), "--trainer.callbacks.init_args.dirpath", str(out))  # fmt: skip
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
    keys = ["agreement", "masked_accuracy", "mDC", "mIC", "kept_mean", "kept_std", "kept_class_std", "acIOU",
            "between_class_iou", "swap_forcing", "zero_forcing", "score", "kept/blocks.0", "loss_kd"]  # fmt: skip
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
    model = GenCNP(target="tiny_cnn", target_checkpoint=None, num_classes=4, image_size=16, d=8, swap_probes_per_class=1)
    x = torch.randn(16, 1, 16, 16)
    loss = model.training_step((x, torch.randint(0, 4, (16,))), 0)
    loss.backward()
    grads = [p.grad for p in model.generator.parameters()]
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert all(p.grad is None for p in model.target.parameters())


def test_toy_target_pathways_find_the_deciding_channel():
    """Class k is decided only by channel k of tap 'route'; the generator must keep exactly it there."""
    torch.manual_seed(0)
    k = 4
    model = GenCNP(target="channel_toy", target_checkpoint=None, num_classes=k, in_chans=k, image_size=4, d=16,
                   lambda_sp=1.0, lambda_swap=1.0, lambda_con=0.0, sparsity_ramp_epochs=0.0, swap_probes_per_class=1)
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
