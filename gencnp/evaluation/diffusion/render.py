"""Pixel diffusion output: ``diffusion.md`` text and the ``diffusion_*.png`` figures, both from the summary that
``diffusion()`` writes to ``diffusion.json``. Figures are ``matplotlib.figure.Figure`` objects (no pyplot backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gencnp.evaluation.diffusion.stats import PERTURBATIONS
from gencnp.io.files import save_figure

__all__ = ["markdown", "figures"]


def _fmt_p(p: float, floor: float | None = None) -> str:
    """A p-value; at the smallest value a permutation test can give (``floor``), ``<= floor``."""
    if floor is not None and p <= floor * (1 + 1e-9):
        return f"≤ {floor:.1e}"
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def _p_phrase(p: float, floor: float | None = None) -> str:
    """``p = 0.03`` or ``p ≤ 1.0e-03``."""
    txt = _fmt_p(p, floor)
    return f"p {txt}" if txt.startswith("≤") else f"p = {txt}"


def _floor(s: dict) -> float:
    """The smallest p-value a permutation test of the summary can give."""
    return 1 / (1 + s["settings"]["permutations"])


def markdown(s: dict) -> str:
    """``diffusion.md`` from the summary ``s``."""
    return "\n".join([*_md_overlap(s), *_md_consistency(s), *_md_perturbations(s), *_md_bank_and_method(s)])


def _md_overlap(s: dict) -> list[str]:
    """Header and the crossings-vs-importance section."""
    st = s["settings"]
    names = st["taps"]
    floor = _floor(s)
    glob, img = s["crossing_vs_importance"]["global"], s["crossing_vs_importance"]["per_image"]
    sig = [t for t in names if glob[t]["p_permutation"] < 0.05 and glob[t]["overlap"] > glob[t]["chance"]]
    sig_img = [
        t for t in names if img[t]["p_permutation"] < 0.05 and img[t]["overlap_fraction"] > img[t]["chance_fraction"]
    ]
    sig_own = [
        t
        for t in names
        if img[t]["p_vs_other_images"] < 0.05 and img[t]["overlap_fraction"] > img[t]["other_image_fraction"]
    ]
    verdict = "Yes" if len(sig) == len(names) else "Partly" if sig else "No"
    lines = [
        "# Pixel diffusion pathways",
        "",
        f"Target `{st['target']}` (`{st['checkpoint']}`), {st['split']} split, n = {st['n']} images (subset seed "
        f"{st['subset_seed']}), target accuracy on them {100 * s['target_accuracy']:.1f}%. Taps "
        f"{', '.join(f'`{t}` ({c})' for t, c in zip(names, st['tap_channels']))}. {st['pixels']} pixels per image "
        f"({st['pixel_rule']}), top {st['top_k']} pathways per pixel from a beam of {st['beam_width']}; class source "
        f"`{st['class_source']}`; {st['permutations']} permutations per baseline.",
        "",
        "## Do large pathways cross the causally important feature maps more often than chance?",
        "",
        f"**{verdict}.** Over all images, the channels most crossed by large pathways overlap the channels whose removal "
        f"drops agreement most more often than random channel sets at {len(sig)} of {len(names)} taps"
        + (f" ({', '.join(f'`{t}`' for t in sig)})" if sig else "")
        + f". Per image (its own crossings vs its own causal test), the overlap beats chance at {len(sig_img)} of "
        f"{len(names)} taps, and beats the overlap with another image's important channels (instance-specific) at "
        f"{len(sig_own)} of {len(names)}" + (f" ({', '.join(f'`{t}`' for t in sig_own)})" if sig_own else "") + ".",
        "",
        "| tap | set size m | overlap (all images) | chance | p (permutation) | p (hypergeom.) | Spearman ρ (p) | "
        "per-image overlap | chance | another image's | p (vs chance) | p (vs another image) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in names:
        a, b = glob[t], img[t]
        lines.append(
            f"| `{t}` | {a['m']} of {a['channels']} | {a['overlap']} | {a['chance']:.2f} | {_fmt_p(a['p_permutation'], floor)} | "
            f"{_fmt_p(a['p_hypergeom'])} | {a['spearman']:.2f} ({_fmt_p(a['spearman_p_permutation'], floor)}) | "
            f"{b['overlap_fraction']:.3f} | {b['chance_fraction']:.3f} | {b['other_image_fraction']:.3f} | {_fmt_p(b['p_permutation'], floor)} | "
            f"{_fmt_p(b['p_vs_other_images'], floor)} |"
        )
    lines += [
        "",
        "Importance = agreement drop when one channel of a tap is zeroed (ties broken by the mean drop of log p_ŷ); "
        "per image, the drop of log p_ŷ. Crossings = how many of the image's top pathways pass through a channel "
        "(ties broken by impulse mass). Chance = the expected overlap of random channel sets of the same size.",
    ]
    return lines


def _md_consistency(s: dict) -> list[str]:
    """Within- vs between-class similarity of crossing profiles."""
    names, floor = s["settings"]["taps"], _floor(s)
    c = s["consistency"]
    allc = c["all"]
    yes = allc["difference"] > 0 and allc["p_permutation"] < 0.05
    lines = [
        "",
        "## Are within-class crossing profiles more similar than between-class ones?",
        "",
        f"**{'Yes' if yes else 'No'}.** Mean cosine similarity of per-tap crossing profiles: within classes "
        f"{allc['within']:.3f}, between classes {allc['between']:.3f} (difference {allc['difference']:.3f}; with shuffled "
        f"classes {allc['null_mean']:.3f} ± {allc['null_std']:.3f}, {_p_phrase(allc['p_permutation'], floor)}).",
        "",
        "| tap | within | between | difference | shuffled-class difference | p |",
        "|---|---|---|---|---|---|",
    ]
    for t in [*names, "all"]:
        v = c[t]
        lines.append(
            f"| {'`' + t + '`' if t != 'all' else 'all taps'} | {v['within']:.3f} | {v['between']:.3f} | "
            f"{v['difference']:.3f} | {v['null_mean']:.3f} ± {v['null_std']:.3f} | {_fmt_p(v['p_permutation'], floor)} |"
        )
    return lines


def _md_perturbations(s: dict) -> list[str]:
    """Clean vs perturbed inputs."""
    st = s["settings"]
    p = s["perturbations"]
    lines = [
        "",
        "## Clean vs perturbed inputs",
        "",
        f"Same pixels, pattern re-frozen at the perturbed input. A feature map is crossed by large diffusion when its "
        f"impulse mass reaches the clean {st['large_quantile']:.2f}-quantile of its tap; *large pathways* counts the "
        "chains (one channel per tap) through such maps only, summed over the image's pixels. Perturbations: Gaussian "
        f"noise σ = {st['noise_std']}, a centred {st['occlusion_size']}x{st['occlusion_size']} occlusion, FGSM ε = "
        f"{st['fgsm_eps']} (normalised units). AUROC: how well the count separates perturbed from clean images "
        "(0.5 = not at all; > 0.5 = larger when perturbed).",
        "",
        "| input | prediction changed | large crossings / image | log10(1 + large pathways) | total mass / image | "
        "AUROC (crossings) | AUROC (mass) | profile cosine to clean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind in ["clean", *PERTURBATIONS]:
        v = p[kind]
        au = v.get("auroc_vs_clean", {})
        lines.append(
            f"| {kind} | {100 * v.get('prediction_changed', 0.0):.1f}% | {v['large_crossings']['mean']:.1f} ± "
            f"{v['large_crossings']['std']:.1f} | {v['large_pathways']['mean_log10']:.2f} | {v['total_mass']['mean']:.1f} | "
            f"{au.get('large_crossings', float('nan')):.3f} | {au.get('total_mass', float('nan')):.3f} | "
            f"{v.get('profile_cosine_to_clean', 1.0 if kind == 'clean' else float('nan')):.3f} |"
        )
    lines.append("")
    for kind in PERTURBATIONS:
        v, c0 = p[kind], p["clean"]
        au = v["auroc_vs_clean"]["large_crossings"]
        direction = "fewer" if v["large_crossings"]["mean"] < c0["large_crossings"]["mean"] else "more"
        lines.append(
            f"- **{kind}**: {direction} large crossings than clean ({v['large_crossings']['mean']:.0f} vs "
            f"{c0['large_crossings']['mean']:.0f} per image; {100 * v['fraction_above_clean']['large_crossings']:.0f}% of "
            f"images above their own clean count); the count separates perturbed from clean images with AUROC "
            f"{max(au, 1 - au):.2f} (0.5 = not at all)."
        )
    return lines


def _md_bank_and_method(s: dict) -> list[str]:
    """The GEN-CNP bank comparison and the method notes."""
    st = s["settings"]
    b = s["bank"]
    lines = ["", "## GEN-CNP class pathways", ""]
    if "skipped" in b:
        lines.append(f"Skipped: {b['skipped']}.")
    else:
        lines.append(
            f"Bank `{b['path']}`: per class and tap, the most-crossed channels (as many as the class pathway keeps "
            f"there) share {b['overlap']} channels with the class pathway; random sets of the same sizes share "
            f"{b['chance']:.1f} on average ({b['ratio_to_chance']:.2f}x chance)."
        )
        lines += ["", "| tap | kept channels (sum over classes) | overlap | chance |", "|---|---|---|---|"]
        for t, v in b["per_tap"].items():
            lines.append(f"| `{t}` | {v['size']:.0f} | {v['overlap']:.0f} | {v['chance']:.1f} |")
    pw = s["pathways"]
    lines += [
        "",
        "## Method",
        "",
        "- ReLU on/off pattern and max-pool switches frozen at each (clean or perturbed) input; a one-pixel unit impulse "
        "runs through the network's linear part (no biases, BatchNorm as its scale), i.e. the Jacobian column.",
        "- Transfer `T_l[i, j]`: Σ|·| over space of tap l+1's channel j when only channel i of tap l carries the response.",
        f"- Chain score: {st['score_rule']} (the scores of all chains of a pixel sum to 1). Top-1 score mean "
        f"{pw['top1_score_mean']:.2e}, top-{st['top_k']} sum {pw['topk_score_sum_mean']:.2e}; "
        f"{pw['distinct_top1_chains']} distinct top-1 chains over all pixels; {100 * pw['valid_fraction']:.1f}% of the "
        "kept chains carry mass.",
        "",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"].items()) + ".",
        "",
        "Figures: `diffusion_crossings.png`, `diffusion_pixel_pathways.png`, `diffusion_similarity.png`, "
        "`diffusion_perturbations.png`.",
        "",
    ]
    return lines


def figures(
    out: Path,
    s: dict,
    consistency: dict,
    clean: dict,
    x: torch.Tensor,
    pix: torch.Tensor,
    labels: torch.Tensor,
    y_hat: torch.Tensor,
    agreement_drop: torch.Tensor,
    cross: torch.Tensor,
    class_names: Sequence[str],
    stats: dict,
) -> None:
    """The four ``diffusion_*.png`` figures in ``out``."""
    _plot_crossings(out, s, agreement_drop, cross)
    _plot_pixel(out, s, clean, x, pix, labels, y_hat, class_names)
    _plot_similarity(out, s, consistency, class_names)
    _plot_perturbations(out, s, stats)


def _plot_crossings(out: Path, s: dict, agreement_drop: torch.Tensor, cross: torch.Tensor) -> None:
    """Crossings per channel, coloured by causal importance."""
    from matplotlib import cm, colors  # matplotlib only when drawing
    from matplotlib.figure import Figure

    names, chans = s["settings"]["taps"], s["settings"]["tap_channels"]
    offsets = [0, *np.cumsum(chans).tolist()]
    glob = s["crossing_vs_importance"]["global"]
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(7 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    drop = agreement_drop.numpy()
    norm = colors.Normalize(vmin=0.0, vmax=max(float(drop.max()), 1e-6))
    for t, name in enumerate(names):
        ax = axes[t // cols][t % cols]
        sl = slice(offsets[t], offsets[t + 1])
        counts = cross[:, sl].sum(0).numpy()
        ax.bar(np.arange(chans[t]), counts, color=cm.viridis(norm(drop[sl])), width=0.9)
        imp = glob[name]["important_channels"]
        ax.scatter(
            imp,
            counts[imp] + 0.02 * max(counts.max(), 1),
            marker="v",
            color="crimson",
            s=18,
            label="most important (causal)",
        )
        g = glob[name]
        ax.set_title(
            f"{name}: {g['m']} most crossed vs {g['m']} most important share {g['overlap']} "
            f"(chance {g['chance']:.1f}, {_p_phrase(g['p_permutation'], _floor(s))})",
            fontsize=9,
        )
        ax.set_xlabel("channel")
        ax.set_ylabel("large pathways crossing")
        ax.legend(fontsize=7, loc="upper right")
    for t in range(len(names), rows * cols):
        axes[t // cols][t % cols].axis("off")
    fig.colorbar(
        cm.ScalarMappable(norm=norm, cmap="viridis"),
        ax=axes,
        label="agreement drop when the channel is zeroed",
        shrink=0.8,
    )
    # (bar colour = causal importance; red triangles = the compared most-important set)
    fig.suptitle(
        f"Large pathways (top {s['settings']['top_k']} per pixel) crossing each feature map, {s['settings']['n']} images"
    )
    save_figure(fig, out / "diffusion_crossings.png", dpi=120, pad_inches=0.1)


def _plot_pixel(
    out: Path,
    s: dict,
    clean: dict,
    x: torch.Tensor,
    pix: torch.Tensor,
    labels: torch.Tensor,
    y_hat: torch.Tensor,
    class_names: Sequence[str],
) -> None:
    """One pixel's top pathways across the layers."""
    from matplotlib import cm, colors  # matplotlib only when drawing
    from matplotlib.figure import Figure

    names, chans = s["settings"]["taps"], s["settings"]["tap_channels"]
    i_img, i_pix = 0, 0
    fig = Figure(figsize=(13, 6.5), layout="constrained")
    ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2.2]})
    img = x[i_img].float()
    ax0.imshow(
        img[0] if img.shape[0] == 1 else ((img - img.min()) / (img.max() - img.min() + 1e-12)).permute(1, 2, 0),
        cmap="gray",
    )
    r, c = pix[i_img, i_pix].tolist()
    ax0.scatter([c], [r], s=120, facecolors="none", edgecolors="red", linewidths=2)
    ax0.set_title(
        f"image 0: label {class_names[int(labels[i_img])]}, predicted {class_names[int(y_hat[i_img])]}\n"
        f"pixel ({r}, {c}) (most salient)",
        fontsize=9,
    )
    ax0.set_xlabel("column")
    ax0.set_ylabel("row")
    masses = [clean["masses"][t][i_img, i_pix].numpy() for t in range(len(names))]
    logm = [np.log10(m + 1e-12) for m in masses]
    lo = min(float(v[np.isfinite(v)].min()) for v in logm)
    hi = max(float(v.max()) for v in logm)
    mnorm = colors.Normalize(vmin=max(lo, hi - 6), vmax=hi)
    for t in range(len(names)):
        ax1.scatter(
            np.full(chans[t], t),
            np.arange(chans[t]) / max(chans[t] - 1, 1),
            c=logm[t],
            cmap="magma",
            norm=mnorm,
            s=14,
            zorder=2,
        )
    chains = clean["chains"][i_img, i_pix].numpy()
    sc = clean["log_scores"][i_img, i_pix].numpy()
    valid = clean["valid"][i_img, i_pix].numpy()
    palette = cm.tab10(np.arange(len(chains)) % 10)
    for k in range(len(chains)):
        if not valid[k]:
            continue
        ys = [chains[k][t] / max(chans[t] - 1, 1) for t in range(len(names))]
        ax1.plot(
            np.arange(len(names)),
            ys,
            "-o",
            color=palette[k],
            lw=3.0 - 0.4 * k,
            alpha=0.9,
            zorder=3,
            label=f"#{k + 1} score {np.exp(sc[k]):.2e}: " + " → ".join(str(int(v)) for v in chains[k]),
        )
    ax1.set_xticks(range(len(names)), [f"{n}\n({cc} ch)" for n, cc in zip(names, chans)])
    ax1.set_xlabel("tap (layer)")
    ax1.set_ylabel("channel index / (channels − 1)")
    ax1.set_title("top pathways of this pixel (dots: every channel, coloured by impulse mass)", fontsize=9)
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, title="pathway: channel per tap")
    fig.colorbar(cm.ScalarMappable(norm=mnorm, cmap="magma"), ax=ax1, label="log10 impulse mass Σ|response|")
    save_figure(fig, out / "diffusion_pixel_pathways.png", dpi=120, pad_inches=0.1)


def _plot_similarity(out: Path, s: dict, consistency: dict, class_names: Sequence[str]) -> None:
    """Within- vs between-class similarity."""
    from matplotlib.figure import Figure  # matplotlib only when drawing

    names = s["settings"]["taps"]
    fig = Figure(figsize=(14, 5.8), layout="constrained")
    ax0, ax1 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    mat = np.array(consistency["all"]["matrix"])
    im = ax0.imshow(mat, cmap="viridis")
    k = mat.shape[0]
    ax0.set_xticks(range(k), [class_names[i] for i in range(k)], rotation=60, ha="right", fontsize=7)
    ax0.set_yticks(range(k), [class_names[i] for i in range(k)], fontsize=7)
    ax0.set_xlabel(f"class ({s['settings']['class_source']})")
    ax0.set_ylabel(f"class ({s['settings']['class_source']})")
    ax0.set_title("crossing-profile cosine similarity, all taps\n(diagonal: pairs within a class)", fontsize=9)
    fig.colorbar(im, ax=ax0, label="cosine similarity")
    keys = [*names, "all"]
    within = [consistency[t]["within"] for t in keys]
    between = [consistency[t]["between"] for t in keys]
    xs = np.arange(len(keys))
    ax1.bar(xs - 0.2, within, 0.4, label="within class")
    ax1.bar(xs + 0.2, between, 0.4, label="between classes")
    null_w = [consistency[t]["between"] + consistency[t]["null_mean"] for t in keys]
    err = [2 * consistency[t]["null_std"] for t in keys]
    ax1.errorbar(xs - 0.2, null_w, yerr=err, fmt="k_", capsize=4, label="within, shuffled classes (±2 sd)")
    for xi, t in zip(xs, keys):
        p_txt = _p_phrase(consistency[t]["p_permutation"], _floor(s))
        ax1.text(xi, max(within[xi], between[xi]) + 0.02, p_txt, ha="center", fontsize=7)
    ax1.set_xticks(xs, keys)
    ax1.set_xlabel("tap")
    ax1.set_ylabel("mean cosine similarity")
    ax1.set_ylim(0, 1.1)
    ax1.set_title("per-tap crossing profiles: within vs between classes", fontsize=9)
    ax1.legend(fontsize=7, loc="lower right")
    save_figure(fig, out / "diffusion_similarity.png", dpi=120, pad_inches=0.1)


def _plot_perturbations(out: Path, s: dict, stats: dict) -> None:
    """Clean vs perturbed."""
    from matplotlib.figure import Figure  # matplotlib only when drawing

    kinds = ["clean", *PERTURBATIONS]
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, label in (
        (axes[0], "large_crossings", "large crossings per image"),
        (axes[1], "total_mass", "total impulse mass per image"),
    ):
        ax.boxplot([stats[kd][key] for kd in kinds], showfliers=False)
        ax.set_xticks(
            range(1, len(kinds) + 1),
            [
                kd if kd == "clean" else f"{kd}\nAUROC {s['perturbations'][kd]['auroc_vs_clean'][key]:.2f}"
                for kd in kinds
            ],
        )
        ax.set_xlabel("input")
        ax.set_ylabel(label)
        ax.set_title(f"{label}: clean vs perturbed", fontsize=9)
    save_figure(fig, out / "diffusion_perturbations.png", dpi=120, pad_inches=0.1)
