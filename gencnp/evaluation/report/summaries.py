"""Summaries of the report: paired bootstrap intervals, the comparisons with GEN-CNP, the entries of every method
and setting, the lookup frontier's rows and same-class transfer."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from gencnp.evaluation.report.evaluator import Evaluator
from gencnp.evaluation.report.results import Results
from gencnp.pathways.metrics import null_families_of

__all__ = [
    "BETTER",
    "CI_KEYS",
    "Entries",
    "ci_keys",
    "compare",
    "frontier_rows",
    "paired_bootstrap",
    "same_class_partners",
    "same_class_transfer",
]

# Key comparisons: report key -> per-sample value of gencnp.pathways.metrics.per_sample, and which direction is better.
CI_KEYS = {
    "agreement": "agree",
    "kept_mean": "kept",
    "swap_forcing": "swap_forced",
    "zero_forcing": "zero_forced",
    "necessity": "necessity",
    "mDC": "dc",
}
BETTER = {
    "agreement": "higher",
    "kept_mean": "lower",
    "swap_forcing": "lower",
    "zero_forcing": "lower",
    "necessity": "lower",
    "mDC": "lower",
}


# ----- paired bootstrap -----
def paired_bootstrap(
    diffs: torch.Tensor, n_boot: int = 1000, seed: int = 0, chunk: int = 100, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def compare(entries: dict[str, tuple[Results, Results]], n_boot: int, seed: int, progress: bool) -> dict[str, dict]:
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


# ----- report entries -----
class Entries:
    """The report entries of every method and setting (summary, settings, ``vs_gencnp``), on all images or on the
    subset at ``subset_pos``. Comparisons on all images use bootstrap seed ``seed``, those on the subset ``seed + 1``.
    """

    def __init__(
        self,
        res: dict[tuple[str, str], Results],
        subset_pos: torch.Tensor,
        sub_images: str,
        taps: Sequence[str],
        chans: Sequence[int],
        settings: dict,
        n_boot: int,
        seed: int,
        progress: bool,
    ):
        self.res, self.subset_pos, self.sub_images = res, subset_pos, sub_images
        self.taps, self.chans, self.settings = taps, chans, settings
        self.gen = res["gencnp", "matched"]
        self.n_all, self.n_sub = self.gen.n, len(subset_pos)
        self.gen_sub = self.gen.at(subset_pos, sub_images)
        full_pairs, sub_pairs = {}, {}
        for (m, s), r in res.items():
            if m == "gencnp":
                continue
            label = f"{m}/{s}"
            if m == "class_lookup":
                label = f"{m}/matched"
            if r.n == self.n_all:
                full_pairs[label] = (r, self.gen)
                sub_pairs[f"subset:{label}"] = (r.at(subset_pos, sub_images), self.gen_sub)
            else:
                sub_pairs[f"subset:{label}"] = (r, self.gen_sub)
        self.cmp_full = compare(full_pairs, n_boot, seed, progress)
        self.cmp_sub = compare(sub_pairs, n_boot, seed + 1, progress)

    def block(self, m: str, s: str, on_subset: bool) -> dict[str, Any]:
        """The entry of method ``m`` at setting ``s``."""
        r = self.res[m, s]
        if m == "gencnp":
            r = self.gen_sub if on_subset else self.gen
            return {**r.summary(self.taps, self.chans), "settings": self.settings["gencnp"]}
        if on_subset:
            r = r if r.n == self.n_sub and r.n != self.n_all else r.at(self.subset_pos, self.sub_images)
            vs = self.cmp_sub.get(f"subset:{m}/{s}", {})
        else:
            vs = self.cmp_full.get(f"{m}/{s}") or self.cmp_sub.get(f"subset:{m}/{s}", {})
        return {**r.summary(self.taps, self.chans), "settings": self.settings[m][s], "vs_gencnp": vs}


# ----- lookup frontier -----
def frontier_rows(hits: dict[float, list[torch.Tensor]], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """GEN-CNP's score ranking against the class lookup at shares of GEN-CNP's own per-tap counts.

    For each share ``f`` both keep ``round(f * count)`` channels per tap and sample: GEN-CNP its highest generator
    scores, the lookup its class's highest ``f_c``. Returns per share the kept fraction, both agreements and the
    paired 95% interval of GEN-CNP minus lookup.
    """
    rows = []
    for f, parts in hits.items():
        h = torch.cat(parts)
        mean, lo, hi = paired_bootstrap((h[:, 0] - h[:, 1])[:, None], n_boot, seed)
        rows.append(
            {
                "fraction": f,
                "n": len(h),
                "kept_mean": float(h[:, 2].mean()),
                "gencnp_agreement": float(h[:, 0].mean()),
                "lookup_agreement": float(h[:, 1].mean()),
                "gencnp_minus_lookup": float(mean[0]),
                "ci95": [float(lo[0]), float(hi[0])],
            }
        )
    return rows


# ----- same-class transfer -----
def same_class_partners(classes: torch.Tensor) -> torch.Tensor:
    """For each sample, the next sample (cyclically, in order) of the same class; -1 when it is its class's only one."""
    partner = torch.full_like(classes, -1)
    for c in torch.unique(classes):
        idx = torch.nonzero(classes == c)[:, 0]
        if len(idx) > 1:
            partner[idx] = torch.roll(idx, -1)
    return partner


@torch.no_grad()
def same_class_transfer(
    ev: Evaluator,
    res: dict[tuple[str, str], Results],
    subset_pos: torch.Tensor,
    x_sub: torch.Tensor,
    y_sub: torch.Tensor,
    batch_size: int,
) -> dict[str, dict]:
    """Input specificity: each subset image's pathway applied to the next subset image of the same predicted class.

    A pathway that explains its own input should keep the class less often on another image of the class than on
    its own image; one that encodes the class keeps it as often. Returns, per method and setting, ``n`` (images
    with a same-class partner), ``same_class_transfer`` (share of partners given the class) and ``agreement``
    (own agreement on the same images).
    """
    partner = same_class_partners(y_sub)
    valid = partner >= 0
    entries = [("gencnp/matched", res["gencnp", "matched"])]
    entries += [(f"{m}/{s}", r) for (m, s), r in res.items() if m != "gencnp"]
    out = {}
    for label, r in entries:
        ra = r.at(subset_pos, "")
        hits = torch.zeros(len(y_sub), dtype=torch.bool)
        for start in range(0, len(y_sub), batch_size):
            sl = slice(start, start + batch_size)
            j = partner[sl].clamp_min(0)
            hits[sl] = ev.keeps_class(x_sub[j].to(ev.dev), ra.pathways[sl].to(ev.dev), y_sub[sl].to(ev.dev)).cpu()
        n = int(valid.sum())
        out[label] = {
            "n": n,
            "same_class_transfer": float(hits[valid].double().mean()) if n else float("nan"),
            "agreement": float(ra.vals["agree"][valid].double().mean()) if n else float("nan"),
        }
    return out
