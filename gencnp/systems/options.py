"""GenCNP's grouped settings: one dataclass per concern, as LightningCLI reads them from YAML.

```yaml
model:
  class_path: gencnp.GenCNP
  init_args:
    target_checkpoint: runs/fashion_mnist/target/best.ckpt
    sparsity: {lambda_sp: 14.0, kappa: 0.7}
    losses: {lambda_swap: 6.0}
    optimizer:
      class_path: torch.optim.Adam
      init_args: {lr: 0.005}
```

Field names are the flat names of gencnp 0.2, so the range rules (``gencnp.settings.RULES``), the logs and the
design document keep one name per setting. ``migrate_flat`` maps a flat 0.2 setting (a checkpoint's stored
hyper-parameters, or a keyword argument) into its group (docs/design.md section 5).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gencnp.pathways import nulls as NL
from gencnp.pathways.selection import W_KEPT, W_SWAP, W_ZERO
from gencnp.settings import check_settings

__all__ = [
    "GeneratorSettings",
    "Losses",
    "Sparsity",
    "Controls",
    "Selection",
    "GROUPS",
    "coerce",
    "flat_view",
    "grouped_key",
    "migrate_flat",
    "default_optimizer",
    "check",
]


@dataclass
class GeneratorSettings:
    """The pathway generator (RFE, PDN, RPD, DAQ; docs/design.md section 5).

    Args:
        d: width of the generator's embeddings and recurrent states.
        groups: GroupNorm groups of the tap embedders.
        init_score: every channel's keep probability at initialisation (in (0, 1)).
        binarizer: ``'daq'`` (distance-aware quantisation) or ``'ste'`` (straight-through).
        class_prior: weight ``alpha`` of the class prior on the score logits, ``alpha * (f_c - mean_j f_c)`` with
            ``f_c`` the running selection frequencies of the predicted class; 0 disables it.
        proto_momentum: EMA momentum of the class prototypes of mean scores (the ``con`` loss).
        freq_momentum: EMA momentum of the class selection frequencies (class lookup, class prior).
    """

    d: int = 64
    groups: int = 8
    init_score: float = 0.9
    binarizer: str = "daq"
    class_prior: float = 4.0
    proto_momentum: float = 0.9
    freq_momentum: float = 0.98


@dataclass
class Losses:
    """Weights of the loss terms besides ``kd`` and sparsity (docs/design.md section 5, table of terms).

    Args:
        temperature: ``T`` of the ``kd`` term.
        lambda_swap: the ``swap`` loss: a pathway must not give its class on an image of another class.
        lambda_zero: the ``zero`` loss: the all-zero image through a pathway must not give its class.
        lambda_null: the ``null`` loss on the null inputs of ``Controls.null_train``.
        lambda_cls: PDN distillation (a class-relevant code).
        lambda_con: class relevance (distance of the scores to their class prototype).
        lambda_lookup: each pathway must beat the class lookup at its own per-tap counts, with ``lookup_margin``.
        lookup_margin: margin of the ``lookup`` loss in nats.
        lambda_nested: ``kd`` on the top ``rho`` share of each pathway (``rho ~ U(nested_min, 1)``), so the score
            ranking is useful below the operating point.
        nested_min: smallest share of a pathway kept by the ``nested`` loss.
        lambda_budget: ``kd`` through each sample's top ``round(b D)`` channels by score over all taps, ``b ~
            U(budget_min, budget_max)`` a kept budget drawn per sample and step (a straight-through top-k: the
            forward keeps exactly those channels, the gradient reaches every score through ``sigmoid((logit a - t) /
            budget_temperature)`` with ``t`` between the last kept and the first dropped score), so
            ``explain(x, kept=b)`` serves any budget in that range. With ``lambda_swap > 0`` the term adds ``lambda_swap`` times the ``swap`` loss of
            the budget's pathway on the swap partner (a small pathway must not force another class's image).
        budget_min, budget_max: the range of kept budgets (fractions of each tap's channels) of the ``budget`` loss.
        budget_temperature: width of the soft top-k of the ``budget`` loss, in score logits.
    """

    temperature: float = 1.0
    lambda_swap: float = 6.0
    lambda_zero: float = 1.0
    lambda_null: float = 2.0
    lambda_cls: float = 1.0
    lambda_con: float = 0.1
    lambda_lookup: float = 0.0
    lookup_margin: float = 0.0
    lambda_nested: float = 0.0
    nested_min: float = 0.5
    lambda_budget: float = 0.0
    budget_min: float = 0.1
    budget_max: float = 0.4
    budget_temperature: float = 1.0


@dataclass
class Sparsity:
    """Instance-specific sparsity: the weight, its ramp and the gates that stop it (docs/design.md section 5).

    Args:
        lambda_sp: weight of the sparsity term after the ramp.
        sparsity_per: ``'tap'`` (every tap's mean score counts the same) or ``'channel'`` (every channel counts the
            same: the term is the expected kept fraction).
        sparsity_ramp_epochs: epochs over which the weight grows linearly from 0 (<= 0: constant).
        kappa: faithfulness gate, ``p^m_y >= kappa p_y``.
        tap_weights: one weight per tap (``None``: all 1).
        dependence_gate: when set, a sample's sparsity pressure also stops while its pathway gives its class a
            probability above this value on a control input (swap partner, zero image, null input).
        gate_top_margin: when set, the gate also requires the masked output to keep the class on top by this many
            nats.
    """

    lambda_sp: float = 14.0
    sparsity_per: str = "channel"
    sparsity_ramp_epochs: float = 0.25
    kappa: float = 0.7
    tap_weights: list[float] | None = None
    dependence_gate: float | None = 0.15
    gate_top_margin: float | None = None


@dataclass
class Controls:
    """Input-dependence controls in training and evaluation (docs/design.md section 2).

    Args:
        swap_probes_per_class: reference train images per class (seeded, correctly classified) for the
            ``swap_forcing`` control; sample i gets a probe of another class chosen by a hash of its pixels.
        swap_partner: the training ``swap`` partner: ``'roll'`` (the next sample) or ``'hard'`` (a sample whose class
            is the runner-up class under the target).
        probe_filter: ``'correct'`` (probes are training images the target classifies correctly) or ``'label'``
            (the first images of each class, no target forward: for targets too weak to classify two classes, such
            as the 50-step ImageNet-shape smoke configs).
        probe_candidates: training images searched for probes (seeded order; the search stops once every class has
            its probes); ``None``: ``max(200 K, 2000)``.
        control_fraction: share of each training batch that runs the swap, zero and null losses (1: all).
        null_families: null-input families measured in validation and test (``None``: gaussian, shuffle, smooth;
            ``[]`` disables).
        null_train: families drawn in training for the ``null`` loss, one per step in turn.
    """

    swap_probes_per_class: int = 4
    swap_partner: str = "roll"
    probe_filter: str = "correct"
    probe_candidates: int | None = None
    control_fraction: float = 1.0
    null_families: list[str] | None = None
    null_train: list[str] | None = field(default_factory=lambda: ["uniform", "smooth", "constant"])


@dataclass
class Selection:
    """Checkpoint selection: ``val/score = agreement - w_swap swap_forcing - w_zero zero_forcing - w_kept kept``."""

    w_swap: float = W_SWAP
    w_zero: float = W_ZERO
    w_kept: float = W_KEPT


GROUPS: dict[str, type] = {
    "generator": GeneratorSettings,
    "losses": Losses,
    "sparsity": Sparsity,
    "controls": Controls,
    "selection": Selection,
}
_GROUP_OF = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
# Flat 0.2 settings that became the optimiser and scheduler callables.
_OPTIM_KEYS = ("lr", "weight_decay", "schedule")


def default_optimizer(params, lr: float = 5e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam with the recommended learning rate (``configs/fashion_mnist/gencnp.yaml``)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def coerce(group: str, value: Any) -> Any:
    """A group's settings as its dataclass: ``None`` gives the defaults, a mapping its fields."""
    cls = GROUPS[group]
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise TypeError(f"{group} has no setting {unknown}; its settings are {sorted(known)}.")
        return cls(**value)
    raise TypeError(f"{group} must be a {cls.__name__} or a mapping of its settings, got {type(value).__name__}.")


def flat_view(groups: Mapping[str, Any]) -> dict[str, Any]:
    """Every grouped setting by its own name (the names are unique across groups)."""
    return {k: v for obj in groups.values() for k, v in dataclasses.asdict(obj).items()}


def grouped_key(name: str) -> str:
    """``'lambda_sp'`` -> ``'sparsity.lambda_sp'``: where a flat setting lives now (other names are returned as
    they are)."""
    return f"{_GROUP_OF[name]}.{name}" if name in _GROUP_OF else name


def migrate_flat(flat: Mapping[str, Any], groups: dict[str, Any], owner: str = "GenCNP") -> dict[str, Any]:
    """Move flat 0.2 settings into their groups; returns the optimiser settings found (``lr``, ``weight_decay``,
    ``schedule``). ``groups`` maps group names to dataclasses and is updated in place.

    Raises:
        TypeError: a name that was never a GenCNP setting.
    """
    unknown = sorted(k for k in flat if k not in _GROUP_OF and k not in _OPTIM_KEYS)
    if unknown:
        raise TypeError(
            f"{owner} got unexpected settings {unknown}; grouped settings are {sorted(GROUPS)} (see "
            "gencnp.systems.options), plus optimizer and lr_scheduler."
        )
    if flat:
        warnings.warn(
            f"{owner}: flat settings {sorted(flat)} are the 0.2 form; they were moved into their groups "
            f"({', '.join(grouped_key(k) for k in sorted(flat) if k in _GROUP_OF) or 'optimizer'}).",
            FutureWarning,
            stacklevel=3,
        )
    for name, value in flat.items():
        if name in _GROUP_OF:
            setattr(groups[_GROUP_OF[name]], name, value)
    return {k: flat[k] for k in _OPTIM_KEYS if k in flat}


def legacy_optimizers(optim: Mapping[str, Any]) -> tuple[dict | None, dict | None]:
    """The optimiser and scheduler specs (``{class_path, init_args}``, as LightningCLI writes them) equal to 0.2's
    ``lr``, ``weight_decay`` and ``schedule``."""
    if optim.get("schedule", "cosine") not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant' (0.2 form), got '{optim['schedule']}'.")
    optimizer = None
    if "lr" in optim or "weight_decay" in optim:
        args = {"lr": float(optim.get("lr", 5e-3)), "weight_decay": float(optim.get("weight_decay", 0.0))}
        optimizer = {"class_path": "torch.optim.Adam", "init_args": args}
    scheduler = None
    if optim.get("schedule") == "constant":
        args = {"factor": 1.0, "total_iters": 0}
        scheduler = {"class_path": "torch.optim.lr_scheduler.ConstantLR", "init_args": args}
    return optimizer, scheduler


def as_callable(spec: Any, what: str) -> Callable | None:
    """An optimiser or scheduler callable from what ``GenCNP`` was given: a callable (LightningCLI's
    ``OptimizerCallable``) as it is, or a ``{class_path, init_args}`` mapping (how checkpoints and YAML record it).

    Raises:
        TypeError: anything else, or a class path that does not import.
    """
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, Mapping) and isinstance(spec.get("class_path"), str):
        module, _, name = spec["class_path"].rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise TypeError(f"{what}: class_path '{spec['class_path']}' does not import ({err}).") from err
        return functools.partial(cls, **dict(spec.get("init_args") or {}))
    raise TypeError(
        f"{what} must be a callable taking the parameters (or the optimiser), or a mapping "
        f"{{class_path: ..., init_args: {{...}}}}; got {type(spec).__name__}."
    )


def check(owner: Any, given: Mapping[str, Any], default_nulls: Sequence[str]) -> tuple[list[str], list[str]]:
    """Types, ranges and choices of every setting of ``owner`` (its ``settings`` namespace and the top-level
    arguments ``given``), before anything is built; returns the evaluated and the trained null families."""
    s = owner.settings
    for name, value, allowed in (
        ("ablation", s.ablation, ("zero", "mean")),
        ("class_source", s.class_source, ("pred", "label")),
        ("sparsity.sparsity_per", s.sparsity_per, ("tap", "channel")),
        ("controls.swap_partner", s.swap_partner, ("roll", "hard")),
        ("controls.probe_filter", s.probe_filter, ("correct", "label")),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got '{value}'.")
    if not 0 < s.control_fraction <= 1:
        raise ValueError(
            f"controls.control_fraction must lie in (0, 1] (1: controls on every sample), got {s.control_fraction}."
        )
    # Types and ranges (gencnp.settings.RULES); the target's shape settings may be unset here (read from the
    # spec the target checkpoint records) and are checked once resolved.
    spec_keys = ("target", "num_classes", "in_chans", "image_size")
    top = {k: v for k, v in given.items() if k not in GROUPS and not (k in spec_keys and v is None)}
    check_settings(owner, {**top, **vars(s)})
    null_eval = NL.check_families(
        default_nulls if s.null_families is None else s.null_families, "controls.null_families"
    )
    null_train = NL.check_families(s.null_train, "controls.null_train")
    if s.lambda_null > 0 and not null_train:
        raise ValueError(
            f"losses.lambda_null is {s.lambda_null} but controls.null_train is empty; list the families to train "
            f"on (from {list(NL.FAMILIES)}), or set losses.lambda_null: 0."
        )
    if not 0 < s.nested_min <= 1:
        raise ValueError(
            f"losses.nested_min must lie in (0, 1] (the smallest share of a pathway kept), got {s.nested_min}."
        )
    if not 0 < s.budget_min <= s.budget_max <= 1 or s.budget_temperature <= 0:
        raise ValueError(
            "losses.budget_min and losses.budget_max must satisfy 0 < budget_min <= budget_max <= 1 (kept fractions), "
            f"and budget_temperature > 0; got {s.budget_min}, {s.budget_max}, {s.budget_temperature}."
        )
    if not 0 <= s.freq_momentum < 1:
        raise ValueError(f"generator.freq_momentum must lie in [0, 1), got {s.freq_momentum}.")
    return null_eval, null_train
