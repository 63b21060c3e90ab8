"""Swap probes as data-set indices: which training images the ``swap_forcing`` control pairs inputs with.

A GEN-CNP model keeps, per class, ``p`` indices into the training split (``probe_index [K*p]``) and their classes
(``probe_class [K*p]``, -1 for an empty slot), never the images: at 1,000 classes and 224 pixels the images would be
about 2.4 GB in every checkpoint and every GPU copy of the model. The images are re-read from the attached data set
when a control needs them (``ProbeImages``); a small probe set (Fashion-MNIST: 40 images) is read once and kept in
memory, a large one is read per batch (one extra image read per image checked). No Lightning import.
"""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset

__all__ = [
    "CACHE_BYTES",
    "SEED",
    "candidate_order",
    "select_probes",
    "match_probes",
    "pixel_hash",
    "ProbeImages",
    "migrate_state",
    "adopt_legacy",
    "probe_images",
    "check_probes",
    "partner_classes",
]

# Probe sets up to this size are read once and kept in memory (not in the state dict); larger ones are read per batch.
CACHE_BYTES = 64 * 2**20
SEED = 12345  # the seeded order in which training images are considered as probes


def candidate_order(n: int, k: int, limit: int | None = None) -> list[int]:
    """Indices of the ``limit`` (default ``max(200 K, 2000)``) training images considered as probes, in the (seeded)
    order considered."""
    g = torch.Generator().manual_seed(SEED)
    return torch.randperm(n, generator=g)[: limit or max(200 * k, 2000)].tolist()


@torch.no_grad()
def select_probes(
    dataset: Dataset,
    classify,
    k: int,
    p: int,
    device: torch.device | str = "cpu",
    chunk: int = 512,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``p`` candidates (``candidate_order``) of each class that ``classify`` (images -> logits) gets right;
    with ``classify=None`` the first ``p`` of each class (labels only, no forward).

    The candidates are classified in chunks of ``chunk`` and the search stops once every class has ``p`` probes, so
    its cost is about ``K p / accuracy`` target forwards (a few thousand at K = 1000), not ``200 K``.

    Returns:
        ``(index, cls)``: long ``[K*p]`` data-set indices and classes, -1 in slots left empty.
    """
    index, cls = torch.full((k * p,), -1, dtype=torch.long), torch.full((k * p,), -1, dtype=torch.long)
    have = [0] * k
    full = 0
    order = candidate_order(len(dataset), k, limit)
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        items = [dataset[i] for i in part]
        ys = [int(it[1]) for it in items]
        if classify is None:
            preds = ys
        else:
            preds = classify(torch.stack([it[0] for it in items]).to(device)).argmax(1).tolist()
        for i, y, pred in zip(part, ys, preds):
            if y == pred and 0 <= y < k and have[y] < p:
                index[y * p + have[y]], cls[y * p + have[y]] = i, y
                have[y] += 1
                full += have[y] == p
        if full == k:
            break
    return index, cls


def match_probes(dataset: Dataset, images: torch.Tensor, cls: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Indices of ``dataset`` holding the probe ``images [K*p, C, H, W]`` of slots with ``cls >= 0`` (old checkpoints
    stored the images); -1 where no candidate (``candidate_order``) of that class equals the image."""
    index = torch.full_like(cls, -1)
    todo = {int(s) for s in torch.nonzero(cls >= 0)[:, 0]}
    classes = {int(cls[s]) for s in todo}
    for i in candidate_order(len(dataset), num_classes):
        if not todo:
            break
        item = dataset[i]
        x, y = torch.as_tensor(item[0]), int(item[1])
        if y not in classes:
            continue
        for s in [s for s in todo if int(cls[s]) == y]:
            if x.shape == images[s].shape and torch.equal(x.to(images.dtype), images[s]):
                index[s] = i
                todo.discard(s)
                break
    return index


def pixel_hash(x: torch.Tensor) -> torch.Tensor:
    """A non-negative integer ``[B]`` per image of ``x``, from its pixels quantised to 1/64: the same image gets the
    same hash under any batching or process count."""
    q = (x.detach().float().flatten(1) * 64).round().long()
    w = torch.arange(1, q.shape[1] + 1, device=x.device, dtype=torch.long) % 1009 + 1
    return (q * w).sum(1).abs()


class ProbeImages:
    """Reads probe images from a data set by index; keeps a whole probe set in memory when it is small.

    Args:
        dataset: the training split the indices point into (items ``(image, label, ...)``).
        shape: ``(C, H, W)`` of one image; sizes the in-memory budget ``CACHE_BYTES``.
    """

    def __init__(self, dataset: Dataset, shape: tuple[int, ...]):
        self.dataset = dataset
        self.shape = tuple(shape)
        self.cached: torch.Tensor | None = None  # slot-aligned images of the last index tensor read whole
        self.cached_for: torch.Tensor | None = None

    def read(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([torch.as_tensor(self.dataset[i][0]) for i in indices]).float()

    def images(self, probe_index: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Images ``[len(slots), C, H, W]`` of probe ``slots`` (zeros for empty slots), on ``slots``' device."""
        n = probe_index.numel()
        numel = 1
        for s in self.shape:
            numel *= s
        if n * numel * 4 <= CACHE_BYTES:
            if self.cached is None or not torch.equal(self.cached_for, probe_index.cpu()):
                self.cached_for = probe_index.detach().cpu().clone()
                filled = [int(i) for i in self.cached_for if i >= 0]
                imgs = torch.zeros(n, *self.shape)
                if filled:
                    imgs[self.cached_for >= 0] = self.read(filled)
                self.cached = imgs
            self.cached = self.cached.to(slots.device)
            return self.cached[slots]
        want = probe_index[slots].tolist()
        distinct = sorted({i for i in want if i >= 0})
        out = torch.zeros(len(want), *self.shape)
        if distinct:
            got = self.read(distinct)
            pos = {i: j for j, i in enumerate(distinct)}
            rows = [r for r, i in enumerate(want) if i >= 0]
            out[rows] = got[[pos[want[r]] for r in rows]]
        return out.to(slots.device)


# ----- GenCNP's side (duck-typed: ``probe_index``, ``probe_class``, ``_probe_source``, ``_legacy_probes``) -----
def migrate_state(state: dict, probe_index: torch.Tensor) -> torch.Tensor | None:
    """Turn a state dict written before probes were indices (a ``probes [K*p, C, H, W]`` image buffer) into the
    current layout, in place: the images leave the state dict and are returned (kept in memory for the session,
    until ``adopt_legacy`` finds them in the data); ``probe_index`` starts empty. ``None`` for current state dicts."""
    images = state.pop("probes", None)
    if images is None:
        return None
    state.setdefault("probe_index", torch.full_like(probe_index, -1))
    return images.detach().float().cpu()


def adopt_legacy(model, dataset: Dataset) -> None:
    """Find an old checkpoint's stored probe images in ``dataset`` (``match_probes``) and keep their indices; the
    images are then re-read from the data like any probe. Probes not found stay in memory for this session only
    (with a warning): a checkpoint saved afterwards leaves them out and picks new ones when next attached."""
    legacy = model._legacy_probes
    index = match_probes(dataset, legacy, model.probe_class.cpu(), model.num_classes)
    model.probe_index.copy_(index.to(model.probe_index.device))
    lost = int(((model.probe_class.cpu() >= 0) & (index < 0)).sum())
    if lost == 0:
        model._legacy_probes = None
        return
    warnings.warn(
        f"{lost} of the swap probe images stored in this (old-format) checkpoint are not in the attached training "
        "data; they are used from memory in this session, and a checkpoint saved from it will pick new probes when "
        "next attached to data. Attach the data the generator was trained on to keep them.",
        stacklevel=2,
    )


def probe_images(model, slots: torch.Tensor) -> torch.Tensor:
    """Images ``[B, C, H, W]`` of probe ``slots`` (zeros for empty slots), on ``slots``' device."""
    if model._legacy_probes is not None:
        return model._legacy_probes.to(slots.device)[slots]
    shape = tuple(model.target.input_shape)
    if not bool((model.probe_index[slots] >= 0).any()):
        return torch.zeros(len(slots), *shape, device=slots.device)
    if model._probe_source is None:
        raise RuntimeError(
            "the swap_forcing control needs the swap probe images, which GenCNP keeps as indices into the training "
            "split (not in the checkpoint); attach the data it was trained on first: model.attach_probe_data("
            "datamodule.split('train')) (Trainer.fit/validate/test/predict with a datamodule do it in setup)."
        )
    return model._probe_source.images(model.probe_index, slots)


def partner_classes(h: torch.Tensor, y_hat: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Swap-partner class of each sample: the ``(h mod n)``-th class after ``y_hat`` (cyclically) among the ``n``
    classes other than ``y_hat`` that have probes. With every class available this is ``y_hat + 1 + h mod (K-1)``.
    A sample with no other available class gets ``y_hat`` (its partner is then marked invalid).

    Args:
        h: ``[B]`` non-negative integer hash of each input; y_hat: ``[B]`` classes; available: ``[K]`` bool.
    """
    k = available.shape[0]
    rel = (torch.arange(k, device=h.device)[None, :] - y_hat[:, None]) % k  # [B, K]: 0 for y_hat itself
    ok = available[None, :] & (rel > 0)
    n = ok.sum(1)
    j = h % n.clamp(min=1)
    # Rank the available classes by their distance after y_hat; pick rank j.
    order = torch.where(ok, rel, torch.full_like(rel, k)).argsort(1)
    pick = order.gather(1, j[:, None])[:, 0]
    return torch.where(n > 0, pick, y_hat)


def check_probes(probe_class: torch.Tensor, num_classes: int, class_names=None) -> None:
    """Before training: the swap control needs correctly classified probe images of at least two classes; warn
    about classes without any (their samples' partners come from the other classes)."""
    have = set(probe_class[probe_class >= 0].tolist())
    lacking = [c for c in range(num_classes) if c not in have]
    if not lacking:
        return
    names = [f"{c} ({class_names[c]})" if class_names and c < len(class_names) else str(c) for c in lacking]
    fix = (
        "the target classifies no sampled training image of these classes correctly: train the target longer "
        "or check that target_checkpoint, num_classes and the data belong together"
    )
    if len(have) < 2:
        raise ValueError(
            f"the swap_forcing control needs probe images of at least two classes, but classes {', '.join(names)} have "
            f"none ({len(have)} class with probes); {fix}. Nothing was trained."
        )
    rank_zero_warn(f"classes {', '.join(names)} have no swap probes; their images are never swap partners ({fix}).")
