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
