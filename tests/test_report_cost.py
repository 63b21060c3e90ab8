"""The report's pass budget: control inputs made once per batch, masked passes started at the first tap, chance
logits once per image, and the ``cost`` section counting what ran."""

from __future__ import annotations

import pytest
import torch

from gencnp import GenCNP, SyntheticDataModule
from gencnp.evaluation.report.evaluator import Evaluator
from gencnp.evaluation.report.results import Results


@pytest.fixture(scope="module")
def model(synthetic_runs):
    m = GenCNP.load_from_checkpoint(synthetic_runs["gencnp"], map_location="cpu").eval()
    dm = SyntheticDataModule(num_classes=4, image_size=16, n_train=1200, n_test=400, val_size=200)
    m.attach_probe_data(dm.split("train"), dm.class_names)
    x, labels = next(iter(dm.loader(dm.split("test"), batch_size=40)))[:2]
    return m, x, labels


@pytest.mark.parametrize("chunk", [7, 256])
def test_evaluator_controls_equal_the_model_reference(model, chunk):
    m, x, labels = model
    ev = Evaluator(m, torch.device("cpu"), seed=0, progress=True, t_start=0.0, chunk=chunk)
    ex = m.explain(x)
    b = ev.batch(torch.arange(len(x)), x, labels, ex["logits"], ex["y_hat"])
    assert b.firsts is not None  # the synthetic target can start at its first tap
    ref = m.controls(x, ex, necessity=True, inputs=m.control_inputs(x, ex["y_hat"]))
    got = ev.controls(b, ex["pathway"])
    for key in ("swap_logits", "zero_logits", "necessity_logits"):
        assert torch.allclose(got[key], ref[key], atol=1e-5), key
    for fam in ref["null_logits"]:
        assert torch.allclose(got["null_logits"][fam], ref["null_logits"][fam], atol=1e-5), fam
        assert torch.allclose(got["null_chance_logits"][fam], ref["null_chance_logits"][fam], atol=1e-5), fam
    masked = ev.masked_forward(x, ex["pathway"], b.first(0))
    assert torch.allclose(masked, ex["masked_logits"], atol=1e-5)
    ev.close()


def test_chance_is_computed_once_per_image_and_passes_are_counted(model):
    m, x, labels = model
    ev = Evaluator(m, torch.device("cpu"), seed=0, progress=True, t_start=0.0)
    ex = m.explain(x)
    pos = torch.arange(len(x))
    ev.batch(pos, x, labels, ex["logits"], ex["y_hat"])
    first = dict(ev.passes["setup"])
    n_null = len(m.null_eval)
    assert first["null chance (once per image)"] == n_null * len(x)
    assert first["control inputs to the first tap"] == (2 + n_null) * len(x) + 1  # x, partners, nulls; zero once
    b = ev.batch(pos, x, labels, ex["logits"], ex["y_hat"])  # a later pass over the same images
    assert ev.passes["setup"]["null chance (once per image)"] == n_null * len(x)  # reused, not recomputed
    res = Results("probe", "test", "40 images")
    ev.measure(res, b, ex["pathway"], 0.0)
    # one masked pass of x, then swap, zero, the nulls and the complement in one stack
    assert ev.passes["setup"]["probe masked"] == len(x)
    assert ev.passes["setup"]["probe controls"] == (3 + n_null) * len(x)
    ev.lap("gencnp")
    assert "gencnp" in ev.passes and ev.passes["gencnp"]["probe masked"] == len(x)
    ev.close()


def test_model_controls_from_the_first_tap_equal_the_full_passes(model):
    m, x, _ = model
    ex = m.explain(x)
    inputs = m.control_inputs(x, ex["y_hat"])
    firsts = m.control_firsts(x, inputs)
    assert firsts is not None and firsts.shape[0] == (3 + len(inputs["nulls"])) * len(x)
    for necessity in (False, True):
        full = m.controls(x, ex, necessity=necessity, inputs=inputs)
        fast = m.controls(x, ex, necessity=necessity, inputs=inputs, firsts=firsts)
        for key in ("swap_logits", "zero_logits", *(["necessity_logits"] if necessity else [])):
            assert torch.allclose(fast[key], full[key], atol=1e-5), key
