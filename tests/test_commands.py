"""The ``gencnp`` console command dispatches to the same parsers as ``train.py``, ``evaluate.py`` and the pipeline."""

from __future__ import annotations

import importlib.metadata

import pytest
import tomllib
from conftest import ROOT

from gencnp import commands


def test_the_console_script_is_declared_and_resolves():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gencnp"] == "gencnp.commands:main"
    installed = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "gencnp"]
    if installed:  # the editable install of this checkout
        assert installed[0].load() is commands.main


@pytest.mark.parametrize(
    "argv,usage",
    [
        (["fit", "--help"], "fit [-c CONFIG]"),
        (["report", "--help"], "report [--config CONFIG]"),
        (["taps", "--help"], "taps [--config CONFIG]"),
        (["pipeline", "--help"], "--config CONFIG"),
    ],
)
def test_commands_reach_their_parsers(argv, usage, capsys):
    with pytest.raises(SystemExit) as info:
        commands.main(argv)
    assert info.value.code == 0 and usage in capsys.readouterr().out


def test_unknown_command_lists_the_commands(capsys):
    assert commands.main(["fitt"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'fitt'" in err and "fit, validate, test, predict" in err and "detect" in err
    assert commands.main([]) == 2 and "usage: gencnp COMMAND" in capsys.readouterr().out
