"""A GEN-CNP checkpoint written by the release before grouped settings (flat hyper-parameters such as ``lambda_sp``
and ``lr``, swap probes stored as images) loads, with its settings moved into their groups.

``tests/data/gencnp_0_2_flat.ckpt`` was written by that release (commit 667043a) with
``fit_synthetic(out, epochs=1)`` of its ``tests/conftest.py``: the synthetic target (embedded) and generator."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ROOT

from gencnp import GenCNP, SyntheticDataModule
from gencnp.systems.options import grouped_key

OLD = ROOT / "tests" / "data" / "gencnp_0_2_flat.ckpt"


@pytest.fixture(scope="module")
def old():
    return torch.load(OLD, map_location="cpu", weights_only=True)


def load_old() -> GenCNP:
    with pytest.warns(FutureWarning, match="flat settings"):
        return GenCNP.load_from_checkpoint(OLD, map_location="cpu")


def test_old_flat_checkpoint_loads_with_its_settings_in_groups(old):
    model = load_old()
    hp = old["hyper_parameters"]
    assert "lambda_sp" in hp and "probes" in old["state_dict"]  # the file really is in the old form
    for name in ("lambda_sp", "lambda_swap", "kappa", "d", "temperature", "swap_probes_per_class", "w_kept"):
        group, leaf = grouped_key(name).split(".")
        assert getattr(model.settings, name) == hp[name] and model.hparams[group][leaf] == hp[name], name
        assert name not in model.hparams  # no flat copy left behind
    assert model.hparams["optimizer"]["init_args"]["lr"] == hp["lr"]
    opt = model.make_optimizer()
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == hp["lr"]
    for key, value in old["state_dict"].items():
        if key.startswith("generator."):
            assert torch.equal(model.state_dict()[key], value), key


def test_old_probe_images_are_found_again_and_the_model_explains_and_saves(old, tmp_path):
    model = load_old()
    # the data module as the old run's config built it (configs/synthetic/gencnp.yaml)
    dm = SyntheticDataModule(num_classes=4, image_size=16, n_train=1200, n_test=400, val_size=200, batch_size=64)
    model.attach_probe_data(dm.split("train"), dm.class_names)
    old_cls = old["state_dict"]["probe_class"]
    assert torch.equal(model.probe_class[old_cls >= 0], old_cls[old_cls >= 0])  # every stored probe found again
    assert bool((model.probe_index[old_cls >= 0] >= 0).all())
    x, _ = next(iter(dm.loader(dm.split("test"), batch_size=32)))[:2]
    ex = model.explain(x)
    assert ex["pathway"].shape[0] == 32 and 0 < float(ex["kept"].mean()) <= 1
    images, valid = model.partner_images(x, ex["y_hat"])
    assert images.shape == x.shape and bool(valid.any())
    # saved again, it is in the grouped form: no warning when loaded
    path = tmp_path / "new.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert "probes" not in state["state_dict"] and "lambda_sp" not in state["hyper_parameters"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        again = GenCNP(**{k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")})
    again.load_state_dict(state["state_dict"])
    assert torch.equal(again.explain(x)["pathway"], ex["pathway"])
