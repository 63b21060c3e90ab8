"""Every YAML under configs/ parses and instantiates (LightningCLI configs through the CLI parser)."""

from pathlib import Path

import pytest
import yaml
from conftest import ROOT

CLI_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "trainer" in (yaml.safe_load(p.read_text()) or {}))
OTHER = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p not in CLI_CONFIGS)


@pytest.mark.parametrize("path", CLI_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_lightning_configs_parse(path):
    from lightning.pytorch.cli import LightningArgumentParser

    from gencnp.cli import GenCNPCLI

    cli = GenCNPCLI.__new__(GenCNPCLI)
    parser = LightningArgumentParser()
    parser.add_lightning_class_args(__import__("lightning").LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(__import__("lightning").LightningDataModule, "data", subclass_mode=True)
    parser.add_lightning_class_args(__import__("lightning").Trainer, "trainer")
    parser.add_argument("--seed_everything", type=int | bool, default=True)
    parser.add_argument("--return_predictions", type=bool | None, default=None)
    parser.add_argument("--ckpt_path", type=str | None, default=None)
    cfg = parser.parse_path(str(path), defaults=True)
    assert cfg.model.class_path.startswith("gencnp.") and cfg.data.class_path.startswith("gencnp.")
    assert cli is not None


def test_synthetic_config_instantiates():
    from gencnp.data import SyntheticDataModule
    from gencnp.systems import TargetClassifier

    cfg = yaml.safe_load((ROOT / "configs/synthetic/target.yaml").read_text())
    model = TargetClassifier(**cfg["model"]["init_args"])
    data = SyntheticDataModule(**cfg["data"]["init_args"])
    model.check_data(data)


@pytest.mark.parametrize("path", OTHER, ids=lambda p: str(p.relative_to(ROOT)))
def test_other_configs_are_valid_yaml(path):
    assert yaml.safe_load(Path(path).read_text()) is not None
