"""``python evaluate.py attribution --config configs/<data>/attribution.yaml``: input attributions measured.

Every method of ``gencnp.evaluation.attributions.methods`` runs on the same seeded subset of the split, explaining the
target's prediction ``y_hat``:

- **ground truth** (data whose items carry a region, e.g. ``SyntheticPatterns``): relevance mass and pointing game;
- **sanity checks** (Adebayo et al., NeurIPS 2018): cascading randomisation of the target's layers from the top;
  per method and randomised layer, SSIM and Spearman rank correlation between the normalised ``|a|`` maps before and
  after, on the first ``sanity_n`` images of the subset (GEN-CNP's generator reads the randomised target's features;
  class pathways stay those of the bank; the mean-ablation fill stays the trained one; ``y_hat`` stays the
  original prediction);
- **deletion and insertion** (Petsiuk et al., BMVC 2018): the unmasked target's probability of ``y_hat`` as pixels are
  set to ``deletion_baseline`` (or revealed on it) in decreasing attribution order, and the areas under the curves.

Every mean carries a 95% percentile bootstrap interval over images, and GEN-CNP's pathway gradient is compared
with every other method by paired bootstrap intervals of the per-image differences.
Writes ``attribution.json``, ``attribution.md`` and figures (``attribution_grid.png``, ``sanity_curves.png``,
``deletion_insertion.png``) to ``out_dir``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from gencnp.banks.bank import PathwayBank
from gencnp.data.modules import FashionMNISTDataModule, ImageDataModule
from gencnp.evaluation.attributions import metrics as AM
from gencnp.evaluation.attributions import render as R
from gencnp.evaluation.attributions.methods import (
    ATTRIBUTION_METHODS,
    AttributionModel,
    attribute,
    cascade_layers,
    randomised,
)
from gencnp.evaluation.attributions.render import OURS
from gencnp.io.checkpoint_io import read_checkpoint
from gencnp.io.files import check_writable_dir, json_safe, write_atomic
from gencnp.systems.gencnp import GenCNP
from gencnp.threads import torch_threads

__all__ = ["attribution", "OURS"]


def attribution(
    generator: str = "runs/fashion_mnist/gencnp/best.ckpt",
    bank: str | None = "runs/fashion_mnist/bank.safetensors",
    data: ImageDataModule | None = None,
    out_dir: str = "runs/fashion_mnist/attribution",
    target_checkpoint: str | None = None,
    split: str = "test",
    n: int = 300,
    subset_seed: int = 0,
    methods: list[str] | None = None,
    batch_size: int = 100,
    ig_steps: int = 32,
    sanity_n: int = 100,
    sanity_seed: int = 0,
    ssim_window: int = 7,
    deletion_steps: int = 20,
    deletion_baseline: float = 0.0,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    grid_images: int = 6,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure input attributions (ground truth, sanity checks, deletion/insertion); write JSON, Markdown, figures.

    Args:
        generator: GEN-CNP checkpoint; its hyper-parameters rebuild the frozen target.
        bank: pathway bank for ``pathway_gradient_class``; ``None`` leaves that method out.
        data: the data module (``class_path``/``init_args``); Fashion-MNIST when unset.
        out_dir: output folder (created).
        target_checkpoint: override the target weights named in the generator's hyper-parameters.
        split: ``'test'`` (or ``'val'``).
        n: images in the seeded subset of the split (every method sees the same images).
        subset_seed: seed of the subset draw.
        methods: names from ``ATTRIBUTION_METHODS``; default every method the inputs allow.
        batch_size: images per attribution batch.
        ig_steps: integration points of ``integrated_gradients``.
        sanity_n: the first ``sanity_n`` subset images are used for the randomisation checks (0 skips them).
        sanity_seed: seed of the re-initialisation.
        ssim_window: Gaussian SSIM window (odd, at most the image side).
        deletion_steps: points of the deletion and insertion curves (plus the start); 0 skips them.
        deletion_baseline: value of a removed pixel, in the data's normalised units (0: the normalisation mean).
        bootstrap_samples: resamples of every interval.
        seed: seed of the bootstrap.
        grid_images: images in the method-by-image figure.
        device: ``'cpu'``, ``'cuda'``, ...
        threads: torch CPU threads during the run (restored afterwards); unset keeps torch's default.
        progress: print one line per phase.

    Returns:
        The content of ``attribution.json``.
    """
    o = SimpleNamespace(**{k: v for k, v in locals().items() if k != "threads"})
    _check_arguments(o, threads)
    check_writable_dir(Path(out_dir), "attribution folder", "set out_dir.")
    with torch_threads(threads):
        return _attribution(o)


def _check_arguments(o: SimpleNamespace, threads: int | None) -> None:
    """Refuse settings ``attribution`` cannot run with, before anything is loaded."""
    for name, lo in (
        ("n", 1),
        ("batch_size", 1),
        ("ig_steps", 2),
        ("sanity_n", 0),
        ("deletion_steps", 0),
        ("bootstrap_samples", 10),
        ("grid_images", 0),
    ):
        if getattr(o, name) < lo:
            raise ValueError(f"{name} must be >= {lo}, got {getattr(o, name)}.")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or null (torch's default), got {threads}.")
    if o.split not in ("test", "val"):
        raise ValueError(f"split must be 'test' (or 'val' for development), got '{o.split}'.")
    unknown = [m for m in (o.methods or []) if m not in ATTRIBUTION_METHODS]
    if unknown:
        raise KeyError(f"unknown attribution methods {unknown}; known methods: {', '.join(ATTRIBUTION_METHODS)}.")
    if o.methods is not None and OURS not in o.methods:
        raise ValueError(f"methods must include '{OURS}' (every comparison is made against it), got {o.methods}.")
    if o.ssim_window % 2 == 0 or o.ssim_window < 1:
        raise ValueError(f"ssim_window must be odd and >= 1, got {o.ssim_window}.")
    if not Path(o.generator).is_file():
        raise FileNotFoundError(
            f"generator checkpoint '{o.generator}' does not exist; train one with "
            "python train.py fit --config configs/<data>/gencnp.yaml, or fix the path."
        )
    if o.bank is not None and not Path(o.bank).is_file():
        raise FileNotFoundError(
            f"pathway bank '{o.bank}' does not exist; export it with python train.py predict --config "
            f"configs/<data>/bank.yaml --ckpt_path {o.generator}, or pass bank: null."
        )
    if o.methods is not None and "pathway_gradient_class" in o.methods and o.bank is None:
        raise ValueError("method 'pathway_gradient_class' needs a bank; set bank, or leave the method out.")


def _load(generator: str, bank: str | None, data, target_checkpoint: str | None, dev: torch.device):
    read_checkpoint(generator)
    overrides = {"target_checkpoint": target_checkpoint} if target_checkpoint else {}
    model = GenCNP.load_from_checkpoint(generator, map_location="cpu", weights_only=True, **overrides).to(dev).eval()
    if data is None:
        data = FashionMNISTDataModule()
    model.check_data(data)
    class_names = list(getattr(data, "class_names", [str(k) for k in range(model.num_classes)]))
    class_paths = None
    if bank is not None:
        bank_obj = PathwayBank.load(bank, target=model.target, class_names=class_names)
        if bank_obj.tau is None:
            raise ValueError(f"pathway bank '{bank}' has no tau; export it with PathwayBankWriter (it chooses tau).")
        class_paths = bank_obj.class_pathways().to(dev)
    return model, data, class_names, class_paths


def _attribution(o: SimpleNamespace) -> dict[str, Any]:
    """The body of ``attribution`` (``o``: its arguments but ``threads``)."""
    t0 = time.perf_counter()
    say = print if o.progress else (lambda *_: None)
    dev = torch.device(o.device)
    model, data, class_names, class_paths = _load(o.generator, o.bank, o.data, o.target_checkpoint, dev)
    target = model.target
    if o.ssim_window > min(target.input_shape[-2:]):
        raise ValueError(f"ssim_window ({o.ssim_window}) exceeds the image side {min(target.input_shape[-2:])}.")
    am = AttributionModel.from_gencnp(model, class_paths, ig_steps=o.ig_steps)
    names = list(o.methods or am.methods())
    x, labels, regions = _subset(data.split(o.split), o.n, o.subset_seed, dev)
    n, bs = x.shape[0], o.batch_size
    with torch.no_grad():
        y_hat = torch.cat([target(x[i : i + bs]).argmax(1) for i in range(0, n, bs)])
    say(f"attribution: {n} {o.split} images (seed {o.subset_seed}), methods {', '.join(names)}")

    def maps_of(method: str, idx: slice | None = None) -> torch.Tensor:
        xs, ys = (x, y_hat) if idx is None else (x[idx], y_hat[idx])
        return torch.cat([attribute(method, am, xs[i : i + bs], ys[i : i + bs]).cpu() for i in range(0, len(xs), bs)])

    maps, seconds = {}, {}
    for m in names:
        t = time.perf_counter()
        maps[m] = maps_of(m)
        seconds[m] = time.perf_counter() - t
        say(f"  {m}: {1000 * seconds[m] / n:.2f} ms/image")
    res, curves, comparisons, layers, k = _measure(o, target, x, y_hat, regions, maps, maps_of, names, say)
    out = Path(o.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = (x.cpu(), y_hat.cpu(), labels, maps, names, regions, class_names)
    figures = R.figures(out, *shown, o.grid_images, res, layers, k, curves, n, o.deletion_baseline)
    report = {
        **res,
        "comparisons": comparisons,
        "curves": curves,
        "methods": {
            m: {"source": ATTRIBUTION_METHODS[m].source, "signed": ATTRIBUTION_METHODS[m].signed}
            | {"ms_per_image": 1000 * seconds[m] / n}
            for m in names
        },
        "sanity_layers": layers,
        "settings": _settings(o, target, n, k, regions is not None, float((y_hat.cpu() == labels).double().mean())),
        "figures": figures,
        "seconds": time.perf_counter() - t0,
    }
    write_atomic(out / "attribution.json", json.dumps(json_safe(report), indent=1).encode())
    write_atomic(out / "attribution.md", R.markdown(report, names).encode())
    say(
        f"attribution: wrote {out / 'attribution.json'}, attribution.md and {len(figures)} figures in {report['seconds']:.1f}s"
    )
    return report


def _measure(o, target, x, y_hat, regions, maps, maps_of, names, say) -> tuple:
    """Ground truth, deletion/insertion, the paired comparisons and the sanity checks of the ``maps``.

    Returns ``(res, curves, comparisons, sanity layers, sanity images)``."""
    res: dict[str, Any] = {}
    boot = dict(n_boot=o.bootstrap_samples, seed=o.seed)
    per_image: dict[str, dict[str, torch.Tensor]] = {}
    if regions is not None:
        _ground_truth(maps, regions, names, boot, res, per_image)
    curves = {}
    if o.deletion_steps:
        steps, base, bs = o.deletion_steps, o.deletion_baseline, o.batch_size
        curves = _deletion_insertion(target, x, y_hat, maps, names, bs, steps, base, boot, res, per_image, say)
    # paired comparisons: GEN-CNP's pathway gradient minus each other method
    comparisons = _comparisons(per_image, names, boot) if OURS in names else {}
    # sanity checks: cascading randomisation from the top
    k = min(o.sanity_n, x.shape[0])
    layers = _sanity(target, maps, maps_of, names, k, o.sanity_seed, o.ssim_window, boot, res, say) if k else []
    return res, curves, comparisons, layers, k


def _settings(o, target, n: int, k: int, ground_truth: bool, accuracy: float) -> dict[str, Any]:
    keys = ("split", "subset_seed", "sanity_seed", "ssim_window", "ig_steps", "deletion_steps", "deletion_baseline")
    return {
        "generator": str(o.generator),
        "bank": o.bank,
        "n": n,
        "sanity_n": k,
        **{key: getattr(o, key) for key in keys},
        "bootstrap_samples": o.bootstrap_samples,
        "seed": o.seed,
        "class_source": "target prediction",
        "target": target.arch,
        "taps": target.tap_names,
        "ground_truth": ground_truth,
        "target_accuracy_on_subset": accuracy,
    }


def _subset(dataset, n: int, subset_seed: int, dev: torch.device):
    """The seeded subset of ``min(n, len(dataset))`` images (in dataset order): inputs on ``dev``, labels, and the
    ground-truth regions when the dataset has them (else ``None``)."""
    g = torch.Generator().manual_seed(subset_seed)
    pos = torch.sort(torch.randperm(len(dataset), generator=g)[: min(n, len(dataset))]).values.tolist()
    items = [dataset[i] for i in pos]
    x = torch.stack([it[0] for it in items]).to(dev)
    labels = torch.as_tensor([int(it[1]) for it in items])
    regions = torch.stack([it[2][0] if it[2].dim() == 3 else it[2] for it in items]) if len(items[0]) > 2 else None
    return x, labels, regions


def _ground_truth(maps, regions, names, boot, res, per_image) -> None:
    """Relevance mass and pointing game of every method on the ground-truth regions (intervals into ``res``)."""
    for m in names:
        rm, pg = AM.relevance_mass(maps[m], regions), AM.pointing_game(maps[m], regions)
        per_image.setdefault("relevance_mass", {})[m] = rm
        per_image.setdefault("pointing", {})[m] = pg
        res[f"relevance_mass/{m}"] = AM.bootstrap(rm, **boot)
        res[f"pointing/{m}"] = AM.bootstrap(pg, **boot)


def _comparisons(per_image: dict, names: list[str], boot: dict) -> dict[str, Any]:
    """Paired intervals of GEN-CNP's pathway gradient minus each other method, per measure."""
    comparisons = {}
    better = {"relevance_mass": "higher", "pointing": "higher", "deletion_auc": "lower", "insertion_auc": "higher"}
    for metric, vals in per_image.items():
        for m in names:
            if m != OURS:
                d = AM.bootstrap(vals[OURS] - vals[m], **boot)
                d["better"] = better[metric]
                comparisons[f"{metric}/{OURS}-{m}"] = d
    return comparisons


def _deletion_insertion(
    target, x, y_hat, maps, names, batch_size, deletion_steps, deletion_baseline, boot, res, per_image, say
) -> dict[str, dict]:
    """Deletion and insertion curves of every method (mean curves returned; AUC intervals into ``res``)."""
    n = x.shape[0]
    curves = {}
    say("  deletion and insertion curves")
    for m in names:
        parts = [
            AM.deletion_insertion(
                target,
                x[i : i + batch_size],
                maps[m][i : i + batch_size].to(x.device),
                y_hat[i : i + batch_size],
                deletion_steps,
                deletion_baseline,
            )
            for i in range(0, n, batch_size)
        ]
        fr = parts[0]["fractions"]
        dele, ins = torch.cat([p["deletion"] for p in parts]), torch.cat([p["insertion"] for p in parts])
        curves[m] = {"fractions": fr.tolist(), "deletion": dele.mean(0).tolist(), "insertion": ins.mean(0).tolist()}
        per_image.setdefault("deletion_auc", {})[m] = AM.auc(dele, fr)
        per_image.setdefault("insertion_auc", {})[m] = AM.auc(ins, fr)
        res[f"deletion_auc/{m}"] = AM.bootstrap(per_image["deletion_auc"][m], **boot)
        res[f"insertion_auc/{m}"] = AM.bootstrap(per_image["insertion_auc"][m], **boot)
    return curves


def _sanity(target, maps, maps_of, names, k, sanity_seed, ssim_window, boot, res, say) -> list[str]:
    """Cascading randomisation from the top on the first ``k`` images (SSIM and Spearman intervals into ``res``);
    returns the layers randomised, in order."""
    layers, sanity = [], {}
    groups = cascade_layers(target)
    ref = {m: AM.normalise(maps[m][:k]) for m in names}
    say(f"  sanity checks: {len(groups)} layers from the top ({', '.join(name for name, _ in groups)}), {k} images")
    for i, (layer, _) in enumerate(groups):
        layers.append(layer)
        modules = [mod for _, mods in groups[: i + 1] for mod in mods]
        with randomised(target, modules, seed=sanity_seed):
            for m in names:
                after = AM.normalise(maps_of(m, slice(0, k)))
                s, r = AM.ssim(ref[m], after, window=ssim_window), AM.spearman(ref[m], after)
                res[f"sanity_ssim/{m}/{layer}"] = AM.bootstrap(s, **boot)
                res[f"sanity_spearman/{m}/{layer}"] = AM.bootstrap(r, **boot)
                sanity.setdefault(m, {})[layer] = (float(s.mean()), float(r.mean()))
    return layers


# ----- Markdown -----
