"""``report.md`` and the summary printed on screen, from the content of ``report.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gencnp.pathways.metrics import KEYS

__all__ = ["TABLE_KEYS", "fmt", "markdown", "null_keys", "screen"]

TABLE_KEYS = [k for k in KEYS if k != "target_accuracy"]  # every per-method metric key (section 8)


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def null_keys(e: dict) -> list[str]:
    return [k for k in e if k.startswith("null_forcing/")]


def _rows(entries: dict[str, dict | None], label: str) -> list[str]:
    first = next((e for e in entries.values() if e), {})
    keys = TABLE_KEYS + null_keys(first)
    head = ["method", "n", *keys, "s/image"]
    lines = [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}"]
    for name, e in entries.items():
        if e is None:
            continue
        cells = [f"**{name}**" if name == "gencnp" else name, str(e["n"])] + [fmt(e.get(k)) for k in keys]
        cells.append(fmt(e.get("seconds_per_image"), 5))
        lines.append(f"| {' | '.join(cells)} |")
    return lines


def _sentence(name: str, setting: str, e: dict) -> tuple[str, list[str]]:
    vs = e.get("vs_gencnp") or {}
    wins, losses, ties = [], [], []
    for key, c in vs.items():
        txt = f"{key} {fmt(c['diff'])} [{fmt(c['ci95'][0])}, {fmt(c['ci95'][1])}]"
        {"gencnp": wins, "method": losses, "tie": ties}[c["winner"]].append(txt)
    parts = [f"**{name}** ({setting}, {e['n']} images) vs GEN-CNP (difference {name} minus GEN-CNP, 95% CI):"]
    if wins:
        parts.append(f"GEN-CNP wins on {'; '.join(wins)}.")
    if losses:
        parts.append(f"GEN-CNP loses on {'; '.join(losses)}.")
    if ties:
        parts.append(f"No significant difference on {'; '.join(ties)}.")
    return " ".join(parts), [f"{name} ({setting}): {t}" for t in losses]


def markdown(r: dict) -> str:
    """``report.md`` of a report (the content of ``report.json``)."""
    return "\n".join(_overview(r) + _comparisons(r) + _null_section(r) + _subset_and_figures(r))


def _overview(r: dict) -> list[str]:
    """Markdown: provenance, methods and settings, the tables at matched and native sparsity, transfer."""
    p = r["provenance"]
    L: list[str] = ["# GEN-CNP evaluation report", ""]
    L += ["## Provenance", "", "| item | value |", "|---|---|"]
    commit = p["git_commit"]
    items = [
        ("target", f"{p['target']['arch']} from `{p['target']['checkpoint']}`"),
        ("target hash", f"`{p['target_hash'][:16]}…`"),
        ("generator", f"`{p['generator']}`"),
        ("bank", f"`{p['bank']}` ({p['bank_samples']} {p['bank_split']} samples)"),
        ("dataset / split", f"{p['dataset']} / {p['split']} ({p['n']} images)"),
        ("class source", p["class_source"]),
        ("ablation", p["ablation"]),
        ("taps", ", ".join(f"{k} [{v}]" for k, v in p["taps"].items())),
        ("tau", fmt(p["tau"])),
        ("seed", p["seed"]),
        ("git commit", f"{commit['commit']}{' (dirty)' if commit['dirty'] else ''}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in p["versions"].items())),
        ("device / threads", f"{p['device']} / {p['threads']}"),
        (
            "total time",
            f"{r['seconds_total']:.0f} s ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds_by_phase"].items())
            + ")",
        ),
    ]
    L += [f"| {k} | {v} |" for k, v in items]
    if r.get("cost"):
        L += ["", "## Cost", "", "```", *cost_lines(r["cost"]), "```"]
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
    L += [
        "",
        "`seconds_per_image`: wall time to produce the pathway and its masked prediction (controls excluded), "
        "measured in this run, same process and device for every method.",
        "",
    ]
    L += ["## Matched sparsity (GEN-CNP's per-sample and per-tap kept counts)", ""]
    L += _rows(r["methods"], "matched")
    L += ["", "neuron_intgrad and dgr cover the seeded subset (see below); the others every image.", ""]
    L += ["## Native settings", ""]
    L += _rows(r["methods_native"], "native")
    if r["transfer"]:
        L += ["", f"## Transfer (class pathways of the bank, tau = {fmt(r['transfer']['tau'])})", ""]
        L += _rows({"gencnp": r["methods"]["gencnp"], "transfer": r["transfer"]}, "transfer")
    return L


def _comparisons(r: dict) -> list[str]:
    """Markdown: the comparisons with GEN-CNP as a table and in words, and where GEN-CNP loses."""
    L = [
        "",
        f"## Comparisons with GEN-CNP (paired bootstrap, {r['bootstrap']['samples']} resamples)",
        "",
        "Each cell: mean difference (method minus GEN-CNP, same images) [95% CI] and the winner; `tie` when the "
        "interval contains 0. Better is higher for agreement, lower for every other key. Forcing and necessity "
        "compare fairly only at similar agreement: a pathway that often loses the class (e.g. random) trivially forces it less.",
        "",
    ]
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
                cells.append(f"{c['diff']:+.3f} [{fmt(c['ci95'][0])}, {fmt(c['ci95'][1])}] {win}")
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
    return L


def _subset_and_figures(r: dict) -> list[str]:
    """Markdown: the common subset, kept fraction per tap, figures and the metric keys."""
    sub = r["subset"]
    L = ["", f"## Common subset ({sub['images']})", "", "Every method on the same images (matched sparsity):", ""]
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
                L.append(f"| {name} | {setting} | " + " | ".join(fmt(e.get(f"kept/{t}")) for t in taps) + " |")
    L += ["", "## Figures", ""]
    captions = {
        "agreement_vs_kept": "Agreement vs kept fraction on the subset (GEN-CNP: threshold sweep on generator scores; "
        "baselines: global kept percentiles; star: transfer), and the swap and zero forcing controls of every entry.",
        "kept_hist": "Kept-fraction histograms per method (native settings; matched methods share GEN-CNP's counts).",
        "bank_heatmap": "Selection frequencies of the bank, class by channel (tap boundaries marked).",
        "attribution_grid": "Pathway gradient and Grad-CAM: unmasked target vs GEN-CNP pathway vs class pathway.",
        "null_forcing": "Null forcing per family and method (bars) against the family's chance level (the unmasked "
        "target's rate of the same class on the same inputs, black tick).",
    }
    for k, f in r["figures"].items():
        L += [f"### {k}", "", captions.get(k, ""), "", f"![{k}]({f})", ""]
    L += [
        "## Metric keys",
        "",
        "Keys of docs/design.md section 8: agreement (masked argmax = class source), masked_accuracy, mDC "
        "(100·mean max(0, Y−O)/Y), mIC, kept_mean/std, kept_class_std, acIOU / between_class_iou (pathway Jaccard within / "
        "between classes), necessity (agreement of the complement), swap_forcing (another class's probe image through the "
        "pathway gives the pathway's class), zero_forcing (all-zero image through the pathway gives its class), "
        "null_forcing/<family> (the null input of that family paired with an image, through the image's pathway, gives "
        "its class; gencnp.pathways.nulls) beside null_chance/<family> (the unmasked target gives that class on the same inputs).",
        "",
    ]
    return L


def _null_section(r: dict) -> list[str]:
    """Markdown: the class-lookup comparison, same-class transfer and null forcing against chance."""
    return _lookup_section(r) + _null_forcing_section(r)


def _lookup_section(r: dict) -> list[str]:
    """Markdown: GEN-CNP against the class lookup (at and below its counts) and same-class transfer."""
    L: list[str] = []
    gen = r["methods"]["gencnp"]
    look = r["methods"].get("class_lookup")
    if look:
        L += [
            "",
            "## GEN-CNP against the class lookup (same per-sample, per-tap counts)",
            "",
            "The class lookup keeps, in every tap, GEN-CNP's own number of channels, ranked by the bank's selection "
            "frequency f_c of the predicted class: no per-input information. A per-input explainer is only worth its "
            "generator where it beats this lookup.",
            "",
            "| key | GEN-CNP | class lookup | lookup minus GEN-CNP [95% CI] | winner |",
            "|---|---|---|---|---|",
        ]
        for key, c in (look.get("vs_gencnp") or {}).items():
            win = {"gencnp": "GEN-CNP", "method": "class lookup", "tie": "tie"}[c["winner"]]
            L.append(
                f"| {key} | {fmt(gen.get(key))} | {fmt(look.get(key))} | {c['diff']:+.4f} "
                f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | {win} |"
            )
    lf = r.get("lookup_frontier") or []
    if lf:
        L += [
            "",
            "### Below GEN-CNP's counts",
            "",
            "Both rankings at shares of GEN-CNP's own per-sample, per-tap counts: GEN-CNP keeps its highest generator "
            "scores, the lookup its class's highest f_c (all images of the split).",
            "",
            "| share of counts | kept | GEN-CNP agreement | lookup agreement | GEN-CNP minus lookup [95% CI] |",
            "|---|---|---|---|---|",
        ]
        for e in lf:
            L.append(
                f"| {e['fraction']:g} | {fmt(e['kept_mean'])} | {fmt(e['gencnp_agreement'])} | "
                f"{fmt(e['lookup_agreement'])} | {e['gencnp_minus_lookup']:+.4f} [{e['ci95'][0]:+.4f}, {e['ci95'][1]:+.4f}] |"
            )
    sc = r.get("same_class_transfer") or {}
    if sc:
        L += [
            "",
            f"## Same-class transfer ({r['subset']['images']})",
            "",
            "Each image's pathway applied to the next image of the same predicted class. A pathway that explains its "
            "own input keeps the class less often on another image than on its own; one that encodes the class keeps "
            "it as often.",
            "",
            "| method | images | own agreement | same-class transfer | difference |",
            "|---|---|---|---|---|",
        ]
        for label, e in sc.items():
            own, other = e["agreement"], e["same_class_transfer"]
            diff = None if own is None or other is None else own - other  # None: no same-class pair in the subset
            L.append(f"| {label} | {e['n']} | {fmt(own)} | {fmt(other)} | {fmt(diff)} |")
    return L


def _null_forcing_section(r: dict) -> list[str]:
    """Markdown: null forcing against chance, per family, for every method."""
    L: list[str] = []
    gen = r["methods"]["gencnp"]
    fams = [k.split("/", 1)[1] for k in null_keys(gen)]
    if fams:
        L += [
            "",
            "## Null inputs: forcing against chance",
            "",
            "Per family (gencnp.pathways.nulls), the share of images whose pathway turns the paired null input into the "
            "image's class, beside the chance level (the unmasked target gives that class on the same null inputs). "
            f"Families used in GEN-CNP's training: {', '.join(r['provenance'].get('null_train') or []) or 'none'}.",
            "",
            "| method | setting | " + " | ".join(f"{f} (chance)" for f in fams) + " |",
            "|---|---|" + "---|" * len(fams),
        ]
        for setting, entries in (
            ("matched", r["methods"]),
            ("native", r["methods_native"]),
            ("class", {"transfer": r["transfer"]}),
        ):
            for name, e in entries.items():
                if not e or (setting == "native" and name == "gencnp"):
                    continue
                L.append(
                    f"| {name} | {setting} | "
                    + " | ".join(f"{fmt(e.get(f'null_forcing/{f}'))} ({fmt(e.get(f'null_chance/{f}'))})" for f in fams)
                    + " |"
                )
    return L


def screen(r: dict, out: Path) -> str:
    """The summary printed at the end of a report: one line per entry."""
    keys = ["agreement", "kept_mean", "swap_forcing", "zero_forcing", "necessity", "mDC", "acIOU"]
    keys += null_keys(r["methods"]["gencnp"])
    lines = [
        f"GEN-CNP report ({r['provenance']['n']} {r['provenance']['split']} images, "
        f"{r['seconds_total']:.0f} s) -> {out}/report.md",
        f"{'method':<16}{'setting':<9}{'n':>6} "
        + " ".join(f"{k.replace('null_forcing/', 'null:')[:9]:>9}" for k in keys)
        + f" {'s/img':>9}",
    ]
    rows = [(m, "matched", e) for m, e in r["methods"].items()]
    rows += [(m, "native", e) for m, e in r["methods_native"].items() if m != "gencnp"]
    if r["transfer"]:
        rows.append(("transfer", "class", r["transfer"]))
    for m, s, e in rows:
        lines.append(
            f"{m:<16}{s:<9}{e['n']:>6} "
            + " ".join(f"{fmt(e.get(k)):>9}" for k in keys)
            + f" {fmt(e['seconds_per_image'], 5):>9}"
        )
    gen = r["methods"]["gencnp"]
    chance = [f"{k.split('/', 1)[1]} {fmt(gen.get(k))}" for k in gen if k.startswith("null_chance/")]
    if chance:
        lines.append(f"null chance (unmasked target gives the class on the same null inputs): {', '.join(chance)}")
    lines += cost_lines(r.get("cost"))
    return "\n".join(lines)


def cost_lines(cost: dict | None) -> list[str]:
    """The pass budget beside the measured time: one line per phase."""
    if not cost:
        return []
    out = [
        f"cost: {cost['passes_per_image_all']:.1f} target passes per image on the whole split, "
        f"{cost['passes_per_image_subset']:.1f} more per subset image ({cost['passes_per_image_mean']:.1f} per image "
        f"on average; {cost['dgr_passes_per_subset_image']:.1f} of them DGR's per subset image, "
        f"{cost['passes_per_image_mean_without_dgr']:.1f} per image on average without DGR; backward passes not counted)"
    ]
    for name, p in cost["phases"].items():
        out.append(f"  {name:<28}{p['seconds']:>8.1f} s  {p['passes_per_image']:>7.1f} passes/image ({p['images']})")
    return out
