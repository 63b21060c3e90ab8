"""The benchmark script runs end to end in a tiny configuration, so it cannot rot. Nothing is timed here."""

from __future__ import annotations

import sys
import warnings

import torch
from conftest import ROOT


def test_benchmark_runs_in_a_tiny_configuration(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "results.md"
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        result = bench.main(
            [
                "--tiny",
                "--config",
                str(ROOT / "configs/synthetic/gencnp.yaml"),
                "--data",
                "random",
                "--target_checkpoint",
                "none",
                "--threads",
                "1",
                "--iou_pathways",
                "300",
                "--out",
                str(out),
            ]
        )
    torch.set_num_threads(threads)
    for key in (
        "t_fwd",
        "t_floor",
        "explain",
        "train_default",
        "train_kd_sparsity",
        "train_fraction_0.25",
        "train_fraction_0.125",
        "neuron_mct",
        "neuron_intgrad",
        "dgr",
        "bank_1x_ips",
        "bank_4x_ips",
        "aciou_s",
    ):
        assert result[key] > 0, key
    for key in ("explain_ratio", "train_default_ratio", "train_fraction_0.25_ratio", "dgr_ratio", "neuron_mct_ratio"):
        assert result[key] > 0, key
    # The bank keeps O(K D) counts: the same state after 4x the samples, by the allocator and by reachable bytes.
    assert result["bank_4x_retained"] == result["bank_1x_retained"] > 0
    assert result["bank_4x_reachable"] == result["bank_1x_reachable"] > 0
    assert result["bank_state_growth"] == 1.0
    text = out.read_text()
    assert "python benchmarks/bench.py --tiny" in text and "torch " in text and "UTC" in text
    for label in (
        "t_fwd",
        "t_floor",
        "GEN-CNP explanation",
        "GEN-CNP training step",
        "neuron_mct",
        "neuron_intgrad",
        "dgr",
        "bank export",
        "allocator retained",
        "acIOU",
    ):
        assert label in text, label
    # the JSON beside the markdown keeps the named ratios scripts read
    import json

    doc = json.loads(out.with_suffix(".json").read_text())
    for name in ("explain_over_fwd", "step_over_floor", "dgr_over_gencnp", "mct_over_gencnp", "bank_state_4x_over_1x"):
        assert name in doc["ratios"], name
    assert doc["ratios"]["step_over_floor"] == result["train_default"] / result["t_floor"]
    assert doc["ratios"]["bank_state_4x_over_1x"] == 1.0 and doc["values"]["t_fwd"] == result["t_fwd"]


def test_floor_runs_the_steps_control_passes():
    """The floor's masked pass holds every part of the step's (x, swap, zero, null): 4 B images on the default recipe."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from gencnp import GenCNP

    model = GenCNP(
        target="tiny_cnn",
        target_checkpoint=None,
        num_classes=4,
        image_size=16,
        ablation="zero",
        generator={"d": 8, "class_prior": 0.0},
        controls={"null_train": ["uniform"]},
    )
    model.compute_fill([(torch.rand(8, 1, 16, 16), None)])
    seen = []
    handle = model.target.model.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    bench.floor_step(model, torch.randn(6, 1, 16, 16))
    handle.remove()
    assert seen[0] == 6 and seen[-1] == 4 * 6  # the recording pass, then x, swap, zero and null in one pass
