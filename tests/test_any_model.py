"""Any classifier as users bring it: class_path targets, specs in checkpoints, self-contained GEN-CNP checkpoints,
data that fits the model, weak targets and short runs."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
import yaml
from conftest import FASHION, QUIET, ROOT, cli

from gencnp import GenCNP, TargetClassifier
from gencnp.data.modules import FashionMNISTDataModule, convert_images
from gencnp.systems.gencnp import check_probes, partner_classes
from gencnp.targets.loading import create_target, load_target, read_target_spec

MYNET = {"class_path": "my_models.mynet.MyNet", "init_args": {"width": 8}}


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A working folder holding the user's own module (a copy of examples/mynet.py), as a new user has it."""
    (tmp_path / "my_models").mkdir()
    shutil.copy(ROOT / "examples" / "mynet.py", tmp_path / "my_models" / "mynet.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    for name in [m for m in sys.modules if m == "my_models" or m.startswith("my_models.")]:
        del sys.modules[name]


def _gencnp_config(path, target_checkpoint, out, **init_args):
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 3,
            "inference_mode": False,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(out),
                        "filename": "best",
                        "monitor": "val/score",
                        "mode": "max",
                        "save_last": True,
                        "enable_version_counter": False,
                    },
                }
            ],
        },
        "model": {
            "class_path": "gencnp.GenCNP",
            "init_args": {
                "target_checkpoint": str(target_checkpoint),
                "generator": {"d": 8},
                "controls": {"swap_probes_per_class": 2},
                **init_args,
            },
        },
        "data": {
            "class_path": "gencnp.SyntheticDataModule",
            "init_args": {
                "num_classes": 4,
                "image_size": 16,
                "n_train": 1200,
                "n_test": 100,
                "val_size": 200,
                "batch_size": 64,
            },
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_own_module_by_class_path_through_the_cli_and_a_self_contained_generator(user_folder, one_thread):
    tdir, gdir = user_folder / "runs" / "target", user_folder / "runs" / "gencnp"
    cli(
        "fit",
        "--config",
        str(ROOT / "configs/synthetic/target.yaml"),
        *QUIET,
        "--trainer.max_epochs",
        "3",
        "--model.init_args.arch",
        yaml.safe_dump(MYNET, default_flow_style=True).strip(),
        "--trainer.logger",
        "false",
        "--trainer.callbacks.init_args.dirpath",
        str(tdir),
    )
    assert str(user_folder) in sys.path  # the working directory became importable
    spec = read_target_spec(tdir / "best.ckpt")
    assert spec == {"arch": MYNET, "num_classes": 4, "in_chans": 1, "image_size": 16, "kwargs": {}}

    # Only target_checkpoint (relative to the working folder): arch, classes, input shape come from its spec.
    # max_steps 3 is shorter than an epoch (15 batches): the run still validates and writes best.ckpt.
    config = _gencnp_config(
        user_folder / "g.yaml", "runs/target/best.ckpt", gdir, taps=["stem", "block1", "block2", "block3"]
    )
    cli("fit", "--config", str(config))
    ckpt = torch.load(gdir / "best.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 and "val/score" in str(ckpt["callbacks"])
    hp = ckpt["hyper_parameters"]
    assert (hp["target"], hp["num_classes"], hp["in_chans"], hp["image_size"]) == (MYNET, 4, 1, 16)

    x = torch.randn(6, 1, 16, 16)
    here = GenCNP.load_from_checkpoint(gdir / "best.ckpt").eval()
    ex = here.explain(x)
    assert list(ex["masks"]) == ["stem", "block1", "block2", "block3"]

    # From another folder the relative target_checkpoint does not exist: the embedded target weights are used.
    elsewhere = user_folder / "elsewhere"
    elsewhere.mkdir()
    shutil.move(str(tdir / "best.ckpt"), str(elsewhere / "moved_target.ckpt"))
    torch.manual_seed(123)  # the rebuilt target starts from other random weights; the checkpoint's must replace them
    there = GenCNP.load_from_checkpoint(gdir / "best.ckpt").eval()
    assert there.target.tensor_hash() == here.target.tensor_hash()
    again = there.explain(x)
    assert torch.equal(again["pathway"], ex["pathway"]) and torch.equal(again["masked_logits"], ex["masked_logits"])

    # A conflicting explicit value is an error naming both; the hash check against a given target file stays.
    with pytest.raises(
        ValueError, match=r"num_classes is 5 but target_checkpoint .*moved_target.ckpt' was trained with num_classes 4"
    ):
        GenCNP(target_checkpoint=str(elsewhere / "moved_target.ckpt"), num_classes=5, taps=["stem", "block1"])
    with pytest.raises(ValueError, match="target is 'tiny_cnn' but target_checkpoint"):
        GenCNP(target="tiny_cnn", target_checkpoint=str(elsewhere / "moved_target.ckpt"))
    other = load_target(MYNET, None, num_classes=4)
    torch.save(other.state_dict(), elsewhere / "other.pt")
    with pytest.raises(ValueError, match="was trained for target"):
        GenCNP.load_from_checkpoint(gdir / "best.ckpt", target_checkpoint=str(elsewhere / "other.pt"))


def test_generator_without_embedded_target_needs_the_target_file(tmp_path, one_thread):
    model = GenCNP(
        target="tiny_cnn", target_checkpoint=None, num_classes=4, image_size=16, embed_target=False, generator={"d": 8}
    )
    assert not any(k.startswith("target.") for k in model.state_dict())
    assert any(
        k.startswith("target.")
        for k in GenCNP(
            target="tiny_cnn", target_checkpoint=None, num_classes=4, image_size=16, generator={"d": 8}
        ).state_dict()
    )
    # A checkpoint without target weights (embed_target false, or written before embedding) still fits a default model.
    from gencnp.pipeline.preflight import check_checkpoint

    lean = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(lean)
    torch.save(lean, tmp_path / "lean.ckpt")
    same = GenCNP(target="tiny_cnn", target_checkpoint=None, num_classes=4, image_size=16, generator={"d": 8})
    same.target.model.load_state_dict(model.target.model.state_dict())
    same.target._hash = None
    check_checkpoint(None, same, str(tmp_path / "lean.ckpt"))
    recorded = dict(model.hparams.target_spec)
    pending = GenCNP(target_checkpoint=str(tmp_path / "gone.ckpt"), target_spec=recorded, generator={"d": 8})
    with pytest.raises(FileNotFoundError, match="gone.ckpt' does not exist"):
        pending.explain(torch.zeros(1, 1, 16, 16))
    with pytest.raises(FileNotFoundError, match="gone.ckpt' does not exist"):
        pending.load_state_dict(model.state_dict())
    with pytest.raises(FileNotFoundError, match="gone.ckpt' does not exist"):
        GenCNP(target_checkpoint=str(tmp_path / "gone.ckpt"))  # no recorded spec: fails at once


def test_class_path_errors_name_the_fix():
    with pytest.raises(ValueError, match="cannot be imported.*sys.path"):
        create_target({"class_path": "no_such_module_xyz.Net"})
    with pytest.raises(TypeError, match="not an nn.Module subclass"):
        create_target({"class_path": "collections.OrderedDict"})
    with pytest.raises(ValueError, match="init_args num_classes=3 but the model's num_classes is 10"):
        create_target(
            {"class_path": "gencnp.targets.loading.ConvBlockNet", "init_args": {"num_classes": 3}}, num_classes=10
        )
    net = create_target("gencnp.targets.loading.ConvBlockNet", num_classes=3, in_chans=2)  # a dotted string works too
    assert net(torch.zeros(1, 2, 8, 8)).shape == (1, 3)


def test_model_that_shrinks_the_input_to_nothing_is_refused_with_the_smallest_size():
    with pytest.raises(ValueError, match=r"convnext_atto.*\(1, 28, 28\).*smallest square side that works is 32"):
        TargetClassifier(arch="convnext_atto", num_classes=4, in_chans=1, image_size=28)
    TargetClassifier(arch="convnext_atto", num_classes=4, in_chans=1, image_size=32)


def test_torchvision_defaults_to_rgb_and_loads_plain_state_dicts(tmp_path):
    import torchvision

    model = create_target("torchvision:resnet18", num_classes=4).eval()  # in_chans defaults to 3 for torchvision
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    plain = torchvision.models.resnet18(num_classes=4).eval()
    torch.save(plain.state_dict(), tmp_path / "plain.pt")  # keys "conv1.weight", no "model." prefix
    loaded = load_target("torchvision:resnet18", str(tmp_path / "plain.pt"), num_classes=4, in_chans=3).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), plain(x))
    with pytest.raises(ValueError, match="data.init_args.in_chans: 3"):
        create_target("torchvision:resnet18", num_classes=4, in_chans=1)


def test_images_convert_channels_and_resize():
    grey = torch.rand(2, 1, 28, 28)
    rgb = convert_images(grey, in_chans=3, image_size=56)
    assert rgb.shape == (2, 3, 56, 56) and torch.equal(rgb[:, 0], rgb[:, 2])
    assert torch.allclose(convert_images(rgb, in_chans=1), rgb[:, :1], atol=1e-6)  # luminance of equal channels
    assert torch.allclose(convert_images(grey, image_size=14).mean(), grey.mean(), atol=1e-2)


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_as_rgb_at_another_size():
    dm = FashionMNISTDataModule(in_chans=3, image_size=40, batch_size=256, val_size=1000)
    assert dm.input_shape == (3, 40, 40)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (256, 3, 40, 40) and torch.equal(x[:, 0], x[:, 1])
    assert abs(float(x.mean())) < 0.1 and 0.8 < float(x.std()) < 1.2  # normalised as the grey images are
    with pytest.raises(ValueError, match="in_chans must be 1 .* or 3"):
        FashionMNISTDataModule(in_chans=2)


def test_swap_partners_skip_classes_without_probes():
    h = torch.arange(40)
    y = h % 5
    every = partner_classes(h, y, torch.ones(5, dtype=torch.bool))
    assert torch.equal(every, (y + 1 + h % 4) % 5)  # unchanged when every class has probes
    some = partner_classes(h, y, torch.tensor([True, False, True, True, False]))
    assert not torch.isin(some, torch.tensor([1, 4])).any() and not (some == y).any()
    alone = partner_classes(h, torch.zeros(40, dtype=torch.long), torch.tensor([True, False, False, False, False]))
    assert torch.equal(alone, torch.zeros(40, dtype=torch.long))  # no other class: marked invalid by the caller


def test_weak_target_is_refused_before_training(tmp_path):
    check_probes(torch.tensor([0, 0, 1, -1]), 2)  # every class has a probe: fine
    with pytest.warns(UserWarning, match=r"classes 2 \(c\) have no swap probes"):
        check_probes(torch.tensor([0, 1, -1, -1]), 3, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"classes 1 \(b\), 2 \(c\) have none.*train the target longer"):
        check_probes(torch.tensor([0, 0, -1, -1, -1, -1]), 3, ["a", "b", "c"])

    import lightning as L

    from gencnp import SyntheticDataModule

    model = GenCNP(
        target="tiny_cnn",
        target_checkpoint=None,
        num_classes=4,
        image_size=16,
        generator={"d": 8},
        controls={"swap_probes_per_class": 2},
    )
    with torch.no_grad():
        model.target.model.head.bias.copy_(torch.tensor([100.0, 0, 0, 0]))  # predicts class 0 whatever the input
    data = SyntheticDataModule(num_classes=4, image_size=16, n_train=300, n_test=50, val_size=50)
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="at least two classes"):
        trainer.fit(model, data)
    assert trainer.global_step == 0


@pytest.mark.slow
def test_python_api_block_runs(tmp_path, monkeypatch, one_thread):
    text = (ROOT / "docs" / "getting-started.md").read_text()
    section = text[text.index("## Python API") :]
    code = section[section.index("```python") + len("```python") : section.index("```", section.index("```python") + 9)]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/getting-started.md#python-api", "exec"), scope)
    model, ex, x, bank = scope["model"], scope["ex"], scope["x"], scope["bank"]
    assert list(ex["masks"]) == model.target.tap_names
    assert scope["logits"].shape == (len(x), 4) and set(scope["kept"]) == set(model.target.tap_names)
    assert model.hparams.num_classes == 4 and model.hparams.image_size == 16  # read from target.ckpt
    assert torch.equal(scope["logits"], bank.apply(model.target, x, fill=model.fills(), tau=0.5))
    model.hparams.ablation = "mean"  # the fill then comes from the model's dataset-mean activations
    model.compute_fill(scope["data"].train_dataloader(), batches=2)
    sparse = type(bank).for_target(model)
    sparse.update(torch.rand(ex["pathway"].shape, generator=torch.Generator().manual_seed(0)) > 0.5, ex["y_hat"])
    own = sparse.apply(model, x, tau=0.5)
    assert torch.equal(own, sparse.apply(model.target, x, fill=model.fills(), tau=0.5))
    assert not torch.equal(own, sparse.apply(model, x, fill=False, tau=0.5))  # zeros instead of the mean fill


def test_auto_taps_for_own_torchvision_and_timm_models(one_thread):
    from gencnp.targets.taps import discover_taps, list_taps, resolve_taps

    own = create_target("examples.mynet.MyNet", num_classes=4, in_chans=1)
    assert resolve_taps(own, "auto", (1, 28, 28)) == ["stem", "block1", "block2", "block3"]
    assert resolve_taps(own, "auto:0,-1", (1, 28, 28)) == ["stem", "block3"]
    with pytest.raises(ValueError, match="positions in the auto list"):
        resolve_taps(own, "auto:7", (1, 28, 28))
    mobile = create_target("torchvision:mobilenet_v3_small", num_classes=4)
    taps = discover_taps(mobile, (3, 64, 64))
    assert taps == ["model.features.1", "model.features.3", "model.features.8", "model.features.12"]  # stage outputs
    # timm: every feature_info level (a ViT's blocks.0 included), only a reduction-2 stem left out.
    vit = create_target("vit_tiny_patch16_224", num_classes=4, in_chans=1, img_size=16, patch_size=4, depth=3)
    assert vit.default_taps == ["model.blocks.0", "model.blocks.1", "model.blocks.2"]
    assert create_target("resnet18", num_classes=4).default_taps == [f"model.layer{i}" for i in range(1, 5)]
    text = list_taps("examples.mynet.MyNet", num_classes=4, in_chans=1, image_size=28)
    assert "* block3" in text and "picks 4: stem, block1, block2, block3" in text


def test_token_taps_mask_per_embedding_channel_on_every_token(one_thread):
    """A torchvision ViT given by class path: auto taps are its encoder blocks, masks act per embedding channel."""
    spec = {
        "class_path": "torchvision.models.VisionTransformer",
        "init_args": {
            "image_size": 16,
            "patch_size": 8,
            "num_layers": 3,
            "num_heads": 2,
            "hidden_dim": 16,
            "mlp_dim": 32,
        },
    }
    model = GenCNP(
        target=spec,
        target_checkpoint=None,
        num_classes=4,
        in_chans=3,
        image_size=16,
        ablation="zero",
        generator={"d": 8},
    )
    names = model.target.tap_names
    assert names == [f"encoder.layers.encoder_layer_{i}" for i in range(3)] and model.target.tap_channels == [16] * 3
    x = torch.randn(3, 3, 16, 16)
    mask = torch.ones(3, 16)
    mask[:, 5] = 0
    _, feats = model.target(x, masks={names[1]: mask}, record=True)
    assert feats[1].shape == (3, 5, 16)  # class token + 4 patches
    assert torch.all(feats[1][:, :, 5] == 0) and feats[1][:, :, 4].abs().sum() > 0  # every token, that channel only
    assert list(model.explain(x)["masks"]) == names
