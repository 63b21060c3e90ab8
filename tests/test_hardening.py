"""Hardening: integrity that cannot be stripped, settings checked at construction, class lists compared
between splits and against checkpoints and banks, image files checked before training, the pipeline's preflight of
every stage, and the small ones (stamp mode, per-run logs, a bank's target architecture).

Every case would pass silently, or fail late with a raw error, on earlier versions of gencnp; here each is refused
before anything is written, with one message naming the fix. Matches are on the error type and a key phrase.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import yaml
from test_bad_input import TARGET, fit_args, out, predict_args, refused, tree  # noqa: F401  (out: fixture)

from gencnp import GenCNP, SyntheticDataModule, TargetClassifier
from gencnp.banks.bank import PathwayBank
from gencnp.data.modules import ImageFolderDataModule
from gencnp.io.checkpoint_io import ALLOW_UNHASHED_ENV, read_checkpoint
from gencnp.io.files import write_atomic
from gencnp.pipeline import run as P

SMALL = {"target": "tiny_cnn", "target_checkpoint": None, "num_classes": 4, "image_size": 16, "d": 8}


# ----- settings: types and ranges at construction -----
@pytest.mark.parametrize(
    "cls,kwargs,exc,match",
    [
        (GenCNP, {"lambda_sp": -1.0}, ValueError, r"GenCNP: lambda_sp=-1.0 is out of range: expected a number >= 0"),
        (GenCNP, {"lambda_swap": -5.0}, ValueError, r"lambda_swap=-5.0 is out of range"),
        (GenCNP, {"lambda_cls": -1.0}, ValueError, r"lambda_cls=-1.0 is out of range"),
        (GenCNP, {"kappa": 5.0}, ValueError, r"kappa=5.0 is out of range: expected a number in \[0, 1\]"),
        (GenCNP, {"temperature": 0.0}, ValueError, r"temperature=0.0 is out of range: expected a number > 0"),
        (GenCNP, {"d": 0}, ValueError, r"d=0 is out of range: expected an integer >= 1"),
        (GenCNP, {"lr": -1.0}, ValueError, r"lr=-1.0 is out of range.*Set lr to a number > 0"),  # 0.2 form, migrated
        (GenCNP, {"init_score": 7.0}, ValueError, r"init_score=7.0 is out of range: expected a number in \(0, 1\)"),
        (GenCNP, {"lr": "fast"}, TypeError, r"lr='fast' is a str, not a number"),
        (GenCNP, {"d": 2.5}, TypeError, r"d=2.5 is not an integer"),
        (GenCNP, {"tap_weights": [1.0, -1.0, 1.0]}, ValueError, r"tap_weights=.* has entry #1 = -1.0"),
        (TargetClassifier, {"lr": -1.0}, ValueError, r"TargetClassifier: lr=-1.0 is out of range"),
        (TargetClassifier, {"label_smoothing": 1.5}, ValueError, r"label_smoothing=1.5 is out of range"),
        (SyntheticDataModule, {"num_workers": -1}, ValueError, r"SyntheticDataModule: num_workers=-1 is out of range"),
        (SyntheticDataModule, {"noise": float("nan")}, ValueError, r"noise=nan is not finite"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_settings_are_checked_at_construction(cls, kwargs, exc, match):
    base = (
        {**SMALL, **kwargs}
        if cls is GenCNP
        else ({"arch": "tiny_cnn", "num_classes": 4} if cls is TargetClassifier else {})
    )
    with pytest.raises(exc, match=match):
        cls(**{**base, **kwargs})


def test_bank_writer_settings_are_checked():
    from gencnp.callbacks import PathwayBankWriter

    with pytest.raises(ValueError, match=r"PathwayBankWriter: w_swap=-1.0 is out of range"):
        PathwayBankWriter(path="b.safetensors", w_swap=-1.0)


def test_a_setting_out_of_range_fails_before_anything_is_written(out, synthetic_runs):  # noqa: F811
    refused(
        out,
        ValueError,
        r"GenCNP: lambda_sp=-1.0 is out of range: expected a number >= 0",
        *fit_args(out, synthetic_runs, "--model.init_args.sparsity.lambda_sp", "-1"),
    )
    refused(
        out,
        ValueError,
        r"SyntheticDataModule: num_workers=-1 is out of range",
        *fit_args(out, synthetic_runs, "--data.init_args.num_workers", "-1"),
    )


# ----- integrity: a hash that cannot be stripped, and that covers the hyper-parameters -----
def _resaved(src: Path, dst: Path, edit) -> Path:
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    edit(ckpt)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    dst.write_bytes(buffer.getvalue())
    return dst


def test_checkpoint_with_its_hash_stripped_is_refused(out, synthetic_runs, tmp_path, monkeypatch):  # noqa: F811
    def strip_and_zero(ckpt):
        ckpt.pop("gencnp_state_hash")
        ckpt.pop("gencnp_settings_hash")
        for k in [k for k in ckpt["state_dict"] if k.startswith("generator.")]:
            ckpt["state_dict"][k] = torch.zeros_like(ckpt["state_dict"][k])

    bad = _resaved(synthetic_runs["gencnp"], tmp_path / "stripped.ckpt", strip_and_zero)
    refused(
        out,
        ValueError,
        r"carries no integrity hash .*opt in explicitly with GENCNP_ALLOW_UNHASHED=1",
        *predict_args(out, synthetic_runs, "--ckpt_path", str(bad)),
    )
    refused(out, ValueError, r"carries no integrity hash", *fit_args(out, synthetic_runs, "--ckpt_path", str(bad)))
    # Opting in loads it, with a warning.
    monkeypatch.setenv(ALLOW_UNHASHED_ENV, "1")
    with pytest.warns(UserWarning, match=r"loading it anyway because GENCNP_ALLOW_UNHASHED is set"):
        assert "state_dict" in read_checkpoint(bad)


@pytest.mark.resume
def test_edited_hyper_parameters_are_refused(out, synthetic_runs, tmp_path):  # noqa: F811
    def edit(ckpt):
        ckpt["hyper_parameters"].update(lr=1000.0, lambda_sp=-50.0)

    (out / "last.ckpt").write_bytes(_resaved(out / "last.ckpt", tmp_path / "x.ckpt", edit).read_bytes())
    refused(
        out,
        ValueError,
        r"is damaged: its hyper-parameters \(the settings that rebuild the model: "
        r"hyper_parameters.*were edited after saving",
        *fit_args(out, synthetic_runs, "--ckpt_path", "last"),
    )

    def strip_settings_hash(ckpt):  # an edit plus the removal of the settings hash: still refused
        edit(ckpt)
        ckpt.pop("gencnp_settings_hash")

    (out / "last.ckpt").write_bytes(
        _resaved(synthetic_runs["gencnp_last"], tmp_path / "y.ckpt", strip_settings_hash).read_bytes()
    )
    refused(
        out,
        ValueError,
        r"carries no hash of its hyper-parameters",
        *fit_args(out, synthetic_runs, "--ckpt_path", "last"),
    )
    shutil.copy(synthetic_runs["gencnp_last"], out / "last.ckpt")  # the fixture's own check: back as it was


def test_load_from_checkpoint_checks_the_file_before_overrides_apply(synthetic_runs, tmp_path):
    edited = _resaved(synthetic_runs["gencnp"], tmp_path / "e.ckpt", lambda c: c["hyper_parameters"].update(lr=1000.0))
    with pytest.raises(ValueError, match=r"its hyper-parameters .* were edited after saving"):
        GenCNP.load_from_checkpoint(edited)
    # An intact file with a keyword override loads: the override is the caller's, not an edit of the file.
    assert GenCNP.load_from_checkpoint(synthetic_runs["gencnp"], lambda_con=0.2).settings.lambda_con == 0.2


def test_target_checkpoint_without_hash_is_refused(tmp_path, synthetic_runs):
    from gencnp.targets.loading import create_target, load_weights

    bad = _resaved(synthetic_runs["target"], tmp_path / "t.ckpt", lambda c: c.pop("gencnp_state_hash"))
    with pytest.raises(ValueError, match=r"checkpoint '.*t.ckpt' carries no integrity hash"):
        load_weights(create_target("tiny_cnn", num_classes=4), bad)


def test_seal_upgrades_a_trusted_legacy_checkpoint_but_not_a_damaged_one(tmp_path, synthetic_runs, capsys):
    from gencnp.io.checkpoint_io import main as checkpointing_main

    legacy = _resaved(synthetic_runs["gencnp"], tmp_path / "legacy.ckpt", lambda c: c.pop("gencnp_settings_hash"))
    with pytest.raises(
        ValueError, match=r"carries no hash of its hyper-parameters .*gencnp.io.checkpoint_io seal FILE"
    ):
        read_checkpoint(legacy)
    assert checkpointing_main(["seal", str(legacy)]) == 0
    assert read_checkpoint(legacy)["gencnp_settings_hash"]

    def damage(ckpt):
        ckpt["state_dict"]["generator.rpd.heads.0.bias"] += 1.0

    damaged = _resaved(synthetic_runs["gencnp"], tmp_path / "damaged.ckpt", damage)
    before = damaged.read_bytes()
    assert checkpointing_main(["seal", str(damaged)]) == 2
    assert "its weights do not match the integrity hash" in capsys.readouterr().out and damaged.read_bytes() == before


# ----- class lists -----
def _png(path: Path, value: int = 128, size: int = 16) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)


def image_folder(root: Path, train=("a", "b", "c", "d"), test=("a", "b", "c", "d"), per_class: int = 4) -> Path:
    for split, classes in (("train", train), ("test", test)):
        for k, c in enumerate(classes):
            for i in range(per_class):
                _png(root / split / c / f"{i}.png", 40 * k + i)
    return root


IMAGEFOLDER = {"image_size": 16, "in_chans": 1, "val_size": 4, "batch_size": 4}


def test_imagefolder_test_split_missing_or_extra_class_is_named(tmp_path):
    root = image_folder(tmp_path / "missing", test=("a", "b", "d"))
    with pytest.raises(
        ValueError,
        match=r"ImageFolder '.*missing/test' lacks the class folders '.*missing/test/c' "
        r"that train/ has.*labels silently shifted",
    ):
        ImageFolderDataModule(str(root), **IMAGEFOLDER)
    root = image_folder(tmp_path / "extra", test=("a", "b", "c", "d", "e"))
    with pytest.raises(ValueError, match=r"has class folders '.*extra/test/e' that train/ lacks"):
        ImageFolderDataModule(str(root), **IMAGEFOLDER)


def test_imagefolder_empty_class_folder_is_named(tmp_path):
    root = image_folder(tmp_path / "data")
    (root / "train/e").mkdir()
    (root / "test/e").mkdir()
    with pytest.raises(FileNotFoundError, match=r"class folders '.*train/e' hold no images"):
        ImageFolderDataModule(str(root), **IMAGEFOLDER)


def test_imagefolder_zero_byte_image_is_named_at_construction(tmp_path):
    root = image_folder(tmp_path / "data", per_class=20)
    (root / "train/d/19.png").write_bytes(b"")  # far past the first batch
    with pytest.raises(ValueError, match=r"holds 1 empty \(zero-byte\) image file\(s\): '.*train/d/19.png'"):
        ImageFolderDataModule(str(root), **IMAGEFOLDER)


def test_corrupt_jpeg_is_named_before_training(out, synthetic_runs, tmp_path):  # noqa: F811
    from PIL import Image

    root = image_folder(tmp_path / "data")
    jpeg = root / "train/c/broken.jpg"
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 99).save(buffer, format="JPEG")
    jpeg.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    data = ["--data", "gencnp.ImageFolderDataModule", "--data.init_args.root", str(root)]
    data += [a for k, v in IMAGEFOLDER.items() for a in (f"--data.init_args.{k}", str(v))]
    refused(
        out,
        ValueError,
        r"1 image file\(s\) under .* cannot be decoded: '.*train/c/broken.jpg' \(OSError",
        *fit_args(out, synthetic_runs, *data, config=TARGET),
    )
    dm = ImageFolderDataModule(str(root), **IMAGEFOLDER)  # and through the loader, mid-epoch: named too
    dataset = dm.split("train").dataset
    index = next(i for i, (p, _) in enumerate(dataset.samples) if p.endswith("broken.jpg"))
    with pytest.raises(ValueError, match=r"image file '.*broken.jpg' cannot be decoded"):
        dataset[index]


class RenamedData(SyntheticDataModule):
    """The synthetic patterns under other class names (what a checkpoint trained on the originals must refuse)."""

    def __init__(self, **kwargs):
        super().__init__(num_classes=4, image_size=16, n_train=1200, n_test=400, val_size=200, **kwargs)
        self.class_names = ["pattern_1", "pattern_0", "pattern_2", "pattern_3"]


def test_checkpoint_class_names_are_compared_with_the_data(out, synthetic_runs):  # noqa: F811
    assert read_checkpoint(synthetic_runs["gencnp"])["class_names"] == [f"pattern_{k}" for k in range(4)]
    refused(
        out,
        ValueError,
        r"--ckpt_path '.*best.ckpt' was trained on the classes \['pattern_0', .*but the data "
        r"\(RenamedData\) has \['pattern_1', 'pattern_0'.*#0 'pattern_0' vs 'pattern_1'",
        *predict_args(
            out, synthetic_runs, "--ckpt_path", str(out / "best.ckpt"), "--data", "test_hardening.RenamedData"
        ),
    )
    refused(
        out,
        ValueError,
        r"target_checkpoint '.*' was trained on the classes",
        *fit_args(out, synthetic_runs, "--data", "test_hardening.RenamedData"),
    )
    from gencnp.evaluation.report import report

    before = tree(out)
    with pytest.raises(ValueError, match=r"generator checkpoint '.*' was trained on the classes"):
        report(
            generator=str(synthetic_runs["gencnp"]),
            bank=None,
            data=RenamedData(),
            out_dir=str(out / "eval"),
            progress=False,
            limit=20,
        )
    assert tree(out) == before


# ----- banks -----
def test_bank_relabelled_with_another_target_arch_is_refused(synthetic_runs, tmp_path):
    model = GenCNP.load_from_checkpoint(synthetic_runs["gencnp"])
    bank = PathwayBank.for_target(model.target, [f"pattern_{k}" for k in range(4)], tau=0.5)
    bank.update(torch.ones(4, model.target.num_channels, dtype=torch.bool), torch.arange(4))
    bank.target_arch = "small_cnn"  # same tensor hash, another architecture name: a valid, re-checksummed file
    path = bank.save(tmp_path / "relabelled.safetensors")
    with pytest.raises(
        ValueError,
        match=r"target architecture: the bank was built on 'small_cnn', the given target "
        r"is 'tiny_cnn'",
    ):
        PathwayBank.load(path, target=model.target)


def test_inspect_on_a_checkpoint_says_it_is_a_checkpoint(synthetic_runs):
    from gencnp.banks.bank import inspect_bank

    with pytest.raises(ValueError, match=r"is a torch checkpoint or pickle \(e.g. a .ckpt\), not a pathway bank"):
        inspect_bank(str(synthetic_runs["gencnp"]))


# ----- writes: disk full, names too long -----
def test_disk_full_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "bank.safetensors"
    path.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        OSError,
        match=r"no space left on the device .*while writing '.*bank.safetensors'.*previous "
        r"file is unchanged",
    ):
        write_atomic(path, b"new content")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors"]


def test_path_component_too_long_is_refused_before_anything_is_written(out, synthetic_runs):  # noqa: F811
    refused(
        out,
        ValueError,
        r"cannot write the checkpoint folder .*a component of 300 bytes, longer than the "
        r"filesystem's limit of 255",
        *fit_args(out, synthetic_runs, "--trainer.callbacks.init_args.dirpath", str(out / ("x" * 300))),
    )


# ----- pipeline: preflight of every stage, stamps, logs -----
FAKE_STAGE = """
import sys, pathlib, yaml
args = sys.argv[1:]
cfg = yaml.safe_load(open(args[args.index("--config") + 1]))
if "--print_config" in args:
    print(yaml.safe_dump(cfg))
    sys.exit(0)
print("fake stage", cfg["write"])
for name in cfg["write"]:
    pathlib.Path(name).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(name).write_text("output of " + name)
"""


def fake_pipeline(tmp_path: Path) -> Path:
    """Two seconds-long stages (a stand-in entry point): 'train' writes a/model.ckpt, 'report' reads it and writes
    eval/report.json under its out_dir."""
    (tmp_path / "stage.py").write_text(FAKE_STAGE)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"write": ["a/model.ckpt"], "out_dir": "a"}))
    (tmp_path / "report.yaml").write_text(yaml.safe_dump({"write": ["eval/report.json"], "out_dir": "eval"}))
    stages = [
        {
            "name": "train",
            "entry": str(tmp_path / "stage.py"),
            "command": "fit",
            "config": str(tmp_path / "train.yaml"),
            "outputs": ["a/model.ckpt"],
        },
        {
            "name": "report",
            "entry": str(tmp_path / "stage.py"),
            "command": "report",
            "config": str(tmp_path / "report.yaml"),
            "inputs": ["a/model.ckpt"],
            "outputs": ["eval/report.json"],
        },
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    return path


def read_only(monkeypatch, *folders: Path) -> None:
    """``folders`` not writable for the preflight's ``os.access`` (permission bits do not stop root)."""
    import gencnp.pipeline.preflight as preflight

    real, locked = os.access, {Path(f) for f in folders}
    monkeypatch.setattr(preflight.os, "access", lambda p, mode: False if Path(p) in locked else real(p, mode))


def test_pipeline_read_only_report_folder_stops_before_the_first_stage(tmp_path, monkeypatch, capsys):
    pipe, work = fake_pipeline(tmp_path), tmp_path / "work"
    (work / "eval").mkdir(parents=True)
    read_only(monkeypatch, work / "eval")
    assert P.main(["--config", str(pipe), "--workdir", str(work), "--force"]) == 2
    err = capsys.readouterr().err
    assert "stage 'report'" in err and "/eval': it is not writable" in err and "No stage was run" in err
    assert "Traceback" not in err and not (work / "a").exists()  # the first stage did not run


def test_pipeline_read_only_workdir_exits_2(tmp_path, monkeypatch, capsys):
    pipe, work = fake_pipeline(tmp_path), tmp_path / "work"
    work.mkdir()
    read_only(monkeypatch, work)
    assert P.main(["--config", str(pipe), "--workdir", str(work)]) == 2
    assert "not writable" in capsys.readouterr().err and list(work.iterdir()) == []
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert P.main(["--config", str(pipe), "--workdir", str(blocker / "work")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert P.main(["--config", str(pipe), "--workdir", str(tmp_path / ("w" * 300))]) == 2
    assert "a component of 300 bytes, longer than the filesystem's limit" in capsys.readouterr().err


def test_pipeline_input_no_stage_produces_is_refused_before_the_first_stage(tmp_path, capsys):
    pipe, work = fake_pipeline(tmp_path), tmp_path / "work"
    spec = yaml.safe_load(pipe.read_text())
    spec["stages"][1]["inputs"] = ["a/model.ckpt", "nowhere/data.bin"]
    pipe.write_text(yaml.safe_dump(spec))
    assert P.main(["--config", str(pipe), "--workdir", str(work)]) == 2
    assert "stage 'report' needs nowhere/data.bin" in capsys.readouterr().err and not (work / "a").exists()


def test_pipeline_stamps_are_0644_and_quiet_runs_get_their_own_logs(tmp_path):
    pipe, work = fake_pipeline(tmp_path), tmp_path / "work"
    for _ in range(2):
        assert P.main(["--config", str(pipe), "--workdir", str(work), "--quiet", "--force"]) == 0
    assert stat.S_IMODE((work / "a/train.stamp.json").stat().st_mode) == 0o644
    logs = sorted((work / "a").glob("train*.log"))
    assert len(logs) == 2 and all("fake stage" in p.read_text() for p in logs)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in logs)


def test_pipeline_disk_full_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    pipe, work = fake_pipeline(tmp_path), tmp_path / "work"

    real = P.write_json

    def full(path, *args, **kwargs):
        if str(path).endswith(".stamp.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(P, "write_json", full)  # the stamp writer gencnp.pipeline.run uses
    assert P.main(["--config", str(pipe), "--workdir", str(work)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "train.stamp.json" in err and "Traceback" not in err
