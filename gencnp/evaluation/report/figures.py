"""The report's figures: agreement vs kept with the forcing controls, kept-fraction histograms, null forcing, the
bank's heatmap and the attribution grid."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from gencnp.evaluation.report.classes import shown_classes
from gencnp.evaluation.report.markdown import null_keys
from gencnp.evaluation.report.passes import BASELINES
from gencnp.io.files import save_figure
from gencnp.pathways.gradients import grad_cam, pathway_gradient

__all__ = ["plot_attribution", "plot_bank", "plot_curves", "plot_kept_hist", "plot_null", "GRID_CLASSES"]
GRID_CLASSES = 12  # predicted classes (rows) of the attribution grid at most


def plot_null(path: Path, r: dict) -> str:
    """Null forcing per family (one panel each): a bar per method, the family's chance level as a tick."""
    from matplotlib.figure import Figure  # matplotlib only when drawing

    gen = r["methods"]["gencnp"]
    fams = [k.split("/", 1)[1] for k in null_keys(gen)]
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
    fig.suptitle(
        f"Null-input forcing ({r['provenance']['split']} split; black tick: chance, the unmasked target on the "
        "same inputs)",
        fontsize=10,
    )
    save_figure(fig, path, dpi=110)
    return str(path)


COLORS = {
    "gencnp": "C0",
    "random": "C7",
    "neuron_mct": "C1",
    "neuron_intgrad": "C2",
    "dgr": "C3",
    "transfer": "C4",
    "class_lookup": "C5",
}


def plot_curves(path: Path, r: dict) -> str:
    """Left: agreement vs kept on the subset (curves and native points). Right: the forcing controls of every entry.

    The right panel is a bar chart, not a scatter over kept: matched entries share GEN-CNP's kept counts, so as
    points they would sit on one another.
    """
    from matplotlib.figure import Figure  # matplotlib only when drawing

    bars = _control_bars(r)
    fig = Figure(figsize=(14, max(5.6, 0.42 * len(bars) + 1.6)), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.15, 1]})
    _agreement_panel(ax, r)
    _controls_panel(ax2, bars, r["provenance"]["split"])
    save_figure(fig, path, dpi=110)
    return str(path)


def _control_bars(r: dict) -> list[tuple[str, dict, str]]:
    """``(label, entry, colour)`` of every entry with forcing controls: matched, native, the class pathways."""
    groups = [("matched", r["methods"]), ("native", r["methods_native"])]
    groups += [("class pathway", {"transfer": r["transfer"]})] if r["transfer"] else []
    bars = []
    for setting, entries in groups:
        for m, e in entries.items():
            if e is None or (setting == "native" and m == "gencnp") or e.get("swap_forcing") is None:
                continue
            name = (
                "GEN-CNP" if m == "gencnp" else ("transfer (class pathways)" if m == "transfer" else f"{m} ({setting})")
            )
            bars.append((f"{name}\nkept {e['kept_mean']:.2f}, n={e['n']}", e, COLORS[m]))
    return bars


def _agreement_panel(ax, r: dict) -> None:
    """Agreement against kept fraction on the subset: each method's curve, DGR's native point, transfer's point."""
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
        main = m == "gencnp"
        xs, ys = [q["kept_mean"] for q in ps], [q["agreement"] for q in ps]
        ax.plot(xs, ys, "o-", color=COLORS[m], label=label, lw=2.2 if main else 1.4, zorder=3 if main else 2)
    sub = r["subset"]
    dgr = (sub.get("methods_native") or {}).get("dgr")
    points = [(dgr, "dgr", "D", 9, "dgr native (gates > 0)"), (sub.get("transfer"), "transfer", "*", 17, None)]
    for e, m, marker, size, label in points:
        if e:
            label = label or "transfer (class pathways)"
            ax.plot(e["kept_mean"], e["agreement"], marker, color=COLORS[m], ms=size, mec="k", label=label, zorder=5)
    ax.set_xlabel("kept fraction of the D tap channels")
    ax.set_ylabel("agreement (masked argmax = class source)")
    ax.set_title(f"Agreement vs kept ({sub['images']})", fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    for line in ax.get_lines():
        line.set_clip_on(False)


def _controls_panel(ax2, bars: list[tuple[str, dict, str]], split: str) -> None:
    """Swap and zero forcing of every entry as paired horizontal bars."""
    y = np.arange(len(bars))
    h = 0.38
    swap = [b[1]["swap_forcing"] for b in bars]
    zero = [b[1].get("zero_forcing") for b in bars]
    cols = [b[2] for b in bars]
    ax2.barh(y - h / 2, swap, h, color=cols, label="swap forcing (another class's image)")
    zeros = [z if z is not None else 0 for z in zero]
    ax2.barh(y + h / 2, zeros, h, color=cols, alpha=0.45, hatch="//", label="zero forcing (all-zero image)")
    for yi, s, z in zip(y, swap, zero):
        ax2.text(min(s, 0.9) + 0.01, yi - h / 2, f"{s:.2f}", va="center", fontsize=7)
        if z is not None:
            ax2.text(min(z, 0.9) + 0.01, yi + h / 2, f"{z:.2f}", va="center", fontsize=7)
    ax2.set_yticks(y, [b[0] for b in bars], fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("share of images whose pathway still gives its class (lower = more input-dependent)")
    ax2.set_title(f"Input-dependence controls ({split} split; n images per bar)", fontsize=10)
    ax2.grid(alpha=0.3, axis="x")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)


def plot_kept_hist(path: Path, res: dict, keep_fraction: float) -> str:
    """Kept fraction per image: GEN-CNP, every baseline at its native setting and transfer."""
    from matplotlib.figure import Figure  # matplotlib only when drawing

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


def plot_bank(path: Path, bank) -> str:
    """The bank's selection frequencies ``f_c``, class by channel, taps marked and tau on the colour bar."""
    from matplotlib.figure import Figure  # matplotlib only when drawing

    freq = bank.frequencies().numpy()
    d = freq.shape[1]
    kept = bank.class_pathways().double().mean(1).numpy()
    rows, note = shown_classes(kept, "class-pathway kept fraction")
    freq = freq[rows]
    fig = Figure(figsize=(min(20.0, max(8.0, d / 24)), max(3.5, 0.4 * len(rows) + 2)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(freq, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    names, n = bank.class_names, bank.n.tolist()
    ax.set_yticks(
        range(len(rows)), [f"{names[c]} (n={int(n[c])}, kept {100 * kept[c]:.0f}%)" for c in rows], fontsize=8
    )
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
        f"Pathway bank: selection frequency f_c, {bank.split} split, {int(bank.n.sum())} samples, tau = {bank.tau:g}"
        + (f"\n{note} (all classes: report per_class table)" if note else ""),
        fontsize=10,
    )
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.01)
    cb.set_label("selection frequency f_c[j] (red: tau)")  # class pathway: f_c >= tau
    cb.ax.axhline(bank.tau, color="red", lw=1.5)
    save_figure(fig, path, dpi=110)
    return str(path)


def plot_attribution(
    path: Path,
    model,
    dataset,
    y_hat: torch.Tensor,
    labels: torch.Tensor,
    pathways: torch.Tensor,
    class_paths: torch.Tensor | None,
    class_names: list[str],
    per_class: int,
    fills,
    dev,
) -> str:
    """Per predicted class ``per_class`` images: pathway gradient and Grad-CAM of the unmasked target, through
    GEN-CNP's pathway and through the class pathway (with a bank). Returns ``''`` when no image was picked."""
    from matplotlib.figure import Figure

    picks = []
    predicted = torch.bincount(y_hat.long(), minlength=len(class_names)).double()
    shown, note = shown_classes(predicted.masked_fill(predicted == 0, float("nan")), "test predictions", GRID_CLASSES)
    for c in sorted(shown):
        picks += torch.nonzero(y_hat == c)[:per_class, 0].tolist()
    if not picks:
        return ""
    x = torch.stack([dataset[i][0] for i in picks]).to(dev)
    yh = y_hat[picks].to(dev)
    variants = [("unmasked", None), ("GEN-CNP pathway", pathways[picks].to(dev))]
    if class_paths is not None:
        variants.append(("class pathway", class_paths[yh]))
    g, cmap_ = _attribution_maps(model.target, x, yh, [p for _, p in variants], fills)
    nv = len(variants)
    block = 1 + 2 * nv  # input, gradients, Grad-CAMs of one sample
    classes = sorted({int(c) for c in yh.tolist()})
    fig = Figure(figsize=(1.25 * block * per_class + 1.0, 1.35 * len(classes) + 2.2), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(classes), block * per_class))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    _fill_grid(axes, x.cpu(), yh, labels, picks, classes, class_names, g, cmap_, block, nv)
    short = {"unmasked": "unmasked", "GEN-CNP pathway": "GEN-CNP", "class pathway": "class path"}
    for s in range(per_class):
        axes[0, s * block].set_title("input", fontsize=8)
        for v, (name, _) in enumerate(variants):
            axes[0, s * block + 1 + v].set_title(f"grad\n{short[name]}", fontsize=8)
            axes[0, s * block + 1 + nv + v].set_title(f"Grad-CAM\n{short[name]}", fontsize=8)
    _colour_bars(fig, axes)
    fig.suptitle(
        f"Attribution through pathways: {per_class} test image(s) per predicted class (row); unmasked target vs "
        "GEN-CNP pathway vs class pathway" + (f"\nclasses shown: {note}" if note else ""),
        fontsize=10,
    )
    save_figure(fig, path, dpi=100)
    return str(path)


def _attribution_maps(target, x: torch.Tensor, yh: torch.Tensor, pathways: list, fills) -> tuple:
    """Pathway gradients and Grad-CAMs ``[N, V, H, W]`` per variant (``None``: the unmasked target), each sample's
    maps scaled to a shared maximum of 1."""
    grads, cams = [], []
    for p in pathways:
        grads.append(pathway_gradient(target, x, p, yh, fill=fills if p is not None else None).cpu())
        cams.append(grad_cam(target, x, p, yh, fill=fills if p is not None else None).cpu())
    g = torch.stack(grads, 1)
    g = g / g.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None, None]
    c = torch.stack(cams, 1)
    return g, c / c.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]


def _fill_grid(axes, img, yh, labels, picks, classes, class_names, g, cmap_, block: int, nv: int) -> None:
    """Each picked sample's input, gradients and Grad-CAMs in its predicted class's row."""
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


def _colour_bars(fig, axes) -> None:
    """The two colour bars under the grid."""
    from matplotlib import cm  # matplotlib only when drawing
    from matplotlib import colors as mcolors

    # The colour bar added last sits nearest the grid: gradients (the left columns) there, Grad-CAM below.
    fig.colorbar(
        cm.ScalarMappable(mcolors.Normalize(0, 1), "inferno"),
        ax=axes,
        location="bottom",
        shrink=0.4,
        aspect=40,
        label="Grad-CAM of H(x; m) at the last tap (each sample's maps share one scale)",
    )
    fig.colorbar(
        cm.ScalarMappable(mcolors.Normalize(-1, 1), "RdBu_r"),
        ax=axes,
        location="bottom",
        shrink=0.4,
        aspect=40,
        label="pathway gradient dS(y)/dx, signed (each sample's maps share one scale)",
    )
