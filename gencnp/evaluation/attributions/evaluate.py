"""``python evaluate.py attribution --config configs/<data>/attribution.yaml``: input attributions measured.

Every method of ``gencnp.evaluation.attributions.methods`` runs on the same seeded subset of the split, explaining the
target's prediction ``y_hat``:

- **ground truth** (data whose items carry a region, e.g. ``SyntheticPatterns``): relevance mass and pointing game;
- **sanity checks** (Adebayo et al., NeurIPS 2018): cascading randomisation of the target's layers from the top;
  per method and randomised layer, SSIM and Spearman rank correlation between the normalised ``|a|`` maps before and
  after, on the first ``sanity_n`` images of the subset (GEN-CNP's generator reads the randomised target's features;
  class pathways stay those of the bank; the mean-ablation fill stays the trained one; ``y_hat`` stays the
  original prediction);
- **deletion and insertion** (Petsiuk et al., BMVC 2018): the unmasked target's probability of ``y_hat`` as pixels are
  set to ``deletion_baseline`` (or revealed on it) in decreasing attribution order, and the areas under the curves.

Every mean carries a 95% percentile bootstrap interval over images, and GEN-CNP's pathway gradient is compared
with every other method by paired bootstrap intervals of the per-image differences.
Writes ``attribution.json``, ``attribution.md`` and figures (``attribution_grid.png``, ``sanity_curves.png``,
``deletion_insertion.png``) to ``out_dir``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gencnp.banks.bank import PathwayBank
from gencnp.data.modules import FashionMNISTDataModule, ImageDataModule
from gencnp.evaluation.attributions import metrics as AM
from gencnp.evaluation.attributions.methods import (
    ATTRIBUTION_METHODS,
    AttributionModel,
    attribute,
    cascade_layers,
    randomised,
)
from gencnp.io.checkpoint_io import read_checkpoint
from gencnp.io.files import check_writable_dir, json_safe, save_figure, write_atomic
from gencnp.systems.gencnp import GenCNP
from gencnp.threads import torch_threads

__all__ = ["attribution", "OURS"]

OURS = "pathway_gradient_gencnp"
LABELS = {
    "gradient": "gradient",
    "saliency": "Saliency (Captum)",
    "integrated_gradients": "IntegratedGradients (Captum)",
    "grad_cam": "LayerGradCam (Captum)",
    "pathway_gradient_gencnp": "pathway grad: GEN-CNP",
    "pathway_gradient_class": "pathway grad: class pathway",
    "pathway_gradient_mct": "pathway grad: NeuronMCT",
}


def attribution(
    generator: str = "runs/fashion_mnist/gencnp/best.ckpt",
    bank: str | None = "runs/fashion_mnist/bank.safetensors",
    data: ImageDataModule | None = None,
    out_dir: str = "runs/fashion_mnist/attribution",
    target_checkpoint: str | None = None,
    split: str = "test",
    n: int = 300,
    subset_seed: int = 0,
    methods: list[str] | None = None,
    batch_size: int = 100,
    ig_steps: int = 32,
    sanity_n: int = 100,
    sanity_seed: int = 0,
    ssim_window: int = 7,
    deletion_steps: int = 20,
    deletion_baseline: float = 0.0,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    grid_images: int = 6,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure input attributions (ground truth, sanity checks, deletion/insertion); write JSON, Markdown, figures.

    Args:
        generator: GEN-CNP checkpoint; its hyper-parameters rebuild the frozen target.
        bank: pathway bank for ``pathway_gradient_class``; ``None`` leaves that method out.
        data: the data module (``class_path``/``init_args``); Fashion-MNIST when unset.
        out_dir: output folder (created).
        target_checkpoint: override the target weights named in the generator's hyper-parameters.
        split: ``'test'`` (or ``'val'``).
        n: images in the seeded subset of the split (every method sees the same images).
        subset_seed: seed of the subset draw.
        methods: names from ``ATTRIBUTION_METHODS``; default every method the inputs allow.
        batch_size: images per attribution batch.
        ig_steps: integration points of ``integrated_gradients``.
        sanity_n: the first ``sanity_n`` subset images are used for the randomisation checks (0 skips them).
        sanity_seed: seed of the re-initialisation.
        ssim_window: Gaussian SSIM window (odd, at most the image side).
        deletion_steps: points of the deletion and insertion curves (plus the start); 0 skips them.
        deletion_baseline: value of a removed pixel, in the data's normalised units (0: the normalisation mean).
        bootstrap_samples: resamples of every interval.
        seed: seed of the bootstrap.
        grid_images: images in the method-by-image figure.
        device: ``'cpu'``, ``'cuda'``, ...
        threads: torch CPU threads during the run (restored afterwards); unset keeps torch's default.
        progress: print one line per phase.

    Returns:
        The content of ``attribution.json``.
    """
    _check_arguments(
        generator,
        bank,
        split,
        n,
        methods,
        batch_size,
        ig_steps,
        sanity_n,
        ssim_window,
        deletion_steps,
        bootstrap_samples,
        grid_images,
        threads,
    )
    check_writable_dir(Path(out_dir), "attribution folder", "set out_dir.")
    with torch_threads(threads):
        return _attribution(
            generator,
            bank,
            data,
            out_dir,
            target_checkpoint,
            split,
            n,
            subset_seed,
            methods,
            batch_size,
            ig_steps,
            sanity_n,
            sanity_seed,
            ssim_window,
            deletion_steps,
            deletion_baseline,
            bootstrap_samples,
            seed,
            grid_images,
            device,
            progress,
        )


def _check_arguments(
    generator,
    bank,
    split,
    n,
    methods,
    batch_size,
    ig_steps,
    sanity_n,
    ssim_window,
    deletion_steps,
    bootstrap_samples,
    grid_images,
    threads,
) -> None:
    """Refuse settings ``attribution`` cannot run with, before anything is loaded."""
    for name, v, lo in (
        ("n", n, 1),
        ("batch_size", batch_size, 1),
        ("ig_steps", ig_steps, 2),
        ("sanity_n", sanity_n, 0),
        ("deletion_steps", deletion_steps, 0),
        ("bootstrap_samples", bootstrap_samples, 10),
        ("grid_images", grid_images, 0),
    ):
        if v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}.")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or null (torch's default), got {threads}.")
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' (or 'val' for development), got '{split}'.")
    unknown = [m for m in (methods or []) if m not in ATTRIBUTION_METHODS]
    if unknown:
        raise KeyError(f"unknown attribution methods {unknown}; known methods: {', '.join(ATTRIBUTION_METHODS)}.")
    if methods is not None and OURS not in methods:
        raise ValueError(f"methods must include '{OURS}' (every comparison is made against it), got {methods}.")
    if ssim_window % 2 == 0 or ssim_window < 1:
        raise ValueError(f"ssim_window must be odd and >= 1, got {ssim_window}.")
    if not Path(generator).is_file():
        raise FileNotFoundError(
            f"generator checkpoint '{generator}' does not exist; train one with "
            "python train.py fit --config configs/<data>/gencnp.yaml, or fix the path."
        )
    if bank is not None and not Path(bank).is_file():
        raise FileNotFoundError(
            f"pathway bank '{bank}' does not exist; export it with python train.py predict --config "
            f"configs/<data>/bank.yaml --ckpt_path {generator}, or pass bank: null."
        )
    if methods is not None and "pathway_gradient_class" in methods and bank is None:
        raise ValueError("method 'pathway_gradient_class' needs a bank; set bank, or leave the method out.")


def _load(generator: str, bank: str | None, data, target_checkpoint: str | None, dev: torch.device):
    read_checkpoint(generator)
    overrides = {"target_checkpoint": target_checkpoint} if target_checkpoint else {}
    model = GenCNP.load_from_checkpoint(generator, map_location="cpu", weights_only=True, **overrides).to(dev).eval()
    if data is None:
        data = FashionMNISTDataModule()
    model.check_data(data)
    class_names = list(getattr(data, "class_names", [str(k) for k in range(model.num_classes)]))
    class_paths = None
    if bank is not None:
        bank_obj = PathwayBank.load(bank, target=model.target, class_names=class_names)
        if bank_obj.tau is None:
            raise ValueError(f"pathway bank '{bank}' has no tau; export it with PathwayBankWriter (it chooses tau).")
        class_paths = bank_obj.class_pathways().to(dev)
    return model, data, class_names, class_paths


def _attribution(
    generator,
    bank,
    data,
    out_dir,
    target_checkpoint,
    split,
    n,
    subset_seed,
    methods,
    batch_size,
    ig_steps,
    sanity_n,
    sanity_seed,
    ssim_window,
    deletion_steps,
    deletion_baseline,
    bootstrap_samples,
    seed,
    grid_images,
    device,
    progress,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    say = print if progress else (lambda *_: None)
    dev = torch.device(device)
    model, data, class_names, class_paths = _load(generator, bank, data, target_checkpoint, dev)
    target = model.target
    if ssim_window > min(target.input_shape[-2:]):
        raise ValueError(f"ssim_window ({ssim_window}) exceeds the image side {min(target.input_shape[-2:])}.")
    am = AttributionModel.from_gencnp(model, class_paths, ig_steps=ig_steps)
    names = list(methods or am.methods())
    x, labels, regions = _subset(data.split(split), n, subset_seed, dev)
    n = x.shape[0]
    with torch.no_grad():
        y_hat = torch.cat([target(x[i : i + batch_size]).argmax(1) for i in range(0, n, batch_size)])
    say(f"attribution: {n} {split} images (seed {subset_seed}), methods {', '.join(names)}")

    def maps_of(method: str, idx: slice | None = None) -> torch.Tensor:
        xs, ys = (x, y_hat) if idx is None else (x[idx], y_hat[idx])
        return torch.cat(
            [
                attribute(method, am, xs[i : i + batch_size], ys[i : i + batch_size]).cpu()
                for i in range(0, len(xs), batch_size)
            ]
        )

    maps, seconds = {}, {}
    for m in names:
        t = time.perf_counter()
        maps[m] = maps_of(m)
        seconds[m] = time.perf_counter() - t
        say(f"  {m}: {1000 * seconds[m] / n:.2f} ms/image")

    res: dict[str, Any] = {}
    boot = dict(n_boot=bootstrap_samples, seed=seed)
    per_image: dict[str, dict[str, torch.Tensor]] = {}

    # ----- ground truth -----
    if regions is not None:
        _ground_truth(maps, regions, names, boot, res, per_image)

    # ----- deletion / insertion -----
    curves = (
        _deletion_insertion(
            target, x, y_hat, maps, names, batch_size, deletion_steps, deletion_baseline, boot, res, per_image, say
        )
        if deletion_steps
        else {}
    )

    # ----- paired comparisons: GEN-CNP's pathway gradient minus each other method -----
    comparisons = _comparisons(per_image, names, boot) if OURS in names else {}

    # ----- sanity checks: cascading randomisation from the top -----
    k = min(sanity_n, n)
    layers = _sanity(target, maps, maps_of, names, k, sanity_seed, ssim_window, boot, res, say) if k else []

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = _figures(
        out,
        x.cpu(),
        y_hat.cpu(),
        labels,
        maps,
        names,
        regions,
        class_names,
        grid_images,
        res,
        layers,
        k,
        curves,
        n,
        deletion_baseline,
    )
    report = {
        **res,
        "comparisons": comparisons,
        "curves": curves,
        "methods": {
            m: {
                "source": ATTRIBUTION_METHODS[m].source,
                "signed": ATTRIBUTION_METHODS[m].signed,
                "ms_per_image": 1000 * seconds[m] / n,
            }
            for m in names
        },
        "sanity_layers": layers,
        "settings": {
            "generator": str(generator),
            "bank": bank,
            "split": split,
            "n": n,
            "subset_seed": subset_seed,
            "sanity_n": k,
            "sanity_seed": sanity_seed,
            "ssim_window": ssim_window,
            "ig_steps": ig_steps,
            "deletion_steps": deletion_steps,
            "deletion_baseline": deletion_baseline,
            "bootstrap_samples": bootstrap_samples,
            "seed": seed,
            "class_source": "target prediction",
            "target": target.arch,
            "taps": target.tap_names,
            "ground_truth": regions is not None,
            "target_accuracy_on_subset": float((y_hat.cpu() == labels).double().mean()),
        },
        "figures": figures,
        "seconds": time.perf_counter() - t0,
    }

    write_atomic(out / "attribution.json", json.dumps(json_safe(report), indent=1).encode())
    write_atomic(out / "attribution.md", _markdown(report, names).encode())
    say(
        f"attribution: wrote {out / 'attribution.json'}, {out / 'attribution.md'} and {len(figures)} figures "
        f"in {report['seconds']:.1f}s"
    )
    return report


def _subset(dataset, n: int, subset_seed: int, dev: torch.device):
    """The seeded subset of ``min(n, len(dataset))`` images (in dataset order): inputs on ``dev``, labels, and the
    ground-truth regions when the dataset has them (else ``None``)."""
    g = torch.Generator().manual_seed(subset_seed)
    pos = torch.sort(torch.randperm(len(dataset), generator=g)[: min(n, len(dataset))]).values.tolist()
    items = [dataset[i] for i in pos]
    x = torch.stack([it[0] for it in items]).to(dev)
    labels = torch.as_tensor([int(it[1]) for it in items])
    regions = torch.stack([it[2][0] if it[2].dim() == 3 else it[2] for it in items]) if len(items[0]) > 2 else None
    return x, labels, regions


def _ground_truth(maps, regions, names, boot, res, per_image) -> None:
    """Relevance mass and pointing game of every method on the ground-truth regions (intervals into ``res``)."""
    for m in names:
        rm, pg = AM.relevance_mass(maps[m], regions), AM.pointing_game(maps[m], regions)
        per_image.setdefault("relevance_mass", {})[m] = rm
        per_image.setdefault("pointing", {})[m] = pg
        res[f"relevance_mass/{m}"] = AM.bootstrap(rm, **boot)
        res[f"pointing/{m}"] = AM.bootstrap(pg, **boot)


def _comparisons(per_image: dict, names: list[str], boot: dict) -> dict[str, Any]:
    """Paired intervals of GEN-CNP's pathway gradient minus each other method, per measure."""
    comparisons = {}
    better = {"relevance_mass": "higher", "pointing": "higher", "deletion_auc": "lower", "insertion_auc": "higher"}
    for metric, vals in per_image.items():
        for m in names:
            if m != OURS:
                d = AM.bootstrap(vals[OURS] - vals[m], **boot)
                d["better"] = better[metric]
                comparisons[f"{metric}/{OURS}-{m}"] = d
    return comparisons


def _figures(
    out, x, y_hat, labels, maps, names, regions, class_names, grid_images, res, layers, k, curves, n, deletion_baseline
) -> dict[str, str]:
    """Draw the method-by-image grid, the sanity curves and the deletion/insertion curves that apply."""
    figures = {}
    if grid_images:
        figures["attribution_grid"] = _plot_grid(
            out / "attribution_grid.png", x, y_hat, labels, maps, names, regions, class_names, grid_images
        )
    if layers:
        figures["sanity_curves"] = _plot_sanity(out / "sanity_curves.png", res, names, layers, k)
    if curves:
        figures["deletion_insertion"] = _plot_curves(
            out / "deletion_insertion.png", curves, res, names, n, deletion_baseline
        )
    return figures


def _deletion_insertion(
    target, x, y_hat, maps, names, batch_size, deletion_steps, deletion_baseline, boot, res, per_image, say
) -> dict[str, dict]:
    """Deletion and insertion curves of every method (mean curves returned; AUC intervals into ``res``)."""
    n = x.shape[0]
    curves = {}
    say("  deletion and insertion curves")
    for m in names:
        parts = [
            AM.deletion_insertion(
                target,
                x[i : i + batch_size],
                maps[m][i : i + batch_size].to(x.device),
                y_hat[i : i + batch_size],
                deletion_steps,
                deletion_baseline,
            )
            for i in range(0, n, batch_size)
        ]
        fr = parts[0]["fractions"]
        dele, ins = torch.cat([p["deletion"] for p in parts]), torch.cat([p["insertion"] for p in parts])
        curves[m] = {"fractions": fr.tolist(), "deletion": dele.mean(0).tolist(), "insertion": ins.mean(0).tolist()}
        per_image.setdefault("deletion_auc", {})[m] = AM.auc(dele, fr)
        per_image.setdefault("insertion_auc", {})[m] = AM.auc(ins, fr)
        res[f"deletion_auc/{m}"] = AM.bootstrap(per_image["deletion_auc"][m], **boot)
        res[f"insertion_auc/{m}"] = AM.bootstrap(per_image["insertion_auc"][m], **boot)
    return curves


def _sanity(target, maps, maps_of, names, k, sanity_seed, ssim_window, boot, res, say) -> list[str]:
    """Cascading randomisation from the top on the first ``k`` images (SSIM and Spearman intervals into ``res``);
    returns the layers randomised, in order."""
    layers, sanity = [], {}
    groups = cascade_layers(target)
    ref = {m: AM.normalise(maps[m][:k]) for m in names}
    say(f"  sanity checks: {len(groups)} layers from the top ({', '.join(name for name, _ in groups)}), {k} images")
    for i, (layer, _) in enumerate(groups):
        layers.append(layer)
        modules = [mod for _, mods in groups[: i + 1] for mod in mods]
        with randomised(target, modules, seed=sanity_seed):
            for m in names:
                after = AM.normalise(maps_of(m, slice(0, k)))
                s, r = AM.ssim(ref[m], after, window=ssim_window), AM.spearman(ref[m], after)
                res[f"sanity_ssim/{m}/{layer}"] = AM.bootstrap(s, **boot)
                res[f"sanity_spearman/{m}/{layer}"] = AM.bootstrap(r, **boot)
                sanity.setdefault(m, {})[layer] = (float(s.mean()), float(r.mean()))
    return layers


# ----- Markdown -----
def _ci(e: dict | None, digits: int = 3) -> str:
    if not e or e.get("mean") is None or (isinstance(e["mean"], float) and math.isnan(e["mean"])):
        return "-"
    return f"{e['mean']:.{digits}f} [{e['lo']:.{digits}f}, {e['hi']:.{digits}f}]"


def _markdown(r: dict, names: list[str]) -> str:
    s = r["settings"]
    lines = [
        "# Input attributions",
        "",
        f"Target `{s['target']}` (taps {', '.join(s['taps'])}); generator `{s['generator']}`; bank `{s['bank']}`.",
        f"{s['n']} {s['split']} images (seeded subset, seed {s['subset_seed']}); each method explains the target's "
        f"prediction (accuracy on these images {s['target_accuracy_on_subset']:.3f}). Every value is the mean over "
        f"images with a 95% bootstrap interval ({s['bootstrap_samples']} resamples).",
        "",
    ]
    if s["ground_truth"]:
        lines += [
            "## Ground truth (region of the class pattern)",
            "",
            "| method | relevance mass (share of positive attribution inside) | pointing game (max inside) |",
            "|---|---|---|",
        ]
        lines += [f"| {m} | {_ci(r.get(f'relevance_mass/{m}'))} | {_ci(r.get(f'pointing/{m}'))} |" for m in names]
        lines.append("")
    if r["sanity_layers"]:
        lay = r["sanity_layers"]
        cols = " | ".join(f"{'' if i == 0 else '+'}{name}" for i, name in enumerate(lay))
        for key, title in (("sanity_ssim", "SSIM"), ("sanity_spearman", "Spearman rank correlation")):
            lines += [
                f"## Sanity check: {title} to the original map, cascading randomisation from the top",
                "",
                f"Normalised `|a|` maps of the first {s['sanity_n']} images; columns add one randomised layer "
                f"(seed {s['sanity_seed']}). Low = the explanation depends on the weights (passes).",
                "",
                f"| method | {cols} |",
                "|---" * (len(lay) + 1) + "|",
            ]
            lines += [f"| {m} | " + " | ".join(_ci(r.get(f"{key}/{m}/{name}")) for name in lay) + " |" for m in names]
            lines.append("")
    if "deletion_auc/" + names[0] in r:
        lines += [
            "## Deletion and insertion (probability of the predicted class)",
            "",
            f"{s['deletion_steps']} steps; removed pixels take the value {s['deletion_baseline']} (normalised "
            "units). Deletion: lower is better; insertion: higher is better.",
            "",
            "| method | deletion AUC | insertion AUC | ms/image |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {m} | {_ci(r.get(f'deletion_auc/{m}'))} | {_ci(r.get(f'insertion_auc/{m}'))} | "
            f"{r['methods'][m]['ms_per_image']:.2f} |"
            for m in names
        ]
        lines.append("")
    if r["comparisons"]:
        lines += [
            f"## Paired differences: {OURS} minus each method (same images)",
            "",
            "| measure | other method | difference [95% CI] | better is | verdict |",
            "|---|---|---|---|---|",
        ]
        for key, d in r["comparisons"].items():
            metric, pair = key.split("/", 1)
            other = pair.split("-", 1)[1]
            lo, hi = (d["lo"], d["hi"]) if d["better"] == "higher" else (-d["hi"], -d["lo"])
            verdict = "GEN-CNP better" if lo > 0 else "GEN-CNP worse" if hi < 0 else "no difference"
            lines.append(f"| {metric} | {other} | {_ci(d)} | {d['better']} | {verdict} |")
        lines.append("")
    lines += ["Figures: " + ", ".join(f"`{Path(p).name}`" for p in r["figures"].values()), ""]
    return "\n".join(lines)


# ----- figures -----
def _save(fig, path: Path) -> str:
    save_figure(fig, path, dpi=100)
    return str(path)


def _plot_grid(path: Path, x, y_hat, labels, maps, names, regions, class_names, k) -> str:
    from matplotlib import cm  # matplotlib only when a figure is drawn
    from matplotlib import colors as mcolors
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    k = min(k, x.shape[0])
    cols = 1 + len(names)
    fig = Figure(figsize=(1.45 * cols + 0.6, 1.5 * k + 1.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(k, cols))
    for i in range(k):
        im = x[i]
        show = im[0] if im.shape[0] == 1 else ((im - im.min()) / (im.max() - im.min() + 1e-12)).permute(1, 2, 0)
        cells = [(show.numpy(), {"cmap": "gray"} if im.shape[0] == 1 else {})]
        for m in names:
            a = maps[m][i]
            a = a / a.abs().max().clamp_min(1e-12)
            cells.append((a.numpy(), {"cmap": "RdBu_r", "vmin": -1, "vmax": 1}))
        for j, (data, kw) in enumerate(cells):
            ax = axes[i, j]
            ax.imshow(data, **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if regions is not None and bool(regions[i].any()):
                rows, cols_ = torch.nonzero(regions[i] > 0.5, as_tuple=True)
                r0, c0 = int(rows.min()), int(cols_.min())
                ax.add_patch(
                    Rectangle(
                        (c0 - 0.5, r0 - 0.5),
                        int(cols_.max()) - c0 + 1,
                        int(rows.max()) - r0 + 1,
                        fill=False,
                        edgecolor="lime",
                        linewidth=1.0,
                    )
                )
        axes[i, 0].set_ylabel(f"pred {class_names[int(y_hat[i])]}\nlabel {class_names[int(labels[i])]}", fontsize=7)
    axes[0, 0].set_title("input", fontsize=8)
    for j, m in enumerate(names):
        axes[0, j + 1].set_title(LABELS.get(m, m).replace(": ", ":\n").replace(" (", "\n("), fontsize=7)
    fig.colorbar(
        cm.ScalarMappable(mcolors.Normalize(-1, 1), "RdBu_r"),
        ax=axes,
        location="bottom",
        shrink=0.5,
        aspect=40,
        label="attribution / max |attribution| of that map (red positive, blue negative)"
        + ("; green box: ground-truth region" if regions is not None else ""),
    )
    fig.suptitle("Input attributions of the predicted class: one image per row, one method per column", fontsize=9)
    return _save(fig, path)


def _styles(names):
    ours = {
        "pathway_gradient_gencnp": ("C3", "-", 2.4),
        "pathway_gradient_class": ("C1", "-", 1.6),
        "pathway_gradient_mct": ("C4", "-", 1.6),
    }
    other = iter([("C0", "--"), ("C2", "--"), ("C7", ":"), ("C8", "-."), ("C9", ":")])
    out = {}
    for m in names:
        if m in ours:
            out[m] = ours[m]
        else:
            c, ls = next(other)
            out[m] = (c, ls, 1.4)
    return out


def _plot_sanity(path: Path, res: dict, names, layers, k: int) -> str:
    from matplotlib.figure import Figure  # matplotlib only when a figure is drawn

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    xs = np.arange(len(layers) + 1)
    ticks = ["none"] + [("" if i == 0 else "+") + name for i, name in enumerate(layers)]
    sty = _styles(names)
    for ax, key, title in ((axes[0], "sanity_ssim", "SSIM"), (axes[1], "sanity_spearman", "Spearman rank correlation")):
        for m in names:
            e = [res[f"{key}/{m}/{name}"] for name in layers]
            mean = [1.0] + [v["mean"] for v in e]
            lo = [1.0] + [v["lo"] for v in e]
            hi = [1.0] + [v["hi"] for v in e]
            c, ls, lw = sty[m]
            ax.plot(xs, mean, color=c, ls=ls, lw=lw, marker="o", ms=3, label=LABELS.get(m, m))
            ax.fill_between(xs, lo, hi, color=c, alpha=0.12)
        ax.set_xticks(xs, ticks, rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("layers randomised (cumulative, from the top)")
        ax.set_ylabel(f"{title} to the original map")
        ax.set_ylim(-0.1 if key == "sanity_spearman" else 0, 1.05)
        ax.grid(alpha=0.3)
        ax.set_title(f"{title} (mean, 95% bootstrap band; {k} images)", fontsize=9)
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(
        "Model-randomisation sanity check (Adebayo et al. 2018): an explanation that passes drops", fontsize=10
    )
    return _save(fig, path)


def _plot_curves(path: Path, curves: dict, res: dict, names, n: int, baseline: float) -> str:
    from matplotlib.figure import Figure  # matplotlib only when a figure is drawn

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    sty = _styles(names)
    for ax, key, what in ((axes[0], "deletion", f"removed (set to {baseline:g})"), (axes[1], "insertion", "revealed")):
        for m in names:
            c, ls, lw = sty[m]
            e = res[f"{key}_auc/{m}"]
            ax.plot(
                curves[m]["fractions"],
                curves[m][key],
                color=c,
                ls=ls,
                lw=lw,
                label=f"{LABELS.get(m, m)}: AUC {e['mean']:.3f} [{e['lo']:.3f}, {e['hi']:.3f}]",
            )
        ax.set_xlabel(f"fraction of pixels {what}, most attributed first")
        ax.set_ylabel("probability of the predicted class")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(
            f"{key.capitalize()} ({'lower' if key == 'deletion' else 'higher'} AUC is better; {n} images)", fontsize=9
        )
    return _save(fig, path)
