"""The ``gencnp`` console command: one entry point for every tool, with the same parsers as the scripts.

``gencnp fit|validate|test|predict ...`` is ``python train.py ...`` (LightningCLI); ``gencnp report|inspect|
diffusion|lookup|taps|attribution|detect ...`` is ``python evaluate.py ...``; ``gencnp pipeline ...`` is
``python -m gencnp.pipeline ...``; ``gencnp sweep``, ``gencnp seal`` and ``gencnp shards`` are the frontier sweep,
checkpoint sealing and the ImageFolder-to-shards converter. A top-layer module: it may import everything.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

__all__ = ["EVALUATE_COMMANDS", "TRAIN_COMMANDS", "evaluate", "main"]

TRAIN_COMMANDS = ("fit", "validate", "test", "predict")


def evaluate_commands() -> dict[str, Callable]:
    """``evaluate.py``'s sub-commands: name -> function (jsonargparse builds each parser from its signature)."""
    from gencnp.banks.bank import inspect_bank
    from gencnp.detection import detect
    from gencnp.evaluation.attributions.evaluate import attribution
    from gencnp.evaluation.diffusion import diffusion
    from gencnp.evaluation.lookup import lookup_frontier
    from gencnp.evaluation.report import report
    from gencnp.targets.taps import list_taps

    return {
        "report": report,
        "inspect": inspect_bank,
        "diffusion": diffusion,
        "lookup": lookup_frontier,
        "taps": list_taps,
        "attribution": attribution,
        "detect": detect,
    }


EVALUATE_COMMANDS = ("report", "inspect", "diffusion", "lookup", "taps", "attribution", "detect")


def evaluate(args: Sequence[str] | None = None, prog: str = "evaluate.py") -> None:
    """``python evaluate.py COMMAND ...``: a full disk is one line and exit 1 (earlier files stay whole)."""
    from jsonargparse import CLI

    from gencnp.cli import importable_cwd, stop_on_full_disk
    from gencnp.pipeline.preflight import ConfigHintArgumentParser

    importable_cwd()  # targets given by class path resolve from the working directory
    with stop_on_full_disk(prog):
        CLI(
            evaluate_commands(),
            args=None if args is None else list(args),
            as_positional=False,
            parser_class=ConfigHintArgumentParser,  # "did you mean" for config keys that do not exist
        )


def _other(name: str, args: list[str]) -> int:
    if name == "pipeline":
        from gencnp.pipeline.run import main as pipeline

        return pipeline(args)
    if name == "sweep":
        from jsonargparse import CLI

        from gencnp.evaluation.sweep import main as sweep

        CLI(sweep, args=args, as_positional=False)
        return 0
    if name == "seal":
        from gencnp.io.checkpoint_io import main as seal

        return seal(["seal", *args])
    from gencnp.data.shards import main as shards

    shards(args)
    return 0


USAGE = """usage: gencnp COMMAND [options]

train (LightningCLI, as python train.py):   fit, validate, test, predict
evaluate (as python evaluate.py):           report, inspect, diffusion, lookup, taps, attribution, detect
the main job (as python -m gencnp.pipeline): pipeline
tools:                                      sweep, seal, shards

gencnp COMMAND --help lists a command's options."""


def main(argv: Sequence[str] | None = None) -> int:
    """``gencnp COMMAND ...`` (the ``[project.scripts]`` entry point)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name in TRAIN_COMMANDS:
        from gencnp.cli import main as train

        train(None if argv is None else [name, *rest])  # None: LightningCLI reads sys.argv itself
        return 0
    if name in EVALUATE_COMMANDS:
        evaluate([name, *rest], prog="gencnp")
        return 0
    if name in ("pipeline", "sweep", "seal", "shards"):
        return _other(name, rest)
    print(f"gencnp: unknown command '{name}'.\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
