"""Evaluation report: GEN-CNP, transferred class pathways and the baselines on the test split.

``python evaluate.py report --config configs/fashion_mnist/evaluate.yaml`` writes to ``out_dir``:

- ``report.json``: ``provenance``, ``methods`` (every method at GEN-CNP's per-sample and per-tap kept counts),
  ``methods_native`` (each baseline at its own setting), ``transfer`` (class pathways ``M_c`` of the bank) and
  ``subset`` (every method again on one seeded common subset). Every entry holds ``n``, ``images``,
  ``seconds_per_image`` and all keys of docs/design.md section 8 (unprefixed, ``kept/<tap>`` included); comparisons
  carry paired bootstrap 95% intervals of the difference to GEN-CNP on the same images (``vs_gencnp``).
- ``report.md``: tables, provenance, intervals and one sentence per comparison saying who wins.
- figures: ``agreement_vs_kept.png``, ``kept_hist.png``, ``bank_heatmap.png``, ``attribution_grid.png``.

Costs: ``gencnp``, ``random``, ``neuron_mct`` and ``transfer`` cover the whole split; ``neuron_intgrad`` (44
forward-backward passes per image on 4 taps) and ``dgr`` (30 optimisation steps) cover the subset.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import time
from collections import defaultdict
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from gencnp.baselines import METHODS, global_percentile, split_pathway, tap_counts, topk_per_tap
from gencnp.data import ImageDataModule
from gencnp.fileio import json_safe, save_figure, write_atomic
from gencnp.metrics import null_families_of, per_sample, summarize

__all__ = ["report", "paired_bootstrap", "CI_KEYS", "BASELINES"]

BASELINES = ("random", "neuron_mct", "neuron_intgrad", "dgr")
# Key comparisons: report key -> per-sample value of gencnp.metrics.per_sample, and which direction is better.
CI_KEYS = {"agreement": "agree", "kept_mean": "kept", "swap_forcing": "swap_forced", "zero_forcing": "zero_forced",
           "necessity": "necessity", "mDC": "dc"}  # fmt: skip
BETTER = {"agreement": "higher", "kept_mean": "lower", "swap_forcing": "lower", "zero_forcing": "lower",
          "necessity": "lower", "mDC": "lower"}  # fmt: skip
TABLE_KEYS = ["agreement", "masked_accuracy", "mDC", "mIC", "kept_mean", "kept_std", "kept_class_std", "acIOU",
              "between_class_iou", "necessity", "swap_forcing", "zero_forcing"]  # fmt: skip


# ----- per-sample results of one method at one setting -----
class _Results:
    """Per-sample values (``gencnp.metrics.per_sample``), pathways and classes at positions of the split."""

    def __init__(self, name: str, setting: str, images: str):
        self.name, self.setting, self.images = name, setting, images
        self._vals: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._paths: list[torch.Tensor] = []
        self._cls: list[torch.Tensor] = []
        self._pos: list[torch.Tensor] = []
        self.seconds = 0.0
        self.vals: dict[str, torch.Tensor] = {}

    def add(self, pos: torch.Tensor, vals: dict[str, torch.Tensor], pathway: torch.Tensor, classes: torch.Tensor,
            seconds: float) -> None:  # fmt: skip
        for k, v in vals.items():
            self._vals[k].append(v.cpu())
        self._paths.append(pathway.bool().cpu())
        self._cls.append(classes.cpu())
        self._pos.append(pos.cpu())
        self.seconds += seconds

    def finish(self) -> _Results:
        self.vals = {k: torch.cat(v) for k, v in self._vals.items()}
        self.pathways, self.classes, self.pos = torch.cat(self._paths), torch.cat(self._cls), torch.cat(self._pos)
        self.n = len(self.pos)
        return self

    def at(self, positions: torch.Tensor, images: str) -> _Results:
        """The same results restricted to ``positions`` of the split (each must be covered)."""
        lookup = torch.full((int(max(self.pos.max(), positions.max())) + 1,), -1, dtype=torch.long)
        lookup[self.pos] = torch.arange(self.n)
        rows = lookup[positions]
        if bool((rows < 0).any()):
            raise ValueError(f"{self.name} ({self.setting}) does not cover every requested image.")
        out = _Results(self.name, self.setting, images)
        out.vals = {k: v[rows] for k, v in self.vals.items()}
        out.pathways, out.classes, out.pos, out.n = (
            self.pathways[rows],
            self.classes[rows],
            positions.clone(),
            len(rows),
        )
        out.seconds = self.seconds * len(rows) / max(self.n, 1)
        return out

    def summary(self, tap_names: Sequence[str], tap_channels: Sequence[int]) -> dict[str, Any]:
        s = summarize(self.vals, self.pathways, self.classes, tap_names, tap_channels)
        return {
            "n": self.n,
            "images": self.images,
            "setting": self.setting,
            "seconds_per_image": self.seconds / max(self.n, 1),
            **s,
        }


# ----- paired bootstrap -----
def paired_bootstrap(diffs: torch.Tensor, n_boot: int = 1000, seed: int = 0, chunk: int = 100,
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Percentile 95% intervals of mean paired differences, vectorised over resamples and comparisons.

    Each resample draws ``N`` images with replacement (the same draw for every column, so columns stay paired);
    a column's statistic is the mean of its non-NaN entries among the drawn images. Draws are counts
    ``W [R, N]`` and statistics matrix products ``W @ values``.

    Args:
        diffs: ``[N, M]`` per-image differences (method minus GEN-CNP), NaN where a value is undefined.
        n_boot: resamples ``R``.
        seed: seed of the resampling.

    Returns:
        ``(mean [M], lo [M], hi [M])``: the observed mean difference and its 2.5% / 97.5% bootstrap quantiles.
    """
    from tqdm.auto import tqdm

    if diffs.dim() != 2 or diffs.shape[0] == 0:
        raise ValueError(f"diffs must be [N, M] with N >= 1, got {list(diffs.shape)}.")
    n = diffs.shape[0]
    valid = (~torch.isnan(diffs)).double()
    vals = torch.nan_to_num(diffs.double(), nan=0.0)
    mean = (vals.sum(0) / valid.sum(0)).where(valid.sum(0) > 0, torch.tensor(float("nan"), dtype=torch.float64))
    g = torch.Generator().manual_seed(seed)
    stats = []
    for start in tqdm(range(0, n_boot, chunk), desc="bootstrap", disable=not progress, leave=False):
        r = min(chunk, n_boot - start)
        w = torch.zeros(r, n, dtype=torch.float64)
        w.scatter_add_(1, torch.randint(0, n, (r, n), generator=g), torch.ones(r, n, dtype=torch.float64))
        stats.append((w @ vals) / (w @ valid))
    s = torch.cat(stats)
    lo = torch.nanquantile(s, 0.025, dim=0)
    hi = torch.nanquantile(s, 0.975, dim=0)
    return mean, lo, hi


def _winner(diff: float, lo: float, hi: float, better: str) -> str:
    if any(v != v for v in (diff, lo, hi)) or lo <= 0.0 <= hi:
        return "tie"
    method_better = (diff > 0) == (better == "higher")
    return "method" if method_better else "gencnp"


def ci_keys(vals: dict[str, torch.Tensor]) -> dict[str, str]:
    """``CI_KEYS`` plus ``null_forcing/<family>`` for every null family present in per-sample ``vals``."""
    return {**CI_KEYS, **{f"null_forcing/{f}": f"null_forced/{f}" for f in null_families_of(vals)}}


def _better(key: str) -> str:
    return "lower" if key.startswith("null_forcing/") else BETTER[key]


def _compare(entries: dict[str, tuple[_Results, _Results]], n_boot: int, seed: int, progress: bool) -> dict[str, dict]:
    """``vs_gencnp`` blocks for several results, each paired with GEN-CNP on the same positions (one group)."""
    cols, where = [], []
    for label, (res, ref) in entries.items():
        if not torch.equal(res.pos, ref.pos):
            raise ValueError(f"{label}: compared results must cover the same images in the same order.")
        for key, v in ci_keys(ref.vals).items():
            cols.append(res.vals[v] - ref.vals[v])
            where.append((label, key))
    if not cols:
        return {}
    mean, lo, hi = paired_bootstrap(torch.stack(cols, dim=1), n_boot, seed, progress=progress)
    out: dict[str, dict] = defaultdict(dict)
    for (label, key), m, a, b in zip(where, mean.tolist(), lo.tolist(), hi.tolist()):
        better = _better(key)
        out[label][key] = {"diff": m, "ci95": [a, b], "better": better, "winner": _winner(m, a, b, better)}
    return dict(out)


# ----- helpers -----
def _git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()  # fmt: skip
        return {"commit": commit or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict[str, str]:
    import lightning
    import torchmetrics

    from gencnp import __version__

    return {"gencnp": __version__, "torch": torch.__version__, "lightning": lightning.__version__,
            "torchmetrics": torchmetrics.__version__, "numpy": np.__version__, "python": platform.python_version()}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> _Timer:
        _sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        _sync(self.device)
        self.seconds = time.perf_counter() - self.t0


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


# ----- the report -----
def report(
    generator: str = "runs/fashion_mnist/gencnp/best.ckpt",
    bank: str | None = "runs/fashion_mnist/bank.safetensors",
    data: ImageDataModule | None = None,
    out_dir: str = "runs/fashion_mnist/eval",
    target_checkpoint: str | None = None,
    split: str = "test",
    subset_n: int = 1000,
    subset_seed: int = 0,
    batch_size: int = 500,
    grad_batch_size: int = 100,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    device: str = "cpu",
    intgrad_steps: int = 11,
    dgr_steps: int = 30,
    dgr_lr: float = 0.1,
    dgr_momentum: float = 0.9,
    dgr_l1: float = 0.05,
    curve_thresholds: list[float] | None = None,
    curve_kept: list[float] | None = None,
    samples_per_class: int = 2,
    limit: int | None = None,
    threads: int | None = None,
    progress: bool = True,
    lookup_fractions: list[float] | None = None,
) -> dict[str, Any]:
    """Evaluate GEN-CNP, transfer and the baselines on the test split; write report.json, report.md and figures.

    Every method is measured at GEN-CNP's per-sample **and** per-tap kept counts (``methods``) and at its own
    setting (``methods_native``: NeuronMCT/IntGrad at one global percentile equal to GEN-CNP's mean kept
    fraction, DGR with gates > 0, random channels drawn globally at that fraction). Each entry carries the
    input-dependence controls (swap and zero forcing, necessity) beside faithfulness, and the key comparisons
    carry paired bootstrap 95% intervals of the difference to GEN-CNP on the same images.

    Args:
        generator: GEN-CNP checkpoint; its hyper-parameters rebuild the frozen target from ``target_checkpoint``.
        bank: pathway bank (``.safetensors``) for transfer; ``None`` skips transfer and the bank heatmap.
        data: the data module (``class_path``/``init_args`` in YAML); Fashion-MNIST when unset.
        out_dir: output folder (created).
        target_checkpoint: override the target weights named in the generator's hyper-parameters.
        split: split to evaluate (``'test'``; never used for selection or tuning).
        subset_n: size of the seeded common subset for ``neuron_intgrad``, ``dgr`` and the curves (all images when
            the split is smaller).
        subset_seed: seed of the subset draw.
        batch_size: images per batch for forward-only methods.
        grad_batch_size: images per batch for ``neuron_intgrad`` and ``dgr`` (``intgrad_steps`` times as many
            activations are held at once).
        bootstrap_samples: paired bootstrap resamples.
        seed: seed of the random baseline and the bootstrap.
        device: ``'cpu'``, ``'cuda'``, ...
        intgrad_steps: points on each integrated-gradients path (both ends included).
        dgr_steps: DGR optimisation steps (Wang et al. 2018: 30).
        dgr_lr: DGR SGD learning rate.
        dgr_momentum: DGR SGD momentum.
        dgr_l1: weight of DGR's L1 penalty on the gates.
        curve_thresholds: thresholds on GEN-CNP's generator scores for the agreement-vs-kept curve
            (default ``0.3, 0.4, 0.5, 0.6, 0.7``).
        curve_kept: global kept fractions of the baselines' curves (default ``0.05, 0.1, 0.2, 0.4, 0.55, 0.7, 0.85``).
        samples_per_class: rows per class in the attribution grid.
        limit: evaluate only the first ``limit`` images of the split (quick runs; the report states ``n``).
        threads: CPU threads for torch during the report (``torch.set_num_threads``; restored afterwards); unset
            keeps torch's default. On a CPU shared with other jobs, 1 avoids stalls of spinning OpenMP workers.
        progress: show progress bars.
        lookup_fractions: shares of GEN-CNP's per-tap counts at which its score ranking is compared with the class
            lookup (``lookup_frontier``; default ``1.0, 0.8, 0.6, 0.4``).

    Returns:
        The content of ``report.json`` as a dict.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or null (torch's default), got {threads}.")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        kwargs = {k: v for k, v in locals().items() if k not in ("threads", "previous")}
        return _report(**kwargs)
    finally:
        torch.set_num_threads(previous)


def _report(
    generator: str = "runs/fashion_mnist/gencnp/best.ckpt",
    bank: str | None = "runs/fashion_mnist/bank.safetensors",
    data: ImageDataModule | None = None,
    out_dir: str = "runs/fashion_mnist/eval",
    target_checkpoint: str | None = None,
    split: str = "test",
    subset_n: int = 1000,
    subset_seed: int = 0,
    batch_size: int = 500,
    grad_batch_size: int = 100,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    device: str = "cpu",
    intgrad_steps: int = 11,
    dgr_steps: int = 30,
    dgr_lr: float = 0.1,
    dgr_momentum: float = 0.9,
    dgr_l1: float = 0.05,
    curve_thresholds: list[float] | None = None,
    curve_kept: list[float] | None = None,
    samples_per_class: int = 2,
    limit: int | None = None,
    progress: bool = True,
    lookup_fractions: list[float] | None = None,
) -> dict[str, Any]:
    """The body of ``report`` (arguments as there)."""
    from tqdm.auto import tqdm

    from gencnp.systems import GenCNP

    t_start = time.perf_counter()
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' (or 'val' for development), got '{split}'.")
    for name, v, lo in (("subset_n", subset_n, 1), ("batch_size", batch_size, 1), ("grad_batch_size", grad_batch_size, 1),
                        ("bootstrap_samples", bootstrap_samples, 10), ("intgrad_steps", intgrad_steps, 2),
                        ("samples_per_class", samples_per_class, 0)):  # fmt: skip
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}.")
    thresholds = list(curve_thresholds or (0.3, 0.4, 0.5, 0.6, 0.7))
    kept_grid = list(curve_kept or (0.05, 0.1, 0.2, 0.4, 0.55, 0.7, 0.85))
    if any(not 0 < t < 1 for t in thresholds) or any(not 0 <= k <= 1 for k in kept_grid):
        raise ValueError(
            f"curve_thresholds must lie in (0, 1) and curve_kept in [0, 1]; got {thresholds} and {kept_grid}."
        )
    if not Path(generator).is_file():
        raise FileNotFoundError(f"generator checkpoint '{generator}' does not exist; train one with "
                                "python train.py fit --config configs/fashion_mnist/gencnp.yaml, or fix the path.")  # fmt: skip
    if bank is not None and not Path(bank).is_file():
        raise FileNotFoundError(
            f"pathway bank '{bank}' does not exist; export it with python train.py predict --config "
            f"configs/fashion_mnist/bank.yaml --ckpt_path {generator}, or pass bank: null to skip transfer."
        )
    out = Path(out_dir)
    from gencnp.preflight import check_writable_dir

    # Checked, not created: a bad generator, bank or data below must leave no empty report folder behind (the
    # atomic writes at the end create it).
    check_writable_dir(out, "report folder", "set out_dir.")
    dev = torch.device(device)
    torch.manual_seed(seed)

    # ----- model, data, bank -----
    overrides = {"target_checkpoint": target_checkpoint} if target_checkpoint else {}
    from gencnp.checkpointing import read_checkpoint

    recorded = read_checkpoint(generator).get("class_names")  # refuses truncated, altered or code-carrying files
    model = GenCNP.load_from_checkpoint(generator, map_location="cpu", weights_only=True, **overrides).to(dev).eval()
    target = model.target
    taps, chans = target.tap_names, target.tap_channels
    if data is None:
        from gencnp.data import FashionMNISTDataModule

        data = FashionMNISTDataModule(eval_batch_size=batch_size)
    model.check_data(data)
    dataset = data.split(split)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {limit}.")
        dataset = Subset(dataset, list(range(min(limit, len(dataset)))))
    n_all = len(dataset)
    class_names = list(getattr(data, "class_names", [str(k) for k in range(model.num_classes)]))
    if recorded is not None and [str(c) for c in recorded] != [str(c) for c in class_names]:
        raise ValueError(
            f"generator checkpoint '{generator}' was trained on the classes {list(recorded)}, but the data has "
            f"{class_names}; class indices would mean other classes. Evaluate on the data it was trained on, or "
            "train a generator on this data."
        )
    if int((model.probe_class >= 0).sum()) == 0:  # a checkpoint saved before setup(): pick swap probes now
        model.build_probes(data.split("train"))
    fills = model.fills()
    bank_obj = None
    if bank is not None:
        from gencnp.banks import PathwayBank

        bank_obj = PathwayBank.load(bank, target=target, class_names=class_names)
        if bank_obj.tau is None:
            raise ValueError(
                f"pathway bank '{bank}' has no tau; export it with PathwayBankWriter (it chooses tau on validation)."
            )
        class_paths = bank_obj.class_pathways().to(dev)
    g_sub = torch.Generator().manual_seed(subset_seed)
    subset_pos = torch.sort(torch.randperm(n_all, generator=g_sub)[: min(subset_n, n_all)]).values
    n_sub = len(subset_pos)
    all_images = f"all {n_all} {split} images" + (f" (first {n_all}, limit)" if limit is not None else "")
    sub_images = f"seeded subset of {n_sub} {split} images (seed {subset_seed})"
    dgr_opts = {"steps": dgr_steps, "lr": dgr_lr, "momentum": dgr_momentum, "l1": dgr_l1}

    def masked_forward(x: torch.Tensor, pathway: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return target(x, masks=split_pathway(pathway.to(x.dtype), chans), fill=fills)

    def measure(res: _Results, pos, x, labels, logits, y_hat, pathway, seconds: float, masked=None, inputs=None) -> None:
        """Masked prediction (timed into ``seconds`` unless given), controls, per-sample metrics. ``inputs``: the
        batch's ``model.control_inputs``, shared by every method's pathways of the batch."""
        if masked is None:
            with _Timer(dev) as tm:
                masked = masked_forward(x, pathway)
            seconds += tm.seconds
        with torch.no_grad():
            ctrl = model.controls(x, {"pathway": pathway, "y_hat": y_hat}, necessity=True, inputs=inputs)
        vals = per_sample(logits, masked, y_hat, pathway, labels, **ctrl)
        res.add(pos, vals, pathway, y_hat, seconds)

    def loader(ds, bs: int) -> DataLoader:
        return DataLoader(ds, batch_size=bs, shuffle=False, num_workers=0)

    phases: dict[str, float] = {"setup": time.perf_counter() - t_start}
    t_phase = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t_phase
        now = time.perf_counter()
        phases[name] = now - t_phase
        t_phase = now

    # ----- pass 1: GEN-CNP on the whole split -----
    res: dict[tuple[str, str], _Results] = {}
    res["gencnp", "matched"] = _Results("gencnp", "generator pathway (DAQ mask > 0.5)", all_images)
    logits_all, yhat_all, labels_all, path_all, scores_all = [], [], [], [], []
    start = 0
    for batch in tqdm(loader(dataset, batch_size), desc="GEN-CNP", disable=not progress):
        x, labels = batch[0].to(dev), batch[1].to(dev)
        pos = torch.arange(start, start + len(x))
        start += len(x)
        with _Timer(dev) as tm:
            ex = model.explain(x, labels)
        g_res, masked = res["gencnp", "matched"], ex["masked_logits"]
        inputs = model.control_inputs(x, ex["y_hat"])
        measure(g_res, pos, x, labels, ex["logits"], ex["y_hat"], ex["pathway"], tm.seconds, masked, inputs)
        logits_all.append(ex["logits"].cpu())
        yhat_all.append(ex["y_hat"].cpu())
        labels_all.append(labels.cpu())
        path_all.append(ex["pathway"].cpu())
        scores_all.append(ex["scores"].float().cpu())
    gen = res["gencnp", "matched"].finish()
    logits_all, yhat_all, labels_all = torch.cat(logits_all), torch.cat(yhat_all), torch.cat(labels_all)
    path_all, scores_all = torch.cat(path_all), torch.cat(scores_all)
    counts_all = tap_counts(path_all, chans)
    keep_fraction = float(path_all.double().mean())
    lap("gencnp")

    # ----- pass 2: random, neuron_mct and transfer on the whole split -----
    g_rand = torch.Generator(device=dev).manual_seed(seed)
    full_methods = [m for m in BASELINES if not METHODS[m].expensive]
    sub_methods = [m for m in BASELINES if METHODS[m].expensive]
    for m in BASELINES:
        images = all_images if m in full_methods else sub_images
        res[m, "matched"] = _Results(m, "GEN-CNP's per-sample and per-tap kept counts", images)
        res[m, "native"] = _Results(m, METHODS[m].native, images)
    if bank_obj is not None:
        res["transfer", "matched"] = _Results("transfer", f"class pathway M_c = f_c >= tau (tau = {bank_obj.tau:g}) of the "
                                              "predicted class", all_images)  # fmt: skip
        res["class_lookup", "matched"] = _Results("class_lookup", "the predicted class's channels ranked by the bank's "
                                                  "f_c, GEN-CNP's per-sample and per-tap kept counts", all_images)  # fmt: skip
        class_freq = bank_obj.frequencies().to(dev)
    fractions = sorted({float(f) for f in (lookup_fractions or (1.0, 0.8, 0.6, 0.4))}, reverse=True)
    if any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"lookup_fractions must lie in (0, 1] (shares of GEN-CNP's per-tap counts), got {fractions}.")
    frontier_hits = {f: [] for f in fractions}  # per image: (gencnp top-by-score agrees, lookup agrees, kept)
    mct_scores = torch.zeros(n_all, sum(chans))
    start = 0
    for batch in tqdm(loader(dataset, batch_size), desc="random, neuron_mct, transfer", disable=not progress):
        x, labels = batch[0].to(dev), batch[1].to(dev)
        pos = torch.arange(start, start + len(x))
        start += len(x)
        logits, y_hat, counts = logits_all[pos].to(dev), yhat_all[pos].to(dev), counts_all[pos].to(dev)
        meas = partial(measure, inputs=model.control_inputs(x, y_hat))
        for m in full_methods:
            scores = _run_baseline(
                m, res, meas, target, pos, x, labels, logits, y_hat, counts, keep_fraction, fills, g_rand, {}, dev
            )
            if m == "neuron_mct":
                mct_scores[pos] = scores.float().cpu()
        if bank_obj is not None:
            with _Timer(dev) as tm:
                p = class_paths[y_hat]
            meas(res["transfer", "matched"], pos, x, labels, logits, y_hat, p, tm.seconds)
            with _Timer(dev) as tm:
                p = topk_per_tap(class_freq[y_hat], counts, chans)
            meas(res["class_lookup", "matched"], pos, x, labels, logits, y_hat, p, tm.seconds)
            for f in fractions:  # both rankings at a share of GEN-CNP's own per-sample, per-tap counts
                c = torch.round(counts.double() * f).long()
                own = topk_per_tap(scores_all[pos].to(dev), c, chans)
                look = topk_per_tap(class_freq[y_hat], c, chans)
                frontier_hits[f].append(torch.stack([(masked_forward(x, own).argmax(1) == y_hat).double().cpu(),
                                                     (masked_forward(x, look).argmax(1) == y_hat).double().cpu(),
                                                     own.double().mean(1).cpu()], dim=1))  # fmt: skip

    lap("random_neuron_mct_transfer")

    # ----- pass 3: neuron_intgrad and dgr on the subset; agreement-vs-kept curves there -----
    curve: dict[tuple[str, float], list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])  # agree, kept, n
    extra_scores = {m: torch.zeros(n_sub, sum(chans)) for m in sub_methods}
    x_sub: list[torch.Tensor] = []
    done = 0
    for batch in tqdm(loader(Subset(dataset, subset_pos.tolist()), grad_batch_size), desc="neuron_intgrad, dgr, curves",
                      disable=not progress):  # fmt: skip
        x, labels = batch[0].to(dev), batch[1].to(dev)
        rows = torch.arange(done, done + len(x))
        pos = subset_pos[rows]
        done += len(x)
        x_sub.append(x.cpu())
        logits, y_hat, counts = logits_all[pos].to(dev), yhat_all[pos].to(dev), counts_all[pos].to(dev)
        meas = partial(measure, inputs=model.control_inputs(x, y_hat))
        for m in sub_methods:
            opts = {"steps": intgrad_steps} if m == "neuron_intgrad" else dgr_opts
            scores = _run_baseline(
                m, res, meas, target, pos, x, labels, logits, y_hat, counts, keep_fraction, fills, g_rand, opts, dev
            )
            extra_scores[m][rows] = scores.float().cpu()

        def point(method: str, param: float, pathway: torch.Tensor, x=x, y_hat=y_hat) -> None:
            agree = (masked_forward(x, pathway).argmax(1) == y_hat).double().sum()
            c = curve[method, param]
            c[0] += float(agree)
            c[1] += float(pathway.double().mean(1).sum())
            c[2] += len(x)

        sc = scores_all[pos].to(dev)
        for t in thresholds:
            point("gencnp", t, sc > t)
        ranked = {"random": torch.rand(len(x), sum(chans), generator=g_rand, device=dev), "neuron_mct": mct_scores[pos].to(dev),
                  **{m: extra_scores[m][rows].to(dev) for m in sub_methods}}  # fmt: skip
        for m, s in ranked.items():
            for k in kept_grid:
                point(m, k, global_percentile(s, k))

    for r in res.values():
        r.finish()
    lap("neuron_intgrad_dgr_curves")
    same_class = _same_class_transfer(res, gen, subset_pos, torch.cat(x_sub), yhat_all[subset_pos], masked_forward,
                                      grad_batch_size, dev)  # fmt: skip
    lap("same_class_transfer")

    # ----- summaries and paired bootstrap intervals -----
    settings = _settings(model, bank_obj, keep_fraction, intgrad_steps, dgr_opts, fills is not None)
    full_pairs = {}
    sub_pairs = {}
    gen_sub = gen.at(subset_pos, sub_images)
    for (m, s), r in res.items():
        if m == "gencnp":
            continue
        label = f"{m}/{s}"
        if m == "class_lookup":
            label = f"{m}/matched"
        if r.n == n_all:
            full_pairs[label] = (r, gen)
            sub_pairs[f"subset:{label}"] = (r.at(subset_pos, sub_images), gen_sub)
        else:
            sub_pairs[f"subset:{label}"] = (r, gen_sub)
    cmp_full = _compare(full_pairs, bootstrap_samples, seed, progress)
    lookup_frontier = _lookup_frontier(frontier_hits, bootstrap_samples, seed) if bank_obj is not None else None
    cmp_sub = _compare(sub_pairs, bootstrap_samples, seed + 1, progress)

    def block(m: str, s: str, on_subset: bool) -> dict[str, Any]:
        r = res[m, s]
        if m == "gencnp":
            r = gen_sub if on_subset else gen
            return {**r.summary(taps, chans), "settings": settings["gencnp"]}
        if on_subset:
            r = r if r.n == n_sub and r.n != n_all else r.at(subset_pos, sub_images)
            vs = cmp_sub.get(f"subset:{m}/{s}", {})
        else:
            vs = cmp_full.get(f"{m}/{s}") or cmp_sub.get(f"subset:{m}/{s}", {})
        return {**r.summary(taps, chans), "settings": settings[m][s], "vs_gencnp": vs}

    names = ["gencnp", *BASELINES]
    matched_names = names + (["class_lookup"] if bank_obj is not None else [])
    result: dict[str, Any] = {
        "provenance": _provenance(model, generator, bank, bank_obj, data, split, seed, n_all, limit),
        "methods": {m: block(m, "matched", on_subset=m in sub_methods) for m in matched_names},
        "methods_native": {
            m: block(m, "native" if m != "gencnp" else "matched", on_subset=m in sub_methods) for m in names
        },
        "transfer": {**block("transfer", "matched", False), "tau": bank_obj.tau} if bank_obj is not None else None,
        "subset": {
            "n": n_sub,
            "seed": subset_seed,
            "images": sub_images,
            "methods": {m: block(m, "matched", True) for m in matched_names},
            "methods_native": {m: block(m, "native" if m != "gencnp" else "matched", True) for m in names},
            "transfer": block("transfer", "matched", True) if bank_obj is not None else None,
        },
        "curves": {
            "images": sub_images,
            "points": [
                {
                    "method": m,
                    "param": p,
                    "param_kind": "threshold" if m == "gencnp" else "global kept fraction",
                    "agreement": c[0] / c[2],
                    "kept_mean": c[1] / c[2],
                }
                for (m, p), c in sorted(curve.items())
            ],
        },
        "same_class_transfer": same_class,
        "lookup_frontier": lookup_frontier,
        "bootstrap": {
            "samples": bootstrap_samples,
            "seed": seed,
            "interval": "95% percentile, paired by image",
            "keys": list(ci_keys(gen.vals)),
            "difference": "method minus GEN-CNP on the same images",
        },
    }
    lap("summaries_bootstrap")
    # ----- figures, markdown, JSON -----
    figures = {}
    figures["agreement_vs_kept"] = _plot_curves(out / "agreement_vs_kept.png", result)
    figures["kept_hist"] = _plot_kept_hist(out / "kept_hist.png", res, keep_fraction)
    if null_families_of(gen.vals):
        figures["null_forcing"] = _plot_null(out / "null_forcing.png", result)
    if bank_obj is not None:
        figures["bank_heatmap"] = _plot_bank(out / "bank_heatmap.png", bank_obj)
    if samples_per_class > 0:
        figures["attribution_grid"] = _plot_attribution(
            out / "attribution_grid.png", model, dataset, yhat_all, labels_all, path_all,
            class_paths if bank_obj is not None else None, class_names, samples_per_class, fills, dev)  # fmt: skip
    result["figures"] = {k: Path(v).name for k, v in figures.items() if v}
    lap("figures")
    result["seconds_total"] = time.perf_counter() - t_start
    result["seconds_by_phase"] = phases
    result = json_safe(result)
    write_atomic(out / "report.json", json.dumps(result, indent=2, allow_nan=False))
    write_atomic(out / "report.md", _markdown(result))
    print(_screen(result, out))
    return result


def _run_baseline(m, res, measure, target, pos, x, labels, logits, y_hat, counts, keep_fraction, fills, g_rand, opts,
                  dev) -> torch.Tensor:  # fmt: skip
    """One baseline on one batch: scores (timed once), then the matched and native pathways, each measured.

    Returns the method's scores ``[B, D]`` (for the curves)."""
    spec = METHODS[m]
    with _Timer(dev) as t_scores:
        out = spec.run(target, x, y_hat, fill=fills, generator=g_rand, **opts)
    with _Timer(dev) as t_m:
        matched = topk_per_tap(out["scores"], counts, target.tap_channels)
    measure(res[m, "matched"], pos, x, labels, logits, y_hat, matched, t_scores.seconds + t_m.seconds)
    with _Timer(dev) as t_n:
        native = out["native"] if "native" in out else global_percentile(out["scores"], keep_fraction)
    measure(res[m, "native"], pos, x, labels, logits, y_hat, native, t_scores.seconds + t_n.seconds)
    return out["scores"].detach()


def _lookup_frontier(hits: dict[float, list[torch.Tensor]], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """GEN-CNP's score ranking against the class lookup at shares of GEN-CNP's own per-tap counts.

    For each share ``f`` both keep ``round(f * count)`` channels per tap and sample: GEN-CNP its highest generator
    scores, the lookup its class's highest ``f_c``. Returns per share the kept fraction, both agreements and the
    paired 95% interval of GEN-CNP minus lookup.
    """
    rows = []
    for f, parts in hits.items():
        h = torch.cat(parts)
        mean, lo, hi = paired_bootstrap((h[:, 0] - h[:, 1])[:, None], n_boot, seed)
        rows.append({"fraction": f, "n": len(h), "kept_mean": float(h[:, 2].mean()), "gencnp_agreement": float(h[:, 0].mean()),
                     "lookup_agreement": float(h[:, 1].mean()), "gencnp_minus_lookup": float(mean[0]),
                     "ci95": [float(lo[0]), float(hi[0])]})  # fmt: skip
    return rows


def same_class_partners(classes: torch.Tensor) -> torch.Tensor:
    """For each sample, the next sample (cyclically, in order) of the same class; -1 when it is its class's only one."""
    partner = torch.full_like(classes, -1)
    for c in torch.unique(classes):
        idx = torch.nonzero(classes == c)[:, 0]
        if len(idx) > 1:
            partner[idx] = torch.roll(idx, -1)
    return partner


@torch.no_grad()
def _same_class_transfer(res: dict, gen: _Results, subset_pos: torch.Tensor, x_sub: torch.Tensor, y_sub: torch.Tensor,
                         masked_forward, batch_size: int, dev: torch.device) -> dict[str, dict]:  # fmt: skip
    """Input specificity: each subset image's pathway applied to the next subset image of the same predicted class.

    A pathway that explains its own input should keep the class less often on another image of the class than on
    its own image; one that encodes the class keeps it as often. Returns, per method and setting, ``n`` (images
    with a same-class partner), ``same_class_transfer`` (share of partners given the class) and ``agreement``
    (own agreement on the same images).
    """
    partner = same_class_partners(y_sub)
    valid = partner >= 0
    entries = [("gencnp/matched", gen)] + [(f"{m}/{s}", r) for (m, s), r in res.items() if m != "gencnp"]
    out = {}
    for label, r in entries:
        ra = r.at(subset_pos, "")
        hits = torch.zeros(len(y_sub), dtype=torch.bool)
        for start in range(0, len(y_sub), batch_size):
            sl = slice(start, start + batch_size)
            j = partner[sl].clamp_min(0)
            logits = masked_forward(x_sub[j].to(dev), ra.pathways[sl].to(dev))
            hits[sl] = (logits.argmax(1).cpu() == y_sub[sl].cpu())
        n = int(valid.sum())
        out[label] = {
            "n": n,
            "same_class_transfer": float(hits[valid].double().mean()) if n else float("nan"),
            "agreement": float(ra.vals["agree"][valid].double().mean()) if n else float("nan"),
        }
    return out


def _settings(model, bank_obj, keep_fraction: float, intgrad_steps: int, dgr_opts: dict, mean_ablation: bool) -> dict:
    ablation = "mean (dataset-mean activation)" if mean_ablation else "zero"
    matched = "top channels per tap, GEN-CNP's per-sample and per-tap kept counts"
    native_global = f"one global ranking over all taps, top {100 * keep_fraction:.1f}% (GEN-CNP's mean kept fraction)"
    return {
        "gencnp": {"pathway": "generator scores > 0.5 (DAQ)", "ablation": ablation, "class_source": model.hparams.class_source,
                   "lambda_sp": model.hparams.lambda_sp, "lambda_swap": model.hparams.lambda_swap},
        "random": {"matched": {"pathway": f"uniformly random channels, {matched}", "ablation": ablation},
                   "native": {"pathway": f"uniformly random channels, {native_global}", "ablation": ablation}},
        "neuron_mct": {"matched": {"score": "sum_space |a dS_y/da|", "pathway": matched, "ablation": ablation},
                       "native": {"score": "sum_space |a dS_y/da|", "pathway": native_global, "ablation": ablation}},
        "neuron_intgrad": {"matched": {"score": f"sum_space |IG| ({intgrad_steps} points, trapezoid)", "pathway": matched,
                                       "ablation": ablation},
                           "native": {"score": f"sum_space |IG| ({intgrad_steps} points, trapezoid)", "pathway": native_global,
                                      "ablation": ablation}},
        "dgr": {"matched": {**dgr_opts, "clamp": [0.0, 5.0], "pathway": f"gates ranked, {matched}", "ablation": ablation},
                "native": {**dgr_opts, "clamp": [0.0, 5.0], "pathway": "gates > 0 of the lowest-loss faithful iterate",
                           "ablation": ablation}},
        "class_lookup": {"matched": {"pathway": f"channels of the predicted class ranked by the bank's f_c, {matched}",
                                     "ablation": ablation}},
        "transfer": {"matched": {"pathway": "class pathway M_c = f_c >= tau of the predicted class",
                                 "tau": bank_obj.tau if bank_obj is not None else None, "ablation": ablation}},
    }  # fmt: skip


def _provenance(model, generator: str, bank: str | None, bank_obj, data, split: str, seed: int, n: int, limit) -> dict:
    hp = model.hparams
    return {
        "target": {"arch": hp.target, "checkpoint": str(hp.target_checkpoint)},
        "target_hash": model.target.tensor_hash(),
        "generator": str(generator),
        "bank": str(bank) if bank is not None else None,
        "bank_samples": int(bank_obj.n.sum()) if bank_obj is not None else None,
        "bank_split": bank_obj.split if bank_obj is not None else None,
        "dataset": f"{type(data).__module__}.{type(data).__name__}",
        "split": split,
        "n": n,
        "limit": limit,
        "class_source": hp.class_source,
        "ablation": hp.ablation,
        "null_families": list(model.null_eval),
        "null_train": list(model.null_train) if hp.get("lambda_null", 0) > 0 else [],
        "taps": dict(zip(model.target.tap_names, model.target.tap_channels)),
        "tau": bank_obj.tau if bank_obj is not None else None,
        "seed": seed,
        "git_commit": _git_commit(),
        "versions": _versions(),
        "device": str(next(model.parameters()).device),
        "threads": torch.get_num_threads(),
    }


# ----- markdown -----
def _null_keys(e: dict) -> list[str]:
    return [k for k in e if k.startswith("null_forcing/")]


def _rows(entries: dict[str, dict | None], label: str) -> list[str]:
    first = next((e for e in entries.values() if e), {})
    keys = TABLE_KEYS + _null_keys(first)
    head = ["method", "n", *keys, "s/image"]
    lines = [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}"]
    for name, e in entries.items():
        if e is None:
            continue
        cells = [f"**{name}**" if name == "gencnp" else name, str(e["n"])] + [_fmt(e.get(k)) for k in keys]
        cells.append(_fmt(e.get("seconds_per_image"), 5))
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def _sentence(name: str, setting: str, e: dict) -> tuple[str, list[str]]:
    vs = e.get("vs_gencnp") or {}
    wins, losses, ties = [], [], []
    for key, c in vs.items():
        txt = f"{key} {_fmt(c['diff'])} [{_fmt(c['ci95'][0])}, {_fmt(c['ci95'][1])}]"
        {"gencnp": wins, "method": losses, "tie": ties}[c["winner"]].append(txt)
    parts = [f"**{name}** ({setting}, {e['n']} images) vs GEN-CNP (difference {name} minus GEN-CNP, 95% CI):"]
    if wins:
        parts.append(f"GEN-CNP wins on {'; '.join(wins)}.")
    if losses:
        parts.append(f"GEN-CNP loses on {'; '.join(losses)}.")
    if ties:
        parts.append(f"No significant difference on {'; '.join(ties)}.")
    return " ".join(parts), [f"{name} ({setting}): {t}" for t in losses]


def _markdown(r: dict) -> str:
    p = r["provenance"]
    L: list[str] = ["# GEN-CNP evaluation report", ""]
    L += ["## Provenance", "", "| item | value |", "|---|---|"]
    commit = p["git_commit"]
    items = [
        ("target", f"{p['target']['arch']} from `{p['target']['checkpoint']}`"), ("target hash", f"`{p['target_hash'][:16]}…`"),
        ("generator", f"`{p['generator']}`"), ("bank", f"`{p['bank']}` ({p['bank_samples']} {p['bank_split']} samples)"),
        ("dataset / split", f"{p['dataset']} / {p['split']} ({p['n']} images)"), ("class source", p["class_source"]),
        ("ablation", p["ablation"]), ("taps", ", ".join(f"{k} [{v}]" for k, v in p["taps"].items())),
        ("tau", _fmt(p["tau"])), ("seed", p["seed"]),
        ("git commit", f"{commit['commit']}{' (dirty)' if commit['dirty'] else ''}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in p["versions"].items())),
        ("device / threads", f"{p['device']} / {p['threads']}"),
        ("total time", f"{r['seconds_total']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds_by_phase"].items()) + ")"),
    ]  # fmt: skip
    L += [f"| {k} | {v} |" for k, v in items]
    L += ["", "## Methods and settings", "", "| method | setting | images | details |", "|---|---|---|---|"]
    for section, title in (("methods", "matched"), ("methods_native", "native")):
        for name, e in r[section].items():
            if name == "gencnp" and section == "methods_native":
                continue
            details = ", ".join(f"{k}: {v}" for k, v in e["settings"].items())
            L.append(f"| {name} | {title}: {e['setting']} | {e['images']} | {details} |")
    if r["transfer"]:
        e = r["transfer"]
        L.append(
            f"| transfer | {e['setting']} | {e['images']} | {', '.join(f'{k}: {v}' for k, v in e['settings'].items())} |"
        )
    L += ["", "`seconds_per_image`: wall time to produce the pathway and its masked prediction (controls excluded), "
          "measured in this run, same process and device for every method.", ""]  # fmt: skip
    L += ["## Matched sparsity (GEN-CNP's per-sample and per-tap kept counts)", ""]
    L += _rows(r["methods"], "matched")
    L += ["", "neuron_intgrad and dgr cover the seeded subset (see below); the others every image.", ""]
    L += ["## Native settings", ""]
    L += _rows(r["methods_native"], "native")
    if r["transfer"]:
        L += ["", f"## Transfer (class pathways of the bank, tau = {_fmt(r['transfer']['tau'])})", ""]
        L += _rows({"gencnp": r["methods"]["gencnp"], "transfer": r["transfer"]}, "transfer")
    L += ["", f"## Comparisons with GEN-CNP (paired bootstrap, {r['bootstrap']['samples']} resamples)", "",
          "Each cell: mean difference (method minus GEN-CNP, same images) [95% CI] and the winner; `tie` when the "
          "interval contains 0. Better is higher for agreement, lower for every other key. Forcing and necessity "
        "compare fairly only at similar agreement: a pathway that often loses the class (e.g. random) trivially forces it less.", ""]  # fmt: skip
    keys = list(r["bootstrap"]["keys"])
    L += ["| comparison | images | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    sentences, losses = [], []
    groups = [("matched", r["methods"]), ("native", r["methods_native"])]
    if r["transfer"]:
        groups.append(("class pathway", {"transfer": r["transfer"]}))
    for setting, entries in groups:
        for name, e in entries.items():
            if name == "gencnp" or not e.get("vs_gencnp"):
                continue
            cells = []
            for key in keys:
                c = e["vs_gencnp"].get(key)
                if c is None:
                    cells.append("-")
                    continue
                win = {"gencnp": "GEN-CNP", "method": name, "tie": "tie"}[c["winner"]]
                cells.append(f"{c['diff']:+.3f} [{_fmt(c['ci95'][0])}, {_fmt(c['ci95'][1])}] {win}")
            L.append(f"| {name} ({setting}) | {e['n']} | " + " | ".join(cells) + " |")
            s, lost = _sentence(name, setting, e)
            sentences.append(s)
            losses += lost
    L += ["", "### In words", ""] + [f"- {s}" for s in sentences]
    L += ["", "### Where GEN-CNP loses", ""]
    L += (
        [f"- {x}" for x in losses]
        if losses
        else ["- Nowhere: no baseline is significantly better on any key comparison."]
    )
    L += _null_section(r)
    sub = r["subset"]
    L += ["", f"## Common subset ({sub['images']})", "", "Every method on the same images (matched sparsity):", ""]
    L += _rows({**sub["methods"], **({"transfer": sub["transfer"]} if sub.get("transfer") else {})}, "subset")
    L += ["", "Native settings on the subset:", ""]
    L += _rows(sub["methods_native"], "subset native")
    taps = list(r["provenance"]["taps"])
    L += [
        "",
        "## Kept fraction per tap",
        "",
        "| method | setting | " + " | ".join(taps) + " |",
        "|---|---|" + "---|" * len(taps),
    ]
    for setting, entries in (
        ("matched", r["methods"]),
        ("native", r["methods_native"]),
        ("class pathway", {"transfer": r["transfer"]}),
    ):
        for name, e in entries.items():
            if e:
                L.append(f"| {name} | {setting} | " + " | ".join(_fmt(e.get(f"kept/{t}")) for t in taps) + " |")
    L += ["", "## Figures", ""]
    captions = {
        "agreement_vs_kept": "Agreement vs kept fraction on the subset (GEN-CNP: threshold sweep on generator scores; "
                             "baselines: global kept percentiles; star: transfer), and the swap and zero forcing controls of every entry.",
        "kept_hist": "Kept-fraction histograms per method (native settings; matched methods share GEN-CNP's counts).",
        "bank_heatmap": "Selection frequencies of the bank, class by channel (tap boundaries marked).",
        "attribution_grid": "Pathway gradient and Grad-CAM: unmasked target vs GEN-CNP pathway vs class pathway.",
        "null_forcing": "Null forcing per family and method (bars) against the family's chance level (the unmasked "
                        "target's rate of the same class on the same inputs, black tick).",
    }  # fmt: skip
    for k, f in r["figures"].items():
        L += [f"### {k}", "", captions.get(k, ""), "", f"![{k}]({f})", ""]
    L += ["## Metric keys", "", "Keys of docs/design.md section 8: agreement (masked argmax = class source), masked_accuracy, mDC "
          "(100·mean max(0, Y−O)/Y), mIC, kept_mean/std, kept_class_std, acIOU / between_class_iou (pathway Jaccard within / "
          "between classes), necessity (agreement of the complement), swap_forcing (another class's probe image through the "
          "pathway gives the pathway's class), zero_forcing (all-zero image through the pathway gives its class), "
          "null_forcing/<family> (the null input of that family paired with an image, through the image's pathway, gives "
          "its class; gencnp.nulls) beside null_chance/<family> (the unmasked target gives that class on the same inputs).", ""]  # fmt: skip
    return "\n".join(L)


def _null_section(r: dict) -> list[str]:
    """Markdown: the class-lookup comparison, same-class transfer and null forcing against chance."""
    L: list[str] = []
    gen = r["methods"]["gencnp"]
    look = r["methods"].get("class_lookup")
    if look:
        L += ["", "## GEN-CNP against the class lookup (same per-sample, per-tap counts)", "",
              "The class lookup keeps, in every tap, GEN-CNP's own number of channels, ranked by the bank's selection "
              "frequency f_c of the predicted class: no per-input information. A per-input explainer is only worth its "
              "generator where it beats this lookup.", "",
              "| key | GEN-CNP | class lookup | lookup minus GEN-CNP [95% CI] | winner |", "|---|---|---|---|---|"]  # fmt: skip
        for key, c in (look.get("vs_gencnp") or {}).items():
            win = {"gencnp": "GEN-CNP", "method": "class lookup", "tie": "tie"}[c["winner"]]
            L.append(f"| {key} | {_fmt(gen.get(key))} | {_fmt(look.get(key))} | {c['diff']:+.4f} "
                     f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | {win} |")  # fmt: skip
    lf = r.get("lookup_frontier") or []
    if lf:
        L += ["", "### Below GEN-CNP's counts", "",
              "Both rankings at shares of GEN-CNP's own per-sample, per-tap counts: GEN-CNP keeps its highest generator "
              "scores, the lookup its class's highest f_c (all images of the split).", "",
              "| share of counts | kept | GEN-CNP agreement | lookup agreement | GEN-CNP minus lookup [95% CI] |",
              "|---|---|---|---|---|"]  # fmt: skip
        for e in lf:
            L.append(f"| {e['fraction']:g} | {_fmt(e['kept_mean'])} | {_fmt(e['gencnp_agreement'])} | "
                     f"{_fmt(e['lookup_agreement'])} | {e['gencnp_minus_lookup']:+.4f} [{e['ci95'][0]:+.4f}, {e['ci95'][1]:+.4f}] |")  # fmt: skip
    sc = r.get("same_class_transfer") or {}
    if sc:
        L += ["", f"## Same-class transfer ({r['subset']['images']})", "",
              "Each image's pathway applied to the next image of the same predicted class. A pathway that explains its "
              "own input keeps the class less often on another image than on its own; one that encodes the class keeps "
              "it as often.", "", "| method | images | own agreement | same-class transfer | difference |",
              "|---|---|---|---|---|"]  # fmt: skip
        for label, e in sc.items():
            L.append(f"| {label} | {e['n']} | {_fmt(e['agreement'])} | {_fmt(e['same_class_transfer'])} | "
                     f"{_fmt(e['agreement'] - e['same_class_transfer'])} |")  # fmt: skip
    fams = [k.split("/", 1)[1] for k in _null_keys(gen)]
    if fams:
        L += ["", "## Null inputs: forcing against chance", "",
              "Per family (gencnp.nulls), the share of images whose pathway turns the paired null input into the "
              "image's class, beside the chance level (the unmasked target gives that class on the same null inputs). "
              f"Families used in GEN-CNP's training: {', '.join(r['provenance'].get('null_train') or []) or 'none'}.", "",
              "| method | setting | " + " | ".join(f"{f} (chance)" for f in fams) + " |", "|---|---|" + "---|" * len(fams)]  # fmt: skip
        for setting, entries in (("matched", r["methods"]), ("native", r["methods_native"]), ("class", {"transfer": r["transfer"]})):
            for name, e in entries.items():
                if not e or (setting == "native" and name == "gencnp"):
                    continue
                L.append(f"| {name} | {setting} | " + " | ".join(
                    f"{_fmt(e.get(f'null_forcing/{f}'))} ({_fmt(e.get(f'null_chance/{f}'))})" for f in fams) + " |")  # fmt: skip
    return L


def _screen(r: dict, out: Path) -> str:
    keys = ["agreement", "kept_mean", "swap_forcing", "zero_forcing", "necessity", "mDC", "acIOU"]
    keys += _null_keys(r["methods"]["gencnp"])
    lines = [f"GEN-CNP report ({r['provenance']['n']} {r['provenance']['split']} images, "
             f"{r['seconds_total']:.0f} s) -> {out}/report.md",
             f"{'method':<16}{'setting':<9}{'n':>6} " + " ".join(f"{k.replace('null_forcing/', 'null:')[:9]:>9}" for k in keys)
             + f" {'s/img':>9}"]  # fmt: skip
    rows = [(m, "matched", e) for m, e in r["methods"].items()]
    rows += [(m, "native", e) for m, e in r["methods_native"].items() if m != "gencnp"]
    if r["transfer"]:
        rows.append(("transfer", "class", r["transfer"]))
    for m, s, e in rows:
        lines.append(f"{m:<16}{s:<9}{e['n']:>6} " + " ".join(f"{_fmt(e.get(k)):>9}" for k in keys)
                     + f" {_fmt(e['seconds_per_image'], 5):>9}")  # fmt: skip
    gen = r["methods"]["gencnp"]
    chance = [f"{k.split('/', 1)[1]} {_fmt(gen.get(k))}" for k in gen if k.startswith("null_chance/")]
    if chance:
        lines.append(f"null chance (unmasked target gives the class on the same null inputs): {', '.join(chance)}")
    return "\n".join(lines)


# ----- figures -----
def _plot_null(path: Path, r: dict) -> str:
    """Null forcing per family (one panel each): a bar per method, the family's chance level as a tick."""
    from matplotlib.figure import Figure

    gen = r["methods"]["gencnp"]
    fams = [k.split("/", 1)[1] for k in _null_keys(gen)]
    entries = [(("GEN-CNP" if m == "gencnp" else f"{m} (matched)"), e) for m, e in r["methods"].items() if e]
    entries += [(f"{m} (native)", e) for m, e in r["methods_native"].items() if e and m != "gencnp"]
    if r["transfer"]:
        entries.append(("transfer (class pathways)", r["transfer"]))
    trained = set(r["provenance"].get("null_train") or [])
    fig = Figure(figsize=(4.2 * len(fams) + 2.5, 0.38 * len(entries) + 1.8), layout="constrained")
    axes = fig.subplots(1, len(fams), sharey=True, squeeze=False)[0]
    y = np.arange(len(entries))
    for ax, f in zip(axes, fams):
        vals = [e.get(f"null_forcing/{f}") or 0.0 for _, e in entries]
        chance = [e.get(f"null_chance/{f}") for _, e in entries]
        ax.barh(y, vals, color=["C0" if n == "GEN-CNP" else "C7" for n, _ in entries])
        for yi, v, c in zip(y, vals, chance):
            if c is not None:
                ax.plot([c, c], [yi - 0.4, yi + 0.4], color="k", lw=2)
            ax.text(min(v, 0.88) + 0.01, yi, f"{v:.2f}", va="center", fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_title(f"{f} ({'used in training' if f in trained else 'never seen in training'})", fontsize=9)
        ax.set_xlabel("null input through the pathway gives the image's class")
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(y, [n for n, _ in entries], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"Null-input forcing ({r['provenance']['split']} split; black tick: chance, the unmasked target on the "
                 "same inputs)", fontsize=10)  # fmt: skip
    save_figure(fig, path, dpi=110)
    return str(path)


def _plot_curves(path: Path, r: dict) -> str:
    """Left: agreement vs kept on the subset (curves and native points). Right: the forcing controls of every entry.

    The right panel is a bar chart, not a scatter over kept: matched entries share GEN-CNP's kept counts, so as
    points they would sit on one another.
    """
    from matplotlib.figure import Figure

    colors = {"gencnp": "C0", "random": "C7", "neuron_mct": "C1", "neuron_intgrad": "C2", "dgr": "C3", "transfer": "C4",
              "class_lookup": "C5"}
    groups = [("matched", r["methods"]), ("native", r["methods_native"])]
    groups += [("class pathway", {"transfer": r["transfer"]})] if r["transfer"] else []
    bars = []  # (label, entry, color)
    for setting, entries in groups:
        for m, e in entries.items():
            if e is None or (setting == "native" and m == "gencnp") or e.get("swap_forcing") is None:
                continue
            name = (
                "GEN-CNP" if m == "gencnp" else ("transfer (class pathways)" if m == "transfer" else f"{m} ({setting})")
            )
            bars.append((f"{name}\nkept {e['kept_mean']:.2f}, n={e['n']}", e, colors[m]))
    fig = Figure(figsize=(14, max(5.6, 0.42 * len(bars) + 1.6)), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
    pts = defaultdict(list)
    for p in r["curves"]["points"]:
        pts[p["method"]].append(p)
    for m, ps in sorted(pts.items(), key=lambda kv: kv[0] != "gencnp"):
        ps = sorted(ps, key=lambda q: q["kept_mean"])
        if m == "gencnp":  # lower thresholds keep more: the points run from the highest threshold (left) to the lowest
            ts = sorted(q["param"] for q in ps)
            label = f"GEN-CNP (score threshold {ts[-1]:g} ... {ts[0]:g}, left to right)"
        else:
            label = f"{m} (global kept percentile)"
        ax.plot([q["kept_mean"] for q in ps], [q["agreement"] for q in ps], "o-", color=colors[m], label=label,
                lw=2.2 if m == "gencnp" else 1.4, zorder=3 if m == "gencnp" else 2, clip_on=False)  # fmt: skip
    sub = r["subset"]
    dgr = (sub.get("methods_native") or {}).get("dgr")
    if dgr:
        ax.plot(dgr["kept_mean"], dgr["agreement"], "D", color=colors["dgr"], ms=9, mec="k", label="dgr native (gates > 0)",
                zorder=5, clip_on=False)  # fmt: skip
    if sub.get("transfer"):
        t = sub["transfer"]
        ax.plot(t["kept_mean"], t["agreement"], "*", color=colors["transfer"], ms=17, mec="k",
                label="transfer (class pathways)", zorder=5, clip_on=False)  # fmt: skip
    ax.set_xlabel("kept fraction of the D tap channels")
    ax.set_ylabel("agreement (masked argmax = class source)")
    ax.set_title(f"Agreement vs kept ({sub['images']})", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)

    y = np.arange(len(bars))
    h = 0.38
    swap = [b[1]["swap_forcing"] for b in bars]
    zero = [b[1].get("zero_forcing") for b in bars]
    cols = [b[2] for b in bars]
    ax2.barh(y - h / 2, swap, h, color=cols, label="swap forcing (another class's image)")
    ax2.barh(y + h / 2, [z if z is not None else 0 for z in zero], h, color=cols, alpha=0.45, hatch="//",
             label="zero forcing (all-zero image)")  # fmt: skip
    for yi, s, z in zip(y, swap, zero):
        ax2.text(min(s, 0.9) + 0.01, yi - h / 2, f"{s:.2f}", va="center", fontsize=7)
        if z is not None:
            ax2.text(min(z, 0.9) + 0.01, yi + h / 2, f"{z:.2f}", va="center", fontsize=7)
    ax2.set_yticks(y, [b[0] for b in bars], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("share of images whose pathway still gives its class (lower = more input-dependent)")
    ax2.set_title(f"Input-dependence controls ({r['provenance']['split']} split; n images per bar)", fontsize=10)
    ax2.grid(alpha=0.3, axis="x")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    save_figure(fig, path, dpi=110)
    return str(path)


def _plot_kept_hist(path: Path, res: dict, keep_fraction: float) -> str:
    from matplotlib.figure import Figure

    panels = [("gencnp", "matched", "GEN-CNP")] + [(m, "native", f"{m} (native)") for m in BASELINES]
    if ("transfer", "matched") in res:
        panels.append(("transfer", "matched", "transfer (class pathways)"))
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    bins = np.linspace(0, 1, 41)
    for ax, (m, s, title) in zip(axes, panels):
        kept = res[m, s].vals["kept"].numpy()
        ax.hist(kept, bins=bins, color="C0" if m == "gencnp" else "C1")
        ax.axvline(keep_fraction, color="k", ls="--", lw=1, label=f"GEN-CNP mean {keep_fraction:.3f}")
        ax.set_title(f"{title}: mean {kept.mean():.3f}, n={len(kept)}", fontsize=9)
        ax.set_xlabel("kept fraction per image")
        ax.set_ylabel("images")
        ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    fig.suptitle("Kept fraction per image (matched baselines use GEN-CNP's counts exactly)", fontsize=11)
    save_figure(fig, path, dpi=110)
    return str(path)


def _plot_bank(path: Path, bank) -> str:
    from matplotlib.figure import Figure

    freq = bank.frequencies().numpy()
    k, d = freq.shape
    fig = Figure(figsize=(min(20.0, max(8.0, d / 24)), max(3.5, 0.4 * k + 2)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(freq, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(k), [f"{c} (n={int(n)})" for c, n in zip(bank.class_names, bank.n.tolist())], fontsize=8)
    bounds = np.cumsum([0, *bank.tap_channels])
    for b in bounds[1:-1]:
        ax.axvline(b - 0.5, color="white", lw=1.2)
    ax.set_xticks(
        (bounds[:-1] + bounds[1:]) / 2 - 0.5,
        [f"{t}\n({c} ch)" for t, c in zip(bank.tap_names, bank.tap_channels)],
        fontsize=8,
    )
    ax.set_xlabel(f"channel (D = {d}), grouped by tap")
    source = {"pred": "target prediction", "label": "label"}.get(bank.class_source, bank.class_source)
    ax.set_ylabel(f"class ({source})")
    ax.set_title(
        f"Pathway bank: selection frequency f_c, {bank.split} split, {int(bank.n.sum())} samples, tau = {bank.tau:g}",
        fontsize=10,
    )
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.01)
    cb.set_label("selection frequency f_c[j] (red: tau)")  # class pathway: f_c >= tau
    cb.ax.axhline(bank.tau, color="red", lw=1.5)
    save_figure(fig, path, dpi=110)
    return str(path)


def _plot_attribution(path: Path, model, dataset, y_hat: torch.Tensor, labels: torch.Tensor, pathways: torch.Tensor,
                      class_paths: torch.Tensor | None, class_names: list[str], per_class: int, fills, dev) -> str:  # fmt: skip
    from matplotlib import cm
    from matplotlib import colors as mcolors
    from matplotlib.figure import Figure

    from gencnp.attribution import grad_cam, pathway_gradient

    picks = []
    for c in range(len(class_names)):
        picks += torch.nonzero(y_hat == c)[:per_class, 0].tolist()
    if not picks:
        return ""
    target = model.target
    x = torch.stack([dataset[i][0] for i in picks]).to(dev)
    yh = y_hat[picks].to(dev)
    variants = [("unmasked", None), ("GEN-CNP pathway", pathways[picks].to(dev))]
    if class_paths is not None:
        variants.append(("class pathway", class_paths[yh]))
    grads, cams = [], []
    for _, p in variants:
        grads.append(pathway_gradient(target, x, p, yh, fill=fills if p is not None else None).cpu())
        cams.append(grad_cam(target, x, p, yh, fill=fills if p is not None else None).cpu())
    g = torch.stack(grads, 1)  # [N, V, H, W]
    g = g / g.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None, None]
    cmap_ = torch.stack(cams, 1)
    cmap_ = cmap_ / cmap_.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
    nv = len(variants)
    block = 1 + 2 * nv  # input, gradients, Grad-CAMs of one sample
    classes = sorted({int(c) for c in yh.tolist()})
    fig = Figure(figsize=(1.25 * block * per_class + 1.0, 1.35 * len(classes) + 2.2), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(classes), block * per_class))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    img = x.cpu()
    slot = dict.fromkeys(classes, 0)
    for i in range(len(picks)):
        row, c0 = classes.index(int(yh[i])), block * slot[int(yh[i])]
        slot[int(yh[i])] += 1
        im = img[i]
        show = im[0] if im.shape[0] == 1 else ((im - im.min()) / (im.max() - im.min() + 1e-12)).permute(1, 2, 0)
        cells = [(show, {"cmap": "gray"} if im.shape[0] == 1 else {})]
        cells += [(g[i, v], {"cmap": "RdBu_r", "vmin": -1, "vmax": 1}) for v in range(nv)]
        cells += [(cmap_[i, v], {"cmap": "inferno", "vmin": 0, "vmax": 1}) for v in range(nv)]
        for j, (data, kw) in enumerate(cells):
            ax = axes[row, c0 + j]
            ax.set_frame_on(True)
            ax.imshow(data.numpy(), **kw)
        axes[row, c0].set_xlabel(f"label: {class_names[int(labels[picks[i]])]}", fontsize=7, labelpad=2)
        if c0 == 0:
            axes[row, 0].set_ylabel(f"pred: {class_names[int(yh[i])]}", fontsize=8)
    short = {"unmasked": "unmasked", "GEN-CNP pathway": "GEN-CNP", "class pathway": "class path"}
    for s in range(per_class):
        axes[0, s * block].set_title("input", fontsize=8)
        for v, (name, _) in enumerate(variants):
            axes[0, s * block + 1 + v].set_title(f"grad\n{short[name]}", fontsize=8)
            axes[0, s * block + 1 + nv + v].set_title(f"Grad-CAM\n{short[name]}", fontsize=8)
    # The colour bar added last sits nearest the grid: gradients (the left columns) there, Grad-CAM below.
    fig.colorbar(cm.ScalarMappable(mcolors.Normalize(0, 1), "inferno"), ax=axes, location="bottom", shrink=0.4, aspect=40,
                 label="Grad-CAM of H(x; m) at the last tap (each sample's maps share one scale)")  # fmt: skip
    fig.colorbar(cm.ScalarMappable(mcolors.Normalize(-1, 1), "RdBu_r"), ax=axes, location="bottom", shrink=0.4, aspect=40,
                 label="pathway gradient dS(y)/dx, signed (each sample's maps share one scale)")  # fmt: skip
    fig.suptitle(
        f"Attribution through pathways: {per_class} test image(s) per predicted class (row); unmasked target vs "
        "GEN-CNP pathway vs class pathway",
        fontsize=10,
    )
    save_figure(fig, path, dpi=100)
    return str(path)
