"""Every YAML under configs/ is read by the parser of the command that uses it: ``train.py`` (LightningCLI) for
target, generator and bank configs, ``evaluate.py`` (jsonargparse ``CLI``) for report, attribution and diffusion
configs, ``gencnp.pipeline.run.load_pipeline`` for pipelines (each stage's config and arguments then through its entry
point), ``gencnp.evaluation.sweep`` points as the overrides ``train.py`` receives, and logger configs as ``--trainer.logger``.
Parsing checks every key and type against the constructors and functions; nothing is instantiated (most configs
need the checkpoints of earlier stages)."""

from __future__ import annotations

import contextlib
import importlib
import io
import runpy
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from jsonargparse import capture_parser

from gencnp.cli import GenCNPCLI, main
from gencnp.evaluation import sweep
from gencnp.pipeline import run as P

CONFIGS = ROOT / "configs"
# (entry point, sub-command) reading each kind of config, by file name.
READERS = {
    "target.yaml": ("train.py", "fit"),
    "gencnp.yaml": ("train.py", "fit"),
    "gencnp_budgets.yaml": ("train.py", "fit"),
    "bank.yaml": ("train.py", "predict"),
    "evaluate.yaml": ("evaluate.py", "report"),
    "attribution.yaml": ("evaluate.py", "attribution"),
    "diffusion.yaml": ("evaluate.py", "diffusion"),
    "detect.yaml": ("evaluate.py", "detect"),
}
ALL = sorted(CONFIGS.rglob("*.yaml"))
PIPELINES = [p for p in ALL if p.name == "pipeline.yaml"]
SWEEPS = [p for p in ALL if p.name == "sweep.yaml"]
LOGGERS = sorted((CONFIGS / "loggers").glob("*.yaml"))
COMMAND_CONFIGS = [p for p in ALL if p.name in READERS]


def _id(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


@pytest.fixture(scope="module")
def parsers() -> dict:
    """The parsers ``train.py`` and ``evaluate.py`` build, captured before they parse anything."""
    return {
        "train.py": capture_parser(lambda: main(args=[])),
        "evaluate.py": capture_parser(lambda: runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")),
    }


@pytest.fixture(autouse=True)
def from_the_repository(monkeypatch):
    """Run from the repository root, as the configs' comments say (``examples.mynet.MyNet`` resolves from there)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))


def parse(parsers: dict, entry: str, command: str, *args: str):
    """``python ENTRY COMMAND ARGS`` parsed (not run); a parse error fails the test with the parser's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cfg = parsers[Path(entry).name].parse_args([command, *map(str, args)])
    except SystemExit:
        pytest.fail(f"`{entry} {command} {' '.join(map(str, args))}` does not parse:\n{err.getvalue()[-3000:]}")
    return cfg[command]


def importable(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_config_has_a_reader():
    kinds = set(COMMAND_CONFIGS) | set(PIPELINES) | set(SWEEPS) | set(LOGGERS)
    assert kinds == set(ALL), sorted(_id(p) for p in set(ALL) - kinds)
    assert len(PIPELINES) >= 6 and SWEEPS and len(LOGGERS) == 3


@pytest.mark.parametrize("path", PIPELINES, ids=_id)
def test_pipeline_stages_use_the_reader_of_their_config(path):
    stages = P.load_pipeline(path)["stages"]
    assert [s.name for s in stages[:3]] == ["target", "gencnp", "bank"]
    for st in stages:
        assert (st.entry, st.command) == READERS[Path(st.config).name], st.name
        assert (ROOT / st.config).is_file() and Path(st.config).parent == path.parent.relative_to(ROOT), st.config


@pytest.mark.parametrize("path", [p for p in COMMAND_CONFIGS if READERS[p.name][0] == "train.py"], ids=_id)
def test_train_configs_parse(parsers, path):
    cfg = parse(parsers, *READERS[path.name], "--config", path)
    model, data = importable(cfg.model.class_path), importable(cfg.data.class_path)
    assert model.__module__.startswith("gencnp.") and data.__module__.startswith("gencnp.")
    callbacks = [c.class_path for c in cfg.trainer.callbacks or []]
    if path.name == "bank.yaml":
        assert cfg.model.class_path == "gencnp.GenCNP" and "gencnp.callbacks.PathwayBankWriter" in callbacks
        assert cfg.return_predictions is False
    else:
        assert any(c.endswith("ModelCheckpoint") for c in callbacks)
        assert cfg.model.class_path == ("gencnp.TargetClassifier" if path.name == "target.yaml" else "gencnp.GenCNP")


@pytest.mark.parametrize("path", [p for p in COMMAND_CONFIGS if READERS[p.name][0] == "evaluate.py"], ids=_id)
def test_evaluate_configs_parse(parsers, path):
    cfg = parse(parsers, *READERS[path.name], "--config", path)
    data = cfg.data if isinstance(cfg.data, dict) else vars(cfg.data)
    assert importable(data["class_path"]).__module__.startswith("gencnp.")
    runs = f"runs/{path.parent.relative_to(CONFIGS).as_posix()}"  # configs/a/b/evaluate.yaml -> runs/a/b/
    assert cfg.out_dir.startswith(f"{runs}/")
    if path.name != "diffusion.yaml":
        assert cfg.generator == f"{runs}/gencnp/best.ckpt"


@pytest.mark.parametrize("path", PIPELINES, ids=_id)
def test_pipeline_stage_commands_parse(parsers, path):
    """What the pipeline runs: each stage's entry point, sub-command, config and extra arguments."""
    spec = P.load_pipeline(path)
    for st in spec["stages"]:
        cfg = parse(parsers, st.entry, st.command, "--config", ROOT / st.config, *st.args)
        assert cfg.config, st.name
    assert spec["report"] in [o for st in spec["stages"] for o in st.outputs]


@pytest.mark.parametrize("path", LOGGERS, ids=_id)
def test_logger_configs_parse_as_trainer_logger(parsers, path):
    cfg = parse(parsers, "train.py", "fit", "--config", CONFIGS / "synthetic/gencnp.yaml", "--trainer.logger", path)
    logger = cfg.trainer.logger
    assert logger.class_path == yaml.safe_load(path.read_text())["class_path"]
    assert logger.init_args.save_dir == "runs/synthetic/gencnp"  # kept from the base config


@pytest.mark.parametrize("path", SWEEPS, ids=_id)
def test_sweep_points_parse_as_train_overrides(parsers, path, tmp_path):
    """Each point's overrides as ``gencnp.evaluation.sweep.run_point`` passes them to ``train.py fit`` (its base config: the
    generator config next to the sweep file)."""
    points = yaml.safe_load(path.read_text())
    assert len({p["name"] for p in points}) == len(points) > 0
    for point in points:
        assert set(point) <= {"name", "model", "trainer"}, point["name"]
        overrides = tmp_path / f"{point['name']}.yaml"
        overrides.write_text(yaml.safe_dump(sweep.point_overrides(point)))
        cfg = parse(parsers, "train.py", "fit", "--config", path.parent / "gencnp.yaml", "--config", overrides)
        for k, v in (point.get("model") or {}).items():  # flat 0.2 names land in their group
            assert cfg.model.init_args[sweep.grouped_key(k)] == v, (point["name"], k)
        for k, v in (point.get("trainer") or {}).items():
            assert cfg.trainer[k] == v, (point["name"], k)


def test_synthetic_target_config_instantiates(tmp_path):
    """The one config that needs no earlier output builds its model, data and trainer (nothing is run)."""
    from gencnp import SyntheticDataModule, TargetClassifier

    path = CONFIGS / "synthetic/target.yaml"
    cli = GenCNPCLI(
        args=[
            "--config",
            str(path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.callbacks.init_args.dirpath",
            str(tmp_path),
        ],
        run=False,
    )
    assert isinstance(cli.model, TargetClassifier) and isinstance(cli.datamodule, SyntheticDataModule)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 4
    assert cli.trainer.max_epochs == yaml.safe_load(path.read_text())["trainer"]["max_epochs"]
    cli.model.check_data(cli.datamodule)
    assert list(tmp_path.iterdir()) == []  # nothing written before a run
