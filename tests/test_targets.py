import pytest
import torch

from gencnp.io.checkpoint_io import seal
from gencnp.targets.loading import FrozenTarget, create_target, list_targets, load_weights, register_target, tensor_hash


def test_registry_lists_and_creates():
    assert {"fmnist_cnn", "tiny_cnn", "small_cnn", "channel_toy"} <= set(list_targets())
    m = create_target("fmnist_cnn", num_classes=10, in_chans=1)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_architecture_suggests_close_matches():
    with pytest.raises(KeyError, match="unknown target architecture 'fmnst_cnn'.*Close matches: fmnist_cnn"):
        create_target("fmnst_cnn")


def test_register_target_is_used_by_create():
    @register_target("test_linear_target")
    def _make(num_classes=3, in_chans=1, pretrained=False):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_chans * 16, num_classes))

    assert create_target("test_linear_target", num_classes=3)(torch.zeros(1, 1, 4, 4)).shape == (1, 3)
    with pytest.raises(KeyError, match="already registered"):
        register_target("test_linear_target")(lambda **kw: None)


def test_frozen_target_invariants():
    model = create_target("tiny_cnn", num_classes=4)
    frozen = FrozenTarget(model, input_shape=(1, 16, 16))
    parent = torch.nn.ModuleDict({"target": frozen, "head": torch.nn.Linear(4, 2)})
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    h0 = frozen.tensor_hash()
    parent.train()
    assert not frozen.model.training and all(not m.training for m in frozen.model.modules())
    assert all(not p.requires_grad for p in frozen.parameters())
    opt = torch.optim.SGD([p for p in parent.parameters() if p.requires_grad], lr=1.0)
    x = torch.randn(8, 1, 16, 16)
    loss = parent["head"](frozen(x)).sum()
    loss.backward()
    opt.step()
    after = frozen.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics
    assert tensor_hash(frozen.model) == h0


def test_candidate_taps_and_channels():
    frozen = FrozenTarget(create_target("fmnist_cnn"), input_shape=(1, 28, 28))
    assert frozen.tap_names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert frozen.tap_channels == [32, 64, 64, 128] and frozen.num_channels == 288
    cands = {n: (c, r) for n, c, r in frozen.candidate_taps()}
    assert cands["blocks.0"] == (32, 2) and cands["blocks.3"] == (128, 4)


def test_unknown_tap_lists_available():
    with pytest.raises(
        KeyError, match="tap 'blocks.9' not found.*available taps: blocks.0, blocks.1, blocks.2, blocks.3"
    ):
        FrozenTarget(create_target("fmnist_cnn"), taps=["blocks.9"], input_shape=(1, 28, 28))


def test_wrong_input_shape_is_refused():
    frozen = FrozenTarget(create_target("fmnist_cnn"), input_shape=(1, 28, 28))
    with pytest.raises(ValueError, match=r"expects images of shape \[B, 1, 28, 28\], got \[2, 3, 28, 28\]"):
        frozen(torch.zeros(2, 3, 28, 28))


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(create_target("small_cnn").state_dict(), path)
    with pytest.raises(ValueError, match="does not fit target 'fmnist_cnn'.*shape mismatches"):
        load_weights(create_target("fmnist_cnn"), path, "fmnist_cnn")
    path2 = tmp_path / "tiny.pt"
    torch.save(create_target("tiny_cnn").state_dict(), path2)
    with pytest.raises(ValueError, match="unexpected keys|missing keys"):
        load_weights(create_target("fmnist_cnn"), path2, "fmnist_cnn")


def test_checkpoint_class_count_mismatch(tmp_path):
    path = tmp_path / "k5.pt"
    torch.save(create_target("fmnist_cnn", num_classes=5).state_dict(), path)
    with pytest.raises(ValueError, match="num_classes differs"):
        load_weights(create_target("fmnist_cnn", num_classes=10), path)


def test_checkpoint_formats_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = create_target("tiny_cnn")
    state = src.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save(seal({"state_dict": {f"model.{k}": v for k, v in state.items()}}), tmp_path / "w.ckpt")
    for name in ("w.safetensors", "w.ckpt"):
        dst = create_target("tiny_cnn")
        load_weights(dst, tmp_path / name)
        assert tensor_hash(dst) == tensor_hash(src)


def test_crafted_pickle_is_refused_not_executed(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(ValueError, match="could not be loaded safely"):
        load_weights(create_target("tiny_cnn"), path)
    assert not marker.exists()


def test_timm_resnet18_at_32px():
    frozen = FrozenTarget(create_target("resnet18", num_classes=4, in_chans=3), input_shape=(3, 32, 32))
    assert frozen.tap_names == ["model.layer1", "model.layer2", "model.layer3", "model.layer4"]
    assert frozen.tap_channels == [64, 128, 256, 512]


def test_torchvision_reused_relu_is_refused():
    tv = create_target("torchvision:resnet18", num_classes=4, in_chans=3)
    with pytest.raises(ValueError, match="ran 2 times in one forward.*'model.layer1.0'"):
        FrozenTarget(tv, taps=["model.layer1.0.relu", "model.layer2"], input_shape=(3, 32, 32))
