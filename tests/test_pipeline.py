"""The one-command pipeline: stages run once, reruns reuse them, a changed stage is redone with everything
downstream, data is obtained (or the data module's error stops the run) before any stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, snapshot
from test_hardening import fake_pipeline

from gencnp.pipeline import run as P

# Shorter stages than configs/synthetic/pipeline.yaml (the stages, not the training, are under test).
FAST = {
    "target": ["--trainer.max_epochs", "2"],
    "gencnp": ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6"],
    "report": ["--limit", "120", "--subset_n", "40", "--bootstrap_samples", "20", "--samples_per_class", "0"],
}


def _pipeline(tmp_path: Path, name: str = "pipeline.yaml", **changes) -> Path:
    spec = yaml.safe_load((ROOT / "configs/synthetic/pipeline.yaml").read_text())
    # The four core stages (the attribution stage reads their outputs; tests/test_attributions.py covers it).
    spec["stages"] = [st for st in spec["stages"] if st["name"] != "attribution"]
    for st in spec["stages"]:
        st["args"] = list(st.get("args") or []) + FAST.get(st["name"], [])
        st.update(changes.get(st["name"], {}))
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _status(result: dict) -> list[str]:
    return [s["status"] for s in result["stages"]]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_rerun_reuses_every_stage_and_a_changed_stage_redoes_itself_and_downstream(tmp_path):
    work, lines = tmp_path / "work", []
    pipe = _pipeline(tmp_path)
    first = P.run_pipeline(pipe, work, quiet=True, say=lines.append)
    assert _status(first) == ["ran"] * 4
    runs = work / "runs/synthetic"
    for out in ("target/best.ckpt", "gencnp/best.ckpt", "bank.safetensors", "eval/report.json", "eval/report.md"):
        assert (runs / out).is_file(), out
    stamps = {
        n: runs / p
        for n, p in (
            ("target", "target/target.stamp.json"),
            ("gencnp", "gencnp/gencnp.stamp.json"),
            ("bank", "bank.stamp.json"),
            ("report", "eval/report.stamp.json"),
        )
    }
    stamp = json.loads(stamps["gencnp"].read_text())
    assert stamp["inputs"] == {"runs/synthetic/target/best.ckpt": P.file_hash(runs / "target/best.ckpt")}
    assert stamp["outputs"] == {"runs/synthetic/gencnp/best.ckpt": P.file_hash(runs / "gencnp/best.ckpt")}
    # The summary screen: where things landed and the key numbers of report.json.
    text = "\n".join(lines)
    assert "bank.safetensors" in text and "report.json" in text and "key numbers (120 test images" in text
    s = first["summary"]
    assert 0 <= s["target_accuracy"] <= 1 and 0 <= s["gencnp"]["agreement"] <= 1 and s["transfer"]["tau"] is not None
    assert s["dgr_speed_ratio"] > 0
    assert (
        set(s["matched"]) == {"random", "neuron_mct", "neuron_intgrad", "dgr", "class_lookup"}
        and "agreement_vs_kept.png" in s["figures"]
    )
    assert "baselines at GEN-CNP's kept counts" in text and "figures (.png)       agreement_vs_kept" in text

    before = snapshot(work)
    second = P.run_pipeline(pipe, work, quiet=True, say=lambda _: None)
    assert _status(second) == ["reused"] * 4 and all(r["seconds"] == 0 for r in second["stages"])
    assert snapshot(work) == before  # nothing rewritten, no stage started

    # Plans without running: a changed GEN-CNP config redoes it and every later stage.
    changed = _pipeline(
        tmp_path,
        "gencnp_changed.yaml",
        gencnp={"args": FAST["gencnp"] + ["--model.init_args.losses.lambda_con", "0.2"]},
    )
    plan = P.run_pipeline(changed, work, dry_run=True, say=lambda _: None)
    assert _status(plan) == ["would reuse", "would run", "would run", "would run"]
    assert [r["reason"] for r in plan["stages"]][1:] == [
        "resolved config changed",
        "upstream stage 'gencnp' ran",
        "upstream stage 'bank' ran",
    ]
    assert _status(P.run_pipeline(pipe, work, dry_run=True, redo=["bank"], say=lambda _: None)) == [
        "would reuse",
        "would reuse",
        "would run",
        "would run",
    ]
    (runs / "eval/report.md").unlink()
    plan = P.run_pipeline(pipe, work, dry_run=True, say=lambda _: None)
    assert (
        _status(plan)[-1] == "would run"
        and plan["stages"][-1]["reason"] == "output runs/synthetic/eval/report.md missing"
    )
    assert snapshot(work) == {k: v for k, v in before.items() if not k.endswith("report.md")}  # dry runs write nothing

    # A changed bank config, for real: bank and report rerun, target and generator are reused.
    bank = yaml.safe_load((ROOT / "configs/synthetic/bank.yaml").read_text())
    bank["trainer"]["callbacks"][0]["init_args"]["min_agreement"] = 0.9
    (tmp_path / "bank.yaml").write_text(yaml.safe_dump(bank, sort_keys=False))
    pipe2 = _pipeline(tmp_path, "bank_changed.yaml", bank={"config": str(tmp_path / "bank.yaml")})
    third = P.run_pipeline(pipe2, work, quiet=True, say=lambda _: None)
    assert _status(third) == ["reused", "reused", "ran", "ran"]
    assert third["stages"][2]["reason"] == "resolved config changed"
    assert (runs / "eval/report.md").is_file()
    for name in ("target", "gencnp"):
        assert stamps[name].read_bytes() == before[str(stamps[name])]
    assert (
        json.loads(stamps["bank"].read_text())["config_hash"] != json.loads(before[str(stamps["bank"])])["config_hash"]
    )
    assert _status(P.run_pipeline(pipe2, work, dry_run=True, say=lambda _: None)) == ["would reuse"] * 4

    # A replaced upstream output invalidates its stage (output differs from the stamp) and everything after it.
    with open(runs / "target/best.ckpt", "ab") as f:
        f.write(b"\0")
    plan = P.run_pipeline(pipe2, work, dry_run=True, say=lambda _: None)
    assert _status(plan) == ["would run"] * 4
    assert plan["stages"][0]["reason"] == "output runs/synthetic/target/best.ckpt differs from the stamp"


def test_reuse_and_redo_rules_on_stand_in_stages(tmp_path):
    """The rules of the slow test above on two stand-in stages that take a fraction of a second."""
    pipe, work = fake_pipeline(tmp_path), tmp_path / "work"
    assert _status(P.run_pipeline(pipe, work, quiet=True, say=lambda _: None)) == ["ran", "ran"]
    before = snapshot(work)
    assert _status(P.run_pipeline(pipe, work, quiet=True, say=lambda _: None)) == ["reused", "reused"]
    assert snapshot(work) == before
    # A changed downstream config redoes that stage only; a changed upstream one redoes everything after it.
    (tmp_path / "report.yaml").write_text(yaml.safe_dump({"write": ["eval/report.json"], "out_dir": "eval", "x": 1}))
    plan = P.run_pipeline(pipe, work, dry_run=True, say=lambda _: None)
    assert _status(plan) == ["would reuse", "would run"] and plan["stages"][1]["reason"] == "resolved config changed"
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({"write": ["a/model.ckpt"], "out_dir": "a", "x": 1}))
    plan = P.run_pipeline(pipe, work, dry_run=True, say=lambda _: None)
    assert [r["reason"] for r in plan["stages"]] == ["resolved config changed", "upstream stage 'train' ran"]
    assert _status(P.run_pipeline(pipe, work, dry_run=True, redo=["report"], say=lambda _: None)) == [
        "would run",
        "would run",
    ]
    assert snapshot(work) == before  # dry runs write nothing
    assert _status(P.run_pipeline(pipe, work, quiet=True, say=lambda _: None)) == ["ran", "ran"]
    # A replaced upstream output invalidates its stage and everything after it; a missing output its own stage.
    (work / "a/model.ckpt").write_text("replaced")
    plan = P.run_pipeline(pipe, work, dry_run=True, say=lambda _: None)
    assert (
        _status(plan) == ["would run"] * 2
        and plan["stages"][0]["reason"] == "output a/model.ckpt differs from the stamp"
    )
    assert _status(P.run_pipeline(pipe, work, quiet=True, say=lambda _: None)) == ["ran", "ran"]
    (work / "eval/report.json").unlink()
    plan = P.run_pipeline(pipe, work, dry_run=True, say=lambda _: None)
    assert _status(plan) == ["would reuse", "would run"]
    assert plan["stages"][1]["reason"] == "output eval/report.json missing"


def test_missing_data_stops_before_any_stage_with_the_data_modules_message(tmp_path, monkeypatch, capsys):
    # Fashion-MNIST nowhere: not in the (redirected) Debian folder, not in the torchvision root, and no root for apt.
    monkeypatch.setenv("GENCNP_FASHION_MNIST", str(tmp_path / "no_debian_copy"))
    monkeypatch.setattr(P.os, "geteuid", lambda: 1000, raising=False)
    pipe = tmp_path / "p.yaml"
    pipe.write_text(
        yaml.safe_dump(
            {
                "stages": [
                    {
                        "name": "target",
                        "entry": "train.py",
                        "command": "fit",
                        "config": str(ROOT / "configs/fashion_mnist/target.yaml"),
                        "outputs": ["runs/fashion_mnist/target/best.ckpt"],
                    }
                ]
            }
        )
    )
    code = P.main(["--config", str(pipe), "--workdir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == 2
    assert "Fashion-MNIST not found (tried" in err and "apt-get install -y dataset-fashion-mnist" in err
    assert not (tmp_path / "work/runs").exists()


def _fake_idx(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (folder / stem).write_bytes(b"")


def test_obtain_data_tries_apt_as_root_then_torchvision_only_when_asked(tmp_path, monkeypatch):
    from gencnp.data.modules import FashionMNISTDataModule

    monkeypatch.setenv("GENCNP_FASHION_MNIST", str(tmp_path / "debian"))
    spec = [{"class_path": "gencnp.FashionMNISTDataModule", "init_args": {"torchvision_root": str(tmp_path / "tv")}}]
    calls = []

    def fake_run(cmd, **kw):
        calls.append(list(cmd))
        _fake_idx(tmp_path / "debian")  # "installs" the package's files
        return P.subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(P.subprocess, "run", fake_run)
    monkeypatch.setattr(P.shutil, "which", lambda name: "/usr/bin/apt-get" if name == "apt-get" else None)
    monkeypatch.setattr(P.os, "geteuid", lambda: 1000, raising=False)
    with pytest.raises(P.DataUnavailable, match="Fashion-MNIST not found"):
        P.obtain_data(spec, download=False, say=lambda _: None)
    assert calls == []  # not root: apt is not tried

    monkeypatch.setattr(P.os, "geteuid", lambda: 0, raising=False)
    P.obtain_data(spec, download=False, say=lambda _: None)
    assert calls == [["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]]

    # No apt: --download runs the module's own (torchvision) download; without it nothing is fetched.
    monkeypatch.setenv("GENCNP_FASHION_MNIST", str(tmp_path / "still_nothing"))
    monkeypatch.setattr(P.shutil, "which", lambda name: None)
    fetched = []
    monkeypatch.setattr(FashionMNISTDataModule, "prepare_data", lambda self: fetched.append(_fake_idx(tmp_path / "tv")))
    monkeypatch.setattr(FashionMNISTDataModule, "setup", lambda self, stage=None: None)
    with pytest.raises(P.DataUnavailable):
        P.obtain_data(spec, download=False, say=lambda _: None)
    assert fetched == []
    P.obtain_data(spec, download=True, say=lambda _: None)
    assert len(fetched) == 1


def test_pipeline_config_errors_say_what_to_fix(tmp_path):
    def write(spec) -> Path:
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(spec))
        return p

    stage = {
        "name": "a",
        "entry": "train.py",
        "command": "fit",
        "config": "configs/synthetic/target.yaml",
        "outputs": ["x"],
    }
    with pytest.raises(P.PipelineError, match=r"unknown keys \['stage'\]"):
        P.load_pipeline(write({"stage": []}))
    with pytest.raises(P.PipelineError, match="appears twice"):
        P.load_pipeline(write({"stages": [stage, stage]}))
    with pytest.raises(P.PipelineError, match=r"missing fields \['outputs'\]"):
        P.load_pipeline(write({"stages": [{**stage, "outputs": []}]}))
    with pytest.raises(P.PipelineError, match=r"--redo names unknown stages \['b'\]"):
        P.run_pipeline(write({"stages": [stage]}), tmp_path, redo=["b"], dry_run=True)
    with pytest.raises(P.PipelineError, match="stage 'a': its config does not parse"):
        P.run_pipeline(
            write({"stages": [{**stage, "args": ["--model.init_args.no_such_key", "1"]}]}), tmp_path, dry_run=True
        )


@pytest.mark.parametrize("name", ["fashion_mnist", "synthetic"])
def test_pipeline_outputs_match_the_stage_configs(name):
    """The pipeline's declared inputs/outputs are the paths the stage configs really read and write."""
    spec = P.load_pipeline(ROOT / f"configs/{name}/pipeline.yaml")
    cfg = {}
    for st in spec["stages"]:
        argv = [str(ROOT / st.entry), st.command, "--config", str(ROOT / st.config), *st.args]
        cfg[st.name] = yaml.safe_load(P.resolved_config(argv))
    t, g, b, r = (cfg[k] for k in ("target", "gencnp", "bank", "report"))
    out = {st.name: st for st in spec["stages"]}

    def ckpt(c):
        mc = next(x for x in c["trainer"]["callbacks"] if x["class_path"].endswith("ModelCheckpoint"))["init_args"]
        return f"{mc['dirpath']}/{mc['filename']}.ckpt"

    assert out["target"].outputs[0] == ckpt(t) == g["model"]["init_args"]["target_checkpoint"]
    assert out["gencnp"].outputs[0] == ckpt(g) == b["ckpt_path"] == r["generator"]
    assert set(out["gencnp"].inputs) == {ckpt(t)} and set(out["bank"].inputs) == {ckpt(t), ckpt(g)}
    bank_path = next(x for x in b["trainer"]["callbacks"] if x["class_path"].endswith("PathwayBankWriter"))[
        "init_args"
    ]["path"]
    assert out["bank"].outputs == [bank_path] == [r["bank"]]
    assert out["report"].outputs[0] == f"{r['out_dir']}/report.json" == spec["report"]
    assert set(out["report"].inputs) == {ckpt(t), ckpt(g), bank_path}
    if "attribution" in cfg:  # optional stage (synthetic: on; Fashion-MNIST: commented out)
        a = cfg["attribution"]
        assert out["attribution"].outputs[0] == f"{a['out_dir']}/attribution.json" and a["generator"] == ckpt(g)
        assert set(out["attribution"].inputs) == {ckpt(t), ckpt(g), bank_path} and a["bank"] == bank_path


@pytest.mark.slow
def test_a_failing_stage_stops_the_run_with_its_exit_code_and_leaves_no_stamp(tmp_path, capsys):
    stage = {
        "name": "report",
        "entry": "evaluate.py",
        "command": "report",
        "config": str(ROOT / "configs/synthetic/evaluate.yaml"),
        "outputs": ["runs/synthetic/eval/report.json"],
    }
    pipe = tmp_path / "p.yaml"
    pipe.write_text(yaml.safe_dump({"stages": [stage]}))
    stamp = tmp_path / "work/runs/synthetic/eval/report.stamp.json"
    stamp.parent.mkdir(parents=True)
    stamp.write_text(json.dumps({"format": 1, "config_hash": "stale"}))
    # No generator checkpoint in the working folder: evaluate.py fails with its own message.
    code = P.main(["--config", str(pipe), "--workdir", str(tmp_path / "work"), "--quiet"])
    err = capsys.readouterr().err
    assert code not in (0, None) and "stage 'report' failed with exit code" in err
    assert not stamp.exists()
    assert (
        "generator checkpoint 'runs/synthetic/gencnp/best.ckpt' does not exist"
        in next(stamp.parent.glob("report.*.log")).read_text()
    )
