"""PathwayImageLogger and experiment tracking: pictures, tables, metrics and the resolved config reach CSV, W&B
(offline, no network, wrong key) and TensorBoard, inside ``fit`` and inside ``validate``."""

from __future__ import annotations

import csv
import json
import math
import struct
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUIET, ROOT, cli

from gencnp.callbacks.pathway_images import TABLE_COLUMNS, PathwayImageLogger, _pick_grid, class_table, frequency_figure

GENCNP = str(ROOT / "configs/synthetic/gencnp.yaml")
# An untrained tiny target (no checkpoint) and a few batches: the pictures, not the numbers, are under test.
SMALL = [
    "--model.init_args.target_checkpoint",
    "null",
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "3",
    "--trainer.limit_val_batches",
    "2",
    "--trainer.log_every_n_steps",
    "1",
]


def _fit(out: Path, *extra: str):
    return cli(
        "fit",
        "--config",
        GENCNP,
        *QUIET,
        *SMALL,
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--trainer.callbacks.init_args.dirpath",
        str(out),
        *extra,
    )


def _validate(out: Path, *extra: str):
    # Zero ablation: an untrained model under `validate` has no mean-ablation fill (that is computed at fit start).
    return cli(
        "validate",
        "--config",
        GENCNP,
        *QUIET,
        "--model.init_args.target_checkpoint",
        "null",
        "--model.init_args.ablation",
        "zero",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.logger.init_args.save_dir",
        str(out),
        *extra,
    )


def _image_logger(run) -> PathwayImageLogger:
    return next(c for c in run.trainer.callbacks if isinstance(c, PathwayImageLogger))


def _check_png(path: Path, min_side: int = 150) -> None:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, (path, im.size)


def _check_rows(rows: list[dict], num_classes: int = 4) -> None:
    assert rows[-1]["class"] == "all" and 1 <= len(rows) - 1 <= num_classes
    assert sum(int(r["n"]) for r in rows[:-1]) == int(rows[-1]["n"]) > 0
    for r in rows:
        for key in ("kept_mean", "agreement", "zero_forcing"):
            assert 0.0 <= float(r[key]) <= 1.0, (key, r)


@pytest.mark.slow
# ----- CSV -----
def test_csv_logger_gets_pictures_and_tables_in_fit_and_validate(tmp_path):
    run = _fit(tmp_path / "fit")
    version = Path(run.trainer.logger.log_dir)
    pics = version / "pathway_images"
    names = sorted(p.name for p in pics.iterdir())
    stem = "fit_epoch000_step000003"
    assert names == [f"{stem}_{k}" for k in ("frequency.png", "gradients.png", "per_class.csv", "per_class.md")]
    _check_png(pics / f"{stem}_frequency.png")
    _check_png(pics / f"{stem}_gradients.png")
    with open(pics / f"{stem}_per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == TABLE_COLUMNS
    _check_rows(rows)
    assert (pics / f"{stem}_per_class.md").read_text().startswith("| class | n | kept_mean | acIOU |")
    # The resolved config and every loss term and metric sit next to the pictures.
    config = yaml.safe_load((version / "config.yaml").read_text())
    assert config["trainer"]["callbacks"][0]["class_path"] == "gencnp.callbacks.PathwayImageLogger"
    with open(version / "metrics.csv") as f:
        header = next(csv.reader(f))
    for key in (
        "train/loss_kd",
        "train/loss_sparsity",
        "train/loss_swap",
        "train/loss_cls",
        "train/loss_con",
        "val/agreement",
        "val/kept_mean",
        "val/swap_forcing",
        "val/zero_forcing",
        "val/acIOU",
        "val/score",
    ):
        assert key in header, key
    assert "lambda_sp" in yaml.safe_load((version / "hparams.yaml").read_text())["sparsity"]

    val = _validate(tmp_path / "val")
    pics = Path(val.trainer.logger.log_dir) / "pathway_images"
    assert sorted(p.name.split("_", 3)[-1] for p in pics.iterdir()) == [
        "frequency.png",
        "gradients.png",
        "per_class.csv",
        "per_class.md",
    ]
    assert all(p.name.startswith("validate_") for p in pics.iterdir())
    assert _image_logger(val).written and all(Path(p).is_file() for p in _image_logger(val).written)


# ----- W&B, offline -----
def _wandb_records(path: Path):
    """Records of a W&B transaction log (``run-<id>.wandb``: a LevelDB-style log of protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, block, partial = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a record header never straddles a block: the rest is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(partial + payload)
            partial = b""
            yield record
        else:
            partial += payload


def _wandb_run(save_dir: Path) -> tuple[Path, dict[str, list], dict, dict]:
    """The single offline run under ``save_dir``: its folder, history (key -> logged values), config and summary.

    wandb 0.31 writes no ``files/wandb-summary.json`` or ``files/config.yaml`` for an offline run (``wandb sync``
    builds them): history, config and summary live only in the transaction log, read here record by record.
    """
    runs = list((save_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    log = next(runs[0].glob("run-*.wandb"))
    for _ in range(120):  # wandb's service process may still be writing after finish() returns
        if any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(log)):
            break
        time.sleep(0.25)
    history: dict[str, list] = {}
    config, summary = {}, {}
    for rec in _wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            for item in rec.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in rec.config.update if u.key})
        elif kind == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in rec.summary.update})
    return runs[0], history, config, summary


@pytest.fixture
def wandb_no_network(monkeypatch):
    """W&B chosen by config only (no WANDB_MODE), with a wrong API key and an unreachable server."""
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)  # restored afterwards, even though WandbLogger sets it process-wide
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb.finish()
    yield wandb
    wandb.finish()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_wandb_offline_run_gets_pictures_metrics_and_config_in_fit_and_validate(tmp_path, wandb_no_network):
    logger = ["--trainer.logger", str(ROOT / "configs/loggers/wandb.yaml")]
    _fit(tmp_path / "fit", *logger)
    wandb_no_network.finish()  # WandbLogger leaves the run open; finishing flushes the transaction log
    run, history, config, summary = _wandb_run(tmp_path / "fit")
    images = sorted(p.name for p in run.glob("files/media/images/*.png"))
    assert any(n.startswith("pathway_frequency_") for n in images) and any(
        n.startswith("pathway_gradients_") for n in images
    )
    for p in run.glob("files/media/images/*.png"):
        _check_png(p)
    (table,) = run.glob("files/media/table/pathway_per_class_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"] == TABLE_COLUMNS
    _check_rows([dict(zip(content["columns"], r)) for r in content["data"]])
    # Every loss term and validation metric is in the history with numbers (3 steps, 1 validation), and the run's
    # summary holds their last values.
    losses = (
        "train/loss",
        "train/loss_kd",
        "train/loss_sparsity",
        "train/loss_swap",
        "train/loss_cls",
        "train/loss_con",
    )
    rates = ("val/agreement", "val/kept_mean", "val/swap_forcing", "val/zero_forcing", "val/acIOU")
    for key in (*losses, *rates, "val/score", "train/kept", "trainer/global_step"):
        assert key in history, key
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in history[key]), (key, history[key])
        assert summary.get(key) == history[key][-1], (key, summary.get(key), history[key])
    assert len(history["train/loss"]) == 3 and len(history["val/agreement"]) == 1
    assert all(0.0 <= history[k][0] <= 1.0 for k in rates)
    # The pictures are history entries too (W&B's image and table types, pointing at the files above).
    frequency = history["pathway_frequency/filenames"][-1]
    assert len(frequency) == 1 and (run / "files" / frequency[0]).is_file()
    assert history["pathway_per_class/_type"] == ["table-file"]
    # Hyper-parameters (Lightning) and the resolved config (ConfigSaver) are the run's config.
    grouped = yaml.safe_load(Path(GENCNP).read_text())["model"]["init_args"]["sparsity"]["lambda_sp"]
    assert config["sparsity"]["lambda_sp"] == grouped == 10.0
    resolved = config["config"]
    assert resolved["model"]["class_path"] == "gencnp.GenCNP" and resolved["trainer"]["logger"]["init_args"]["offline"]
    assert yaml.safe_load((run / "files/resolved_config.yaml").read_text()) == resolved

    _validate(tmp_path / "val", *logger)
    wandb_no_network.finish()
    run, history, _, summary = _wandb_run(tmp_path / "val")
    assert len(list(run.glob("files/media/images/pathway_*.png"))) == 2
    assert 0.0 <= summary["val/agreement"] <= 1.0 and history["val/agreement"] == [summary["val/agreement"]]
    assert (run / "files" / history["pathway_gradients/filenames"][-1][0]).is_file()


# ----- TensorBoard -----
def test_tensorboard_gets_images_table_and_config_in_validate_under_inference_mode(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # inference_mode true: the callback still takes gradients (it leaves inference mode and clones its tensors).
    run = _validate(
        tmp_path, "--trainer.logger", str(ROOT / "configs/loggers/tensorboard.yaml"), "--trainer.inference_mode", "true"
    )
    events = EventAccumulator(run.trainer.logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"pathway_frequency", "pathway_gradients"} <= set(tags["images"])
    assert {"config/text_summary", "pathway_per_class/text_summary"} <= set(tags["tensors"])
    assert "val/agreement" in tags["scalars"]
    assert not (Path(run.trainer.logger.log_dir) / "pathway_images").exists()  # no stray files for TensorBoard


def test_missing_tensorboard_fails_before_anything_naming_the_extra(tmp_path, monkeypatch):
    import gencnp.tracking as tracking

    monkeypatch.setattr(tracking, "_tensorboard_available", lambda: False)
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[tb\]"'):
        _validate(tmp_path / "tb", "--trainer.logger", str(ROOT / "configs/loggers/tensorboard.yaml"))
    assert not (tmp_path / "tb").exists()


def test_logger_configs_parse_as_trainer_logger_overrides():
    from gencnp.pipeline.run import resolved_config

    for name, cls in (("csv", "CSVLogger"), ("tensorboard", "TensorBoardLogger"), ("wandb", "WandbLogger")):
        text = resolved_config(
            [
                str(ROOT / "train.py"),
                "fit",
                "--config",
                GENCNP,
                "--trainer.logger",
                str(ROOT / f"configs/loggers/{name}.yaml"),
            ]
        )
        logger = yaml.safe_load(text)["trainer"]["logger"]
        assert logger["class_path"] == f"lightning.pytorch.loggers.{cls}"
        assert logger["init_args"]["save_dir"] == "runs/synthetic/gencnp"  # kept from the base config
        if name == "wandb":
            assert logger["init_args"]["offline"] is True and logger["init_args"]["log_model"] is False


# ----- pieces with known answers -----
def test_class_table_matches_hand_computed_rates():
    # Class 0: two identical pathways {0, 1} of D = 4 -> kept 0.5, acIOU 1; class 1: {2} and {2, 3} -> acIOU 0.5.
    paths = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    classes = torch.tensor([0, 0, 1, 1])
    # n, kept sum, agree, swap forced, swap valid, zero forced
    sums = torch.tensor([[2, 1.0, 2, 1, 2, 0], [2, 0.75, 1, 0, 1, 2], [0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    rows = class_table(sums, paths, classes, ["a", "b", "empty"])
    assert [r[0] for r in rows] == ["a", "b", "all"]  # classes without images are left out
    assert rows[0] == ["a", 2, 0.5, 1.0, 1.0, 0.5, 0.0]
    assert rows[1] == ["b", 2, 0.375, 0.5, 0.5, 0.0, 1.0]
    assert rows[2][:3] == ["all", 4, 0.4375] and rows[2][3] == pytest.approx(0.75)


def test_grid_picks_round_robin_over_classes():
    pool = [{"y_hat": torch.tensor(c), "i": i} for i, c in enumerate([2, 2, 2, 0, 1, 0])]
    assert [p["i"] for p in _pick_grid(pool, 4)] == [3, 4, 0, 5]
    assert _pick_grid(pool, 0) == [] and len(_pick_grid(pool, 10)) == 6


def test_bad_arguments_and_models_are_refused():
    with pytest.raises(ValueError, match="every_n_val must be >= 1"):
        PathwayImageLogger(every_n_val=0)
    with pytest.raises(ValueError, match="max_samples"):
        PathwayImageLogger(max_samples=0)
    from gencnp import TargetClassifier

    with pytest.raises(TypeError, match="needs a GenCNP model"):
        PathwayImageLogger().setup(None, TargetClassifier(arch="tiny_cnn", num_classes=4, image_size=16), "fit")


def _texts_apart(fig, groups: list[list]) -> None:
    """Within each group, the texts of ``fig`` (drawn at its size) do not overlap one another."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for group in groups:
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in group if t.get_visible() and t.get_text()]
        for i, (ta, a) in enumerate(boxes):
            for tb, b in boxes[i + 1 :]:
                assert not a.overlaps(b), (ta, tb)


def test_frequency_figure_is_labelled_with_class_names_and_a_colour_bar():
    from gencnp.data.modules import FASHION_MNIST_CLASSES

    taps, channels = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"], [32, 64, 64, 128]
    g = torch.Generator().manual_seed(0)
    n = torch.randint(50, 120, (10,), generator=g).double()
    n[3] = 0  # a class without images: a grey row, said in the title
    counts = (torch.rand(10, sum(channels), generator=g, dtype=torch.float64) * n[:, None]).round()
    fig = frequency_figure(counts, n, taps, channels, list(FASHION_MNIST_CLASSES), "fit, epoch 0", "pred")
    heatmaps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(heatmaps) == len(taps)
    for ax, tap, c in zip(heatmaps, taps, channels):
        assert ax.get_xlabel() == f"channel of {tap}" and ax.get_ylabel() == "class\n(target prediction)"
        assert ax.get_title(loc="left").startswith(f"tap {tap}: {c} channels, kept ")
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == [f"{name} (n={int(m)})" for name, m in zip(FASHION_MNIST_CLASSES, n.tolist())]
    (bar,) = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert bar.get_ylabel().startswith("selection frequency") and bar.get_ylim() == (0.0, 1.0)
    assert "grey rows: classes without images" in fig._suptitle.get_text()
    # Row labels apart; panel titles, axis labels and the figure title apart from one another.
    headings = [fig._suptitle] + [t for ax in heatmaps for t in (ax._left_title, ax.xaxis.label, ax.yaxis.label)]
    _texts_apart(fig, [list(ax.get_yticklabels()) for ax in heatmaps] + [headings])
