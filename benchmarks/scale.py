"""Scale benchmark: GEN-CNP at ImageNet shape (224 px, up to 1,000 classes) for ResNet-50 and a ViT, one table.

For every ``--arch`` and every ``--k`` (classes), each stage runs in its own subprocess, so its peak RSS (``VmHWM``
of that process, imports included) is the stage's own. Data: ``gencnp.ImageNetShapedDataModule`` (synthetic,
generated per index); target weights are random (``pretrained: false``): costs do not depend on them. Swap probes
are set to the first training image of each class (which images are probes does not change any cost).

Columns (times are medians over ``--steps`` timed rounds after one warm-up, batch ``--batch``):

- ``D``: pathway channels; ``gen params``: generator parameters; ``ckpt MB``: a GEN-CNP checkpoint's state (embedded
  target included) and ``- target MB``: the same minus the embedded target's; ``buffers MB``: the model's buffers
  outside the target (``O(K D)`` tables); ``largest buffer``: the biggest of them.
- ``explain / fwd``: ``GenCNP.explain`` over the target forward (no gradients) on the same batch.
- ``step / floor``: a GEN-CNP training step (``training_step`` + backward + Adam) over its floor: the target passes a
  step must make (the recording forward, then the masked forward over ``[x, swap, zero, null]`` parts as the config
  asks, and its backward to the masks; parts built by ``gencnp.training.masked_parts``).
- ``bank / fwd``: bank export per image (``explain`` + ``PathwayBank.update``) in target-forward equivalents.
- ``report / fwd``: ``evaluate.py report`` (``baselines_on: subset``, the seeded subset ``--subset_share`` of the
  test images) per test image in target-forward equivalents, with DGR excluded (the seconds of the setup and figures
  phases are fixed costs and excluded too); ``report whole / fwd``: its whole-split part per test image (GEN-CNP,
  transfer and the class lookup, each with its controls); ``report subset / fwd``: the subset's part (random,
  NeuronMCT, integrated gradients, the lookup frontier, the curves, same-class transfer) per subset image;
  ``report passes``: the report's own pass count per test image without DGR (``cost`` in ``report.json``; a pass
  that starts or stops at the first tap counts whole); ``DGR / fwd``: DGR's per-image cost (``dgr_steps``
  optimisation steps) on its own line.
- ``RSS <stage> GB``: peak resident memory of that stage's process (``target``: target training steps; ``gencnp``:
  GEN-CNP forward, explain and training steps; ``bank``; ``report``).

Run (the full table; hours on 2 CPU cores, minutes on a GPU)::

    python benchmarks/scale.py --k 10 100 1000 --arch resnet50 vit_small_patch16_224 --batch 32 --steps 3

``--device cuda --precision bf16-mixed`` measures on a GPU; ``--stages`` picks stages; ``--image_size`` and
``--report_images`` scale it down (the tests run ``--image_size 32 --arch tiny_cnn``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAGES = ("model", "target", "gencnp", "bank", "report")
# GEN-CNP settings of the measured step: the shipped recipe (configs/imagenet_shape/resnet50/gencnp.yaml).
RECIPE = dict(  # configs/imagenet_shape/*/gencnp.yaml
    ablation="mean",
    generator={"d": 64},
    losses={"temperature": 1.0, "lambda_swap": 4.0, "lambda_zero": 1.0, "lambda_cls": 1.0, "lambda_con": 0.1},
    sparsity={"lambda_sp": 10.0, "sparsity_per": "channel", "kappa": 0.7, "dependence_gate": 0.2},
    controls={"control_fraction": 0.5},
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[10, 100, 1000], help="class counts")
    p.add_argument("--arch", nargs="+", default=["resnet50", "vit_small_patch16_224"], help="target names")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed rounds per measurement (median)")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--in_chans", type=int, default=3)
    p.add_argument("--report_images", type=int, default=64, help="test images of the report stage")
    p.add_argument(
        "--subset_share",
        type=float,
        default=0.125,
        help="share of the report's test images in its seeded subset (configs/imagenet_shape: 64 of 512)",
    )
    p.add_argument("--dgr_steps", type=int, default=30)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----- helpers (worker side) -----
def peak_rss_gb() -> float:
    """Peak resident set size of this process (VmHWM), GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    import resource  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def timed(fn, steps: int, sync) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def data_module(a: argparse.Namespace, k: int, n_test: int | None = None):
    from gencnp import ImageNetShapedDataModule

    return ImageNetShapedDataModule(
        num_classes=k,
        image_size=a.image_size,
        in_chans=a.in_chans,
        n_train=2 * k + 4 * a.batch + 64,  # every class in train (probes); read per index, never held
        n_test=n_test or a.batch,
        val_size=64,
        batch_size=a.batch,
        eval_batch_size=a.batch,
    )


def batch(dm, split: str, n: int, device):
    import torch

    ds = dm.split(split)
    items = [ds[i] for i in range(n)]
    return torch.stack([it[0] for it in items]).to(device), torch.stack([it[1] for it in items]).long().to(device)


def gencnp_model(a: argparse.Namespace, k: int, dm):
    import torch

    from gencnp import GenCNP

    torch.manual_seed(0)
    model = GenCNP(
        target=a.arch_name,
        target_checkpoint=None,
        num_classes=k,
        in_chans=a.in_chans,
        image_size=a.image_size,
        channels_last=a.channels_last,
        **RECIPE,
    ).to(a.device)
    train = dm.split("train")
    p = model.settings.swap_probes_per_class
    first = {}
    for j, i in enumerate(train.indices):  # ShapedImages: image i has class i mod K
        first.setdefault(i % k, j)
    for c, j in first.items():
        model.probe_index[c * p], model.probe_class[c * p] = j, c
    model.attach_probe_data(train)
    x, _ = batch(dm, "train", a.batch, a.device)
    model.compute_fill([(x, None)], batches=1)
    return model


def autocast(a: argparse.Namespace):
    import torch

    return torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16, enabled=a.precision == "bf16-mixed")


def sync_of(a: argparse.Namespace):
    import torch

    return torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)


# ----- stages -----
def stage_model(a, k: int) -> dict:
    import torch

    dm = data_module(a, k)
    model = gencnp_model(a, k, dm)
    with tempfile.TemporaryDirectory() as tmp:
        full, target = Path(tmp) / "gencnp.pt", Path(tmp) / "target.pt"
        torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, full)
        torch.save(model.target.state_dict(), target)
        ckpt, tgt = full.stat().st_size / 2**20, target.stat().st_size / 2**20
    buffers = {n: b for n, b in model.named_buffers() if not n.startswith("target.")}
    big = max(buffers, key=lambda n: buffers[n].numel() * buffers[n].element_size())
    return {
        "D": model.target.num_channels,
        "gen_params": sum(p.numel() for p in model.generator.parameters()),
        "ckpt_mb": ckpt,
        "ckpt_minus_target_mb": ckpt - tgt,
        "buffers_mb": sum(b.numel() * b.element_size() for b in buffers.values()) / 2**20,
        "largest_buffer": f"{big} {list(buffers[big].shape)}",
    }


def stage_target(a, k: int) -> dict:
    import torch
    import torch.nn.functional as F

    from gencnp import TargetClassifier

    dm = data_module(a, k)
    torch.manual_seed(0)
    clf = TargetClassifier(
        arch=a.arch_name, num_classes=k, in_chans=a.in_chans, image_size=a.image_size, channels_last=a.channels_last
    ).to(a.device)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    x, y = batch(dm, "train", a.batch, a.device)

    def step():
        with autocast(a):
            loss = F.cross_entropy(clf(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return {"t_target_step": timed(step, a.steps, sync_of(a)) / a.batch}


def stage_gencnp(a, k: int) -> dict:
    import torch

    from gencnp.systems import training as ST

    dm = data_module(a, k)
    model = gencnp_model(a, k, dm)
    x, y = batch(dm, "train", a.batch, a.device)
    opt = torch.optim.Adam(model.generator.parameters(), lr=1e-3)
    sync = sync_of(a)

    def fwd():
        with torch.no_grad(), autocast(a):
            model.target(x)

    def explain():
        with autocast(a):
            model.explain(x)

    with torch.no_grad(), autocast(a):
        logits, feats = model.target(x, record=True)
        y_hat = model.class_of(logits, y)
        out = model.generator(feats, model.prior(y_hat))

    def floor():
        with autocast(a):
            with torch.no_grad():
                lg, fs = model.target(x, record=True)
            xs, ms, firsts, _, _ = ST.masked_parts(model, x, lg, fs, y_hat, out)
            m = torch.cat(ms).detach().requires_grad_()
            masked = model.target(
                torch.cat(xs), masks=model.generator.split(m), fill=model.fills(), first_tap=torch.cat(firsts)
            )
        masked.float().sum().backward()

    def step():
        with autocast(a):
            loss = model.training_step((x, y), 0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t = {name: timed(fn, a.steps, sync) for name, fn in (("fwd", fwd), ("explain", explain))}
    t["floor"], t["step"] = timed(floor, a.steps, sync), timed(step, a.steps, sync)
    return {
        "t_fwd": t["fwd"] / a.batch,
        "explain_over_fwd": t["explain"] / t["fwd"],
        "step_over_floor": t["step"] / t["floor"],
        "t_step": t["step"] / a.batch,
    }


def stage_bank(a, k: int) -> dict:
    import torch

    from gencnp import PathwayBank

    dm = data_module(a, k)
    model = gencnp_model(a, k, dm)
    x, _ = batch(dm, "train", a.batch, a.device)
    bank = PathwayBank.for_target(model.target, dm.class_names)

    def fwd():
        with torch.no_grad(), autocast(a):
            model.target(x)

    def export():
        with autocast(a):
            ex = model.explain(x)
        bank.update(ex["pathway"].cpu(), ex["y_hat"].cpu())

    sync = sync_of(a)
    t_fwd = timed(fwd, a.steps, sync)
    return {"bank_over_fwd": timed(export, a.steps, sync) / t_fwd}


def stage_report(a, k: int) -> dict:
    import lightning as L
    import torch

    from gencnp import PathwayBank
    from gencnp.evaluation.report import report

    n = a.report_images
    dm = data_module(a, k, n_test=n)
    model = gencnp_model(a, k, dm)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            max_steps=1,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            inference_mode=False,
            accelerator="gpu" if a.device.startswith("cuda") else "cpu",
            devices=1,
        )
        trainer.fit(model, dm)
        ckpt = Path(tmp) / "gencnp.ckpt"
        trainer.save_checkpoint(ckpt)
        model.to(a.device)  # the Trainer returns the model to the CPU at the end of fit
        x, _ = batch(dm, "train", a.batch, a.device)
        bank = PathwayBank.for_target(model.target, dm.class_names)
        with torch.no_grad():
            ex = model.explain(x)
        bank.update(ex["pathway"].cpu(), ex["y_hat"].cpu())
        bank.tau = 0.5
        bank_path = bank.save(Path(tmp) / "bank.safetensors")

        def fwd():
            with torch.no_grad(), autocast(a):
                model.target(x)

        t_fwd = timed(fwd, a.steps, sync_of(a)) / a.batch
        r = report(
            generator=str(ckpt),
            bank=str(bank_path),
            data=dm,
            out_dir=str(Path(tmp) / "eval"),
            subset_n=max(1, round(n * a.subset_share)),
            baselines_on="subset",
            batch_size=a.batch,
            grad_batch_size=max(1, a.batch // 4),  # x intgrad_steps (11) images with gradients at once
            bootstrap_samples=200,
            device=a.device,
            dgr_steps=a.dgr_steps,
            samples_per_class=1,
            limit=n,
            progress=False,
            precision=a.precision,
            channels_last=a.channels_last,
        )
    phases, n_sub = r["seconds_by_phase"], r["subset"]["n"]
    dgr = r["methods"]["dgr"]["seconds_per_image"] * n_sub
    whole = phases["gencnp"] + phases["whole_split"]
    sub = phases["subset"] + phases["same_class_transfer"] - dgr
    return {
        "report_all_over_fwd": whole / n / t_fwd,
        "report_sub_over_fwd": sub / n_sub / t_fwd,
        "report_over_fwd": (whole + sub) / n / t_fwd,
        "report_passes": r["cost"]["passes_per_image_mean_without_dgr"],
        "dgr_over_fwd": r["methods"]["dgr"]["seconds_per_image"] / t_fwd,
    }


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    stage = a.worker
    a.arch_name, k = a.arch[0], a.k[0]
    row = {"stage_" + stage: globals()[f"stage_{stage}"](a, k), "rss_gb": peak_rss_gb()}
    print("SCALE-RESULT " + json.dumps(row), flush=True)


# ----- driver -----
def run_stage(a: argparse.Namespace, arch: str, k: int, stage: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", stage, "--arch", arch, "--k", str(k)]
    opts = ("batch", "steps", "image_size", "in_chans", "report_images", "subset_share", "dgr_steps", "device")
    for opt in (*opts, "precision"):
        cmd += [f"--{opt}", str(getattr(a, opt))]
    cmd += ["--channels_last"] if a.channels_last else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SCALE-RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"stage {stage} ({arch}, K={k}) failed:\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1][len("SCALE-RESULT ") :])
    return {**out[f"stage_{stage}"], f"rss_{stage}_gb": out["rss_gb"]}


COLUMNS = [
    ("D", "D", "{:d}"),
    ("gen_params", "gen params", "{:,d}"),
    ("ckpt_mb", "ckpt MB", "{:.1f}"),
    ("ckpt_minus_target_mb", "- target MB", "{:.1f}"),
    ("buffers_mb", "buffers MB", "{:.1f}"),
    ("explain_over_fwd", "explain/fwd", "{:.2f}"),
    ("step_over_floor", "step/floor", "{:.2f}"),
    ("bank_over_fwd", "bank/fwd", "{:.2f}"),
    ("report_all_over_fwd", "report whole/fwd", "{:.1f}"),
    ("report_sub_over_fwd", "report subset/fwd", "{:.1f}"),
    ("report_over_fwd", "report/fwd", "{:.1f}"),
    ("report_passes", "report passes", "{:.1f}"),
    ("dgr_over_fwd", "DGR/fwd", "{:.1f}"),
    ("t_fwd", "fwd s/img", "{:.4f}"),
    *[(f"rss_{s}_gb", f"RSS {s} GB", "{:.2f}") for s in STAGES],
]


def table(rows: list[dict]) -> str:
    head = ["arch", "K", *[c[1] for c in COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["arch"], str(r["k"])] + [fmt.format(r[key]) if key in r else "-" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    largest = sorted({f"{r['arch']}: {r['largest_buffer']}" for r in rows if "largest_buffer" in r})
    return "\n".join(lines + ([""] + [f"largest non-target buffer, {s}" for s in largest] if largest else []))


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return []
    rows = []
    for arch in a.arch:
        for k in a.k:
            row = {"arch": arch, "k": k}
            for stage in a.stages:
                t = time.perf_counter()
                row.update(run_stage(a, arch, k, stage))
                print(f"{arch} K={k} {stage}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
            rows.append(row)
    print(f"batch {a.batch}, {a.image_size} px, {a.device}, {a.precision}, median of {a.steps} rounds")
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
