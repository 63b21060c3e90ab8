"""Speed benchmarks of gencnp on one target and one batch, written to ``benchmarks/results.md``.

Every figure comes from one run: the same frozen target, the same in-memory batch, the same threads. Each
measurement is repeated ``--repeats`` times, rounds interleaved (every measurement once per round, in a rotating
order) so that a neighbour's load hits them alike, and the median is reported. Ratios are of medians of this run.

Rows (per image unless stated):

- ``t_fwd``: ``FrozenTarget`` forward without gradients.
- ``t_floor``: the least a GEN-CNP training step needs besides the generator: one forward without gradients
  (tap features recorded), one masked forward (the config's ablation) and a backward to an all-ones mask through
  the frozen target (no weight gradients).
- GEN-CNP explanation: ``GenCNP.explain`` (features, generator, binarisation, masked forward giving the masked
  prediction), and its ratio to ``t_fwd``.
- GEN-CNP training step: ``GenCNP.training_step`` + backward + Adam step of the generator, with the config's
  hyper-parameters, outside a Trainer (no loop or logger overhead); ratio to ``t_floor``. Three variants: the
  config's losses (swap and zero-image controls as extra masked forwards, a ``3B`` batch), kd + sparsity only
  (``lambda_swap = lambda_zero = 0``; ``cls`` and ``con`` stay, they need no target pass), and, where ``GenCNP``
  has the opt-in ``control_fraction``, the controls on a fraction of the batch (one row per ``--control_fraction``).
- ``neuron_mct``, ``neuron_intgrad``, ``dgr`` through ``gencnp.pathways.baselines.run_method`` (class from their own
  forward), pathway at GEN-CNP's per-sample and per-tap counts, plus the masked forward giving the masked
  prediction; ratio to the GEN-CNP explanation.
- Bank export: ``GenCNP.predict_step`` + ``PathwayBank.update`` over in-memory train batches (images/s), and the
  accumulated state for 1x and 4x the samples: the allocator's view (tensor memory allocated during the export and
  still live at its end, and its peak, from the profiler's allocator events on CPU), the bytes reachable from the
  bank, and the ``tracemalloc`` peak of Python allocations. Process RSS is not used.
- ``acIOU``: ``gencnp.pathways.metrics.class_iou`` (acIOU and between-class IoU) of 10,000 pathways, D = 288, 10 classes.

Accounting that flatters no one: the floor's masked forward reuses the recorded first-tap output exactly as GEN-CNP's
own passes do (``FrozenTarget(first_tap=...)``), baselines get their class from their own forward, and every
method's masked prediction is part of its time. ``--clock cpu`` times process CPU seconds instead of wall seconds:
on cores shared with other jobs, two OpenMP threads wait for each other at every operator and wall times of the
many small operators (generator, losses) balloon, so ``--threads 1 --clock cpu`` is the steadier view there.

Run ``python benchmarks/bench.py`` (batch 256, Fashion-MNIST default target); ``--tiny`` is the seconds-long
configuration the tests use (small counts; with ``--config configs/synthetic/gencnp.yaml --data random
--target_checkpoint none`` it needs no data or checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import inspect
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_CONFIG = ROOT / "configs/fashion_mnist/gencnp.yaml"
DEFAULT_OUT = ROOT / "benchmarks/results.md"

# Must-show figures: (row key, comparison, bound, what it says).
TARGETS = {
    "explain_ratio": ("<=", 2.5, "GEN-CNP explanation <= 2.5 x t_fwd"),
    "train_kd_sparsity_ratio": ("<=", 1.5, "training step (kd + sparsity) <= 1.5 x t_floor"),
    "train_default_ratio": ("<=", 1.5, "training step (config losses, controls on the full batch) <= 1.5 x t_floor"),
    "train_fraction_ratio": ("<=", 1.5, "training step (config losses, controls on a fraction) <= 1.5 x t_floor"),
    "neuron_mct_ratio": (">=", 1.0, "explanation no slower than neuron_mct"),
    "dgr_ratio": (">=", 15.0, "explanation >= 15x faster than dgr"),
    "bank_state_growth": ("==", 1.0, "bank state at 4x samples = size at 1x"),
    "aciou_s": ("<", 2.0, "acIOU of 10k pathways < 2 s"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="GEN-CNP config whose model.init_args are used")
    p.add_argument(
        "--target_checkpoint",
        default=None,
        help="target weights (default: the config's); 'none' or a missing file gives a random-init target",
    )
    p.add_argument(
        "--generator_checkpoint", default=None, help="optional trained GenCNP checkpoint (cost does not depend on it)"
    )
    p.add_argument(
        "--data",
        choices=("fashion_mnist", "random"),
        default="fashion_mnist",
        help="in-memory images: Fashion-MNIST (test split for the batch, train split for fill/bank) or random",
    )
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds of every fast measurement (median reported)")
    p.add_argument("--slow_repeats", type=int, default=3, help="timed rounds of neuron_intgrad and dgr")
    p.add_argument("--bank_samples", type=int, default=2048, help="samples of the 1x bank export (4x is 4 times that)")
    p.add_argument("--iou_pathways", type=int, default=10000, help="pathways for the acIOU timing")
    p.add_argument("--iou_repeats", type=int, default=3)
    p.add_argument(
        "--control_fraction",
        type=float,
        nargs="+",
        default=[0.25, 0.125],
        help="fractions of the batch for the swap/zero controls in the opt-in training variants",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall seconds (perf_counter) or process CPU seconds (process_time; steadier when cores are shared)",
    )
    p.add_argument(
        "--channels_last", action="store_true", help="GenCNP(channels_last=True): target and inputs in channels_last"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="seconds-long run: batch 8, 2 rounds, small counts (tests)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="markdown results file")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch_size = min(args.batch_size, 8)
        args.repeats, args.slow_repeats, args.iou_repeats = min(args.repeats, 2), 1, 1
        args.bank_samples, args.iou_pathways = min(args.bank_samples, 16), min(args.iou_pathways, 400)
    for name in ("batch_size", "repeats", "slow_repeats", "bank_samples", "iou_pathways", "iou_repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if not all(0 < f <= 1 for f in args.control_fraction):
        raise SystemExit(f"--control_fraction values must lie in (0, 1], got {args.control_fraction}.")
    return args


# ----- setup -----
def model_kwargs(args: argparse.Namespace) -> dict:
    """``model.init_args`` of the config, with the target checkpoint resolved (``None``: random init)."""
    import yaml

    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    kw = dict(cfg["model"]["init_args"])
    ckpt = args.target_checkpoint if args.target_checkpoint is not None else kw.get("target_checkpoint")
    if ckpt and ckpt != "none":
        ckpt_path = Path(ckpt) if Path(ckpt).is_absolute() else ROOT / ckpt
        ckpt = str(ckpt_path) if ckpt_path.is_file() else None
    else:
        ckpt = None
    kw["target_checkpoint"] = ckpt
    return kw


def load_images(args: argparse.Namespace, shape: tuple[int, int, int], num_classes: int, n_train: int):
    """``(batch [B, C, H, W], train images [N, C, H, W])`` in memory, and where they came from."""
    b = args.batch_size
    if args.data == "fashion_mnist":
        from gencnp import FashionMNISTDataModule

        dm = FashionMNISTDataModule()
        test, train = dm.split("test"), dm.split("train")
        xb = torch.stack([it[0] for it in test.__getitems__(list(range(min(b, len(test)))))])
        idx = [i % len(train) for i in range(n_train)]
        xt = torch.stack([it[0] for it in train.__getitems__(idx)])
        if len(xb) < b:
            xb = xb.repeat(math.ceil(b / len(xb)), 1, 1, 1)[:b]
        return xb, xt, "Fashion-MNIST (batch: test split; fill and bank: train split)"
    g = torch.Generator().manual_seed(args.seed)
    return torch.randn(b, *shape, generator=g), torch.randn(n_train, *shape, generator=g), "random normal images"


def build(kw: dict, fill_images: torch.Tensor, args: argparse.Namespace, **overrides):
    """A ``GenCNP`` from the config's arguments (mean-ablation fill from ``fill_images``); unknown overrides -> None."""
    from gencnp import GenCNP
    from gencnp.systems.options import grouped_key

    allowed = inspect.signature(GenCNP.__init__).parameters
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in kw.items()}
    for key, value in overrides.items():
        group, _, name = grouped_key(key).rpartition(".")
        if group:
            merged[group] = {**(merged.get(group) or {}), name: value}
        elif key in allowed:
            merged[key] = value
        else:
            return None
    torch.manual_seed(args.seed)
    model = GenCNP(**{**merged, **({"channels_last": True} if args.channels_last else {})})
    if args.generator_checkpoint:
        state = torch.load(args.generator_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(state, strict=False)
    if model.settings.ablation == "mean":
        bs = args.batch_size
        model.compute_fill([(fill_images[i : i + bs], None) for i in range(0, len(fill_images), bs)])
    return model.eval()  # the frozen target is in eval anyway; the generator has no batch-dependent layers


# ----- measurements -----
def _first_tap(target, feats) -> dict:
    """``first_tap=feats[0]`` where ``FrozenTarget`` supports it: the floor reuses what GEN-CNP's passes reuse."""
    return {"first_tap": feats[0]} if "first_tap" in inspect.signature(target.forward).parameters else {}


def floor_step(model, x: torch.Tensor) -> None:
    """The part of a training step no generator can avoid: the recording forward, then the step's one masked forward
    over every part it runs (x for kd, and the swap, zero-image and null-input controls the config switches on,
    ``gencnp.systems.training.masked_parts``) with all-ones masks, and the backward to those masks."""
    from gencnp.systems.training import masked_parts

    target, fill = model.target, model.fills()
    with torch.no_grad():
        logits, feats = target(x, record=True)
    ones = torch.ones(x.shape[0], target.num_channels, requires_grad=True)
    out = {"masks": ones, "scores": ones.detach()}
    xs, ms, firsts, _, _ = masked_parts(model, x, logits, feats, logits.argmax(1), out)
    first = {"first_tap": torch.cat(firsts)} if _first_tap(target, feats) else {}
    masked = target(torch.cat(xs), masks=model.generator.split(torch.cat(ms)), fill=fill, **first)
    torch.autograd.grad(masked.sum(), ones)


def train_step(model, opt: torch.optim.Optimizer, batch, step: int) -> None:
    opt.zero_grad(set_to_none=True)
    loss = model.training_step(batch, step)
    loss.backward()
    opt.step()


def baseline(name: str, model, x: torch.Tensor, counts: torch.Tensor) -> None:
    """A baseline's pathway at GEN-CNP's counts, then the masked forward giving its masked prediction."""
    from gencnp.pathways.baselines import run_method, split_pathway

    target, fill = model.target, model.fills()
    out = run_method(name, target, x, None, counts=counts, fill=fill)
    with torch.no_grad():
        target(x, masks=split_pathway(out["matched"], target.tap_channels), fill=fill).argmax(1)


def bank_export(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int, timer=time.perf_counter):
    """``predict_step`` + ``PathwayBank.update`` over ``images``; returns ``(bank, seconds)``."""
    from gencnp.banks.bank import PathwayBank

    bank = PathwayBank.for_target(model.target, class_source=model.hparams.class_source)
    t0 = timer()
    for i, start in enumerate(range(0, len(images), batch_size)):
        out = model.predict_step((images[start : start + batch_size], labels[start : start + batch_size]), i)
        bank.update(out["pathway"], out["y_hat"])
    return bank, timer() - t0


def reachable_bytes(obj, seen: set | None = None) -> int:
    """Bytes reachable from ``obj``: tensor storages (each once) plus Python containers and scalars."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = ("t", obj.untyped_storage().data_ptr())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    container = isinstance(obj, (dict, list, tuple, set, frozenset)) or hasattr(obj, "__dict__")
    if container:  # leaves (str, int, ...) count every time: interning must not make two equal states differ
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(reachable_bytes(k, seen) + reachable_bytes(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        size += sum(reachable_bytes(v, seen) for v in obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        # Attribute values only: an instance dict's own size depends on CPython's key sharing, not on the state.
        size += sum(reachable_bytes(v, seen) for v in vars(obj).values())
    return size


def allocator_trace(fn) -> tuple[int, int, object]:
    """``(peak, retained, result)`` of tensor memory allocated while ``fn()`` runs, from the allocator's events.

    CPU: the profiler's allocator hooks (``profile_memory``); allocations are reported on the op that made them,
    frees as ``[memory]`` events. ``retained`` is what was allocated during ``fn`` and is still live at its end
    (the accumulated state); ``peak`` is the highest live total during ``fn`` (batch activations included).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, d in deltas:
        live += d
        peak = max(peak, live)
    return peak, live, result


def python_peak(fn) -> int:
    """``tracemalloc`` peak of Python allocations while ``fn()`` runs (tensor storages are not Python allocations)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def time_rounds(fns: dict, rounds: dict[str, int], timer=time.perf_counter) -> dict[str, list[float]]:
    """Interleaved timing: round r runs every measurement with ``rounds[name] > r`` once, order rotated by r."""
    times = {name: [] for name in fns}
    names = list(fns)
    for name in names:  # warm-up (oneDNN primitives, allocator)
        fns[name]()
    for r in range(max(rounds.values())):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if rounds[name] > r:
                t0 = timer()
                fns[name]()
                times[name].append(timer() - t0)
    return times


def time_iou(n: int, d: int, k: int, repeats: int, seed: int, timer=time.perf_counter) -> list[float]:
    from gencnp.pathways.metrics import class_iou

    g = torch.Generator().manual_seed(seed)
    pathways = torch.rand(n, d, generator=g) < 0.7
    classes = torch.randint(0, k, (n,), generator=g)
    ts = []
    for _ in range(repeats):
        t0 = timer()
        class_iou(pathways, classes)
        ts.append(timer() - t0)
    return ts


# ----- report -----
def machine() -> dict[str, str]:
    import lightning

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "load": load_average(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def load_average() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def verdict(key: str, value: float) -> str:
    op, bound, _ = TARGETS[key]
    ok = {"<=": value <= bound, "<": value < bound, ">=": value >= bound, "==": value == bound}[op]
    return f"{op} {bound:g}: {'yes' if ok else 'NO'}"


def write_report(path: Path, rows: list[tuple], info: dict, args: argparse.Namespace, command: str) -> None:
    cfg = Path(args.config).resolve()
    cfg_name = cfg.relative_to(ROOT) if cfg.is_relative_to(ROOT) else cfg
    lines = [
        "# gencnp benchmarks",
        "",
        f"Written by `benchmarks/bench.py`. Command: `{command}`",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores, torch threads {info['threads']}; load average before the "
        f"run {info['load_before']}, after {info['load']} (1/5/15 min; other processes share the cores)",
        f"- torch {info['torch']}, lightning {info['lightning']}, Python {info['python']}; {info['date']}",
        f"- target `{info['arch']}` ({info['weights']}), taps {info['taps']} (D = {info['D']}); data: {info['data']}",
        f"- batch {args.batch_size}, {args.repeats} interleaved rounds ({args.slow_repeats} for neuron_intgrad and dgr), "
        f"medians (min-max beside them), {args.clock} clock; config `{cfg_name}` (ablation `{info['ablation']}`, "
        f"lambda_swap {info['lambda_swap']}, lambda_zero {info['lambda_zero']}, d {info['d']}); "
        f"channels_last {args.channels_last}",
        "",
        "| measurement | median | min-max | unit | ratio | ratio to | must show | ratio of minima |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _key, label, value, spread, unit, ratio, base, check in rows:
        r = "" if ratio is None else f"{ratio:.2f}"
        sp = "" if spread is None else f"{spread[0]:.4g}-{spread[1]:.4g}"
        r_min = "" if spread is None or len(spread) < 3 or spread[2] is None else f"{spread[2]:.2f}"
        lines.append(f"| {label} | {value:.4g} | {sp} | {unit} | {r} | {base} | {check} | {r_min} |")
    lines += [
        "",
        "Ratios are of medians (the last column: of minima, the least disturbed rounds): explanation and training "
        "rows are time / base; baseline rows are baseline time / "
        "GEN-CNP explanation time (how many times slower than GEN-CNP). Rows with a `must show` bound are the "
        "issue's targets. The training step is `GenCNP.training_step` + backward + Adam step outside a Trainer; "
        "t_floor's masked forward reuses the recorded first-tap output as GEN-CNP's passes do. Bank state: "
        "`allocator retained` is tensor memory allocated during the export and still live at its end (profiler "
        "allocator events), `reachable` the bytes reachable from the bank object; both must not grow with samples.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run every measurement, write ``--out`` and return ``{row key: value}`` (plus ``<key>_ratio``)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = time.perf_counter if args.clock == "wall" else time.process_time
    warnings.filterwarnings("ignore")
    load_before = load_average()
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)

    kw = model_kwargs(args)
    n_fill = args.batch_size * (2 if args.tiny else min(4, int(kw.get("ablation_batches", 20))))
    shape = (int(kw.get("in_chans", 1)), int(kw.get("image_size", 28)), int(kw.get("image_size", 28)))
    xb, xt, data_note = load_images(args, shape, int(kw.get("num_classes", 10)), max(4 * args.bank_samples, n_fill))
    model = build(kw, xt[:n_fill], args)
    target = model.target
    with torch.no_grad():
        labels = target(xb).argmax(1)
    batch = (xb, labels)
    b = args.batch_size

    # ----- interleaved rounds -----
    from gencnp.pathways.baselines import tap_counts

    counts = tap_counts(model.explain(xb)["pathway"], target.tap_channels)
    variants = {
        "train_default": build(kw, xt[:n_fill], args),
        "train_kd_sparsity": build(kw, xt[:n_fill], args, lambda_swap=0.0, lambda_zero=0.0),
        **{f"train_fraction_{f:g}": build(kw, xt[:n_fill], args, control_fraction=f) for f in args.control_fraction},
    }
    variants = {k: v.train() for k, v in variants.items() if v is not None}
    opts = {k: v.make_optimizer() for k, v in variants.items()}
    step = {"i": 0}

    def trainer_of(name):
        def run():
            step["i"] += 1
            train_step(variants[name], opts[name], batch, step["i"])

        return run

    def fwd():
        with torch.no_grad():
            target(xb)

    fns = {"t_fwd": fwd, "t_floor": lambda: floor_step(model, xb), "explain": lambda: model.explain(xb)}
    fns.update({name: trainer_of(name) for name in variants})
    for name in ("neuron_mct", "neuron_intgrad", "dgr"):
        fns[name] = lambda name=name: baseline(name, model, xb, counts)
    rounds = {name: (args.slow_repeats if name in ("neuron_intgrad", "dgr") else args.repeats) for name in fns}
    times = time_rounds(fns, rounds, timer)
    per_img = {name: statistics.median(ts) / b * 1e3 for name, ts in times.items()}  # ms per image
    spread = {name: (min(ts) / b * 1e3, max(ts) / b * 1e3) for name, ts in times.items()}

    # ----- bank export: 1x and 4x the samples -----
    n1 = args.bank_samples
    yt = torch.zeros(len(xt), dtype=torch.long)
    bank_export(model, xt[:b], yt[:b], b)  # warm-up
    export = {}
    for mult in (1, 4):
        n = mult * n1
        runs = [bank_export(model, xt[:n], yt[:n], b, timer) for _ in range(1 if args.tiny else 2)]
        bank = runs[0][0]
        secs = statistics.median(r[1] for r in runs)
        peak, retained, _ = allocator_trace(lambda n=n: bank_export(model, xt[:n], yt[:n], b))
        py_peak = python_peak(lambda n=n: bank_export(model, xt[:n], yt[:n], b))
        export[mult] = {
            "ips": n / secs,
            "reachable": reachable_bytes(bank),
            "retained": retained,
            "peak": peak,
            "py_peak": py_peak,
            "samples": int(bank.n.sum()),
        }
    iou_ts = time_iou(
        args.iou_pathways, target.num_channels, int(kw.get("num_classes", 10)), args.iou_repeats, args.seed, timer
    )
    iou_s = statistics.median(iou_ts)

    # ----- rows: (key, label, value, (min, max) or None, unit, ratio, ratio base, must-show verdict) -----
    def ratio(a, base):
        return per_img[a] / per_img[base]

    def timed(key, label, base=None, check=None):
        r = None if base is None else ratio(key, base)
        r_min = None if base is None else spread[key][0] / spread[base][0]  # robustness check on a noisy machine
        base_name = {"t_fwd": "t_fwd", "t_floor": "t_floor", "explain": "explanation", None: ""}[base]
        return (
            key,
            label,
            per_img[key],
            (*spread[key], r_min),
            "ms/img",
            r,
            base_name,
            verdict(check, r) if check else "",
        )

    rows = [
        timed("t_fwd", "t_fwd: target forward, no gradients"),
        timed(
            "t_floor",
            "t_floor: forward + the step's masked forward (kd and the controls) + backward to all-ones masks",
            "t_fwd",
        ),
        timed(
            "explain",
            "GEN-CNP explanation (`GenCNP.explain`: features, generator, DAQ, masked forward)",
            "t_fwd",
            "explain_ratio",
        ),
        timed(
            "train_default",
            "GEN-CNP training step, config losses (kd, sparsity, swap, zero, cls, con; 3B masked batch)",
            "t_floor",
            "train_default_ratio",
        ),
        timed(
            "train_kd_sparsity",
            "GEN-CNP training step, kd + sparsity (lambda_swap = lambda_zero = 0; cls, con kept)",
            "t_floor",
            "train_kd_sparsity_ratio",
        ),
    ]
    for frac in args.control_fraction:
        if f"train_fraction_{frac:g}" in per_img:
            rows.append(
                timed(
                    f"train_fraction_{frac:g}",
                    f"GEN-CNP training step, config losses, controls on {frac:g} of "
                    f"the batch (opt-in control_fraction={frac:g})",
                    "t_floor",
                    "train_fraction_ratio",
                )
            )
    for name in ("neuron_mct", "neuron_intgrad", "dgr"):
        rows.append(
            timed(
                name,
                f"{name} (matched counts) + masked forward",
                "explain",
                f"{name}_ratio" if f"{name}_ratio" in TARGETS else None,
            )
        )
    e1, e4 = export[1], export[4]
    growth = max(e4["retained"], e4["reachable"]) / max(1, max(e1["retained"], e1["reachable"]))
    rows += [
        (
            "bank_1x_ips",
            f"bank export, {n1} samples (predict_step + PathwayBank.update)",
            e1["ips"],
            None,
            "images/s",
            None,
            "",
            "",
        ),
        ("bank_4x_ips", f"bank export, {4 * n1} samples", e4["ips"], None, "images/s", None, "", ""),
        (
            "bank_1x_retained",
            f"bank state after {n1} samples: allocator retained",
            e1["retained"],
            None,
            "bytes",
            None,
            "",
            "",
        ),
        (
            "bank_4x_retained",
            f"bank state after {4 * n1} samples: allocator retained",
            e4["retained"],
            None,
            "bytes",
            e4["retained"] / max(e1["retained"], 1),
            "state at 1x",
            "",
        ),
        (
            "bank_1x_reachable",
            f"bank state after {n1} samples: bytes reachable from the bank",
            e1["reachable"],
            None,
            "bytes",
            None,
            "",
            "",
        ),
        (
            "bank_4x_reachable",
            f"bank state after {4 * n1} samples: bytes reachable from the bank",
            e4["reachable"],
            None,
            "bytes",
            e4["reachable"] / max(e1["reachable"], 1),
            "state at 1x",
            "",
        ),
        (
            "bank_state_growth",
            "bank state 4x / 1x (larger of the two measures)",
            growth,
            None,
            "x",
            None,
            "",
            verdict("bank_state_growth", growth),
        ),
        (
            "bank_1x_peak",
            f"allocator peak during the {n1}-sample export (batch activations included)",
            e1["peak"],
            None,
            "bytes",
            None,
            "",
            "",
        ),
        (
            "bank_4x_peak",
            f"allocator peak during the {4 * n1}-sample export",
            e4["peak"],
            None,
            "bytes",
            e4["peak"] / max(e1["peak"], 1),
            "peak at 1x",
            "",
        ),
        (
            "bank_1x_py_peak",
            f"tracemalloc peak during the {n1}-sample export (Python allocations)",
            e1["py_peak"],
            None,
            "bytes",
            None,
            "",
            "",
        ),
        (
            "bank_4x_py_peak",
            f"tracemalloc peak during the {4 * n1}-sample export",
            e4["py_peak"],
            None,
            "bytes",
            e4["py_peak"] / max(e1["py_peak"], 1),
            "peak at 1x",
            "",
        ),
        (
            "aciou_s",
            f"acIOU + between-class IoU of {args.iou_pathways} pathways (D = {target.num_channels})",
            iou_s,
            (min(iou_ts), max(iou_ts)),
            "s",
            None,
            "",
            verdict("aciou_s", iou_s) if args.iou_pathways >= 10000 else "",
        ),
    ]
    info = machine()
    ckpt = kw["target_checkpoint"]
    weights = "random init, no checkpoint"
    if ckpt:
        weights = f"weights {Path(ckpt).relative_to(ROOT) if Path(ckpt).is_relative_to(ROOT) else ckpt}"
    info.update(
        load_before=load_before,
        arch=target.arch,
        taps=", ".join(target.tap_names),
        D=target.num_channels,
        weights=weights,
        data=data_note,
        ablation=model.settings.ablation,
        lambda_swap=model.settings.lambda_swap,
        lambda_zero=model.settings.lambda_zero,
        d=model.settings.d,
    )
    cli = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python benchmarks/bench.py", *cli])
    write_report(Path(args.out), rows, info, args, command)
    result = {key: float(value) for key, _, value, *_ in rows}
    result.update({f"{key}_ratio": float(r) for key, _, _, _, _, r, *_ in rows if r is not None})
    write_json(Path(args.out).with_suffix(".json"), result, info, command)
    return result


NAMED_RATIOS = {  # name in the JSON -> (numerator row, denominator row)
    "explain_over_fwd": ("explain", "t_fwd"),
    "step_over_floor": ("train_default", "t_floor"),
    "dgr_over_gencnp": ("dgr", "explain"),
    "mct_over_gencnp": ("neuron_mct", "explain"),
    "intgrad_over_gencnp": ("neuron_intgrad", "explain"),
}


def write_json(path: Path, result: dict[str, float], info: dict, command: str) -> None:
    """``results.json`` beside the markdown: the named ratios scripts read, every row's value, the machine."""
    import json

    ratios = {name: result[a] / result[b] for name, (a, b) in NAMED_RATIOS.items() if a in result and b in result}
    ratios["bank_state_4x_over_1x"] = result.get("bank_state_growth", math.nan)
    doc = {"command": command, "ratios": ratios, "values": result, "machine": {k: str(v) for k, v in info.items()}}
    path.write_text(json.dumps(doc, indent=2, allow_nan=True) + "\n")


if __name__ == "__main__":
    main()
    print(Path(parse_args(sys.argv[1:]).out).read_text())
