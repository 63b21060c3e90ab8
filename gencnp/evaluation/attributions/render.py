"""What ``evaluate.py attribution`` writes besides ``attribution.json``: ``attribution.md`` and the figures (the method
by image grid, the sanity curves, the deletion and insertion curves)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import torch

from gencnp.io.files import save_figure

__all__ = ["LABELS", "OURS", "figures", "markdown"]

OURS = "pathway_gradient_gencnp"
LABELS = {
    "gradient": "gradient",
    "saliency": "Saliency (Captum)",
    "integrated_gradients": "IntegratedGradients (Captum)",
    "grad_cam": "LayerGradCam (Captum)",
    "pathway_gradient_gencnp": "pathway grad: GEN-CNP",
    "pathway_gradient_class": "pathway grad: class pathway",
    "pathway_gradient_mct": "pathway grad: NeuronMCT",
    "pathway_integrated_gradients": "pathway IG: GEN-CNP (Captum)",
    "pathway_grad_cam": "pathway Grad-CAM: GEN-CNP (Captum)",
}


def figures(
    out, x, y_hat, labels, maps, names, regions, class_names, grid_images, res, layers, k, curves, n, deletion_baseline
) -> dict[str, str]:
    """Draw the method-by-image grid, the sanity curves and the deletion/insertion curves that apply."""
    figures = {}
    if grid_images:
        figures["attribution_grid"] = plot_grid(
            out / "attribution_grid.png", x, y_hat, labels, maps, names, regions, class_names, grid_images
        )
    if layers:
        figures["sanity_curves"] = plot_sanity(out / "sanity_curves.png", res, names, layers, k)
    if curves:
        figures["deletion_insertion"] = plot_curves(
            out / "deletion_insertion.png", curves, res, names, n, deletion_baseline
        )
    return figures


def _ci(e: dict | None, digits: int = 3) -> str:
    if not e or e.get("mean") is None or (isinstance(e["mean"], float) and math.isnan(e["mean"])):
        return "-"
    return f"{e['mean']:.{digits}f} [{e['lo']:.{digits}f}, {e['hi']:.{digits}f}]"


def markdown(r: dict, names: list[str]) -> str:
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


def plot_grid(path: Path, x, y_hat, labels, maps, names, regions, class_names, k) -> str:
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
        "pathway_integrated_gradients": ("C5", "-", 1.6),
        "pathway_grad_cam": ("C6", "-", 1.6),
    }
    other = itertools.cycle([("C0", "--"), ("C2", "--"), ("C7", ":"), ("C8", "-."), ("C9", ":")])
    out = {}
    for m in names:
        if m in ours:
            out[m] = ours[m]
        else:
            c, ls = next(other)
            out[m] = (c, ls, 1.4)
    return out


def plot_sanity(path: Path, res: dict, names, layers, k: int) -> str:
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


def plot_curves(path: Path, curves: dict, res: dict, names, n: int, baseline: float) -> str:
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
