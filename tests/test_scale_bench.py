"""The scale benchmark runs in a tiny configuration (nothing timed here), and GEN-CNP's state does not grow with the
image size."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import scale
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

TINY = ["--arch", "tiny_cnn", "--in_chans", "1", "--batch", "4", "--steps", "1", "--report_images", "8"]


def test_model_state_does_not_grow_with_image_size():
    rows = {}
    for size in (16, 48):
        a = scale.parse_args([*TINY, "--image_size", str(size)])
        a.arch_name = "tiny_cnn"
        rows[size] = scale.stage_model(a, 50)
    assert rows[16]["buffers_mb"] == rows[48]["buffers_mb"] and rows[16]["D"] == rows[48]["D"]
    assert abs(rows[16]["ckpt_minus_target_mb"] - rows[48]["ckpt_minus_target_mb"]) < 0.01
    assert rows[16]["largest_buffer"] in ("prototypes [50, 40]", "class_freq [50, 40]")


@pytest.mark.slow
def test_scale_benchmark_prints_its_table(capsys, tmp_path):
    out = tmp_path / "rows.json"
    rows = scale.main([*TINY, "--image_size", "16", "--k", "4", "--stages", "model", "gencnp", "--json", str(out)])
    printed = capsys.readouterr().out
    assert len(rows) == 1 and rows[0]["k"] == 4 and out.is_file()
    for key in ("D", "ckpt_minus_target_mb", "explain_over_fwd", "step_over_floor", "rss_gencnp_gb"):
        assert rows[0][key] > 0
    assert "| tiny_cnn | 4 | 40 |" in printed and "step/floor" in printed
