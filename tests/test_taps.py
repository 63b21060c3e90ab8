import pytest
import torch

from gencnp.targets.loading import FrozenTarget, create_target
from gencnp.targets.taps import FeatureTaps, MaskedForward, apply_mask, split_shallow_deep


def _model():
    torch.manual_seed(0)
    return create_target("tiny_cnn").eval()


def test_all_ones_mask_reproduces_logits_exactly():
    frozen = FrozenTarget(_model(), input_shape=(1, 16, 16))
    x = torch.randn(5, 1, 16, 16)
    ones = [torch.ones(5, c) for c in frozen.tap_channels]
    assert torch.equal(frozen(x), frozen(x, masks=ones))


def test_hooks_removed_after_success_and_exception():
    model = _model()
    x = torch.randn(2, 1, 16, 16)
    with FeatureTaps(model, ["blocks.0", "blocks.2"]) as ft:
        model(x)
    assert [f.shape[1] for f in ft.features] == [8, 16]
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    masks = [torch.zeros(2, 8), torch.ones(2, 16)]
    with pytest.raises(RuntimeError):
        with MaskedForward(model, ["blocks.0", "blocks.2"], masks):
            model(torch.randn(2, 3, 16, 16))  # wrong channels: the forward raises
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_masking_zeroes_and_mean_fills_channels():
    out = torch.randn(2, 3, 4, 4)
    m = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    z = apply_mask(out, m)
    assert torch.equal(z[0, 1], torch.zeros(4, 4)) and torch.equal(z[0, 0], out[0, 0])
    fill = torch.tensor([5.0, 6.0, 7.0])
    f = apply_mask(out, m, fill)
    assert torch.all(f[0, 1] == 6.0) and torch.all(f[1, 0] == 5.0) and torch.equal(f[1, 2], out[1, 2])
    tokens = torch.randn(2, 5, 3)
    assert torch.equal(apply_mask(tokens, m)[:, :, 1], tokens[:, :, 1] * m[:, 1:2])


def test_masked_channels_change_the_output_and_gradients_reach_masks():
    frozen = FrozenTarget(_model(), input_shape=(1, 16, 16))
    x = torch.randn(4, 1, 16, 16)
    masks = [torch.ones(4, c, requires_grad=True) for c in frozen.tap_channels]
    logits = frozen(x, masks=masks)
    logits.logsumexp(1).sum().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masks)


def test_shallow_deep_split():
    assert split_shallow_deep(["a", "b", "c"]) == (["a", "b"], ["c"])
    assert split_shallow_deep(["a", "b", "c", "d"], 1) == (["a"], ["b", "c", "d"])
    with pytest.raises(ValueError, match="must be the first taps"):
        split_shallow_deep(["a", "b", "c"], ["b"])
