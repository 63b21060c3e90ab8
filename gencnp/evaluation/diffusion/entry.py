"""``diffusion()``, the entry point of ``python evaluate.py diffusion --config configs/fashion_mnist/diffusion.yaml``.

Loads the target and a seeded subset of a split, runs the engine (``engine.py``) and the statistics (``stats.py``) and
writes ``diffusion.json``, ``diffusion.md`` and ``diffusion_*.png`` (``render.py``) into ``out_dir``.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gencnp.banks import bank as banks
from gencnp.data.modules import FashionMNISTDataModule
from gencnp.evaluation.diffusion.engine import PixelDiffusion
from gencnp.evaluation.diffusion.render import figures, markdown
from gencnp.evaluation.diffusion.stats import (
    PERTURBATIONS,
    auroc,
    channel_importance,
    class_pathway_overlap,
    class_similarity,
    crossing_counts,
    mass_stats,
    overlap_test,
    per_image_overlap,
    perturb,
    select_pixels,
    split_taps,
)
from gencnp.io.files import write_atomic
from gencnp.targets.loading import FrozenTarget, load_target
from gencnp.threads import torch_threads

__all__ = ["DiffusionSettings", "diffusion"]


@dataclass(frozen=True)
class DiffusionSettings:
    """The keyword arguments of ``diffusion()`` (documented there), checked when constructed."""

    arch: str
    checkpoint: str | None
    taps: str | list[str]
    target_kwargs: dict | None
    data: dict | None
    data_dir: str | None
    split: str
    n_images: int
    pixels: int
    pixel_rule: str
    top_k: int
    beam_width: int
    overlap_fraction: float
    class_source: str
    large_quantile: float
    noise_std: float
    occlusion_size: int
    fgsm_eps: float
    perturbed_pathways: int
    permutations: int
    bank: str | None
    batch_images: int
    seed: int
    threads: int | None
    out_dir: str
    progress: bool

    def __post_init__(self) -> None:
        """Bad values fail here, before anything is loaded or written."""
        class_source, pixel_rule, split, top_k = self.class_source, self.pixel_rule, self.split, self.top_k
        checks = [
            (class_source in ("pred", "label"), f"class_source must be 'pred' or 'label', got '{class_source}'."),
            (pixel_rule in ("saliency", "random"), f"pixel_rule must be 'saliency' or 'random', got '{pixel_rule}'."),
            (split in ("train", "val", "test"), f"split must be 'train', 'val' or 'test', got '{split}'."),
            (self.n_images >= 2, f"n_images must be >= 2, got {self.n_images}."),
            (
                1 <= top_k <= self.beam_width,
                f"need 1 <= top_k <= beam_width, got top_k={top_k}, beam_width={self.beam_width}.",
            ),
            (0 < self.overlap_fraction < 1, f"overlap_fraction must be in (0, 1), got {self.overlap_fraction}."),
            (0 < self.large_quantile < 1, f"large_quantile must be in (0, 1), got {self.large_quantile}."),
            (self.permutations >= 1, f"permutations must be >= 1, got {self.permutations}."),
            (self.batch_images >= 1, f"batch_images must be >= 1, got {self.batch_images}."),
            (self.perturbed_pathways >= 0, f"perturbed_pathways must be >= 0, got {self.perturbed_pathways}."),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


@dataclass
class _Inputs:
    """The loaded target, its engine and the analysed images."""

    target: FrozenTarget
    engine: PixelDiffusion
    x: torch.Tensor  # [n, C, H, W]
    labels: torch.Tensor  # [n]
    y_hat: torch.Tensor  # [n] the target's predictions
    classes: torch.Tensor  # [n] y_hat or labels (class_source)
    num_classes: int
    class_names: list[str]


def diffusion(
    arch: str = "fmnist_cnn",
    checkpoint: str | None = "runs/fashion_mnist/target/best.ckpt",
    taps: str | list[str] = "auto",
    target_kwargs: dict | None = None,
    data: dict | None = None,
    data_dir: str | None = None,
    split: str = "test",
    n_images: int = 1000,
    pixels: int = 32,
    pixel_rule: str = "saliency",
    top_k: int = 5,
    beam_width: int = 16,
    overlap_fraction: float = 0.125,
    class_source: str = "pred",
    large_quantile: float = 0.9,
    noise_std: float = 0.2,
    occlusion_size: int = 8,
    fgsm_eps: float = 0.05,
    perturbed_pathways: int = 1000,
    permutations: int = 1000,
    bank: str | None = "runs/fashion_mnist/bank.safetensors",
    batch_images: int = 32,
    seed: int = 0,
    threads: int | None = None,
    out_dir: str = "runs/fashion_mnist/eval",
    progress: bool = True,
) -> dict:
    """Pixel diffusion pathways of a frozen CNN (docs/design.md section 9; method in ``gencnp.evaluation.diffusion.engine``).

    Writes ``diffusion.json``, ``diffusion.md`` and ``diffusion_*.png`` into ``out_dir``.

    Args:
        arch: target architecture (a plain chain CNN, e.g. ``fmnist_cnn``).
        checkpoint: target weights; ``None`` keeps the random initialisation (smoke tests only).
        taps: tap module paths or ``'auto'`` (block outputs).
        target_kwargs: extra arguments of the target factory.
        data: data module as ``{class_path, init_args}``; default Fashion-MNIST from ``data_dir``.
        data_dir: Fashion-MNIST IDX folder when ``data`` is unset (``None``: the Debian package, then ``data/``).
        split: ``'test'`` (default), ``'val'`` or ``'train'``.
        n_images: images analysed, a seeded random subset of the split (all when larger).
        pixels: pixels per image.
        pixel_rule: ``'saliency'`` (the ``pixels`` largest input-gradient magnitudes of the explained logit) or
            ``'random'`` (one seeded set of positions for every image).
        top_k: large pathways kept per pixel.
        beam_width: prefixes kept by the beam search (``>= top_k``). Measured on ``fmnist_cnn`` against exhaustive
            search (24 pixels): 16 recovers 96% of the top-5 chains and every top-1 chain; 8 recovers 82%.
        overlap_fraction: size of the compared channel sets per tap, as a fraction of the tap's channels.
        class_source: ``'pred'`` (the target's prediction) or ``'label'`` groups images into classes.
        large_quantile: a feature map is crossed by large diffusion when its impulse mass reaches this quantile of
            the clean masses at its tap (the clean-vs-perturbed counts).
        noise_std, occlusion_size, fgsm_eps: perturbations, in normalised input units (see ``perturb``). The
            defaults change the default target's prediction on about 39%, 29% and 38% of test images.
        perturbed_pathways: images (the first ones) whose perturbed versions also get beam-search pathways, to
            compare crossing profiles with the clean ones; 0 skips it (the counts use every image regardless).
        permutations: draws for every permutation baseline.
        bank: GEN-CNP pathway bank to compare with; skipped with a note when absent.
        batch_images: images per chunk (peak memory grows with it: about 20 MB per image at the defaults).
        seed: subset, random pixels, noise and permutation seed.
        threads: CPU threads for torch during the run (restored afterwards; ``None`` leaves the count).
        out_dir: output folder.
        progress: tqdm progress bars.

    Returns:
        The summary written to ``diffusion.json``.
    """
    cfg = DiffusionSettings(**locals())
    with torch_threads(int(threads) if threads else None):
        return _run(cfg)


def _run(cfg: DiffusionSettings) -> dict:
    """Every stage in order, timed; writes the outputs and returns the summary."""
    times: dict[str, float] = {}
    t_start = time.time()
    inp = _load(cfg)
    times["load"] = time.time() - t_start

    t0 = time.time()
    x, y_hat, n = inp.x, inp.y_hat, inp.x.shape[0]
    pix = torch.cat(
        [
            select_pixels(inp.target, x[s:e], y_hat[s:e], cfg.pixels, cfg.pixel_rule, cfg.seed)
            for s, e in _chunks(n, 256)
        ]
    )
    clean = _pathway_run(
        inp.engine, x, pix, cfg.top_k, cfg.beam_width, cfg.batch_images, cfg.progress, "pathways (clean)"
    )
    times["pathways"] = time.time() - t0

    t0 = time.time()
    flip, drop = channel_importance(
        inp.target, x, y_hat, inp.engine, batch_size=max(1, cfg.batch_images), progress=cfg.progress
    )
    times["causal_test"] = time.time() - t0

    t0 = time.time()
    found = _analyse(cfg, inp, clean, flip, drop)
    times["analysis"] = time.time() - t0

    t0 = time.time()
    thresholds, stats, pert = _perturbations(cfg, inp, pix, clean)
    times["perturbations"] = time.time() - t0
    times["total"] = time.time() - t_start

    summary = _summary(cfg, inp, clean, found, thresholds, pert, times)
    out = Path(cfg.out_dir)
    write_atomic(out / "diffusion.json", json.dumps(summary, indent=2))
    write_atomic(out / "diffusion.md", markdown(summary))
    figures(
        out,
        summary,
        found["consistency"],
        clean,
        x,
        pix,
        inp.labels,
        y_hat,
        found["agreement_drop"],
        clean["crossings"],
        inp.class_names,
        stats,
    )
    return summary


def _load(cfg: DiffusionSettings) -> _Inputs:
    """Seeds torch, loads the data and the target, and takes the seeded image subset with its predictions."""
    torch.manual_seed(cfg.seed)
    dm = _make_data(cfg.data, cfg.data_dir)
    ds = dm.split(cfg.split)
    num_classes = int(dm.num_classes)
    input_shape = tuple(dm.input_shape)
    class_names = list(getattr(dm, "class_names", [str(k) for k in range(num_classes)]))
    model = load_target(cfg.arch, cfg.checkpoint, num_classes, input_shape[0], **(cfg.target_kwargs or {}))
    target = FrozenTarget(model, cfg.taps, input_shape, arch=cfg.arch)
    engine = PixelDiffusion(target.model, target.tap_names, input_shape)

    g = torch.Generator().manual_seed(cfg.seed)
    idx = torch.randperm(len(ds), generator=g)[: min(cfg.n_images, len(ds))].sort().values.tolist()
    items = [ds[i] for i in idx]
    x = torch.stack([torch.as_tensor(it[0]) for it in items]).float()
    labels = torch.as_tensor([int(it[1]) for it in items])
    with torch.no_grad():
        logits = torch.cat([target(x[s:e]) for s, e in _chunks(x.shape[0], 256)])
    y_hat = logits.argmax(1)
    classes = y_hat if cfg.class_source == "pred" else labels
    return _Inputs(target, engine, x, labels, y_hat, classes, num_classes, class_names)


def _make_data(data: dict | None, data_dir: str | None):
    """A data module from a ``{class_path, init_args}`` dict, or Fashion-MNIST (``data_dir`` or the defaults)."""
    if data is None:
        return FashionMNISTDataModule(data_dir=data_dir)
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(
            f"data must be a {{class_path, init_args}} mapping (e.g. class_path: gencnp.FashionMNISTDataModule), got {data!r}."
        )
    module, _, name = str(data["class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "gencnp"), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"data class_path '{data['class_path']}' cannot be imported ({err}); use e.g. gencnp.FashionMNISTDataModule."
        ) from err
    return cls(**dict(data.get("init_args") or {}))


def _chunks(n: int, size: int):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _masses(
    engine: PixelDiffusion, x: torch.Tensor, pix: torch.Tensor, batch: int, progress: bool, desc: str
) -> list[torch.Tensor]:
    """Per-tap impulse masses ``[n, P, C_l]`` of pixels ``pix [n, P, 2]`` (plain propagation, no transfers)."""
    n, p = pix.shape[:2]
    out = [torch.zeros(n, p, c) for c in engine.tap_channels]
    for s, e in tqdm(_chunks(n, batch), desc=desc, disable=not progress, leave=False):
        pat = engine.freeze(x[s:e])
        img = torch.arange(e - s).repeat_interleave(p)
        for t, win in enumerate(engine.responses(pat, img, pix[s:e].reshape(-1, 2))):
            out[t][s:e] = win.mass()[:, 0].reshape(e - s, p, -1).float().cpu()
    return out


def _pathway_run(
    engine: PixelDiffusion,
    x: torch.Tensor,
    pix: torch.Tensor,
    top_k: int,
    beam_width: int,
    batch: int,
    progress: bool,
    desc: str,
) -> dict[str, Any]:
    """Beam-search pathways of every pixel of every image, plus masses and crossing counts."""
    n, p = pix.shape[:2]
    masses = [torch.zeros(n, p, c) for c in engine.tap_channels]
    chains, scores, valid, links = [], [], [], []
    for s, e in tqdm(_chunks(n, batch), desc=desc, disable=not progress, leave=False):
        pat = engine.freeze(x[s:e])
        img = torch.arange(e - s).repeat_interleave(p)
        res = engine.pathways(pat, img, pix[s:e].reshape(-1, 2), top_k, beam_width)
        for t, m in enumerate(res["masses"]):
            masses[t][s:e] = m.reshape(e - s, p, -1).float().cpu()
        chains.append(res["chains"].reshape(e - s, p, *res["chains"].shape[1:]).cpu())
        scores.append(res["log_scores"].reshape(e - s, p, -1).float().cpu())
        valid.append(res["valid"].reshape(e - s, p, -1).cpu())
        links.append(res["links"].reshape(e - s, p, *res["links"].shape[1:]).float().cpu())
    chains_t, valid_t = torch.cat(chains), torch.cat(valid)
    img_all = torch.arange(n).repeat_interleave(p)
    cross = crossing_counts(
        chains_t.reshape(n * p, *chains_t.shape[2:]), valid_t.reshape(n * p, -1), img_all, n, engine.tap_channels
    )
    return {
        "masses": masses,
        "chains": chains_t,
        "log_scores": torch.cat(scores),
        "valid": valid_t,
        "links": torch.cat(links),
        "crossings": cross,
    }


def _analyse(cfg: DiffusionSettings, inp: _Inputs, clean: dict, flip: torch.Tensor, drop: torch.Tensor) -> dict:
    """Crossings against causal importance (all images and per image), class consistency and the bank comparison."""
    engine, chans, names = inp.engine, inp.engine.tap_channels, inp.target.tap_names
    cross = clean["crossings"]  # [n, D]
    mass_img = torch.cat([m.sum(1) for m in clean["masses"]], 1)  # [n, D] impulse mass summed over pixels
    agreement_drop = flip.double().mean(0)
    logp_drop = drop.mean(0)
    global_overlap, image_overlap = {}, {}
    for t, name in enumerate(names):
        sl = slice(engine.offsets[t], engine.offsets[t + 1])
        m = max(1, min(chans[t] - 1, round(cfg.overlap_fraction * chans[t])))
        global_overlap[name] = overlap_test(
            cross[:, sl].sum(0).numpy(),
            agreement_drop[sl].numpy(),
            m,
            cfg.permutations,
            cfg.seed,
            mass_img[:, sl].sum(0).double().numpy(),
            logp_drop[sl].numpy(),
        )
        image_overlap[name] = per_image_overlap(
            cross[:, sl], mass_img[:, sl], drop[:, sl], m, cfg.permutations, cfg.seed
        )
    profiles = split_taps(cross.double(), chans)
    consistency = {
        name: class_similarity(p, inp.classes, inp.num_classes, cfg.permutations, cfg.seed)
        for name, p in zip(names, profiles)
    }
    consistency["all"] = class_similarity(profiles, inp.classes, inp.num_classes, cfg.permutations, cfg.seed)
    y1 = F.one_hot(inp.classes, inp.num_classes).double()
    bank_result = _bank_overlap(
        cfg.bank, y1.T @ cross.double(), y1.T @ mass_img.double(), chans, names, inp.class_names, inp.target
    )
    return {
        "mass_img": mass_img,
        "agreement_drop": agreement_drop,
        "logp_drop": logp_drop,
        "global": global_overlap,
        "per_image": image_overlap,
        "consistency": consistency,
        "bank": bank_result,
    }


def _bank_overlap(
    bank_path: str | None,
    cross_class: torch.Tensor,
    mass_class: torch.Tensor,
    channels: Sequence[int],
    tap_names: Sequence[str],
    class_names: Sequence[str],
    target=None,
) -> dict:
    """Overlap of each class's most-crossed channels with GEN-CNP's class pathway ``M_c`` (same size per tap).

    Args:
        bank_path: a ``gencnp.banks.bank.PathwayBank`` file, or ``None``. Missing file, a bank that does not fit
            ``target`` or has no threshold: the comparison is skipped and the reason recorded.
        cross_class, mass_class: ``[K, D]`` crossing counts and impulse masses summed over each class's images.
    """
    if not bank_path:
        return {"skipped": "no bank path given"}
    if not Path(bank_path).is_file():
        return {"skipped": f"bank file '{bank_path}' does not exist (export one with GEN-CNP first)"}
    try:
        pathways = banks.PathwayBank.load(bank_path, target).class_pathways()
    except ValueError as err:
        return {"skipped": f"bank '{bank_path}' cannot be used: {err}"}
    res = class_pathway_overlap(pathways, cross_class, mass_class, channels, tap_names, class_names)
    return res if "skipped" in res else {"path": str(bank_path), **res}


def _perturbations(cfg: DiffusionSettings, inp: _Inputs, pix: torch.Tensor, clean: dict) -> tuple:
    """Clean vs perturbed inputs: the large-mass thresholds, per-image mass statistics per input kind, and the
    summary entry per kind (prediction changes, crossing-profile similarity, statistics against clean)."""
    x, y_hat, target, engine, n = inp.x, inp.y_hat, inp.target, inp.engine, inp.x.shape[0]
    flat = [m.reshape(-1) for m in clean["masses"]]
    thresholds = [float(f.kthvalue(max(1, math.ceil(cfg.large_quantile * f.numel()))).values) for f in flat]
    stats = {"clean": mass_stats(clean["masses"], thresholds)}
    pert: dict[str, dict] = {}
    n_pp = min(cfg.perturbed_pathways, n)
    chans, names = engine.tap_channels, target.tap_names
    for kind in PERTURBATIONS:
        xp = torch.cat(
            [
                perturb(kind, x[s:e], y_hat[s:e], target, cfg.noise_std, cfg.occlusion_size, cfg.fgsm_eps, cfg.seed + s)
                for s, e in _chunks(n, 256)
            ]
        )
        with torch.no_grad():
            yp = torch.cat([target(xp[s:e]).argmax(1) for s, e in _chunks(n, 256)])
        masses = _masses(engine, xp, pix, cfg.batch_images, cfg.progress, f"masses ({kind})")
        stats[kind] = mass_stats(masses, thresholds)
        entry = {"prediction_changed": float((yp != y_hat).double().mean())}
        if n_pp:
            run = _pathway_run(
                engine,
                xp[:n_pp],
                pix[:n_pp],
                cfg.top_k,
                cfg.beam_width,
                cfg.batch_images,
                cfg.progress,
                f"pathways ({kind})",
            )
            sims = [
                F.cosine_similarity(a.double(), b.double(), dim=1)
                for a, b in zip(split_taps(run["crossings"], chans), split_taps(clean["crossings"][:n_pp], chans))
            ]
            entry["profile_cosine_to_clean"] = float(torch.stack(sims).mean())
            entry["profile_cosine_to_clean_per_tap"] = {nm: float(s.mean()) for nm, s in zip(names, sims)}
        pert[kind] = entry
    for kind, st in stats.items():
        entry = pert.setdefault(kind, {})
        for key, v in st.items():
            entry[key] = {"mean": float(np.mean(v)), "std": float(np.std(v)), "median": float(np.median(v))}
        entry["large_pathways"]["mean_log10"] = float(np.mean(np.log10(1 + st["large_pathways"])))
        if kind != "clean":
            entry["auroc_vs_clean"] = {key: auroc(stats["clean"][key], st[key]) for key in st}
            entry["fraction_above_clean"] = {key: float(np.mean(st[key] > stats["clean"][key])) for key in st}
    return thresholds, stats, pert


def _summary(
    cfg: DiffusionSettings,
    inp: _Inputs,
    clean: dict,
    found: dict,
    thresholds: list[float],
    pert: dict,
    times: dict[str, float],
) -> dict:
    """The document written to ``diffusion.json``."""
    offs, names, chans = inp.engine.offsets, inp.target.tap_names, inp.engine.tap_channels
    agreement_drop, logp_drop, mass_img = found["agreement_drop"], found["logp_drop"], found["mass_img"]
    cross, consistency = clean["crossings"], found["consistency"]
    return {
        "settings": {
            "target": cfg.arch,
            "checkpoint": cfg.checkpoint,
            "tensor_hash": inp.target.tensor_hash(),
            "taps": names,
            "tap_channels": chans,
            "data": (cfg.data or {}).get("class_path", "gencnp.FashionMNISTDataModule"),
            "split": cfg.split,
            "n": inp.x.shape[0],
            "subset_seed": cfg.seed,
            "pixels": cfg.pixels,
            "pixel_rule": cfg.pixel_rule,
            "top_k": cfg.top_k,
            "beam_width": cfg.beam_width,
            "overlap_fraction": cfg.overlap_fraction,
            "class_source": cfg.class_source,
            "large_quantile": cfg.large_quantile,
            "large_thresholds": dict(zip(names, thresholds)),
            "noise_std": cfg.noise_std,
            "occlusion_size": cfg.occlusion_size,
            "fgsm_eps": cfg.fgsm_eps,
            "perturbed_pathways": min(cfg.perturbed_pathways, inp.x.shape[0]),
            "permutations": cfg.permutations,
            "torch_threads": torch.get_num_threads(),
            "score_rule": "Markov routing: M_1[c_1]/sum M_1 * prod_l T_l[c_l,c_l+1]/sum_j T_l[c_l,j]",
        },
        "target_accuracy": float((inp.y_hat == inp.labels).double().mean()),
        "pathways": {
            "valid_fraction": float(clean["valid"].double().mean()),
            "top1_score_mean": float(clean["log_scores"][..., 0].exp().mean()),
            "topk_score_sum_mean": float(clean["log_scores"].exp().sum(-1).mean()),
            "distinct_top1_chains": int(torch.unique(clean["chains"][:, :, 0].reshape(-1, len(names)), dim=0).shape[0]),
        },
        "importance": {
            name: {
                "agreement_drop_max": float(agreement_drop[offs[t] : offs[t + 1]].max()),
                "agreement_drop_mean": float(agreement_drop[offs[t] : offs[t + 1]].mean()),
            }
            for t, name in enumerate(names)
        },
        "per_channel": {
            name: {  # tap order; mass = mean impulse mass per analysed pixel
                "crossings": cross[:, offs[t] : offs[t + 1]].sum(0).tolist(),
                "mass": (mass_img[:, offs[t] : offs[t + 1]].double().mean(0) / cfg.pixels).tolist(),
                "agreement_drop": agreement_drop[offs[t] : offs[t + 1]].tolist(),
                "logp_drop": logp_drop[offs[t] : offs[t + 1]].tolist(),
            }
            for t, name in enumerate(names)
        },
        "crossing_vs_importance": {"global": found["global"], "per_image": found["per_image"]},
        "consistency": {k: {kk: vv for kk, vv in v.items() if kk != "matrix"} for k, v in consistency.items()},
        "class_similarity_matrix": consistency["all"]["matrix"],
        "bank": found["bank"],
        "perturbations": pert,
        "seconds": times,
    }
