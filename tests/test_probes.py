"""Swap probes as training-split indices: no images in the model's state, the same swap partners as the old image
buffer, old checkpoints (with a ``probes`` image buffer) still load."""

import pytest
import torch

from gencnp import GenCNP, SyntheticDataModule
from gencnp.systems import probes as PR


def tiny_model(size: int = 16, p: int = 2) -> GenCNP:
    torch.manual_seed(0)
    return GenCNP(
        target="tiny_cnn",
        target_checkpoint=None,
        num_classes=4,
        image_size=size,
        generator={"d": 8},
        controls={"swap_probes_per_class": p},
    )


def train_split(size: int = 16):
    return SyntheticDataModule(num_classes=4, image_size=size, n_train=300, n_test=50, val_size=50).split("train")


def reference_probes(dataset, target, k, p):
    """The old ``build_probes``: classify all ``max(200K, 2000)`` candidates, then take each class's first ``p``."""
    order = PR.candidate_order(len(dataset), k)
    xs = torch.stack([dataset[i][0] for i in order])
    ys = torch.as_tensor([int(dataset[i][1]) for i in order])
    preds = torch.cat([target(xs[i : i + 512]).argmax(1) for i in range(0, len(xs), 512)])
    index, cls = torch.full((k * p,), -1), torch.full((k * p,), -1)
    for c in range(k):
        hits = torch.nonzero((ys == c) & (preds == c))[:p, 0]
        index[c * p : c * p + len(hits)] = torch.as_tensor(order)[hits]
        cls[c * p : c * p + len(hits)] = c
    return index, cls


def test_state_dict_holds_indices_whatever_the_image_size():
    sizes = {}
    for size in (16, 64):
        state = tiny_model(size).state_dict()
        assert "probes" not in state
        assert state["probe_index"].shape == (8,) and state["probe_index"].dtype == torch.long
        sizes[size] = {k: v.numel() for k, v in state.items()}
    assert sizes[16] == sizes[64]  # no tensor of the model's state grows with the image size


def test_select_probes_stops_early_and_equals_the_full_scan():
    data, model = train_split(), tiny_model()
    with torch.no_grad():  # a target that gets most images right: class decided by the label-correlated pattern
        ref = reference_probes(data, model.target, 4, 2)
        calls = []

        def counting(x):
            calls.append(len(x))
            return model.target(x)

        got = PR.select_probes(data, counting, 4, 2, chunk=16)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # An oracle classifier fills every class quickly: the search stops after a few chunks.
    labels = {data[i][0].numpy().tobytes(): int(data[i][1]) for i in range(len(data))}
    calls.clear()

    def oracle(x):
        calls.append(len(x))
        return torch.nn.functional.one_hot(torch.tensor([labels[r.numpy().tobytes()] for r in x]), 4).float()

    index, cls = PR.select_probes(data, oracle, 4, 2, chunk=16)
    order = PR.candidate_order(len(data), 4)
    first = {c: [i for i in order if int(data[i][1]) == c][:2] for c in range(4)}
    assert index.tolist() == [i for c in range(4) for i in first[c]] and cls.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert 0 < sum(calls) < len(order)


def test_partner_images_are_read_from_the_data_by_index():
    data, model = train_split(), tiny_model()
    model.attach_probe_data(data)
    filled = model.probe_class >= 0
    assert int(filled.sum()) >= 2
    x = torch.stack([data[i][0] for i in range(12)])
    y_hat = model.target(x).argmax(1)
    images, valid = model.partner_images(x, y_hat)
    assert images.shape == x.shape
    k, p = 4, 2
    h = PR.pixel_hash(x)
    for i in torch.nonzero(valid)[:, 0].tolist():  # every valid partner is the dataset image its slot points to
        match = [
            s
            for s in range(k * p)
            if model.probe_index[s] >= 0 and torch.equal(images[i], data[int(model.probe_index[s])][0])
        ]
        assert match and all(int(model.probe_class[s]) != int(y_hat[i]) for s in match)
    assert int(h.min()) >= 0


def test_large_probe_sets_are_read_per_batch(monkeypatch):
    data, model = train_split(), tiny_model()
    model.attach_probe_data(data)
    x = torch.stack([data[i][0] for i in range(10)])
    y_hat = model.target(x).argmax(1)
    cached = model.partner_images(x, y_hat)
    monkeypatch.setattr(PR, "CACHE_BYTES", 0)
    model.attach_probe_data(data)
    streamed = model.partner_images(x, y_hat)
    assert model._probe_source.cached is None
    assert torch.equal(cached[0], streamed[0]) and torch.equal(cached[1], streamed[1])


def test_controls_without_data_say_how_to_attach_it():
    data, model = train_split(), tiny_model()
    model.attach_probe_data(data)
    fresh = tiny_model()
    fresh.load_state_dict(model.state_dict())
    x = torch.stack([data[i][0] for i in range(4)])
    with pytest.raises(RuntimeError, match=r"attach the data it was trained on.*attach_probe_data"):
        fresh.partner_images(x, fresh.target(x).argmax(1))
    fresh.attach_probe_data(data)  # indices recorded: nothing rebuilt, same partners
    assert torch.equal(fresh.probe_index, model.probe_index)
    y_hat = model.target(x).argmax(1)
    assert torch.equal(fresh.partner_images(x, y_hat)[0], model.partner_images(x, y_hat)[0])


def old_format_state(model: GenCNP, data) -> dict:
    """A state dict as gencnp wrote it before this change: a ``probes [K*p, C, H, W]`` image buffer, no indices."""
    index, cls = PR.select_probes(data, model.target, 4, 2)
    images = torch.zeros(8, 1, 16, 16)
    for s in range(8):
        if index[s] >= 0:
            images[s] = data[int(index[s])][0]
    state = {k: v for k, v in model.state_dict().items() if k != "probe_index"}
    state["probes"], state["probe_class"] = images, cls
    return state, index


def test_old_checkpoint_with_a_probe_buffer_loads_and_keeps_its_partners():
    data, old = train_split(), tiny_model()
    state, index = old_format_state(old, data)
    model = tiny_model()
    model.load_state_dict(state)  # strict: the old buffer is migrated, not an unexpected key
    x = torch.stack([data[i][0] for i in range(12)])
    y_hat = model.target(x).argmax(1)
    before = model.partner_images(x, y_hat)  # no data attached: the old images serve from memory
    expected = state["probes"][torch.arange(8)]
    assert all(any(torch.equal(img, e) for e in expected) for img in before[0])
    assert "probes" not in model.state_dict()
    model.attach_probe_data(data)  # the stored images are found in the data: their indices are recovered
    assert torch.equal(model.probe_index, index) and model._legacy_probes is None
    after = model.partner_images(x, y_hat)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    again = tiny_model()
    again.load_state_dict(model.state_dict())
    again.attach_probe_data(data)
    assert torch.equal(again.partner_images(x, y_hat)[0], after[0])


def test_old_probes_missing_from_the_data_warn_and_are_not_saved():
    data, old = train_split(), tiny_model()
    state, _ = old_format_state(old, data)
    state["probes"] = state["probes"] + 0.5  # images no longer in the data
    model = tiny_model()
    model.load_state_dict(state)
    with pytest.warns(UserWarning, match="not in the attached training data"):
        model.attach_probe_data(data)
    assert model._legacy_probes is not None
    assert int((model.state_dict()["probe_class"] >= 0).sum()) == 0  # re-picked when next attached


def test_label_probes_need_no_forward_and_candidates_can_be_capped():
    data = train_split()
    index, cls = PR.select_probes(data, None, 4, 2)  # labels only: every class filled, no classifier
    order = PR.candidate_order(len(data), 4)
    first = {c: [i for i in order if int(data[i][1]) == c][:2] for c in range(4)}
    assert index.tolist() == [i for c in range(4) for i in first[c]]
    capped, _ = PR.select_probes(data, None, 4, 2, limit=5)
    assert set(capped[capped >= 0].tolist()) <= set(order[:5])
    model = GenCNP(
        target="tiny_cnn",
        target_checkpoint=None,
        num_classes=4,
        image_size=16,
        generator={"d": 8},
        controls={"swap_probes_per_class": 2, "probe_filter": "label", "probe_candidates": 40},
    )
    model.attach_probe_data(data)
    assert bool((model.probe_class >= 0).all()) and set(model.probe_index.tolist()) <= set(order[:40])
    with pytest.raises(ValueError, match="controls.probe_filter must be one of"):
        GenCNP(
            target="tiny_cnn", target_checkpoint=None, num_classes=4, image_size=16, controls={"probe_filter": "any"}
        )


@pytest.mark.slow
def test_an_old_format_checkpoint_file_passes_preflight_loads_and_tests(tmp_path):
    """A Lightning checkpoint written with a ``probes`` image buffer: preflight accepts it, loading migrates it, and
    Trainer.test gives the metrics the model that wrote it gives."""
    import lightning as L

    from gencnp.io.checkpoints import seal
    from gencnp.pipeline.preflight import check_checkpoint

    dm = SyntheticDataModule(num_classes=4, image_size=16, n_train=300, n_test=64, val_size=50)
    model = tiny_model()
    opts = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, inference_mode=False)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=False, **opts)
    trainer.fit(model, dm)
    new_path, old_path = tmp_path / "new.ckpt", tmp_path / "old.ckpt"
    trainer.save_checkpoint(new_path)
    ckpt = torch.load(new_path, weights_only=True)
    state, index = ckpt["state_dict"], ckpt["state_dict"]["probe_index"]
    images = torch.zeros(len(index), 1, 16, 16)
    for s, i in enumerate(index.tolist()):
        if i >= 0:
            images[s] = dm.split("train")[i][0]
    del state["probe_index"]
    state["probes"] = images
    torch.save(seal(ckpt), old_path)
    fresh = tiny_model()
    check_checkpoint(None, fresh, str(old_path))  # raised 'missing keys: probe_index' before the migration
    loaded = tiny_model()  # the same (seeded) target; the old file's state is migrated on load
    loaded.load_state_dict(torch.load(old_path, weights_only=True)["state_dict"])
    assert "probes" not in loaded.state_dict() and loaded._legacy_probes is not None
    results = [L.Trainer(**opts).test(m, dm, verbose=False)[0] for m in (model, loaded)]
    assert results[0] == results[1]
    assert torch.equal(loaded.probe_index, index)  # found again in the data when test attached it
