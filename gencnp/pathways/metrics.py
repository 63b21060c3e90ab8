"""Pathway metrics (docs/design.md section 8): pure per-sample functions plus one torchmetrics ``Metric``.

``c = y_hat(x)``, ``Y = p_c``, ``O = p^m_c``, computed from float64 log-probabilities. Per-sample values are
kept as ``cat`` states and reduced order-independently, so results are exact across processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["per_sample", "class_iou", "summarize", "PathwayMetrics", "KEYS", "null_families_of"]

KEYS = [
    "agreement",
    "masked_accuracy",
    "target_accuracy",
    "mDC",
    "mIC",
    "kept_mean",
    "kept_std",
    "kept_class_std",
    "acIOU",
    "between_class_iou",
    "necessity",
    "swap_forcing",
    "zero_forcing",
]
PER_SAMPLE = [
    "agree",
    "masked_correct",
    "target_correct",
    "dc",
    "ic",
    "kept",
    "swap_forced",
    "zero_forced",
    "necessity",
]


def per_sample(
    logits: torch.Tensor,
    masked_logits: torch.Tensor,
    y_hat: torch.Tensor,
    pathways: torch.Tensor,
    labels: torch.Tensor | None = None,
    swap_logits: torch.Tensor | None = None,
    zero_logits: torch.Tensor | None = None,
    necessity_logits: torch.Tensor | None = None,
    swap_valid: torch.Tensor | None = None,
    null_logits: dict[str, torch.Tensor] | None = None,
    null_chance_logits: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample float64 values ``[B]`` (NaN where a control was not run).

    Args:
        logits, masked_logits: ``[B, K]`` of ``H(x)`` and ``H(x; m)``.
        y_hat: ``[B]`` the class source (prediction by default).
        pathways: ``[B, D]`` binary masks.
        swap_logits: ``[B, K]`` another-class image through sample i's pathway; forced when it gives ``y_hat_i``.
        zero_logits: ``[B, K]`` the all-zero image through sample i's pathway.
        necessity_logits: ``[B, K]`` ``x`` through the complement ``1 - m``.
        null_logits: per null family (``gencnp.pathways.nulls``), ``[B, K]`` logits of the null input paired with sample i
            through sample i's pathway; forced when it gives ``y_hat_i`` (``null_forced/<family>``).
        null_chance_logits: per family, the unmasked target's logits on the same null inputs; its rate of
            ``y_hat_i`` is the family's chance level (``null_chance/<family>``).
    """
    b = logits.shape[0]
    nan = torch.full((b,), float("nan"), dtype=torch.float64, device=logits.device)
    lp = F.log_softmax(logits.detach().double(), dim=1)
    lq = F.log_softmax(masked_logits.detach().double(), dim=1)
    ly = lp.gather(1, y_hat[:, None])[:, 0]
    lo = lq.gather(1, y_hat[:, None])[:, 0]
    y, o = ly.exp(), lo.exp()
    out = {
        "agree": (lq.argmax(1) == y_hat).double(),
        "masked_correct": (lq.argmax(1) == labels).double() if labels is not None else nan,
        "target_correct": (lp.argmax(1) == labels).double() if labels is not None else nan,
        "dc": 100.0 * torch.clamp(1.0 - torch.exp(lo - ly), min=0.0),  # max(0, Y-O)/Y
        "ic": 100.0 * (o > y + 1e-6).double(),
        "kept": pathways.detach().double().mean(dim=1),
        "swap_forced": (swap_logits.detach().argmax(1) == y_hat).double() if swap_logits is not None else nan,
        "zero_forced": (zero_logits.detach().argmax(1) == y_hat).double() if zero_logits is not None else nan,
        "necessity": (necessity_logits.detach().argmax(1) == y_hat).double() if necessity_logits is not None else nan,
    }
    if swap_logits is not None and swap_valid is not None:
        out["swap_forced"] = torch.where(swap_valid, out["swap_forced"], nan)
    for fam, z in (null_logits or {}).items():
        out[f"null_forced/{fam}"] = (z.detach().argmax(1) == y_hat).double()
    for fam, z in (null_chance_logits or {}).items():
        out[f"null_chance/{fam}"] = (z.detach().argmax(1) == y_hat).double()
    return out


def null_families_of(values: dict[str, torch.Tensor]) -> list[str]:
    """Null families present in per-sample ``values`` (keys ``null_forced/<family>``), in insertion order."""
    return [k.split("/", 1)[1] for k in values if k.startswith("null_forced/")]


def _canonical(pathways: np.ndarray) -> np.ndarray:
    """Rows sorted lexicographically: sums over pairs then do not depend on sample order."""
    packed = np.packbits(pathways, axis=1)
    return pathways[np.lexsort(packed.T[::-1])] if len(pathways) > 1 else pathways


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Jaccard ``[n_a, n_b]`` of binary rows; two empty pathways count 0."""
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def _jaccard_sum(a: torch.Tensor, b: torch.Tensor, block: int = 1 << 22) -> float:
    """``sum_ij J(a_i, b_j)`` over all row pairs of float32 0/1 rows ``a [n_a, D]``, ``b [n_b, D]``; empty pairs count 0.

    Intersections and unions are integers below ``2^24``, so the float32 product and sums are exact; each ratio is
    rounded once (float32) and the ratios are summed in float64. Rows of ``a`` go in chunks of about ``block``
    pairs, so memory stays bounded for any class size.
    """
    sb = b.sum(1)[None, :]
    rows = max(1, block // max(1, b.shape[0]))
    total = 0.0
    for start in range(0, a.shape[0], rows):
        ai = a[start : start + rows]
        inter = ai @ b.T
        union = (ai.sum(1)[:, None] + sb).sub_(inter).clamp_min_(1)  # empty with empty: 0 / 1 = 0
        total += float(inter.div_(union).sum(dtype=torch.float64))
    return total


def class_iou(pathways: torch.Tensor, classes: torch.Tensor, num_classes: int | None = None) -> tuple[float, float]:
    """``(acIOU, between_class_iou)``.

    acIOU: per class, mean Jaccard over pairs ``i != j`` of its samples, unweighted mean over classes with >= 2
    samples. between_class_iou: per class pair, mean Jaccard over cross pairs; unweighted mean over pairs.
    One float32 matrix product per class pair (exact integer counts): 10,000 pathways of D = 288 in 10 classes took
    about 0.8 s of one core (``benchmarks/results.md``). Rows are put in a canonical order first, so the result
    does not depend on sample order.

    Args:
        pathways: ``[N, D]`` binary; classes: ``[N]``.
    """
    p = pathways.detach().cpu().bool().numpy()
    c = classes.detach().cpu().numpy()
    groups = [torch.from_numpy(_canonical(p[c == k])).float() for k in np.unique(c)]
    within = []
    for g in groups:
        n = len(g)
        if n >= 2:
            # The diagonal J(a_i, a_i) is exactly 1 for a non-empty pathway and 0 for an empty one.
            diagonal = int((g.sum(1) > 0).sum())
            within.append((_jaccard_sum(g, g) - diagonal) / (n * (n - 1)))
    between = []
    for i in range(len(groups)):
        for k in range(i + 1, len(groups)):
            between.append(_jaccard_sum(groups[i], groups[k]) / (len(groups[i]) * len(groups[k])))
    ac = float(np.mean(within)) if within else float("nan")
    bc = float(np.mean(between)) if between else float("nan")
    return ac, bc


def _mean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(torch.sort(x).values.sum() / len(x)) if len(x) else float("nan")


def summarize(
    values: dict[str, torch.Tensor],
    pathways: torch.Tensor,
    classes: torch.Tensor,
    tap_names: Sequence[str] | None = None,
    tap_channels: Sequence[int] | None = None,
) -> dict[str, float]:
    """The keys of docs/design.md section 8 from per-sample values (see ``per_sample``) and the pathways."""
    kept = values["kept"]
    out = {
        "n": int(len(kept)),
        "agreement": _mean(values["agree"]),
        "masked_accuracy": _mean(values["masked_correct"]),
        "target_accuracy": _mean(values["target_correct"]),
        "mDC": _mean(values["dc"]),
        "mIC": _mean(values["ic"]),
        "kept_mean": _mean(kept),
        "kept_std": float(torch.sort(kept).values.std(unbiased=False)) if len(kept) else float("nan"),
        "necessity": _mean(values["necessity"]),
        "swap_forcing": _mean(values["swap_forced"]),
        "zero_forcing": _mean(values["zero_forced"]),
    }
    for fam in null_families_of(values):
        out[f"null_forcing/{fam}"] = _mean(values[f"null_forced/{fam}"])
        if f"null_chance/{fam}" in values:
            out[f"null_chance/{fam}"] = _mean(values[f"null_chance/{fam}"])
    stds = []
    for k in torch.unique(classes):
        kk = torch.sort(kept[classes == k]).values
        if len(kk) >= 2:
            stds.append(float(kk.std(unbiased=False)))
    out["kept_class_std"] = float(np.mean(stds)) if stds else float("nan")
    out["acIOU"], out["between_class_iou"] = class_iou(pathways, classes)
    if tap_names is not None and tap_channels is not None:
        for name, part in zip(tap_names, torch.split(pathways.double(), list(tap_channels), dim=1)):
            out[f"kept/{name}"] = _mean(part.mean(dim=1))
    return out


class PathwayMetrics(Metric):
    """Every key of docs/design.md section 8 for one method, exact across processes (per-sample ``cat`` states).

    ``update`` takes the arguments of ``per_sample``; ``compute`` returns a dict of floats (``summarize``).
    ``null_families`` names the null-input families whose ``null_forcing/<family>`` and ``null_chance/<family>``
    are tracked (``update`` then needs ``null_logits`` and ``null_chance_logits`` for each).
    """

    full_state_update = False

    def __init__(
        self, tap_names: Sequence[str], tap_channels: Sequence[int], null_families: Sequence[str] = (), **kwargs
    ):
        super().__init__(**kwargs)
        self.tap_names, self.tap_channels = list(tap_names), list(tap_channels)
        self.null_families = list(null_families)
        self._keys = list(PER_SAMPLE) + [f"null_{w}/{f}" for f in self.null_families for w in ("forced", "chance")]
        for key in self._keys:
            self.add_state(self._state(key), default=[], dist_reduce_fx="cat")
        self.add_state("pathways", default=[], dist_reduce_fx="cat")
        self.add_state("classes", default=[], dist_reduce_fx="cat")

    @staticmethod
    def _state(key: str) -> str:
        return key.replace("/", "__")

    def update(
        self,
        logits,
        masked_logits,
        y_hat,
        pathways,
        labels=None,
        swap_logits=None,
        zero_logits=None,
        necessity_logits=None,
        swap_valid=None,
        null_logits=None,
        null_chance_logits=None,
    ) -> None:
        vals = per_sample(
            logits,
            masked_logits,
            y_hat,
            pathways,
            labels,
            swap_logits,
            zero_logits,
            necessity_logits,
            swap_valid,
            null_logits,
            null_chance_logits,
        )
        missing = [k for k in self._keys if k not in vals]
        if missing:
            raise ValueError(
                f"PathwayMetrics tracks {missing} but update got no logits for them; pass null_logits and "
                "null_chance_logits for every family in null_families."
            )
        for key in self._keys:
            getattr(self, self._state(key)).append(vals[key])
        self.pathways.append(pathways.detach().bool())
        self.classes.append(y_hat.detach())

    def values(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Synced per-sample values, pathways and classes (for bootstrap intervals)."""
        vals = {k: dim_zero_cat(getattr(self, self._state(k))) for k in self._keys}
        return vals, dim_zero_cat(self.pathways), dim_zero_cat(self.classes)

    def compute(self) -> dict[str, float]:
        vals, pathways, classes = self.values()
        return summarize(vals, pathways, classes, self.tap_names, self.tap_channels)
