"""The detector's tables (metrics, intervals, best pathway score beside the best baseline), ROC figures and
``detect.md``."""

from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_roc

from gencnp.detection.metrics import bootstrap, point
from gencnp.detection.scores import PATHWAY_SCORES
from gencnp.io.files import save_figure

__all__ = ["figures", "markdown", "tables"]

COMBINED = "pathway_combined"


def tables(
    scored: dict[str, dict[str, torch.Tensor]],
    info: dict[str, dict],
    pathway_names: list[str],
    baselines: list[str],
    samples: int,
    seed: int,
    progress: bool = False,
) -> dict:
    """Metrics of every method on every flagged set against the clean test images, with bootstrap intervals; per set
    the best pathway score (highest AUROC, the combination included) beside the best baseline and the paired
    interval of their AUROC difference."""
    clean = scored["clean"]
    pathway = [*pathway_names, COMBINED]
    sets = {}
    for i, (name, s) in enumerate((k, v) for k, v in scored.items() if k != "clean"):
        entry = dict(info[name])
        if len(next(iter(s.values()))) < 2:
            entry.update(metrics=None, note="fewer than 2 flagged inputs (no successful attack?): no metrics")
            sets[name] = entry
            continue
        metrics = {m: point(clean[m], s[m]) for m in [*pathway, *baselines]}
        best_p = max(pathway, key=lambda m: metrics[m]["auroc"])
        best_b = max(baselines, key=lambda m: metrics[m]["auroc"]) if baselines else None
        pairs = [(best_p, best_b)] if best_b else []
        cis, diffs = bootstrap({m: (clean[m], s[m]) for m in metrics}, samples, seed + i, pairs)
        for m in metrics:
            metrics[m]["ci"] = cis[m]
        entry.update(metrics=metrics, best_pathway=best_p, best_baseline=best_b)
        if best_b:
            entry["auroc_difference"] = {
                "value": metrics[best_p]["auroc"] - metrics[best_b]["auroc"],
                "ci": diffs[f"{best_p} - {best_b}"],
                "of": f"{best_p} - {best_b}",
            }
        sets[name] = entry
        if progress:
            print(
                f"  {name}: best pathway {best_p} {metrics[best_p]['auroc']:.3f}"
                + (f", best baseline {best_b} {metrics[best_b]['auroc']:.3f}" if best_b else "")
            )
    return {
        "sets": sets,
        "methods": {"pathway": pathway, "baselines": list(baselines)},
        "legend": {
            **PATHWAY_SCORES,
            "<score>@class": "(s - mu_ŷ) / sigma_ŷ, clean-validation mean and std of the predicted class",
            COMBINED: "logistic regression of the pathway scores, fitted on validation",
        },
    }


def figures(out: Path, scored: dict[str, dict[str, torch.Tensor]], result: dict) -> dict[str, str]:
    """One ROC figure per family (attacks, corruptions, OOD sets): per set, the best pathway score and the best
    baseline (torchmetrics ``binary_roc``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    families = {}
    for name, e in result["sets"].items():
        if e.get("metrics"):
            families.setdefault(e["family"] if e["family"] != "adaptive" else "attack", []).append(name)
    clean = scored["clean"]
    for family, names in families.items():
        cols = min(4, len(names))
        rows = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            e = result["sets"][name]
            for m, style in ((e["best_pathway"], "-"), (e["best_baseline"], "--")):
                if m is None:
                    continue
                s = torch.cat([clean[m], scored[name][m]]).double()
                t = torch.cat([torch.zeros(len(clean[m])), torch.ones(len(scored[name][m]))]).long()
                fpr, tpr, _ = binary_roc(s, t)
                ax.plot(fpr.numpy(), tpr.numpy(), style, label=f"{m} {e['metrics'][m]['auroc']:.3f}")
            ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("FPR (clean flagged)", fontsize=8)
            ax.set_ylabel("TPR", fontsize=8)
            ax.legend(fontsize=7, loc="lower right")
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        fig.tight_layout()
        files[family] = save_figure(fig, out / f"roc_{family}.png").name
    return files


def _fmt(m: dict | None, key: str = "auroc") -> str:
    if not m:
        return "-"
    lo, hi = m["ci"][key]
    return f"{m[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown(result: dict) -> str:
    """``detect.md``: the main comparison, the full AUROC table, settings."""
    st = result["setup"]
    lines = [
        "# Pathway detector vs pytorch-ood baselines",
        "",
        f"Generator `{st['generator']}`, bank `{st['bank']}` (tau {st['tau']}); {st['test_clean']} clean test images "
        f"(target accuracy {st['test_accuracy']:.4f}) are the negatives; positives are the attacked (successful "
        "attacks on correctly classified images only), corrupted or OOD inputs of each set. Higher score = more "
        f"anomalous. 95% intervals: {st['bootstrap_samples']} stratified bootstrap resamples. Signs and the "
        "combination were fitted on validation; the baselines on train images.",
        "",
        "## Best pathway score vs best baseline (AUROC, FPR at 95% TPR; [95% CI])",
        "",
        "| set | inputs flagged | best pathway score | AUROC | FPR95 | best baseline | AUROC | FPR95 | AUROC difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in result["sets"].items():
        if not e.get("metrics"):
            lines.append(f"| {name} | {e.get('flagged', 0)} | - | - | - | - | - | - | {e.get('note', '')} |")
            continue
        bp, bb = e["best_pathway"], e["best_baseline"]
        d = e.get("auroc_difference")
        diff = f"{d['value']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" if d else "-"
        lines.append(
            f"| {name} | {e['flagged']} | {bp} | {_fmt(e['metrics'][bp])} | {_fmt(e['metrics'][bp], 'fpr95')} | {bb} | "
            f"{_fmt(e['metrics'].get(bb))} | {_fmt(e['metrics'].get(bb), 'fpr95')} | {diff} |"
        )
    methods = [*result["methods"]["pathway"], *result["methods"]["baselines"]]
    for key, title in (("auroc", "AUROC"), ("fpr95", "FPR at 95% TPR (lower is better)"), ("aupr", "AUPR")):
        names = [n for n, e in result["sets"].items() if e.get("metrics")]
        lines += [
            "",
            f"## {title}, method x set",
            "",
            "| method | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for m in methods:
            row = [f"{result['sets'][n]['metrics'][m][key]:.3f}" for n in names]
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        if result["methods"]["baselines"]:  # the best baseline beside every pathway row
            pick = min if key == "fpr95" else max
            best = [pick(result["sets"][n]["metrics"][b][key] for b in result["methods"]["baselines"]) for n in names]
            lines.append("| **best baseline** | " + " | ".join(f"{v:.3f}" for v in best) + " |")
    lines += ["", "## Scores", ""] + [f"- `{k}`: {v}" for k, v in result["legend"].items()]
    lines += [
        "",
        f"Signs set on validation: {st['signs']}",
        "",
        f"Combination weights (standardised): {st['combination_weights']}",
        "",
        f"Baselines (pytorch-ood): {st['baselines']}",
        "",
    ]
    return "\n".join(lines)
