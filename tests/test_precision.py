"""bf16-mixed and channels_last for the stages that run the target: they run on CPU autocast, the target really runs in
bfloat16, and the results agree with float32."""

import lightning as L
import pytest
import torch

from gencnp import GenCNP, SyntheticDataModule, TargetClassifier


def trainer(precision: str, **kw) -> L.Trainer:
    return L.Trainer(
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        **kw,
    )


def first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.slow
def test_bf16_mixed_and_channels_last_fit_and_test_agree_with_float32():
    data = SyntheticDataModule(num_classes=4, image_size=16, n_train=300, n_test=96, val_size=50, batch_size=32)
    torch.manual_seed(0)
    target = TargetClassifier(arch="tiny_cnn", num_classes=4, image_size=16, channels_last=True)
    trainer("bf16-mixed", max_steps=20, limit_val_batches=0).fit(target, data)  # target training under bf16
    assert first_conv(target.model).weight.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    model = GenCNP(
        target="tiny_cnn",
        target_checkpoint=None,
        num_classes=4,
        image_size=16,
        generator={"d": 8},
        controls={"swap_probes_per_class": 2},
    )
    model.target.model.load_state_dict(target.model.state_dict())
    model.target._hash = None
    trainer("bf16-mixed", max_steps=10, limit_val_batches=0).fit(model, data)
    seen = []
    handle = first_conv(model.target.model).register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        seen.clear()
        results[precision] = trainer(precision).test(model, data, verbose=False)[0]
        assert (torch.bfloat16 in seen) == (precision == "bf16-mixed")
    handle.remove()
    fp32, bf16 = results["32-true"], results["bf16-mixed"]
    for key in ("test/agreement", "test/kept_mean", "test/swap_forcing", "test/zero_forcing"):
        assert abs(fp32[key] - bf16[key]) <= 0.05, (key, fp32[key], bf16[key])
    # the same explanations under autocast, channels_last on: masked logits within bfloat16 rounding
    x = torch.stack([data.split("test")[i][0] for i in range(32)])
    ref = model.explain(x)
    fast = GenCNP(
        target="tiny_cnn",
        target_checkpoint=None,
        num_classes=4,
        image_size=16,
        generator={"d": 8},
        controls={"swap_probes_per_class": 2},
        channels_last=True,
    )
    fast.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fast.explain(x)
    assert got["masked_logits"].dtype == torch.float32
    assert float((got["pathway"] == ref["pathway"]).float().mean()) > 0.95
    assert torch.allclose(got["logits"], ref["logits"], atol=0.1, rtol=0.05)


def test_report_refuses_an_unknown_precision_before_writing(tmp_path):
    from gencnp.evaluation.report import report

    with pytest.raises(ValueError, match=r"precision must be one of \('32-true', 'bf16-mixed'\)"):
        report(generator=str(tmp_path / "missing.ckpt"), out_dir=str(tmp_path / "eval"), precision="16-mixed")
    assert not (tmp_path / "eval").exists()
