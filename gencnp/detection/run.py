"""``detect()``: pathway scores against pytorch-ood's detectors on attacked, corrupted and out-of-distribution inputs
(docs/design.md section 12). Writes ``detect.json``, ``detect.md`` and ROC figures."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from gencnp.banks import PathwayBank
from gencnp.data import FashionMNISTDataModule, ImageDataModule
from gencnp.detection.baselines import BASELINES, Baselines
from gencnp.detection.combine import LogisticCombination, orient
from gencnp.detection.features import Scorer
from gencnp.detection.perturb import CORRUPTIONS, corrupt, pixel_stats
from gencnp.detection.report import figures, markdown, tables
from gencnp.detection.sources import parse_sources
from gencnp.io.checkpoints import read_checkpoint
from gencnp.io.files import check_writable_dir, json_safe, write_atomic
from gencnp.systems import GenCNP
from gencnp.threads import torch_threads

__all__ = ["detect"]


def detect(
    generator: str = "runs/fashion_mnist/gencnp/best.ckpt",
    bank: str = "runs/fashion_mnist/bank.safetensors",
    data: ImageDataModule | None = None,
    out_dir: str = "runs/fashion_mnist/detect",
    target_checkpoint: str | None = None,
    n: int | None = None,
    val_n: int = 2000,
    fit_n: int = 10000,
    attack_n: int = 2000,
    ood_n: int = 2000,
    fgsm_eps: list[float] | None = None,
    pgd_eps: list[float] | None = None,
    pgd_steps: int = 10,
    adaptive_eps: float = 0.1,
    adaptive_steps: int = 10,
    adaptive_weights: list[float] | None = None,
    adaptive_target: str = "masked_logit_gap@class",
    corruptions: list[str] | None = None,
    severities: list[int] | None = None,
    ood: list[dict] | None = None,
    baselines: list[str] | None = None,
    knn_k: int = 50,
    vim_dim: int = 64,
    bootstrap_samples: int = 200,
    seed: int = 0,
    batch_size: int = 500,
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Flag attacked and out-of-distribution inputs with pathway scores, beside pytorch-ood's detectors.

    In-distribution inputs are the clean test images; every other set is scored against them (positives: the
    attacked, corrupted or OOD inputs). Baselines are fitted on train images; the signs of the pathway scores and
    their logistic combination on validation (a holdout of train: clean vs attacked and corrupted); nothing on test.

    Args:
        generator: GEN-CNP checkpoint (its hyper-parameters rebuild the frozen target).
        bank: pathway bank (``.safetensors``) of that generator, with its tau.
        data: the in-distribution data module; Fashion-MNIST when unset.
        out_dir: output folder (``detect.json``, ``detect.md``, ``roc_*.png``).
        target_checkpoint: override the target weights named in the generator's hyper-parameters.
        n: clean test images (a seeded subset); ``None``: the whole test split.
        val_n: validation images (seeded subset) for the signs and the combination.
        fit_n: train images (seeded subset) the feature baselines are fitted on.
        attack_n: test images attacked (seeded subset of the clean ones); only successful attacks on correctly
            classified images count as attacked inputs.
        ood_n: images per corruption and per OOD set (seeded subset).
        fgsm_eps: FGSM budgets, L-inf in pixel units (default ``0.05, 0.1``).
        pgd_eps: PGD budgets (default ``0.05, 0.1``).
        pgd_steps: PGD steps (step size ``2.5 eps / steps``).
        adaptive_eps, adaptive_steps: budget and steps of the adaptive PGD (``PathwayAdaptivePGD``).
        adaptive_weights: weights of its pathway term, one attacked set each (default ``1, 10``): report the worst.
        adaptive_target: the pathway score the adaptive PGD pushes toward clean (``Scorer.adaptive_score``).
        corruptions: names in ``CORRUPTIONS`` (default all).
        severities: corruption severities 1-5 (default ``1, 3, 5``).
        ood: OOD sets, each ``{name, path}`` or ``{name, data: {class_path, init_args}}`` (``gencnp.detection.sources``).
        baselines: pytorch-ood detectors (default all of ``msp, energy, mahalanobis, vim, knn``).
        knn_k: KNN's ``k``.
        vim_dim: ViM's principal subspace dimension.
        bootstrap_samples: bootstrap resamples of every interval.
        seed: seed of subsets, attacks, corruptions and the bootstrap.
        batch_size: images per batch.
        device: ``'cpu'``, ``'cuda'``, ...
        threads: CPU threads for torch during the run (``None``: torch's default).
        progress: show progress bars.

    Returns:
        The content of ``detect.json``.
    """
    options = SimpleNamespace(**{k: v for k, v in locals().items() if k != "threads"})
    with torch_threads(threads):
        return _detect(options)


INSTALL = 'pip install -e ".[detect]" && pip install --no-deps torchattacks==3.5.1'


def _check_installed() -> None:
    """Refuse at once when the optional detection libraries are missing, naming the install command."""
    import importlib.util

    missing = [m for m in ("torchattacks", "pytorch_ood", "sklearn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"evaluate.py detect needs {', '.join(missing)} (optional dependencies); install them with: {INSTALL} "
            "(torchattacks without its dependencies: it pins an old requests)."
        )


def _check(o: SimpleNamespace) -> None:
    """Refuse bad options before any work (and before any folder is created)."""
    _check_installed()
    o.fgsm_eps = list(o.fgsm_eps if o.fgsm_eps is not None else (0.05, 0.1))
    o.pgd_eps = list(o.pgd_eps if o.pgd_eps is not None else (0.05, 0.1))
    o.corruptions = list(o.corruptions if o.corruptions is not None else CORRUPTIONS)
    o.severities = list(o.severities if o.severities is not None else (1, 3, 5))
    o.baselines = list(o.baselines if o.baselines is not None else BASELINES)
    o.adaptive_weights = list(o.adaptive_weights if o.adaptive_weights is not None else (1.0, 10.0))
    if any(w < 0 for w in o.adaptive_weights):
        raise ValueError(f"adaptive_weights must be >= 0, got {o.adaptive_weights}.")
    base, _, per_class = o.adaptive_target.partition("@")
    if base not in ("pathway_surprise", "masked_logit_gap") or per_class not in ("", "class"):
        raise ValueError(
            "adaptive_target must be pathway_surprise or masked_logit_gap, optionally with '@class'; "
            f"got '{o.adaptive_target}'."
        )
    for name, lo in (("val_n", 10), ("fit_n", 10), ("attack_n", 1), ("ood_n", 1), ("batch_size", 1)):
        if getattr(o, name) < lo:
            raise ValueError(f"{name} must be >= {lo}, got {getattr(o, name)}.")
    if o.n is not None and o.n < 10:
        raise ValueError(f"n must be >= 10 or null (the whole test split), got {o.n}.")
    if o.bootstrap_samples < 10:
        raise ValueError(f"bootstrap_samples must be >= 10, got {o.bootstrap_samples}.")
    if any(not 0 < e <= 1 for e in [*o.fgsm_eps, *o.pgd_eps, o.adaptive_eps]):
        raise ValueError("attack budgets (fgsm_eps, pgd_eps, adaptive_eps) must lie in (0, 1], pixel units.")
    if o.pgd_steps < 1 or o.adaptive_steps < 1:
        raise ValueError("pgd_steps and adaptive_steps must be >= 1.")
    unknown = [c for c in o.corruptions if c not in CORRUPTIONS]
    if unknown or any(s not in (1, 2, 3, 4, 5) for s in o.severities):
        raise ValueError(
            f"corruptions must be among {sorted(CORRUPTIONS)} and severities 1-5; got {o.corruptions}, {o.severities}."
        )
    bad = [b for b in o.baselines if b not in BASELINES]
    if bad:
        raise ValueError(f"unknown baselines {bad}; available: {list(BASELINES)}.")
    for path, what, fix in (
        (o.generator, "generator checkpoint", "python train.py fit --config configs/fashion_mnist/gencnp.yaml"),
        (
            o.bank,
            "pathway bank",
            f"python train.py predict --config configs/fashion_mnist/bank.yaml --ckpt_path {o.generator}",
        ),
    ):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} '{path}' does not exist; make it with {fix}, or fix the path.")
    check_writable_dir(Path(o.out_dir), "detect folder", "set out_dir.")


def _load(o: SimpleNamespace, dev: torch.device):
    """Model, data, bank, scorer, pixel statistics and the OOD sources, all checked."""
    overrides = {"target_checkpoint": o.target_checkpoint} if o.target_checkpoint else {}
    recorded = read_checkpoint(o.generator).get("class_names")
    model = GenCNP.load_from_checkpoint(o.generator, map_location="cpu", weights_only=True, **overrides).to(dev).eval()
    data = o.data if o.data is not None else FashionMNISTDataModule(eval_batch_size=o.batch_size)
    model.check_data(data)
    class_names = list(getattr(data, "class_names", [str(k) for k in range(model.num_classes)]))
    if recorded is not None and [str(c) for c in recorded] != [str(c) for c in class_names]:
        raise ValueError(
            f"generator checkpoint '{o.generator}' was trained on the classes {list(recorded)}, but the data has "
            f"{class_names}; evaluate on the data it was trained on."
        )
    sources = parse_sources(o.ood, model.target.input_shape)
    bank = PathwayBank.load(o.bank, target=model.target, class_names=class_names)
    if bank.tau is None:
        raise ValueError(f"pathway bank '{o.bank}' has no tau; export it with PathwayBankWriter.")
    scorer = Scorer(model, bank.class_pathways(), bank.frequencies())
    mean, std = pixel_stats(data, model.target.input_shape[0])
    return model, data, bank, scorer, (mean, std), sources


def _pick(total: int, n: int | None, seed: int) -> list[int]:
    if n is None or n >= total:
        return list(range(total))
    return sorted(torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].tolist())


def _images(dataset, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for b in DataLoader(Subset(dataset, idx), batch_size=1000, shuffle=False, num_workers=0):
        xs.append(b[0].float())
        ys.append(torch.as_tensor(b[1]).long())
    return torch.cat(xs), torch.cat(ys)


def _attack(atk, x: torch.Tensor, y: torch.Tensor, batch_size: int, dev: torch.device) -> torch.Tensor:
    return torch.cat(
        [atk(xb.to(dev), yb.to(dev)).detach().cpu() for xb, yb in zip(x.split(batch_size), y.split(batch_size))]
    )


def _perturbations(o: SimpleNamespace) -> list[tuple[str, str, dict]]:
    """``(set name, family, settings)`` of every attack and corruption, in table order."""
    out = [(f"fgsm_eps{e:g}", "attack", {"attack": "fgsm", "eps": e}) for e in o.fgsm_eps]
    out += [(f"pgd_eps{e:g}", "attack", {"attack": "pgd", "eps": e}) for e in o.pgd_eps]
    out += [(f"{c}_s{s}", "corruption", {"corruption": c, "severity": s}) for c in o.corruptions for s in o.severities]
    return out


def _perturb(o, ctx, spec: dict, x: torch.Tensor, y: torch.Tensor, salt: int) -> torch.Tensor:
    """Apply one attack or corruption (settings ``spec``) to normalised ``x`` with labels ``y``."""
    mean, std = ctx.stats
    if "corruption" in spec:
        return corrupt(x, spec["corruption"], spec["severity"], mean, std, seed=o.seed + salt)
    from gencnp.detection.attacks import make_attack

    torch.manual_seed(o.seed + salt)  # torchattacks' PGD draws its random start from the global generator
    atk = make_attack(spec["attack"], ctx.model.target, spec["eps"], o.pgd_steps, mean, std)
    return _attack(atk, x, y, o.batch_size, ctx.dev)


def _flagged(ctx, x_adv: torch.Tensor, y: torch.Tensor, clean_pred: torch.Tensor, attack: bool, desc: str) -> dict:
    """Scores of perturbed images; for attacks only the successful ones on correctly classified images count."""
    s = ctx.scorer.dataset(x_adv, ctx.o.batch_size, desc, ctx.o.progress)
    if not attack:
        return s
    keep = (clean_pred == y) & (s["y_hat"] != y)
    return {k: v[keep] for k, v in s.items()}


def _validation(o, ctx) -> tuple[dict, dict]:
    """Validation scores: clean images, and one perturbation per image (perturbation ``i mod P`` for image ``i``)."""
    val = ctx.data.split("val")
    x, y = _images(val, _pick(len(val), o.val_n, o.seed + 1))
    clean = ctx.scorer.dataset(x, o.batch_size, "val clean", o.progress)
    specs = _perturbations(o)
    parts = []
    for p, (name, family, spec) in enumerate(specs):
        rows = torch.arange(p, len(x), len(specs))
        x_p = _perturb(o, ctx, spec, x[rows], y[rows], salt=1000 + p)
        parts.append(_flagged(ctx, x_p, y[rows], clean["y_hat"][rows], family == "attack", f"val {name}"))
    flagged = {k: torch.cat([q[k] for q in parts]) for k in parts[0]}
    return clean, flagged


def _test_sets(o, ctx, clean: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, dict]:
    """Scores of every flagged test set (attacks, adaptive attack, corruptions, OOD sets) and their descriptions."""
    sets, info = {}, {}
    att = torch.tensor(_pick(len(x), o.attack_n, o.seed + 2))
    cor = torch.tensor(_pick(len(x), o.ood_n, o.seed + 3))
    for p, (name, family, spec) in enumerate(_perturbations(o)):
        rows = att if family == "attack" else cor
        t0 = time.perf_counter()
        x_p = _perturb(o, ctx, spec, x[rows], y[rows], salt=p)
        sets[name] = _flagged(ctx, x_p, y[rows], clean["y_hat"][rows], family == "attack", f"test {name}")
        info[name] = {
            "family": family,
            **spec,
            "inputs": len(rows),
            "flagged": len(sets[name]["y_hat"]),
            "seconds": time.perf_counter() - t0,
        }
    for w in o.adaptive_weights:
        name = f"adaptive_pgd_eps{o.adaptive_eps:g}_w{w:g}"
        sets[name], info[name] = _adaptive(o, ctx, w, x[att], y[att], clean["y_hat"][att], name)
    for src in ctx.sources:
        t0 = time.perf_counter()
        x_o = src.images(ctx.model.target.input_shape, *ctx.stats, o.ood_n, o.seed + 4)
        sets[src.name] = ctx.scorer.dataset(x_o, o.batch_size, f"ood {src.name}", o.progress)
        info[src.name] = {
            "family": "ood",
            "source": src.describe(),
            "inputs": len(x_o),
            "flagged": len(x_o),
            "seconds": time.perf_counter() - t0,
        }
    return sets, info


def _adaptive(o, ctx, weight: float, x: torch.Tensor, y: torch.Tensor, clean_pred: torch.Tensor, name: str):
    """The adaptive PGD at one weight: scores of its successful attacks and the set's description."""
    from gencnp.detection.attacks import PathwayAdaptivePGD

    t0 = time.perf_counter()
    mean, std = ctx.stats
    alpha = 2.5 * o.adaptive_eps / o.adaptive_steps
    sign = ctx.signs[o.adaptive_target]
    atk = PathwayAdaptivePGD(
        ctx.scorer, o.adaptive_eps, alpha, o.adaptive_steps, weight, o.adaptive_target, sign, o.seed
    )
    atk.set_normalization_used(mean=mean, std=std)
    scored = _flagged(ctx, _attack(atk, x, y, o.batch_size, ctx.dev), y, clean_pred, True, f"test {name}")
    info = {
        "family": "adaptive",
        "attack": "pathway-adaptive PGD",
        "target_score": o.adaptive_target,
        "eps": o.adaptive_eps,
        "steps": o.adaptive_steps,
        "weight": weight,
        "inputs": len(x),
        "flagged": len(scored["y_hat"]),
        "seconds": time.perf_counter() - t0,
    }
    return scored, info


def _methods(ctx, s: dict) -> dict[str, torch.Tensor]:
    """Every method's oriented score for one scored set (pathway scores, the combination, the baselines)."""
    out = {k: ctx.signs[k] * s[k] for k in ctx.signs}
    out["pathway_combined"] = ctx.combo.score(out)  # fitted on the oriented scores
    out.update(ctx.base.score(s["logits"], s["features"]))
    return out


def _detect(o: SimpleNamespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    _check(o)
    dev = torch.device(o.device)
    model, data, bank, scorer, stats, sources = _load(o, dev)
    ctx = SimpleNamespace(o=o, dev=dev, model=model, data=data, scorer=scorer, stats=stats, sources=sources)
    phases: dict[str, float] = {}

    def lap(name: str, t=[t_start]) -> None:  # noqa: B006  (a mutable default as the running clock)
        now = time.perf_counter()
        phases[name], t[0] = now - t[0], now

    train = data.split("train")
    x_fit, y_fit = _images(train, _pick(len(train), o.fit_n, o.seed))
    ctx.base = Baselines(o.baselines, scorer.head, o.knn_k, o.vim_dim).fit(scorer.embed(x_fit, o.batch_size), y_fit)
    lap("setup_fit_baselines")
    val_clean, val_flagged = _validation(o, ctx)
    scorer.calibrate(val_clean)  # per-class statistics of the clean validation scores
    val_clean, val_flagged = scorer.with_class_scores(val_clean), scorer.with_class_scores(val_flagged)
    names = scorer.names()
    ctx.signs = orient({k: val_clean[k] for k in names}, {k: val_flagged[k] for k in names})
    oriented = lambda s: {k: ctx.signs[k] * s[k] for k in names}  # noqa: E731
    ctx.combo = LogisticCombination(names).fit(oriented(val_clean), oriented(val_flagged))
    lap("validation_fit")
    test = data.split("test")
    x, y = _images(test, _pick(len(test), o.n, o.seed + 5))
    clean = scorer.dataset(x, o.batch_size, "test clean", o.progress)
    clean["labels"] = y
    lap("test_clean")
    sets, info = _test_sets(o, ctx, clean, x, y)
    lap("test_flagged")
    scored = {"clean": _methods(ctx, clean), **{k: _methods(ctx, v) for k, v in sets.items()}}
    result = tables(scored, info, names, o.baselines, o.bootstrap_samples, o.seed, o.progress)
    lap("metrics_bootstrap")
    result["setup"] = _setup(o, ctx, bank, len(x), clean, val_clean, val_flagged)
    result["figures"] = figures(Path(o.out_dir), scored, result)
    lap("figures")
    result["seconds_total"] = time.perf_counter() - t_start
    result["seconds_by_phase"] = phases
    result = json_safe(result)
    out = Path(o.out_dir)
    write_atomic(out / "detect.json", json.dumps(result, indent=2, allow_nan=False))
    write_atomic(out / "detect.md", markdown(result))
    print(f"detect: wrote {out / 'detect.json'} and {out / 'detect.md'} ({result['seconds_total']:.0f} s)")
    return result


def _setup(o, ctx, bank, n_test: int, clean: dict, val_clean: dict, val_flagged: dict) -> dict:
    """What was measured on what (the JSON's provenance block)."""
    acc = float((clean["y_hat"] == clean["labels"]).double().mean()) if "labels" in clean else None
    return {
        "generator": o.generator,
        "bank": o.bank,
        "tau": bank.tau,
        "data": type(ctx.data).__name__,
        "class_names": list(getattr(ctx.data, "class_names", [])),
        "test_clean": n_test,
        "test_accuracy": acc,
        "validation": {
            "clean": len(val_clean["y_hat"]),
            "flagged": len(val_flagged["y_hat"]),
            "note": "perturbation i mod P on validation image i; attacks count when successful",
        },
        "fit_baselines_train_images": o.fit_n,
        "signs": ctx.signs,
        "combination_weights": ctx.combo.weights(),
        "baselines": ctx.base.settings,
        "attack_n": o.attack_n,
        "ood_n": o.ood_n,
        "pgd_steps": o.pgd_steps,
        "seed": o.seed,
        "bootstrap_samples": o.bootstrap_samples,
        "positives": "attacked / corrupted / OOD inputs; negatives: clean test images; higher score = more anomalous",
    }
