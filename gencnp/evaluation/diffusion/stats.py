"""Pixel diffusion statistics: pixels to analyse, crossing counts, the causal channel test, perturbations, overlap
and class-similarity tests with their permutation baselines."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gencnp.evaluation.diffusion.engine import PixelDiffusion

__all__ = [
    "PERTURBATIONS",
    "select_pixels",
    "crossing_counts",
    "channel_importance",
    "hypergeom_sf",
    "overlap_test",
    "class_similarity",
    "perturb",
    "auroc",
    "mass_stats",
    "split_taps",
    "per_image_overlap",
    "class_pathway_overlap",
]

PERTURBATIONS = ("noise", "occlusion", "fgsm")


def select_pixels(
    forward, x: torch.Tensor, y_hat: torch.Tensor, n_pixels: int, rule: str = "saliency", seed: int = 0
) -> torch.Tensor:
    """Pixels to analyse per image: ``long [B, n_pixels, 2]`` (row, col).

    Args:
        forward: ``x -> logits`` (the target).
        x: ``[B, C, H, W]`` images; y_hat: ``[B]`` classes whose logit is explained.
        rule: ``'saliency'``: the ``n_pixels`` largest ``sum_c |d S_y / d x[c, h, w]|`` (input-gradient magnitude of
            the pre-softmax logit, i.e. the magnitude of each pixel's impulse response at the logit); ``'random'``:
            one seeded uniform sample of positions shared by every image.
    """
    b, _, big_h, big_w = x.shape
    if not 1 <= n_pixels <= big_h * big_w:
        raise ValueError(f"pixels must be between 1 and {big_h * big_w} (H * W), got {n_pixels}.")
    if rule == "random":
        g = torch.Generator().manual_seed(seed)
        flat = torch.randperm(big_h * big_w, generator=g)[:n_pixels].sort().values.to(x.device).expand(b, n_pixels)
    elif rule == "saliency":
        with torch.enable_grad():
            xx = x.detach().clone().requires_grad_(True)
            forward(xx).gather(1, y_hat[:, None]).sum().backward()
        sal = xx.grad.abs().sum(1).reshape(b, -1)
        flat = sal.topk(n_pixels, dim=1).indices
    else:
        raise ValueError(f"pixel_rule must be 'saliency' or 'random', got '{rule}'.")
    return torch.stack([flat // big_w, flat % big_w], dim=-1)


def crossing_counts(
    chains: torch.Tensor, valid: torch.Tensor, img: torch.Tensor, n_images: int, tap_channels: Sequence[int]
) -> torch.Tensor:
    """How many large pathways cross each channel of each tap, per image.

    Args:
        chains: ``long [N, K, L]`` channel per tap of each impulse's top-K chains; valid: ``bool [N, K]``.
        img: ``long [N]`` image of each impulse (``0 .. n_images-1``).

    Returns:
        ``long [n_images, D]`` counts in tap order (``D = sum C_l``); each tap's block sums to the number of valid
        chains of the image.
    """
    offsets = torch.tensor([0, *np.cumsum(tap_channels)[:-1].tolist()], device=chains.device)
    n, k, taps = chains.shape
    cols = (chains + offsets).reshape(n * k, taps)
    rows = img.to(chains.device)[:, None].expand(n, k).reshape(-1)
    keep = valid.reshape(-1)
    out = torch.zeros(n_images, int(sum(tap_channels)), dtype=torch.long, device=chains.device)
    flat = (rows[keep, None] * out.shape[1] + cols[keep]).reshape(-1)
    out.view(-1).index_add_(0, flat, torch.ones_like(flat))
    return out


def channel_importance(
    target,
    x: torch.Tensor,
    y_hat: torch.Tensor,
    engine: PixelDiffusion | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal test: zero one channel of one tap and see what the target does.

    Args:
        target: a ``FrozenTarget`` (masked forward ``target(x, masks=...)``).
        x: ``[B, C, H, W]`` images; y_hat: ``[B]`` the target's predictions on them.
        engine: when given, the target is re-run only from the masked tap on (same numbers, less work; see
            ``PixelDiffusion.forward_from_tap``); otherwise every masked forward is a full ``target(x, masks=...)``.
        batch_size: images per chunk; the chunk is repeated once per channel of the tap (batched over channels).

    Returns:
        ``flip bool [B, D]``: the prediction leaves ``y_hat`` when that channel is zeroed (agreement drop = its
        mean over images), and ``logp_drop float64 [B, D]``: ``log p_y(x) - log p_y(x; channel zeroed)``.
    """
    chans = list(target.tap_channels)
    flips, drops = [], []
    for s in tqdm(range(0, x.shape[0], batch_size), desc="causal test", disable=not progress, leave=False):
        xb, yb = x[s : s + batch_size], y_hat[s : s + batch_size]
        b = xb.shape[0]
        with torch.no_grad():
            if engine is not None:
                pat = engine.freeze(xb)
                clean = pat.logits
            else:
                clean = target(xb)
            ref = clean.double().log_softmax(1).gather(1, yb[:, None])
            f_row, d_row = [], []
            for t, c in enumerate(chans):
                keep = 1 - torch.eye(c, dtype=xb.dtype, device=xb.device)  # row j zeroes channel j
                keep = keep[None].expand(b, c, c).reshape(b * c, c)
                if engine is not None:
                    feats = pat.taps[t].repeat_interleave(c, 0) * keep[:, :, None, None]
                    logits = engine.forward_from_tap(t, feats)
                else:
                    masks = [keep if i == t else None for i in range(len(chans))]
                    logits = target(xb.repeat_interleave(c, 0), masks=masks)
                yy = yb.repeat_interleave(c)
                lp = logits.double().log_softmax(1).gather(1, yy[:, None]).reshape(b, c)
                f_row.append((logits.argmax(1) != yy).reshape(b, c))
                d_row.append(ref - lp)
            flips.append(torch.cat(f_row, 1))
            drops.append(torch.cat(d_row, 1))
    return torch.cat(flips), torch.cat(drops)


def hypergeom_sf(x: int, total: int, good: int, draws: int) -> float:
    """``P(X >= x)`` for ``X ~ Hypergeometric(total, good, draws)`` (exact; the chance of an overlap >= x)."""
    lo, hi = max(0, draws - (total - good)), min(good, draws)
    denom = math.comb(total, draws)
    return float(
        sum(math.comb(good, k) * math.comb(total - good, draws - k) for k in range(max(x, lo), hi + 1)) / denom
    )


def _top_m(primary: np.ndarray, secondary: np.ndarray, m: int) -> np.ndarray:
    """Boolean mask of the ``m`` largest entries ordered by ``primary`` then ``secondary`` (ties broken by index)."""
    order = np.lexsort((-np.arange(len(primary)), secondary, primary))[::-1][:m]
    out = np.zeros(len(primary), dtype=bool)
    out[order] = True
    return out


def _rank(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.arange(len(a), dtype=np.float64)
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _rank(a) - (len(a) - 1) / 2, _rank(b) - (len(b) - 1) / 2
    den = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def overlap_test(
    crossed: np.ndarray,
    important: np.ndarray,
    m: int,
    permutations: int = 1000,
    seed: int = 0,
    crossed_tiebreak: np.ndarray | None = None,
    important_tiebreak: np.ndarray | None = None,
) -> dict:
    """Do the ``m`` most-crossed channels of a tap overlap the ``m`` most important ones more than chance?

    Args:
        crossed: ``[C]`` crossing counts; important: ``[C]`` importance (agreement drop); ``*_tiebreak``: secondary
            keys (pathway mass, log-probability drop).
        m: set size; chance overlap is ``m * m / C`` (hypergeometric mean).
        permutations: random channel relabelings for the permutation p-values.

    Returns:
        ``overlap``, ``chance``, ``p_hypergeom`` (exact), ``p_permutation``, ``spearman`` (crossing counts vs
        ``important_tiebreak`` or ``important``) and its permutation p-value.
    """
    c = len(crossed)
    if not 1 <= m < c:
        raise ValueError(f"overlap set size m must be in [1, {c - 1}] for a tap of {c} channels, got {m}.")
    zeros = np.zeros(c)
    a = _top_m(crossed, crossed_tiebreak if crossed_tiebreak is not None else zeros, m)
    b = _top_m(important, important_tiebreak if important_tiebreak is not None else zeros, m)
    obs = int((a & b).sum())
    rng = np.random.default_rng(seed)
    null = np.array([int(b[rng.permutation(c)[:m]].sum()) for _ in range(permutations)])
    cont = important_tiebreak if important_tiebreak is not None else important
    rho = _spearman(crossed.astype(np.float64), cont.astype(np.float64))
    rho_null = np.array(
        [_spearman(rng.permutation(crossed).astype(np.float64), cont.astype(np.float64)) for _ in range(permutations)]
    )
    return {
        "m": m,
        "channels": c,
        "overlap": obs,
        "chance": m * m / c,
        "overlap_fraction": obs / m,
        "chance_fraction": m / c,
        "p_hypergeom": hypergeom_sf(obs, c, m, m),
        "p_permutation": float((1 + (null >= obs).sum()) / (1 + permutations)),
        "spearman": rho,
        "spearman_p_permutation": float((1 + (rho_null >= rho).sum()) / (1 + permutations)),
        "crossed_channels": np.flatnonzero(a).tolist(),
        "important_channels": np.flatnonzero(b).tolist(),
    }


def _class_sums(gram: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-pair mean similarities for several labelings at once.

    Args:
        gram: ``[B, B]`` pairwise similarities; labels: ``long [B, P]``, P labelings.

    Returns:
        ``[P, K, K]`` mean similarity per class pair (diagonal: over pairs ``i != j`` of one class), ``[P, K]`` sizes.
    """
    b, p = labels.shape
    y = F.one_hot(labels, k).to(gram.dtype)  # [B, P, K]
    r = (gram @ y.reshape(b, p * k)).reshape(b, p, k)  # one GEMM for all labelings
    sums = torch.einsum("ipa,ipb->pab", y, r)
    diag = torch.einsum("i,ipa->pa", torch.diagonal(gram), y)
    n = y.sum(0)  # [P, K]
    mat = sums / (n[:, :, None] * n[:, None, :]).clamp_min(1)
    within = (torch.diagonal(sums, dim1=1, dim2=2) - diag) / (n * (n - 1)).clamp_min(1)
    torch.diagonal(mat, dim1=1, dim2=2).copy_(within)
    return mat, n


def _within_between(mat: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Within (mean over classes with >= 2 members) and between (mean over class pairs) for ``[P, K, K]``."""
    k = mat.shape[-1]
    w_ok = (n >= 2).to(mat.dtype)
    off = ~torch.eye(k, dtype=torch.bool, device=mat.device)
    b_ok = ((n[:, :, None] >= 1) & (n[:, None, :] >= 1) & off).to(mat.dtype)
    within = (torch.diagonal(mat, dim1=1, dim2=2) * w_ok).sum(1) / w_ok.sum(1)
    between = (mat * b_ok).sum((1, 2)) / b_ok.sum((1, 2))
    return within, between


def class_similarity(
    profiles: torch.Tensor | list[torch.Tensor],
    classes: torch.Tensor,
    num_classes: int,
    permutations: int = 1000,
    seed: int = 0,
) -> dict:
    """Cosine similarity of crossing profiles within vs between classes, with a label-permutation null.

    Args:
        profiles: ``[B, C]`` per-image crossing counts of one tap, or a list of them (one per tap: the per-tap
            cosine similarities are averaged). An all-zero profile has similarity 0 with everything.
        classes: ``long [B]``.

    Returns:
        ``within`` (mean over classes of the mean over pairs i != j), ``between`` (mean over class pairs, each pair
        weighted equally), ``difference``, the null mean/std of the difference under shuffled classes,
        ``p_permutation`` (one-sided: within - between at least as large by chance) and ``matrix`` ``[K, K]``.
    """
    plist = profiles if isinstance(profiles, (list, tuple)) else [profiles]
    gram = sum(F.normalize(p.double(), dim=1) @ F.normalize(p.double(), dim=1).T for p in plist) / len(plist)
    mat, n = _class_sums(gram, classes[:, None], num_classes)
    w, b = _within_between(mat, n)
    within, between = float(w[0]), float(b[0])
    g = torch.Generator().manual_seed(seed)
    null = []
    for s in range(0, permutations, 100):
        perms = torch.stack([torch.randperm(len(classes), generator=g) for _ in range(min(100, permutations - s))], 1)
        w, b = _within_between(*_class_sums(gram, classes[perms.to(classes.device)], num_classes))
        null.append(w - b)
    null_t = torch.cat(null).double().cpu()
    diff = within - between
    return {
        "within": within,
        "between": between,
        "difference": diff,
        "null_mean": float(null_t.mean()),
        "null_std": float(null_t.std()),
        "p_permutation": float((1 + (null_t >= diff).sum()) / (1 + permutations)),
        "matrix": mat[0].tolist(),
    }


def perturb(
    kind: str,
    x: torch.Tensor,
    y_hat: torch.Tensor,
    forward=None,
    noise_std: float = 0.2,
    occlusion_size: int = 8,
    fgsm_eps: float = 0.05,
    seed: int = 0,
) -> torch.Tensor:
    """Perturbed copies of ``x [B, C, H, W]`` (normalised input units).

    Args:
        kind: ``'noise'`` (add ``noise_std`` * N(0, 1), seeded), ``'occlusion'`` (a centred ``occlusion_size`` square
            set to each image's minimum, i.e. the background of dark-background data), or ``'fgsm'``
            (``x + fgsm_eps * sign(grad_x CE(H(x), y_hat))`` against the target, Goodfellow et al. 2015).
        forward: ``x -> logits``, needed for FGSM.
    """
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        return x + noise_std * torch.randn(x.shape, generator=g).to(x)
    if kind == "occlusion":
        _, _, big_h, big_w = x.shape
        s = min(occlusion_size, big_h, big_w)
        r, c = (big_h - s) // 2, (big_w - s) // 2
        out = x.clone()
        low = x.amin(dim=(1, 2, 3), keepdim=True).expand(-1, x.shape[1], s, s)
        out[:, :, r : r + s, c : c + s] = low
        return out
    if kind == "fgsm":
        if forward is None:
            raise ValueError("FGSM needs the target's forward.")
        with torch.enable_grad():
            xx = x.detach().clone().requires_grad_(True)
            F.cross_entropy(forward(xx), y_hat, reduction="sum").backward()
        return (x + fgsm_eps * xx.grad.sign()).detach()
    raise ValueError(f"unknown perturbation '{kind}'; expected 'noise', 'occlusion' or 'fgsm'.")


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(pos > neg) + 0.5 P(pos = neg) (Mann-Whitney)."""
    if not len(neg) or not len(pos):
        return float("nan")
    r = _rank(np.concatenate([neg, pos]).astype(np.float64))
    n0, n1 = len(neg), len(pos)
    return float((r[n0:].sum() - n1 * (n1 - 1) / 2) / (n0 * n1))


def mass_stats(masses: list[torch.Tensor], thresholds: list[float]) -> dict[str, np.ndarray]:
    """Per image: large crossings (pixel, tap, channel with mass >= the tap's clean threshold), the number of
    chains through large feature maps only (``sum_pixels prod_taps n_l``), and the total impulse mass."""
    counts = [(m >= th).sum(-1).double() for m, th in zip(masses, thresholds)]  # [n, P] per tap
    crossings = sum(c.sum(1) for c in counts)
    prod = torch.ones_like(counts[0])
    for c in counts:
        prod = prod * c
    total = sum(m.double().sum(dim=(1, 2)) for m in masses)
    return {"large_crossings": crossings.numpy(), "large_pathways": prod.sum(1).numpy(), "total_mass": total.numpy()}


def split_taps(t: torch.Tensor, channels: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(t, list(channels), dim=-1))


def per_image_overlap(
    cross: torch.Tensor, mass: torch.Tensor, drop: torch.Tensor, m: int, permutations: int, seed: int
) -> dict:
    """Per image: overlap of its ``m`` most-crossed channels with its ``m`` most important ones (log p drop).

    Baselines: random channel sets (hypergeometric, ``m / C``) and another image's important channels.
    """
    n, c = cross.shape
    key = cross.double() + 0.5 * mass.double() / mass.double().amax(1, keepdim=True).clamp_min(1e-30)
    a = torch.zeros(n, c, dtype=torch.bool).scatter_(1, key.topk(m, 1).indices, True)
    b = torch.zeros(n, c, dtype=torch.bool).scatter_(1, drop.double().topk(m, 1).indices, True)
    obs = (a & b).sum(1).double() / m
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    other = perm.roll(1)
    mismatch = torch.empty(n, dtype=torch.long)
    mismatch[perm] = other  # image perm[i] is paired with image perm[i-1]: never itself when n > 1
    mism = (a & b[mismatch]).sum(1).double() / m
    rng = np.random.default_rng(seed)
    null = rng.hypergeometric(m, c - m, m, size=(max(permutations, 1), n)).mean(1) / m
    mean = float(obs.mean())
    # Instance specificity: re-pair every image with another image's important channels (random derangements).
    others = []
    for _ in range(max(permutations, 1)):
        p = torch.randperm(n, generator=g)
        pair = torch.empty(n, dtype=torch.long)
        pair[p] = p.roll(1)
        others.append(float((a & b[pair]).sum()) / (n * m))
    others_t = np.array(others)
    return {
        "m": m,
        "channels": c,
        "overlap_fraction": mean,
        "chance_fraction": m / c,
        "other_image_fraction": float(mism.mean()),
        "p_permutation": float((1 + (null >= mean).sum()) / (1 + len(null))),
        "p_vs_other_images": float((1 + (others_t >= mean).sum()) / (1 + len(others_t))),
    }


def class_pathway_overlap(
    pathways: torch.Tensor,
    cross_class: torch.Tensor,
    mass_class: torch.Tensor,
    channels: Sequence[int],
    tap_names: Sequence[str],
    class_names: Sequence[str],
) -> dict:
    """Overlap of each class's most-crossed channels with GEN-CNP's class pathway ``M_c`` (same size per tap).

    Args:
        pathways: ``bool [K, D]`` class pathways of a bank; a shape that does not fit is skipped with the reason.
        cross_class, mass_class: ``[K, D]`` crossing counts and impulse masses summed over each class's images.
    """
    pathways = torch.as_tensor(pathways).bool().cpu()
    d = int(sum(channels))
    if pathways.dim() != 2 or pathways.shape[1] != d or pathways.shape[0] != cross_class.shape[0]:
        return {
            "skipped": f"bank class pathways have shape {tuple(pathways.shape)}, expected [{cross_class.shape[0]}, {d}] "
            "for this target; export the bank from the same target"
        }
    rows = []
    per_tap: dict[str, dict[str, float]] = {}
    offs = [0, *np.cumsum(channels).tolist()]
    for k in range(pathways.shape[0]):
        for t, name in enumerate(tap_names):
            sl = slice(offs[t], offs[t + 1])
            mk = pathways[k, sl]
            size, c = int(mk.sum()), channels[t]
            if not 0 < size < c or cross_class[k, sl].sum() == 0:
                continue
            key = cross_class[k, sl].double() + 0.5 * mass_class[k, sl].double() / mass_class[
                k, sl
            ].double().max().clamp_min(1e-30)
            top = torch.zeros(c, dtype=torch.bool)
            top[key.topk(size).indices] = True
            ov = int((top & mk).sum())
            rows.append(
                {
                    "class": class_names[k],
                    "tap": name,
                    "size": size,
                    "overlap": ov,
                    "chance": size * size / c,
                    "p_hypergeom": hypergeom_sf(ov, c, size, size),
                }
            )
            acc = per_tap.setdefault(name, {"overlap": 0.0, "chance": 0.0, "size": 0.0})
            acc["overlap"] += ov
            acc["chance"] += size * size / c
            acc["size"] += size
    if not rows:
        return {"skipped": "every class pathway keeps all or none of a tap's channels; nothing to compare"}
    tot_ov = sum(r["overlap"] for r in rows)
    tot_ch = sum(r["chance"] for r in rows)
    return {
        "rows": rows,
        "per_tap": per_tap,
        "overlap": tot_ov,
        "chance": tot_ch,
        "ratio_to_chance": tot_ov / tot_ch if tot_ch else float("nan"),
    }
