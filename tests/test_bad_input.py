"""The bad-input matrix: every item fails with one message that names the problem and the fix, leaves
every file that existed before byte-for-byte unchanged, and writes nothing (no folder, no partial file).

Each case runs the real entry point (``train.py`` through ``gencnp.cli.main``, or ``gencnp.evaluation.report.report`` for
``evaluate.py report``) with every output (checkpoints, logs, bank, report, the resolved ``config.yaml``) pointed
into ``out``, a folder holding what an earlier run left there; the current folder is an empty one that must stay
empty. Failures found only while training (a NaN image further into the data, a loss going non-finite) stop the
run at that step: earlier files are unchanged, no checkpoint is written, and the run's own log folder is all that
appears.

Unit-level checks of the same items live beside their code and are not repeated here: data constructors
(``test_data.py``), tap resolution and target checkpoints (``test_targets.py``), the bank format, tau and atomic
saves (``test_banks.py``), the pipeline's missing data (``test_pipeline.py``).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import QUIET, ROOT, cli, says

from gencnp.banks.bank import PathwayBank
from gencnp.data.modules import SyntheticDataModule
from gencnp.io.checkpoint_io import seal
from gencnp.pathways import losses as LS

GENCNP, TARGET = str(ROOT / "configs/synthetic/gencnp.yaml"), str(ROOT / "configs/synthetic/target.yaml")
BANK = str(ROOT / "configs/synthetic/bank.yaml")
NAMES = [f"pattern_{k}" for k in range(4)]


# ----- what an earlier run left, and how to prove it is untouched -----
def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder``: files with their bytes, folders as ``None`` (an empty new folder counts)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def out(synthetic_runs, tmp_path, monkeypatch) -> Path:
    """A run folder with an earlier run's checkpoints, logs, bank and report; the current folder empty (and
    checked to stay empty: nothing may land in it either)."""
    run = tmp_path / "run"
    (run / "logs/version_0").mkdir(parents=True)
    shutil.copy(synthetic_runs["gencnp"], run / "best.ckpt")
    shutil.copy(synthetic_runs["gencnp_last"], run / "last.ckpt")
    (run / "logs/version_0/metrics.csv").write_text("epoch,step,train/loss\n0,0,1.0\n")
    (run / "config.yaml").write_text("# the resolved config of the earlier run\n")
    (run / "bank.safetensors").write_bytes(b"the earlier bank")
    (run / "eval").mkdir()
    (run / "eval/report.json").write_text("{}")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield run
    assert list(cwd.iterdir()) == [], "a command wrote into the current folder"


def fit_args(run: Path, synthetic_runs, *extra: str, config: str = GENCNP) -> list[str]:
    """``train.py fit`` with every output in ``run`` and only a ModelCheckpoint (a fast, quiet run)."""
    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(run),
                "filename": "best",
                "monitor": "val/score" if config == GENCNP else "val/acc",
                "mode": "max",
                "save_last": True,
                "enable_version_counter": False,
                "auto_insert_metric_name": False,
            },
        }
    ]
    model = ["--model.init_args.target_checkpoint", str(synthetic_runs["target"])] if config == GENCNP else []
    return [
        "fit",
        "--config",
        config,
        *QUIET,
        "--trainer.logger.init_args.save_dir",
        str(run),
        "--trainer.callbacks",
        json.dumps(callbacks),
        *model,
        *extra,
    ]


def predict_args(run: Path, synthetic_runs, *extra: str) -> list[str]:
    """``train.py predict --config configs/synthetic/bank.yaml`` writing the bank and config.yaml into ``run``."""
    return [
        "predict",
        "--config",
        BANK,
        *QUIET,
        "--model.init_args.target_checkpoint",
        str(synthetic_runs["target"]),
        "--trainer.callbacks.init_args.path",
        str(run / "bank.safetensors"),
        "--trainer.default_root_dir",
        str(run),
        *extra,
    ]


def refused(run: Path, exc: type[BaseException], match: str, *args: str) -> pytest.ExceptionInfo:
    """``train.py ARGS`` fails with ``exc`` matching ``match`` (a ``says`` pattern), and ``run`` is exactly as
    before."""
    before = tree(run)
    with pytest.raises(exc, match=match) as info:
        cli(*args)
    assert tree(run) == before
    return info


def stopped_mid_run(run: Path, exc: type[BaseException], match: str, *args: str) -> pytest.ExceptionInfo:
    """``train.py ARGS`` starts, then stops with ``exc``: earlier files unchanged, no checkpoint written, new files
    only inside the run's own new log folder."""
    before = tree(run)
    with pytest.raises(exc, match=match) as info:
        cli(*args)
    after = tree(run)
    assert {k: v for k, v in after.items() if k in before} == before
    new = sorted(set(after) - set(before))
    assert new and all(k == "logs/version_1" or k.startswith("logs/version_1/") for k in new), new
    assert not [k for k in new if k.endswith((".ckpt", ".tmp", ".safetensors"))]
    return info


# ----- data -----
class CorruptData(SyntheticDataModule):
    """Synthetic patterns with broken train images: from position ``bad_from`` on they hold ``value`` (``'nan'``
    or ``'inf'``), or every image is ``actual_size`` pixels wide while the module declares ``image_size``."""

    def __init__(
        self,
        value: str | None = None,
        bad_from: int = 0,
        actual_size: int | None = None,
        num_classes: int = 4,
        image_size: int = 16,
        n_train: int = 1200,
        n_test: int = 400,
        val_size: int = 200,
        batch_size: int = 64,
    ):
        super().__init__(
            num_classes=num_classes,
            image_size=image_size,
            n_train=n_train,
            n_test=n_test,
            val_size=val_size,
            batch_size=batch_size,
        )
        self.value, self.bad_from, self.actual_size = value, bad_from, actual_size
        self._broken = False

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.train_set is None or self._broken:
            return
        self._broken = True
        patterns = self.train_set.dataset
        if self.value is not None:
            patterns.images[torch.as_tensor(self.train_set.indices[self.bad_from :])] = float(self.value)
        if self.actual_size is not None:
            patterns.images = torch.nn.functional.interpolate(patterns.images, size=self.actual_size)


@pytest.mark.parametrize(
    "data,match",
    [
        (
            ["gencnp.FashionMNISTDataModule", "--data.init_args.data_dir", "{tmp}/nowhere"],
            says("nowhere' does not exist", "apt-get install -y dataset-fashion-mnist"),
        ),
        (
            ["gencnp.FashionMNISTDataModule", "--data.init_args.data_dir", "{tmp}/empty"],
            says("empty' is empty or lacks the IDX files"),
        ),
        (["gencnp.ImageFolderDataModule", "--data.init_args.root", "{tmp}/empty"], says("has no 'train' folder")),
        (
            ["gencnp.ImageFolderDataModule", "--data.init_args.root", "{tmp}/no_images"],
            says("no_images/train' is empty", "one sub-folder per class"),
        ),
        (
            ["gencnp.CIFAR10DataModule", "--data.init_args.data_dir", "{tmp}/empty"],
            says("cifar-10-batches-py' does not exist", "cifar-10-python.tar.gz"),
        ),
    ],
    ids=["fashion_missing", "fashion_empty", "imagefolder_empty", "imagefolder_no_images", "cifar_missing"],
)
def test_missing_or_empty_data_dir(out, synthetic_runs, tmp_path, data, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images/train/cat").mkdir(parents=True)
    cls, *init = [a.replace("{tmp}", str(tmp_path)) for a in data]
    refused(out, FileNotFoundError, match, *fit_args(out, synthetic_runs, "--data", cls, *init, config=TARGET))
    assert list((tmp_path / "empty").iterdir()) == []  # no download folder, no cache


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--data.init_args.image_size", "20"], says("(1, 16, 16)", "(1, 20, 20)", "in_chans/image_size")),
        (["--data.init_args.in_chans", "3"], says("(1, 16, 16)", "(3, 16, 16)")),
        # The data module declares 16x16 but its images are 20x20: the images themselves are checked.
        (
            ["--data", "test_bad_input.CorruptData", "--data.init_args.actual_size", "20"],
            says("train split gives images of shape (1, 20, 20)", "(1, 16, 16)", "nothing was run"),
        ),
    ],
    ids=["size", "channels", "actual_size"],
)
def test_wrong_image_size_or_channel_count(out, synthetic_runs, extra, match):
    refused(out, ValueError, match, *fit_args(out, synthetic_runs, *extra))


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nan_or_inf_inputs_fail_before_anything_is_written(out, synthetic_runs, value):
    refused(
        out,
        ValueError,
        says("train split holds NaN or Inf inputs", "nothing was run"),
        *fit_args(out, synthetic_runs, "--data", "test_bad_input.CorruptData", "--data.init_args.value", value),
    )


def test_nan_inputs_further_in_stop_training_at_their_batch(out, synthetic_runs):
    # The first 64 train images are clean (the check before the run passes); most later ones are NaN.
    stopped_mid_run(
        out,
        ValueError,
        says("train batch 0", "NaN or Inf"),
        *fit_args(
            out,
            synthetic_runs,
            "--data",
            "test_bad_input.CorruptData",
            "--data.init_args.value",
            "nan",
            "--data.init_args.bad_from",
            "64",
        ),
    )


def test_a_loss_going_non_finite_stops_and_names_the_step_and_the_term(out, synthetic_runs, monkeypatch):
    real, calls = LS.swap, []

    def swap_turning_nan(*args, **kwargs):  # the swap term becomes NaN from the 4th training step on
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) > 3 else value

    monkeypatch.setattr(LS, "swap", swap_turning_nan)
    stopped_mid_run(
        out,
        FloatingPointError,
        says("loss term 'swap' became non-finite", "global step 3"),
        *fit_args(out, synthetic_runs, "--model.init_args.losses.lambda_zero", "0"),
    )  # one LS.swap call per step


# ----- model -----
def test_unknown_tap_names(out, synthetic_runs):
    refused(
        out,
        KeyError,
        says("tap 'blocks.9' not found", "blocks.0, blocks.1, blocks.2"),
        *fit_args(out, synthetic_runs, "--model.init_args.taps", "[blocks.0, blocks.9]"),
    )


@pytest.fixture
def other_target(synthetic_runs, tmp_path) -> Path:
    """The synthetic target with one bias changed: same architecture, other weights."""
    from gencnp.targets.loading import load_target

    model = load_target("tiny_cnn", str(synthetic_runs["target"]), num_classes=4)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    path = tmp_path / "other_target.pt"
    torch.save(model.state_dict(), path)
    return path


def test_generator_checkpoint_for_another_target(out, synthetic_runs, other_target, tmp_path):
    fix = "point target_checkpoint at the original target weights"
    # Resuming with other target weights configured ...
    refused(
        out,
        ValueError,
        says("last.ckpt'", "trained for target 'tiny_cnn'", fix),
        *fit_args(out, synthetic_runs, "--model.init_args.target_checkpoint", str(other_target), "--ckpt_path", "last"),
    )
    # ... exporting a bank after the target file the generator names was replaced (retrained in place). With an
    # explicit --ckpt_path, LightningCLI takes the model's arguments from the checkpoint, target_checkpoint included.
    target = tmp_path / "target.ckpt"
    shutil.copy(synthetic_runs["target"], target)
    ckpt = torch.load(out / "best.ckpt", map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["target_checkpoint"] = str(target)
    torch.save(seal(ckpt), tmp_path / "generator.ckpt")  # an edit made on purpose, sealed again
    shutil.copy(other_target, target)
    refused(
        out,
        ValueError,
        says("trained for target 'tiny_cnn'", f"'{target}'", fix),
        *predict_args(out, synthetic_runs, "--ckpt_path", str(tmp_path / "generator.ckpt")),
    )
    # ... and a target checkpoint given where a generator checkpoint belongs.
    # (LightningCLI alone would swap the configured GenCNP for the TargetClassifier the checkpoint names.)
    for run in (fit_args, predict_args):
        refused(
            out,
            ValueError,
            says("written by gencnp.TargetClassifier", "model.init_args.target_checkpoint"),
            *run(out, synthetic_runs, "--ckpt_path", str(synthetic_runs["target"])),
        )
    # A checkpoint without the class it was written by (a bare torch.save of a Lightning checkpoint): GenCNP checks.
    ckpt = torch.load(synthetic_runs["target"], map_location="cpu", weights_only=True)
    ckpt.pop("hyper_parameters")
    torch.save(seal(ckpt), tmp_path / "bare_target.ckpt")
    refused(
        out,
        ValueError,
        says("has no 'gencnp' section", "not a GenCNP generator checkpoint"),
        *predict_args(out, synthetic_runs, "--ckpt_path", str(tmp_path / "bare_target.ckpt")),
    )


# ----- checkpoints: truncated, altered, wrong version, crafted -----
def flip_a_tensor_byte(data: bytes) -> bytes:
    """One bit flipped inside the largest tensor of a torch zip checkpoint (torch itself does not notice)."""
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    offset = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[offset + 26 : offset + 30])
    at = offset + 30 + name_len + extra_len + info.file_size // 2
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]


def damaged_checkpoint(good: Path, how: str) -> bytes:
    data = good.read_bytes()
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "altered_bytes":
        return flip_a_tensor_byte(data)
    ckpt = torch.load(good, map_location="cpu", weights_only=True)
    if how == "altered_weights":  # edited and re-saved by hand: the recorded integrity hash no longer holds
        key = next(k for k in ckpt["state_dict"] if k.startswith("generator."))
        ckpt["state_dict"][key] = ckpt["state_dict"][key] + 1e-3
    elif how == "wrong_version":  # written by another gencnp version: intact, with its own hashes
        ckpt["gencnp"]["format_version"] = 99
        seal(ckpt)
    import io

    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    return buffer.getvalue()


@pytest.mark.resume
@pytest.mark.parametrize(
    "how,match",
    [
        ("truncated", says("last.ckpt' is damaged", "truncated")),
        ("altered_bytes", says("last.ckpt' is damaged", "integrity hash")),
        ("altered_weights", says("last.ckpt' is damaged", "integrity hash")),
        ("wrong_version", says("generator checkpoint format 99", "reads format 1 only")),
    ],
    ids=["truncated", "altered_bytes", "altered_weights", "wrong_version"],
)
def test_truncated_altered_or_wrong_version_checkpoint(out, synthetic_runs, how, match):
    """``--ckpt_path last`` (resume) with a damaged last.ckpt: refused before anything is written."""
    (out / "last.ckpt").write_bytes(damaged_checkpoint(out / "last.ckpt", how))
    refused(out, ValueError, match, *fit_args(out, synthetic_runs, "--ckpt_path", "last"))


def test_truncated_target_checkpoint(out, synthetic_runs, tmp_path):
    bad = tmp_path / "target.ckpt"
    bad.write_bytes(synthetic_runs["target"].read_bytes()[:1000])
    refused(
        out,
        ValueError,
        says("target.ckpt' could not be loaded safely", "truncated"),
        *fit_args(out, synthetic_runs, "--model.init_args.target_checkpoint", str(bad)),
    )


class _Evil:
    """Unpickling this runs ``open(marker, 'w')``: code from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("container", ["pickle", "torch_zip"])
def test_crafted_pickle_as_a_checkpoint_is_refused_not_executed(out, synthetic_runs, tmp_path, container):
    from gencnp.io.checkpoint_io import read_checkpoint

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": _Evil(marker)}, "gencnp": {"format_version": 1}}
    if container == "pickle":
        evil.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, evil)
    assert not marker.exists()  # saving does not run it; loading with pickle would
    refusal = says("was refused", "Python objects other than tensors")
    with pytest.raises(ValueError, match=refusal):
        read_checkpoint(evil)
    refused(out, ValueError, refusal, *predict_args(out, synthetic_runs, "--ckpt_path", str(evil)))
    refused(out, ValueError, refusal, *fit_args(out, synthetic_runs, "--ckpt_path", str(evil)))
    assert not marker.exists()


# ----- banks: another target, another class list, truncated, altered, wrong version -----
@pytest.fixture
def report_inputs(synthetic_runs, tmp_path) -> dict:
    """What ``report`` needs apart from the bank, and a valid bank for the generator's target."""
    from gencnp import GenCNP

    model = GenCNP.load_from_checkpoint(synthetic_runs["gencnp"])
    g = torch.Generator().manual_seed(0)

    def bank_for(target, names) -> PathwayBank:
        bank = PathwayBank.for_target(target, names, tau=0.5)
        bank.update(torch.rand(40, target.num_channels, generator=g) < 0.5, torch.arange(40) % len(names))
        return bank

    return {
        "generator": str(synthetic_runs["gencnp"]),
        "target": model.target,
        "bank_for": bank_for,
        "good": bank_for(model.target, NAMES).save(tmp_path / "good.safetensors"),
    }


def report_refuses(out: Path, inputs: dict, bank: Path, match: str) -> None:
    """``evaluate.py report`` with ``bank``: refused with ``match`` (a ``says`` pattern), the earlier report
    untouched, no new report folder."""
    from gencnp.evaluation.report import report

    data = SyntheticDataModule(num_classes=4, image_size=16, n_train=1200, n_test=400, val_size=200)
    for out_dir in (out / "eval", out / "eval_new"):
        before = tree(out)
        with pytest.raises(ValueError, match=match):
            report(
                generator=inputs["generator"], bank=str(bank), data=data, out_dir=str(out_dir), limit=40, progress=False
            )
        assert tree(out) == before


def test_bank_for_another_target_or_class_list(out, report_inputs, tmp_path):
    from gencnp.targets.loading import FrozenTarget, create_target

    torch.manual_seed(1)
    other = FrozenTarget(
        create_target("tiny_cnn", num_classes=4), report_inputs["target"].tap_names, (1, 16, 16), arch="tiny_cnn"
    )  # same architecture, other weights
    path = report_inputs["bank_for"](other, NAMES).save(tmp_path / "other_target.safetensors")
    report_refuses(out, report_inputs, path, says("does not fit the given target", "re-export the bank"))
    names = ["pattern_0", "pattern_1", "pattern_3", "pattern_2"]
    path = report_inputs["bank_for"](report_inputs["target"], names).save(tmp_path / "other_classes.safetensors")
    report_refuses(out, report_inputs, path, says("built for classes", "#2 'pattern_3' vs 'pattern_2'"))


@pytest.mark.parametrize("how", ["truncated", "altered", "wrong_version"])
def test_truncated_altered_or_wrong_version_bank(out, report_inputs, tmp_path, how):
    from gencnp.banks import bank as banks_module

    good = Path(report_inputs["good"])
    data = good.read_bytes()
    bad = tmp_path / f"{how}.safetensors"
    if how == "truncated":
        bad.write_bytes(data[: len(data) // 2])
        problem = says(f"'{bad}' is damaged", "not a readable safetensors file")
    elif how == "altered":
        bad.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))  # one bit of n
        problem = says(f"'{bad}' is damaged", "checksum does not match")
    else:
        from safetensors.torch import save_file

        bank = PathwayBank.load(good)
        meta = json.dumps({**bank.metadata, "format_version": 99}, sort_keys=True)
        digest = banks_module._checksum(meta, bank.counts.numpy(), bank.n.numpy())
        save_file({"counts": bank.counts, "n": bank.n}, str(bad), metadata={"gencnp": meta, "sha256": digest})
        problem = says(f"'{bad}' has format_version 99", "reads format_version 1 only")
    report_refuses(out, report_inputs, bad, problem)


# ----- config -----
@pytest.mark.parametrize("where", ["command_line", "yaml"])
def test_config_key_that_does_not_exist(out, synthetic_runs, tmp_path, capsys, where):
    if where == "yaml":
        extra = tmp_path / "extra.yaml"
        extra.write_text("model:\n  init_args:\n    lamda_sp: 2.0\n")
        args, key = ["--config", str(extra)], "lamda_sp"
    else:
        args, key = ["--trainer.max_epochz", "3"], "trainer.max_epochz"
    before = tree(out)
    with pytest.raises(SystemExit) as info:
        cli(*fit_args(out, synthetic_runs, *args))
    err = capsys.readouterr().err
    assert info.value.code == 2 and tree(out) == before
    if where == "yaml":
        assert f"'{key}' is not an argument of gencnp.GenCNP" in err and "Did you mean 'sparsity.lambda_sp'" in err
    else:
        assert f"'{key}' is not a config key" in err and "Did you mean 'max_epochs'" in err
    assert "Fix the key" in err


def test_a_flat_0_2_setting_in_a_config_names_its_group(out, synthetic_runs, tmp_path, capsys):
    extra = tmp_path / "extra.yaml"
    extra.write_text("model:\n  init_args:\n    lambda_swap: 2.0\n")
    before = tree(out)
    with pytest.raises(SystemExit) as info:
        cli(*fit_args(out, synthetic_runs, "--config", str(extra)))
    err = capsys.readouterr().err
    assert info.value.code == 2 and tree(out) == before
    assert (
        "flat form of gencnp 0.2" in err and "group 'losses'" in err and "--model.init_args.losses.lambda_swap" in err
    )


@pytest.mark.parametrize("taus", ["[0.0, 0.5]", "[0.5, 1.5]"])
def test_tau_outside_0_1(out, synthetic_runs, taus):
    bad = "0.0" if "0.0" in taus else "1.5"
    refused(
        out,
        ValueError,
        says("taus must lie in (0, 1]", f"[{bad}]"),
        *predict_args(
            out, synthetic_runs, "--ckpt_path", str(out / "best.ckpt"), "--trainer.callbacks.init_args.taus", taus
        ),
    )
    # A bank's own tau: PathwayBank refuses it when set, used or loaded (test_banks.py::test_tau_outside_0_1_*).
    bank = PathwayBank(NAMES, ["a"], [2], "tiny_cnn", "h")
    with pytest.raises(ValueError, match=says("tau=1.5 is outside the valid range")):
        bank.tau = 1.5


# ----- output folders -----
def test_output_folder_under_a_file(out, synthetic_runs, tmp_path):
    """A folder path running through a regular file cannot be created, for root too."""
    blocker = out / "config.yaml"  # an existing file of the earlier run
    refused(
        out,
        NotADirectoryError,
        says("log folder of CSVLogger", "is a file, not a folder", "trainer.logger.init_args.save_dir"),
        *fit_args(out, synthetic_runs, "--trainer.logger.init_args.save_dir", str(blocker / "logs")),
    )
    refused(
        out,
        NotADirectoryError,
        says("folder of PathwayBankWriter's file", "is a file, not a folder"),
        *predict_args(
            out,
            synthetic_runs,
            "--ckpt_path",
            str(out / "best.ckpt"),
            "--trainer.callbacks.init_args.path",
            str(blocker / "bank.safetensors"),
        ),
    )
    from gencnp.evaluation.report import report

    before = tree(out)
    with pytest.raises(NotADirectoryError, match=says("report folder", "is a file, not a folder", "set out_dir")):
        report(
            generator=str(synthetic_runs["gencnp"]),
            bank=None,
            out_dir=str(blocker / "eval"),
            progress=False,
            data=SyntheticDataModule(num_classes=4, image_size=16, n_train=1200, n_test=400, val_size=200),
        )
    assert tree(out) == before


def test_output_folder_without_write_permission(out, synthetic_runs, tmp_path, monkeypatch):
    """Permission bits do not stop root (these tests run as root in CI), so for root the check's own view of the
    folder is made read-only (``os.access``), as it is for any other user after ``chmod 555``."""
    import gencnp.pipeline.preflight as preflight

    locked = out / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(preflight.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    try:
        refused(
            out,
            PermissionError,
            says("checkpoint folder", "locked' is not writable", "dirpath of ModelCheckpoint"),
            *fit_args(out, synthetic_runs, "--trainer.callbacks.init_args.dirpath", str(locked / "ckpt")),
        )
    finally:
        locked.chmod(0o755)


# ----- Weights & Biases online without a network -----
@pytest.fixture
def wandb_online(monkeypatch, tmp_path):
    """W&B asked for online (no WANDB_MODE), a key, and a server on a closed port."""
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    wandb.finish()
    yield
    wandb.finish()


def test_wandb_online_without_network_fails_in_seconds(out, synthetic_runs, wandb_online, monkeypatch):
    online = [
        "--trainer.logger",
        str(ROOT / "configs/loggers/wandb.yaml"),
        "--trainer.logger.init_args.offline",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(out),
    ]
    offline = "WANDB_MODE=offline"
    start = time.monotonic()
    refused(
        out,
        ValueError,
        says("127.0.0.1:9 cannot be reached", "ConnectionRefusedError", offline),
        *fit_args(out, synthetic_runs, *online),
    )
    monkeypatch.delenv("WANDB_API_KEY")
    refused(out, ValueError, says("no API key", "wandb login", offline), *fit_args(out, synthetic_runs, *online))
    assert time.monotonic() - start < 30  # W&B itself would hang for about 105 s


def test_wandb_host_whose_name_never_resolves_is_given_up_after_the_timeout(wandb_online, monkeypatch):
    """getaddrinfo ignores socket timeouts (a dead DNS server blocks for minutes): the check does not wait for it."""
    from lightning.pytorch.loggers import WandbLogger

    import gencnp.pipeline.preflight as preflight

    release = threading.Event()

    def stuck(*args, **kwargs):
        release.wait(60)
        raise OSError("released")

    monkeypatch.setattr(preflight.socket, "getaddrinfo", stuck)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.invalid")
    start = time.monotonic()
    try:
        with pytest.raises(ValueError, match=says("wandb.example.invalid:443 cannot be reached", "name resolution")):
            preflight.check_wandb_online([WandbLogger(offline=False)], timeout=0.5)
        assert time.monotonic() - start < 5
    finally:
        release.set()
