"""``report()``: check the options, load the generator, data and bank, run the three passes, summarise, draw and
write ``report.json``, ``report.md`` and the figures."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.data import Subset

from gencnp.banks.bank import PathwayBank
from gencnp.data.modules import FashionMNISTDataModule, ImageDataModule
from gencnp.evaluation.report.classes import class_table, summary_lines, table_summary, write_class_table
from gencnp.evaluation.report.evaluator import Evaluator
from gencnp.evaluation.report.figures import plot_attribution, plot_bank, plot_curves, plot_kept_hist, plot_null
from gencnp.evaluation.report.markdown import markdown, screen
from gencnp.evaluation.report.passes import (
    BASELINES,
    SUB_METHODS,
    Curves,
    GenPass,
    Split,
    add_results,
    full_pass,
    gencnp_pass,
    subset_pass,
)
from gencnp.evaluation.report.provenance import method_settings, provenance
from gencnp.evaluation.report.results import Results
from gencnp.evaluation.report.summaries import Entries, ci_keys, frontier_rows, same_class_transfer
from gencnp.io.checkpoint_io import read_checkpoint
from gencnp.io.files import check_writable_dir, json_safe, write_atomic
from gencnp.pathways.metrics import null_families_of
from gencnp.systems.gencnp import GenCNP
from gencnp.threads import torch_threads

__all__ = ["report", "cost", "PRECISIONS"]
PRECISIONS = ("32-true", "bf16-mixed")


def autocast(o: SimpleNamespace):
    """bfloat16 autocast on the report's device for ``precision: bf16-mixed``; a no-op context for ``32-true``."""
    return torch.autocast(torch.device(o.device).type, dtype=torch.bfloat16, enabled=o.precision == "bf16-mixed")


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
    precision: str = "32-true",
    channels_last: bool | None = True,
    forward_chunk: int = 256,
    baselines_on: str = "all",
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
        batch_size, grad_batch_size: images per batch for forward-only methods, and for ``neuron_intgrad`` and
            ``dgr`` (``intgrad_steps`` times as many activations are held at once).
        bootstrap_samples: paired bootstrap resamples.
        seed: seed of the random baseline and the bootstrap.
        device: ``'cpu'``, ``'cuda'``, ...
        intgrad_steps: points on each integrated-gradients path (both ends included).
        dgr_steps, dgr_lr, dgr_momentum, dgr_l1: DGR's optimisation steps (Wang et al. 2018: 30), SGD learning rate
            and momentum, and the weight of its L1 penalty on the gates.
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
        precision: ``'32-true'`` or ``'bf16-mixed'`` (the passes that run the target under bfloat16 autocast).
        channels_last: run the target in ``channels_last`` memory format (the default: faster convolutions on CPU
            and GPU; logits agree to float rounding); ``None`` keeps the generator's setting.
        forward_chunk: images per masked target pass (every pathway's controls of a batch run as one stack, in
            chunks of this size).
        baselines_on: where the cheap baselines (``random``, ``neuron_mct``) and the lookup frontier run: ``'all'``
            images of the split (the default) or the seeded ``'subset'`` (with ``neuron_intgrad`` and ``dgr``). On
            a large split ``'subset'`` leaves GEN-CNP, transfer and the class lookup (each with its controls) as the
            whole split's cost.

    Returns:
        The content of ``report.json`` as a dict.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or null (torch's default), got {threads}.")
    options = SimpleNamespace(**{k: v for k, v in locals().items() if k != "threads"})
    with torch_threads(threads):
        return _report(options)


def _report(o: SimpleNamespace) -> dict[str, Any]:
    """The body of ``report`` (``o``: its arguments but ``threads``)."""
    t_start = time.perf_counter()
    curves = Curves(*_check_options(o))
    out = Path(o.out_dir)
    # Checked, not created: a bad generator, bank or data below must leave no empty report folder behind (the
    # atomic writes at the end create it).
    check_writable_dir(out, "report folder", "set out_dir.")
    dev = torch.device(o.device)
    torch.manual_seed(o.seed)
    ev, sp = _load(o, dev, t_start)
    ev.lap("setup")
    with autocast(o):
        res, gp, hits, curves, same_class = _passes(o, ev, sp, curves)
    result = _result(o, ev, sp, gp, res, curves, same_class, hits)
    result["precision"] = o.precision
    ev.lap("summaries_bootstrap")
    result["figures"] = _figures(out, result, ev, sp, gp, res, o.samples_per_class)
    ev.lap("figures")
    # every table after the figures: a run stopped while drawing replaces none of the previous run's files
    result["per_class"] = _per_class(out, res, sp.class_names)
    result["seconds_total"] = time.perf_counter() - t_start
    result["seconds_by_phase"] = ev.phases
    result["cost"] = cost(ev, sp.n_all, len(sp.subset_pos))
    ev.close()
    result = json_safe(result)
    write_atomic(out / "report.json", json.dumps(result, indent=2, allow_nan=False))
    write_atomic(out / "report.md", markdown(result))
    print(screen(result, out))
    print("\n".join(summary_lines(result["per_class"]["summary"], result["per_class"]["files"])))
    return result


SUBSET_PHASES = ("subset", "same_class_transfer")


def cost(ev: Evaluator, n_all: int, n_sub: int) -> dict[str, Any]:
    """The ``cost`` section: per phase its seconds, the images it ran on and the target passes it made, per image and
    per part (one image through the target once is one pass; backward passes are not counted)."""
    phases = {}
    for name, seconds in ev.phases.items():
        n = n_sub if name in SUBSET_PHASES else n_all
        parts = dict(sorted(ev.passes.get(name, {}).items()))
        total = sum(parts.values())
        phases[name] = {
            "seconds": seconds,
            "images": n,
            "passes_per_image": total / n if n else 0.0,
            "parts_per_image": {k: v / n for k, v in parts.items()},
        }
    full = sum(p["passes_per_image"] for k, p in phases.items() if k not in SUBSET_PHASES)
    sub = sum(p["passes_per_image"] for k, p in phases.items() if k in SUBSET_PHASES)
    dgr = sum(v for k, v in phases.get("subset", {}).get("parts_per_image", {}).items() if k.startswith("dgr "))
    return {
        "unit": (
            "target passes: one image through the frozen target once, counted whole even where it starts at the "
            "first tap (masked passes, after one pass to the first tap per control input) or stops there; "
            "backward passes not counted"
        ),
        "passes_per_image_all": full,
        "passes_per_image_subset": sub,
        "passes_per_image_mean": full + sub * n_sub / max(n_all, 1),
        "dgr_passes_per_subset_image": dgr,
        "passes_per_image_mean_without_dgr": full + (sub - dgr) * n_sub / max(n_all, 1),
        "phases": phases,
    }


def _per_class(out: Path, res: dict[tuple[str, str], Results], class_names: list[str]) -> dict[str, Any]:
    """Per-class agreement, kept and forcing of GEN-CNP (and transfer) to ``per_class.{csv,json}``; a summary."""
    methods = {m: res[m, "matched"] for m in ("gencnp", "transfer") if (m, "matched") in res}
    table = class_table(methods, class_names)
    return {"files": write_class_table(out / "per_class", table), "summary": table_summary(table, "gencnp/agreement")}


def _passes(o: SimpleNamespace, ev: Evaluator, sp: Split, curves: Curves) -> tuple:
    """The passes that run the target: GEN-CNP, the full split, the subset, same-class transfer."""
    res: dict[tuple[str, str], Results] = {}
    gp = gencnp_pass(ev, sp, res, o.batch_size)
    ev.lap("gencnp")
    add_results(res, sp)
    fractions = sorted({float(f) for f in (o.lookup_fractions or (1.0, 0.8, 0.6, 0.4))}, reverse=True)
    if any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"lookup_fractions must lie in (0, 1] (shares of GEN-CNP's per-tap counts), got {fractions}.")
    mct_scores, hits = full_pass(ev, sp, gp, res, fractions, o.batch_size)
    ev.lap("whole_split")
    x_sub = subset_pass(
        ev,
        sp,
        gp,
        res,
        mct_scores,
        {"neuron_intgrad": {"steps": o.intgrad_steps}, "dgr": _dgr_opts(o)},
        curves,
        o.grad_batch_size,
        hits,
    )
    for r in res.values():
        r.finish()
    ev.lap("subset")
    same_class = same_class_transfer(ev, res, sp.subset_pos, x_sub, gp.y_hat[sp.subset_pos], o.grad_batch_size)
    ev.lap("same_class_transfer")
    return res, gp, hits, curves, same_class


def _dgr_opts(o: SimpleNamespace) -> dict[str, float]:
    return {"steps": o.dgr_steps, "lr": o.dgr_lr, "momentum": o.dgr_momentum, "l1": o.dgr_l1}


def _check_options(o: SimpleNamespace) -> tuple[list[float], list[float]]:
    """Refuse bad options and missing inputs before any work. Returns the curves' thresholds and kept fractions."""
    if o.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (as trainer.precision), got {o.precision!r}.")
    if o.baselines_on not in ("all", "subset"):
        raise ValueError(
            f"baselines_on must be 'all' (every image) or 'subset' (the seeded subset), got {o.baselines_on!r}."
        )
    if o.split not in ("test", "val"):
        raise ValueError(f"split must be 'test' (or 'val' for development), got '{o.split}'.")
    for name, lo in (
        ("subset_n", 1),
        ("batch_size", 1),
        ("grad_batch_size", 1),
        ("bootstrap_samples", 10),
        ("intgrad_steps", 2),
        ("samples_per_class", 0),
        ("forward_chunk", 1),
    ):
        if getattr(o, name) < lo:
            raise ValueError(f"{name} must be >= {lo}, got {getattr(o, name)}.")
    thresholds = list(o.curve_thresholds or (0.3, 0.4, 0.5, 0.6, 0.7))
    kept_grid = list(o.curve_kept or (0.05, 0.1, 0.2, 0.4, 0.55, 0.7, 0.85))
    if any(not 0 < t < 1 for t in thresholds) or any(not 0 <= k <= 1 for k in kept_grid):
        raise ValueError(
            f"curve_thresholds must lie in (0, 1) and curve_kept in [0, 1]; got {thresholds} and {kept_grid}."
        )
    if not Path(o.generator).is_file():
        raise FileNotFoundError(
            f"generator checkpoint '{o.generator}' does not exist; train one with "
            "python train.py fit --config configs/fashion_mnist/gencnp.yaml, or fix the path."
        )
    if o.bank is not None and not Path(o.bank).is_file():
        raise FileNotFoundError(
            f"pathway bank '{o.bank}' does not exist; export it with python train.py predict --config "
            f"configs/fashion_mnist/bank.yaml --ckpt_path {o.generator}, or pass bank: null to skip transfer."
        )
    return thresholds, kept_grid


def _load(o: SimpleNamespace, dev: torch.device, t_start: float) -> tuple[Evaluator, Split]:
    """The generator (on ``dev``), the split (``limit`` applied), the bank and the seeded common subset."""
    overrides = {"target_checkpoint": o.target_checkpoint} if o.target_checkpoint else {}
    if o.channels_last is not None:
        overrides["channels_last"] = bool(o.channels_last)
    recorded = read_checkpoint(o.generator).get("class_names")  # refuses truncated, altered or code-carrying files
    model = GenCNP.load_from_checkpoint(o.generator, map_location="cpu", weights_only=True, **overrides).to(dev).eval()
    data = o.data if o.data is not None else FashionMNISTDataModule(eval_batch_size=o.batch_size)
    model.check_data(data)
    dataset = data.split(o.split)
    if o.limit is not None:
        if o.limit < 1:
            raise ValueError(f"limit must be >= 1 or null, got {o.limit}.")
        dataset = Subset(dataset, list(range(min(o.limit, len(dataset)))))
    n_all = len(dataset)
    class_names = list(getattr(data, "class_names", [str(k) for k in range(model.num_classes)]))
    if recorded is not None and [str(c) for c in recorded] != [str(c) for c in class_names]:
        raise ValueError(
            f"generator checkpoint '{o.generator}' was trained on the classes {list(recorded)}, but the data has "
            f"{class_names}; class indices would mean other classes. Evaluate on the data it was trained on, or "
            "train a generator on this data."
        )
    # Swap probes are training-split indices: read their images from the data (picked now if none are recorded).
    model.attach_probe_data(data.split("train"), class_names)
    ev = Evaluator(model, dev, o.seed, o.progress, t_start, chunk=o.forward_chunk)
    bank = None
    if o.bank is not None:
        bank = PathwayBank.load(o.bank, target=model.target, class_names=class_names)
        if bank.tau is None:
            raise ValueError(
                f"pathway bank '{o.bank}' has no tau; export it with PathwayBankWriter (it chooses tau on validation)."
            )
    g_sub = torch.Generator().manual_seed(o.subset_seed)
    subset_pos = torch.sort(torch.randperm(n_all, generator=g_sub)[: min(o.subset_n, n_all)]).values
    all_images = f"all {n_all} {o.split} images" + (f" (first {n_all}, limit)" if o.limit is not None else "")
    sub_images = f"seeded subset of {len(subset_pos)} {o.split} images (seed {o.subset_seed})"
    return ev, Split(
        data,
        dataset,
        n_all,
        class_names,
        subset_pos,
        all_images,
        sub_images,
        bank,
        bank.class_pathways().to(dev) if bank is not None else None,
        bank.frequencies().to(dev) if bank is not None else None,
        o.baselines_on,
    )


def _result(
    o: SimpleNamespace,
    ev: Evaluator,
    sp: Split,
    gp: GenPass,
    res: dict[tuple[str, str], Results],
    curves: Curves,
    same_class: dict,
    hits: dict[float, list[torch.Tensor]],
) -> dict[str, Any]:
    """The content of ``report.json`` but figures and timings: entries, comparisons, curves and provenance."""
    model, bank = ev.model, sp.bank
    settings = method_settings(model, bank, gp.keep_fraction, o.intgrad_steps, _dgr_opts(o), ev.fills is not None)
    entries = Entries(
        res,
        sp.subset_pos,
        sp.sub_images,
        model.target.tap_names,
        ev.chans,
        settings,
        o.bootstrap_samples,
        o.seed,
        o.progress,
    )
    block = entries.block
    names = ["gencnp", *BASELINES]
    matched_names = names + (["class_lookup"] if bank is not None else [])
    return {
        "provenance": provenance(model, o.generator, o.bank, bank, sp.data, o.split, o.seed, sp.n_all, o.limit),
        "methods": {m: block(m, "matched", on_subset=m in SUB_METHODS) for m in matched_names},
        "methods_native": {
            m: block(m, "native" if m != "gencnp" else "matched", on_subset=m in SUB_METHODS) for m in names
        },
        "transfer": {**block("transfer", "matched", False), "tau": bank.tau, "class_taus": bank.class_taus}
        if bank is not None
        else None,
        "subset": {
            "n": len(sp.subset_pos),
            "seed": o.subset_seed,
            "images": sp.sub_images,
            "methods": {m: block(m, "matched", True) for m in matched_names},
            "methods_native": {m: block(m, "native" if m != "gencnp" else "matched", True) for m in names},
            "transfer": block("transfer", "matched", True) if bank is not None else None,
        },
        "curves": {"images": sp.sub_images, "points": curves.points()},
        "same_class_transfer": same_class,
        "lookup_frontier": frontier_rows(hits, o.bootstrap_samples, o.seed) if bank is not None else None,
        "bootstrap": {
            "samples": o.bootstrap_samples,
            "seed": o.seed,
            "interval": "95% percentile, paired by image",
            "keys": list(ci_keys(res["gencnp", "matched"].vals)),
            "difference": "method minus GEN-CNP on the same images",
        },
    }


def _figures(
    out: Path,
    result: dict,
    ev: Evaluator,
    sp: Split,
    gp: GenPass,
    res: dict[tuple[str, str], Results],
    samples_per_class: int,
) -> dict[str, str]:
    """Draw the figures into ``out``; returns figure name -> file name."""
    figures = {}
    figures["agreement_vs_kept"] = plot_curves(out / "agreement_vs_kept.png", result)
    figures["kept_hist"] = plot_kept_hist(out / "kept_hist.png", res, gp.keep_fraction)
    if null_families_of(res["gencnp", "matched"].vals):
        figures["null_forcing"] = plot_null(out / "null_forcing.png", result)
    if sp.bank is not None:
        figures["bank_heatmap"] = plot_bank(out / "bank_heatmap.png", sp.bank)
    if samples_per_class > 0:
        figures["attribution_grid"] = plot_attribution(
            out / "attribution_grid.png",
            ev.model,
            sp.dataset,
            gp.y_hat,
            gp.labels,
            gp.pathways,
            sp.class_paths,
            sp.class_names,
            samples_per_class,
            ev.fills,
            ev.dev,
        )
    return {k: Path(v).name for k, v in figures.items() if v}
