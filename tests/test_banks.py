"""Pathway banks (docs/design.md section 6): accumulation, the file format, its validation, transfer and the writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import QUIET, ROOT, cli

from gencnp.banks import bank as banks_module
from gencnp.banks.bank import PathwayBank, choose_tau, inspect_bank
from gencnp.targets.loading import FrozenTarget, create_target

TAPS = ["blocks.0", "blocks.1", "blocks.2"]
CHANNELS = [8, 16, 16]  # tiny_cnn
NAMES = ["zero", "one", "two", "three"]


def tiny_target(seed: int = 0, arch: str = "tiny_cnn", taps=TAPS) -> FrozenTarget:
    torch.manual_seed(seed)
    return FrozenTarget(create_target(arch, num_classes=4, in_chans=1), taps, (1, 16, 16), arch=arch)


@pytest.fixture(scope="module")
def target() -> FrozenTarget:
    return tiny_target()


def random_batch(b: int, seed: int, d: int = sum(CHANNELS), k: int = 4, p: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, d, generator=g) < p, torch.randint(0, k, (b,), generator=g)


def filled_bank(target: FrozenTarget, batches: int = 3, tau: float | None = 0.4) -> PathwayBank:
    bank = PathwayBank.for_target(target, NAMES, tau=tau)
    for i in range(batches):
        bank.update(*random_batch(50, seed=i))
    bank.info = {"note": "test bank"}
    return bank


# ----- accumulation -----
def test_update_matches_a_slow_loop_reference(target):
    bank = PathwayBank.for_target(target, NAMES)
    ref_counts = np.zeros((4, 40), dtype=np.int64)
    ref_n = np.zeros(4, dtype=np.int64)
    for i, b in enumerate((7, 1, 33, 0, 64)):
        p, c = random_batch(b, seed=10 + i, p=0.2 + 0.1 * i)
        bank.update(p if i % 2 else p.float(), c)  # bool and 0/1 floats
        for row, cls in zip(p.numpy(), c.numpy()):
            ref_n[cls] += 1
            for j in range(40):
                ref_counts[cls, j] += int(row[j])
    assert bank.counts.dtype == torch.int64 and bank.n.dtype == torch.int64
    np.testing.assert_array_equal(bank.counts.numpy(), ref_counts)
    np.testing.assert_array_equal(bank.n.numpy(), ref_n)
    freq = bank.frequencies()
    np.testing.assert_allclose(freq.numpy(), ref_counts / np.maximum(ref_n, 1)[:, None])
    assert torch.equal(bank.class_pathways(0.25), freq >= 0.25)


def test_update_rejects_bad_input_with_what_was_expected(target):
    bank = PathwayBank.for_target(target, NAMES)
    with pytest.raises(ValueError, match=r"pathways must be \[B, D\] with D = 40"):
        bank.update(torch.zeros(2, 39, dtype=torch.bool), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 4\).*\[0, 4\]"):
        bank.update(torch.zeros(2, 40, dtype=torch.bool), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="must be binary"):
        bank.update(torch.full((2, 40), 0.5), torch.tensor([0, 1]))
    assert int(bank.n.sum()) == 0 and int(bank.counts.sum()) == 0  # nothing half-applied


def test_memory_does_not_grow_with_the_number_of_samples(target):
    def state_bytes(bank):
        return {k: (tuple(v.shape), v.dtype, v.nbytes) for k, v in vars(bank).items() if isinstance(v, torch.Tensor)}

    once, four = PathwayBank.for_target(target, NAMES), PathwayBank.for_target(target, NAMES)
    once.update(*random_batch(100, seed=0))
    for s in range(4):
        four.update(*random_batch(100, seed=s))
    assert (
        state_bytes(once)
        == state_bytes(four)
        == {"counts": ((4, 40), torch.int64, 4 * 40 * 8), "n": ((4,), torch.int64, 32)}
    )
    assert int(four.n.sum()) == 4 * int(once.n.sum()) == 400


def test_merge_equals_one_bank_over_all_batches_and_refuses_other_targets(target):
    whole, a, b = (PathwayBank.for_target(target, NAMES) for _ in range(3))
    for s in range(4):
        batch = random_batch(30, seed=s)
        whole.update(*batch)
        (a if s % 2 else b).update(*batch)
    a.merge(b)
    assert torch.equal(a.counts, whole.counts) and torch.equal(a.n, whole.n)
    other = PathwayBank.for_target(tiny_target(seed=1), NAMES)
    with pytest.raises(ValueError, match="cannot merge banks built differently: target_hash"):
        a.merge(other)


# ----- tau -----
@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5, float("nan")])
def test_tau_outside_0_1_is_refused_everywhere(target, tau):
    bank = filled_bank(target)
    with pytest.raises(ValueError, match=r"tau=.* is outside the valid range \(0, 1\]"):
        bank.tau = tau
    with pytest.raises(ValueError, match=r"outside the valid range \(0, 1\]"):
        bank.class_pathways(tau)
    with pytest.raises(ValueError, match=r"outside the valid range \(0, 1\]"):
        PathwayBank(NAMES, TAPS, CHANNELS, "tiny_cnn", "h", tau=tau)
    assert bank.tau == 0.4  # unchanged


def test_class_pathways_threshold_is_inclusive_and_needs_a_tau(target):
    bank = PathwayBank.for_target(target, NAMES[:4])
    p = torch.zeros(10, 40, dtype=torch.bool)
    p[:3, 0] = True  # f = 0.3 for channel 0 of class 1
    p[:, 1] = True  # f = 1.0
    bank.update(p, torch.ones(10, dtype=torch.long))
    with pytest.raises(ValueError, match="no tau yet"):
        bank.class_pathways()
    m = bank.class_pathways(0.3)
    assert m[1, 0] and m[1, 1] and not m[1, 2:].any()
    assert not bank.class_pathways(0.31)[1, 0] and bank.class_pathways(1.0)[1, 1]
    assert not m[0].any()  # a class never seen keeps nothing


def test_choose_tau_rule_by_hand():
    taus = [0.25, 0.5, 0.75]
    # 0.75 is the sparsest but misses min_agreement; among 0.25 / 0.5, 0.5 has the best score.
    tau, rule, scores = choose_tau(taus, [0.99, 0.97, 0.80], [0.10, 0.05, 0.0], [0.0, 0.2, 0.0], [0.6, 0.3, 0.1])
    assert scores == pytest.approx([0.99 - 0.10 - 0.15, 0.97 - 0.05 - 0.1 - 0.075, 0.80 - 0.025])
    assert tau == 0.5 and "2 of 3 taus" in rule
    tau, rule, _ = choose_tau(taus, [0.5, 0.6, 0.7], [0.0] * 3, [0.0] * 3, [0.0] * 3, min_agreement=0.95)
    assert tau == 0.75 and rule.startswith("no tau reached")


# ----- file -----
def test_save_load_round_trip(tmp_path, target):
    bank = filled_bank(target)
    path = bank.save(tmp_path / "bank.safetensors")
    loaded = PathwayBank.load(path, target=target, class_names=NAMES)
    assert torch.equal(loaded.counts, bank.counts) and torch.equal(loaded.n, bank.n)
    assert (loaded.tau, loaded.class_names, loaded.tap_names, loaded.tap_channels) == (0.4, NAMES, TAPS, CHANNELS)
    assert (loaded.target_arch, loaded.target_hash, loaded.class_source, loaded.split) == (
        "tiny_cnn",
        target.tensor_hash(),
        "pred",
        "train",
    )
    assert loaded.info == {"note": "test bank"}
    meta = loaded.metadata
    assert (
        meta["format_version"] == 1
        and meta["total"] == 150
        and meta["created_utc"].endswith("Z")
        and meta["gencnp_version"]
    )
    assert torch.equal(loaded.class_pathways(), bank.class_pathways())
    assert not list(tmp_path.glob("*.tmp"))


def test_file_is_readable_with_safetensors_and_numpy_alone(tmp_path, target):
    bank = filled_bank(target)
    path = bank.save(tmp_path / "bank.safetensors")
    expected = bank.class_pathways().numpy()
    np.save(tmp_path / "expected.npy", expected)
    # The module docstring's recipe, in a fresh interpreter that never imports torch.
    code = f"""
import hashlib, json, sys
import numpy as np
from safetensors import safe_open
with safe_open({str(path)!r}, framework="np") as f:
    raw = f.metadata()
    meta, counts, n = json.loads(raw["gencnp"]), f.get_tensor("counts"), f.get_tensor("n")
M = counts / np.maximum(n, 1)[:, None] >= meta["tau"]
h = hashlib.sha256(raw["gencnp"].encode())
h.update(counts.astype("<i8").tobytes())
h.update(n.astype("<i8").tobytes())
assert h.hexdigest() == raw["sha256"], "checksum recipe"
assert (M == np.load({str(tmp_path / "expected.npy")!r})).all(), "class pathways"
assert meta["class_names"] == {NAMES!r} and sum(meta["tap_channels"]) == M.shape[1]
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_load_refuses_a_bank_for_another_target_naming_every_mismatch(tmp_path, target):
    path = filled_bank(target).save(tmp_path / "bank.safetensors")
    with pytest.raises(
        ValueError,
        match=r"does not fit the given target: target tensor hash.*load the target checkpoint the bank was exported",
    ):
        PathwayBank.load(path, target=tiny_target(seed=1))
    with pytest.raises(
        ValueError,
        match=r"taps: the bank has \['blocks.0', 'blocks.1', 'blocks.2'\], the target \['blocks.0', 'blocks.1'\]",
    ):
        PathwayBank.load(path, target=tiny_target(seed=0, taps=["blocks.0", "blocks.1"]))
    # small_cnn has the same tap names but other channel counts (and other weights): both are named.
    with pytest.raises(
        ValueError, match=r"target tensor hash.*tap channels \(bank vs target\): blocks.0: 8 vs 16, blocks.1: 16 vs 32"
    ):
        PathwayBank.load(path, target=tiny_target(seed=0, arch="small_cnn"))


def test_load_refuses_another_class_list(tmp_path, target):
    path = filled_bank(target).save(tmp_path / "bank.safetensors")
    with pytest.raises(
        ValueError, match=r"built for classes \['zero', 'one', 'two', 'three'\].*#2 'two' vs 'deux'.*same order"
    ):
        PathwayBank.load(path, class_names=["zero", "one", "deux", "three"])
    with pytest.raises(ValueError, match="4 vs 3 entries"):
        PathwayBank.load(path, class_names=NAMES[:3])


def test_load_refuses_truncated_and_altered_files(tmp_path, target):
    path = filled_bank(target).save(tmp_path / "bank.safetensors")
    good = path.read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "header_value": good.replace(b"three", b"thref", 1),  # valid JSON, altered class name
        "header_syntax": good.replace(b'"counts"', b'"counts ', 1),  # broken header JSON
        "data": good[:-1] + bytes([good[-1] ^ 0x01]),  # one bit of n flipped
    }
    for name, data in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        msg = (
            "it is not a readable safetensors file.*truncated or altered"
            if name in ("truncated", "header_syntax")
            else "its checksum does not match its content.*altered after saving"
        )
        with pytest.raises(ValueError, match=f"pathway bank '{bad}' is damaged: {msg}"):
            PathwayBank.load(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PathwayBank.load(tmp_path / "missing.safetensors")


def test_load_refuses_an_unknown_format_version_and_inconsistent_shapes(tmp_path, target):
    from safetensors.torch import save_file

    bank = filled_bank(target)
    meta = bank._metadata()

    def write(name, meta, counts, n):
        text = json.dumps(meta, sort_keys=True)
        digest = banks_module._checksum(text, counts.numpy(), n.numpy())
        save_file({"counts": counts, "n": n}, str(tmp_path / name), metadata={"gencnp": text, "sha256": digest})
        return tmp_path / name

    path = write("v99.safetensors", {**meta, "format_version": 99}, bank.counts, bank.n)
    with pytest.raises(
        ValueError, match="has format_version 99, but this gencnp reads format_version 1 only. Upgrade gencnp"
    ):
        PathwayBank.load(path)
    path = write("shape.safetensors", meta, bank.counts[:, :39].contiguous(), bank.n)
    with pytest.raises(ValueError, match=r"counts has shape \[4, 39\], metadata says \[K, D\] = \[4, 40\]"):
        PathwayBank.load(path)
    over = bank.counts.clone()
    over[0, 0] = bank.n[0] + 1
    path = write("over.safetensors", meta, over, bank.n)
    with pytest.raises(ValueError, match=r"0 <= counts\[c, j\] <= n\[c\]"):
        PathwayBank.load(path)
    path = write("tau.safetensors", {**meta, "tau": 1.5}, bank.counts, bank.n)
    with pytest.raises(ValueError, match=r"metadata is invalid.*outside the valid range \(0, 1\]"):
        PathwayBank.load(path)


def test_load_never_unpickles(tmp_path):
    path = tmp_path / "pickle.safetensors"
    torch.save({"counts": torch.zeros(2, 2)}, path)  # a zip/pickle file under a bank's name
    with pytest.raises(ValueError, match="is a torch checkpoint or pickle .*not a pathway bank"):
        PathwayBank.load(path)


def test_save_into_a_non_writable_directory_fails_clearly_and_keeps_the_old_file(tmp_path, target, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    old = filled_bank(target, batches=1).save(folder / "bank.safetensors")
    before = old.read_bytes()
    folder.chmod(0o555)
    try:
        with monkeypatch.context() as mp:
            if os.geteuid() == 0:  # root ignores permission bits: report the directory as read-only as a user sees it
                real = os.access
                mp.setattr(os, "access", lambda p, m: False if Path(p) == folder else real(p, m))
            with pytest.raises(PermissionError, match=f"directory '{folder}' is not writable; nothing was written"):
                filled_bank(target, batches=3).save(folder / "bank.safetensors")
    finally:
        folder.chmod(0o755)
    assert old.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["bank.safetensors"]

    def no_temp_file(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", no_temp_file)
    with pytest.raises(PermissionError, match="creating a temporary file .* failed .*nothing was written"):
        filled_bank(target, batches=3).save(folder / "bank.safetensors")
    assert old.read_bytes() == before


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_interrupted_save_leaves_the_previous_bank_intact(tmp_path, target, monkeypatch, where):
    path = filled_bank(target, batches=1).save(tmp_path / "bank.safetensors")
    before = path.read_bytes()

    def crash(*a, **k):
        raise KeyboardInterrupt("interrupted mid-save")

    monkeypatch.setattr(os, where, crash)  # whichever module writes the file
    with pytest.raises(KeyboardInterrupt):
        filled_bank(target, batches=3).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors"]  # no temporary file left
    assert int(PathwayBank.load(path).n.sum()) == 50


# ----- transfer -----
def test_apply_with_all_ones_class_pathways_reproduces_the_logits_exactly(target):
    bank = PathwayBank.for_target(target, NAMES, tau=1.0)
    bank.update(torch.ones(8, 40, dtype=torch.bool), torch.arange(8) % 4)
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(bank.apply(target, x), target(x))


def test_apply_masks_each_sample_with_its_class_pathway(target):
    bank = filled_bank(target, batches=4, tau=0.3)
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 3, 1, 1, 2])
    m = bank.class_pathways().float()[classes]
    with torch.no_grad():
        expected = target(x, masks=list(torch.split(m, CHANNELS, dim=1)))
        got = bank.apply(target, x, classes)
        own = bank.apply(target, x)  # class = the target's own prediction
        pred = target(x).argmax(1)
        expected_own = target(x, masks=list(torch.split(bank.class_pathways().float()[pred], CHANNELS, dim=1)))
    assert torch.equal(got, expected) and torch.equal(own, expected_own)
    assert not torch.equal(got, target(x))  # the pathway does change something
    with pytest.raises(ValueError, match="does not fit the given target: target tensor hash"):
        bank.apply(tiny_target(seed=1), x)


# ----- inspect -----
def test_inspect_bank_prints_the_summary_and_draws_a_png(tmp_path, target, capsys):
    path = filled_bank(target).save(tmp_path / "bank.safetensors")
    png = Path(inspect_bank(str(path), out_dir=str(tmp_path / "fig")))
    out = capsys.readouterr().out
    assert png == tmp_path / "fig" / "bank_heatmap.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    assert all(name in out for name in NAMES) and "tau 0.4" in out and "tiny_cnn" in out
    kept = bank_kept = PathwayBank.load(path).summary()["two"]["kept"]
    assert f"{100 * bank_kept:5.1f}%" in out and 0 < kept < 1


# ----- Lightning writers on the synthetic pair -----
def _reference_counts(model, dataset, batch_size: int = 256):
    counts = torch.zeros(model.num_classes, model.target.num_channels, dtype=torch.int64)
    n = torch.zeros(model.num_classes, dtype=torch.int64)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    for batch in loader:
        ex = model.explain(batch[0], batch[1])
        for row, c in zip(ex["pathway"], ex["y_hat"]):  # slow reference
            counts[c] += row.long()
            n[c] += 1
    return counts, n


def export_bank(runs: dict, out: Path, *extra: str) -> None:
    """``python train.py predict --config configs/synthetic/bank.yaml`` writing the bank (and config) beside ``out``."""
    cli(
        "predict",
        "--config",
        str(ROOT / "configs/synthetic/bank.yaml"),
        *QUIET,
        "--ckpt_path",
        str(runs["gencnp"]),
        "--model.init_args.target_checkpoint",
        str(runs["target"]),
        "--trainer.callbacks.init_args.path",
        str(out),
        "--trainer.default_root_dir",
        str(out.parent),
        *extra,
    )


def test_bank_writer_exports_over_train_and_chooses_tau_on_validation(synthetic_runs, tmp_path):
    from gencnp import GenCNP, SyntheticDataModule

    out = tmp_path / "bank.safetensors"
    export_bank(synthetic_runs, out, "--trainer.callbacks.init_args.taus", "[0.2, 0.5, 0.8]")
    assert (tmp_path / "config.yaml").is_file()  # the resolved config lands beside the run, not in the cwd
    model = GenCNP.load_from_checkpoint(synthetic_runs["gencnp"]).eval()
    dm = SyntheticDataModule(num_classes=4, image_size=16, n_train=1200, n_test=400, val_size=200)
    bank = PathwayBank.load(out, target=model.target, class_names=dm.class_names)
    assert int(bank.n.sum()) == len(dm.split("train")) == 1000
    assert bank.split == "train" and bank.class_source == "pred"
    counts, n = _reference_counts(model, dm.split("train"))
    assert torch.equal(bank.n, n) and torch.equal(bank.counts, counts)
    search = bank.info["tau_search"]
    assert search["split"] == "val" and search["n"] == 200 and search["taus"] == [0.2, 0.5, 0.8]
    assert bank.tau in search["taus"] and "validation transfer agreement" in bank.info["tau_rule"]
    best = search["taus"].index(bank.tau)
    assert search["score"][best] == max(
        search["score"][i]
        for i in range(3)
        if search["agreement"][i] >= 0.95 or all(a < 0.95 for a in search["agreement"])
    )
    assert bank.info["generator_checkpoint"] == str(synthetic_runs["gencnp"])


def test_bank_writer_refuses_the_test_split(synthetic_runs, tmp_path):
    out = tmp_path / "bank.safetensors"
    with pytest.raises(ValueError, match="refuses to build a bank on the test split.*predict_split: train"):
        export_bank(synthetic_runs, out, "--data.init_args.predict_split", "test")
    assert not out.exists()


@pytest.mark.parametrize("interval,packed", [("batch", True), ("epoch", False)])
def test_prediction_writer_streams_pathways_to_shards(synthetic_runs, tmp_path, interval, packed):
    import lightning as L

    from gencnp import GenCNP, SyntheticDataModule
    from gencnp.callbacks import PathwayPredictionWriter, load_predictions

    model = GenCNP.load_from_checkpoint(synthetic_runs["gencnp"])
    dm = SyntheticDataModule(
        num_classes=4, image_size=16, n_train=1200, n_test=400, val_size=200, eval_batch_size=96, predict_split="val"
    )
    (tmp_path / "pathways-rank007-dl0.safetensors").write_bytes(b"stale shard of an earlier run")
    writer = PathwayPredictionWriter(str(tmp_path), write_interval=interval, pack_bits=packed)
    trainer = L.Trainer(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[writer],
        inference_mode=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.predict(model, datamodule=dm, return_predictions=False)
    shards = sorted(tmp_path.glob("pathways-rank*.safetensors"))
    assert len(shards) == (3 if interval == "batch" else 1)  # 200 images in batches of 96
    got = load_predictions(tmp_path)
    x = torch.stack([dm.split("val")[i][0] for i in range(200)])
    labels = torch.stack([dm.split("val")[i][1] for i in range(200)])
    ex = model.explain(x, labels)
    assert torch.equal(got["batch_indices"], torch.arange(200))
    assert got["pathway"].dtype == torch.bool and torch.equal(got["pathway"], ex["pathway"])
    assert torch.equal(got["y_hat"], ex["y_hat"]) and torch.equal(got["label"], labels)
    assert torch.equal(got["prediction"], ex["prediction"]) and torch.allclose(got["kept"], ex["kept"])
    assert got["meta"]["packed"] is packed and got["meta"]["target_hash"] == model.target.tensor_hash()
    assert not list(tmp_path.glob("*.tmp"))


# ----- per-class thresholds -----
def _class_sums(agree: list[list[int]], kept: list[list[int]], swap: list[list[int]], n: list[int]) -> torch.Tensor:
    """``[T, K, 8]`` sums as the tau search writes them, from per-tau, per-class agree/kept/swap counts."""
    t, k = len(agree), len(n)
    out = torch.zeros(t, k, 8, dtype=torch.float64)
    for i in range(t):
        for c in range(k):
            out[i, c] = torch.tensor([n[c], agree[i][c], 0, 0, swap[i][c], n[c], 0, kept[i][c]], dtype=torch.float64)
    return out


def test_choose_class_taus_lowers_the_class_that_buys_most_agreement_per_channel():
    from gencnp.pathways.selection import choose_class_taus

    # two classes of 10 images, D = 10; taus ascending: the lowest tau keeps most channels and agrees most.
    # class 0 gains 5 agreeing images for 1 more channel per image; class 1 gains 5 for 4 channels.
    agree = [[10, 10], [10, 10], [5, 5]]
    kept = [[60, 90], [30, 80], [20, 40]]  # kept channels summed over the class's 10 images
    swap = [[0, 0], [0, 0], [0, 0]]
    sums = _class_sums(agree, kept, swap, [10, 10])
    taus, rule, totals = choose_class_taus([0.2, 0.5, 0.8], sums, 10, min_agreement=0.75)
    assert taus == [0.5, 0.8] and totals["agreement"] == 0.75 and "0.7500 >= 0.75" in rule
    assert totals["kept"] == (30 + 40) / 200
    # the goal needs both classes lowered; a kept budget stops the search short and says so
    taus, rule, totals = choose_class_taus([0.2, 0.5, 0.8], sums, 10, min_agreement=1.0, max_kept=0.36)
    assert taus == [0.5, 0.8] and totals["agreement"] == 0.75 and "stays below" in rule
    # a swap budget refuses a step that would force the class on other images
    swap = [[0, 9], [0, 9], [0, 0]]
    taus, _, totals = choose_class_taus(
        [0.2, 0.5, 0.8], _class_sums(agree, kept, swap, [10, 10]), 10, min_agreement=1.0, max_swap=0.2
    )
    assert taus[1] == 0.8 and totals["swap_forcing"] == 0.0


def test_class_taus_round_trip_and_old_files_without_them_load(tmp_path, target):
    bank = filled_bank(target)
    assert bank.class_taus is None
    old = PathwayBank.load(bank.save(tmp_path / "old.safetensors"), target=target)
    assert old.class_taus is None and torch.equal(old.class_pathways(), bank.frequencies() >= 0.4)
    bank.class_taus = [0.2, 0.4, 0.6, 0.8]
    loaded = PathwayBank.load(bank.save(tmp_path / "new.safetensors"), target=target)
    assert loaded.class_taus == [0.2, 0.4, 0.6, 0.8]
    expect = bank.frequencies() >= torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)[:, None]
    assert torch.equal(loaded.class_pathways(), expect)
    assert torch.equal(loaded.class_pathways(0.4), bank.frequencies() >= 0.4)  # an explicit tau still wins
    assert loaded.summary()["two"]["tau"] == 0.6
    with pytest.raises(ValueError, match="one tau per class"):
        bank.class_taus = [0.5]


def test_bank_writer_chooses_per_class_taus_on_validation(synthetic_runs, tmp_path):
    out = tmp_path / "bank.safetensors"
    export_bank(
        synthetic_runs,
        out,
        "--trainer.callbacks.init_args.taus",
        "[0.2, 0.5, 0.8]",
        "--trainer.callbacks.init_args.per_class",
        "true",
    )
    bank = PathwayBank.load(out)
    assert bank.class_taus is not None and set(bank.class_taus) <= {0.2, 0.5, 0.8}
    choice = bank.info["per_class"]
    assert choice["class_taus"] == bank.class_taus and "per-class tau" in choice["rule"]
    assert 0 <= choice["validation"]["kept"] <= 1 and 0 <= choice["validation"]["agreement"] <= 1


def test_a_bank_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path, target):
    """The first byte of a safetensors file is its header length's lowest byte: 0x80 is a pickle's first byte too."""
    bank = filled_bank(target)
    for pad in range(256):
        bank.info = {"note": "x" * pad}
        data = bank.to_bytes()
        if data[0] == 0x80:
            break
    assert data[0] == 0x80
    path = bank.save(tmp_path / "bank.safetensors")
    assert path.read_bytes()[0] == 0x80
    assert torch.equal(PathwayBank.load(path, target=target).counts, bank.counts)
    pickle_file = tmp_path / "pickle.safetensors"
    torch.save({"counts": bank.counts}, pickle_file, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="is a torch checkpoint or pickle"):
        PathwayBank.load(pickle_file)
