"""Two processes on CPU (``strategy: ddp``, gloo) give what one process gives: training with zero-weight losses,
validation/test metrics and the bank export, on odd sample counts (docs/design.md sections 6 and 8).

One DDP launch runs every command (``python tests/test_ddp.py SPEC.json``: this file is also the script that
Lightning's launcher starts again for rank 1); the single-process references run in the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUIET, ROOT, cli

pytestmark = [pytest.mark.ddp, pytest.mark.slow]  # two processes per run

GENCNP, BANK = str(ROOT / "configs/synthetic/gencnp.yaml"), str(ROOT / "configs/synthetic/bank.yaml")
ODD = ["--data.init_args.val_size", "201", "--data.init_args.n_test", "401", "--data.init_args.eval_batch_size", "50"]
DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]


def checkpoint_callbacks(folder: Path) -> str:
    """Only a ModelCheckpoint (the config's other callbacks are not under test)."""
    return json.dumps(
        [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(folder),
                    "filename": "best",
                    "monitor": "val/score",
                    "mode": "max",
                    "save_last": True,
                    "enable_version_counter": False,
                    "auto_insert_metric_name": False,
                },
            }
        ]
    )


def commands(runs: dict, out: Path, ddp: bool) -> list[tuple[str, list[str]]]:
    """``(name, train.py arguments)`` for fit (DDP only), validate, test and predict (bank export).

    Evaluation uses the generator trained here under DDP: ``init_score: 0.5`` gives input-dependent pathways
    that keep about half the channels (a generator keeping every channel would make the comparisons trivial).
    """
    tag = "ddp" if ddp else "one"
    dist = DDP if ddp else []
    model = ["--model.init_args.target_checkpoint", str(runs["target"])]
    generator = str(out / "fit" / "last.ckpt")
    evaluate = [
        *QUIET,
        *dist,
        *model,
        *ODD,
        "--ckpt_path",
        generator,
        "--trainer.logger",
        "false",
        "--trainer.callbacks",
        "[]",
    ]
    cmds = [
        (
            "validate",
            ["validate", "--config", GENCNP, *evaluate, "--trainer.default_root_dir", str(out / f"val_{tag}")],
        ),
        ("test", ["test", "--config", GENCNP, *evaluate, "--trainer.default_root_dir", str(out / f"test_{tag}")]),
        (
            "predict",
            [
                "predict",
                "--config",
                BANK,
                *QUIET,
                *dist,
                *model,
                *ODD,
                "--ckpt_path",
                generator,
                "--trainer.callbacks.init_args.path",
                str(out / f"bank_{tag}.safetensors"),
                "--trainer.default_root_dir",
                str(out / f"bank_{tag}"),
            ],
        ),
    ]
    if ddp:  # every loss weight that can be zero at zero: DDP must not find unused parameters
        fit = [
            "fit",
            "--config",
            GENCNP,
            *QUIET,
            *dist,
            *model,
            "--trainer.max_steps",
            "4",
            "--data.init_args.n_train",
            "300",
            "--data.init_args.val_size",
            "60",
            "--data.init_args.batch_size",
            "32",
            "--model.init_args.generator.init_score",
            "0.5",
            "--model.init_args.losses.lambda_cls",
            "0",
            "--model.init_args.losses.lambda_con",
            "0",
            "--model.init_args.losses.lambda_swap",
            "0",
            "--trainer.callbacks",
            checkpoint_callbacks(out / "fit"),
            "--trainer.logger.init_args.save_dir",
            str(out / "fit"),
        ]
        cmds.insert(0, ("fit", fit))
    return cmds


def _record(result) -> dict:
    metrics = {k: float(v) for k, v in result.trainer.callback_metrics.items()}
    rec = {"metrics": metrics, "world_size": result.trainer.world_size, "global_step": result.trainer.global_step}
    if hasattr(result.model, "prototypes"):
        rec["prototypes"] = result.model.prototypes.tolist()
        rec["proto_seen"] = result.model.proto_seen.tolist()
    return rec


def _run_spec(spec_path: str) -> None:
    """Entry point of the DDP launch: run every command, each rank writes what it saw to ``rank<r>.json``."""
    spec = json.loads(Path(spec_path).read_text())
    out, rank = {}, 0
    for name, args in spec["commands"]:
        result = cli(*args)
        rank = result.trainer.global_rank
        out[name] = _record(result)
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def ddp_results(synthetic_runs, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "commands": commands(synthetic_runs, out, ddp=True)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # The references: one process, one thread (as each DDP process has), in this process.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = {name: _record(cli(*args)) for name, args in commands(synthetic_runs, out, ddp=False)}
    finally:
        torch.set_num_threads(n)
    return {"out": out, "ranks": ranks, "one": one}


def test_training_with_zero_loss_weights_runs_and_keeps_prototypes_identical_across_ranks(ddp_results):
    r0, r1 = (r["fit"] for r in ddp_results["ranks"])
    assert r0["world_size"] == r1["world_size"] == 2
    assert (ddp_results["out"] / "fit" / "last.ckpt").is_file()
    ckpt = torch.load(ddp_results["out"] / "fit" / "last.ckpt", map_location="cpu", weights_only=True)
    # last.ckpt holds the final state (gencnp.io.checkpoint_io.ModelCheckpoint also writes it when training ends)
    assert r0["global_step"] == r1["global_step"] == 4 and ckpt["global_step"] == 4
    # EMA prototypes are all-reduced before every update: both processes hold the same ones.
    assert r0["prototypes"] == r1["prototypes"] and any(r0["proto_seen"])
    assert all(v == v for v in r0["metrics"].values())  # finite (NaN != NaN)


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluation_metrics_under_two_processes_equal_one_process(ddp_results, stage):
    prefix = "val/" if stage == "validate" else "test/"
    one = {k: v for k, v in ddp_results["one"][stage]["metrics"].items() if k.startswith(prefix)}
    two = [{k: v for k, v in r[stage]["metrics"].items() if k.startswith(prefix)} for r in ddp_results["ranks"]]
    assert len(one) > 10 and set(two[0]) == set(one) and two[0] == two[1]
    assert 0.2 < one[f"{prefix}kept_mean"] < 0.8  # pathways that differ between samples, not all-ones
    kd = f"{prefix}loss_kd"
    assert two[0][kd] == pytest.approx(one[kd], rel=1e-6)  # a float mean: equal up to summation order
    exact = {k: v for k, v in one.items() if k != kd}
    assert {k: two[0][k] for k in exact} == exact  # per-sample cat states: no sample padded or counted twice


def test_bank_export_under_two_processes_equals_one_process_on_an_odd_sample_count(ddp_results):
    from gencnp.banks.bank import PathwayBank

    out = ddp_results["out"]
    one, two = PathwayBank.load(out / "bank_one.safetensors"), PathwayBank.load(out / "bank_ddp.safetensors")
    assert int(one.n.sum()) == 999  # 1200 - 201: odd, so a padding sampler would count a sample twice
    assert torch.equal(one.counts, two.counts) and torch.equal(one.n, two.n) and one.tau == two.tau
    assert 0 < int(one.counts.sum()) < int(one.n.sum()) * one.num_channels  # neither empty nor all-ones
    assert two.info.pop("world_size") == 2 and one.info.pop("world_size") == 1
    assert one.info == two.info and one.info["tau_search"]["n"] == 201
    meta = [{k: v for k, v in b.metadata.items() if k not in ("created_utc", "info")} for b in (one, two)]
    assert meta[0] == meta[1]


if __name__ == "__main__":
    _run_spec(sys.argv[1])
