"""One validation of constructor settings: types and ranges, checked before anything is built or written.

Every system, data module and bank writer calls ``check_settings(self, locals())`` at the top of its constructor.
Rules are declared once per argument name in ``RULES`` (an argument without a rule is not checked here), so
the same name means the same thing in every class; ``OWNER_RULES`` narrows a rule for one class. A broken setting
raises ``TypeError`` (wrong type) or ``ValueError`` (out of range) saying what was given, what is expected, why,
and what to set instead (the class's own default when it is valid)::

    GenCNP: lambda_sp=-1.0 is out of range: expected a number >= 0 (weight of the sparsity loss; a negative weight
    rewards what the loss penalises). Set lambda_sp to a number >= 0, e.g. 1.0 (the default).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Range", "Choice", "check_range", "check_choice", "check_settings", "init_args", "RULES", "OWNER_RULES"]


@dataclass(frozen=True)
class Range:
    """A number in ``[lo, hi]`` (``lo_open``/``hi_open`` exclude the bound; ``None``: unbounded).

    Args:
        integer: only integers (``bool`` is refused for every rule).
        none_ok: ``None`` is a valid value (e.g. "unset: all").
        each: the value is a list, each entry checked (``None`` allowed when ``none_ok``).
        why: what the setting does, said in the message.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    none_ok: bool = False
    each: bool = False
    why: str = ""

    def expected(self) -> str:
        kind = "an integer" if self.integer else "a number"
        lo = None if self.lo is None else (f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}")
        hi = None if self.hi is None else (f"< {self.hi:g}" if self.hi_open else f"<= {self.hi:g}")
        if lo and hi:
            left, right = ("(" if self.lo_open else "["), (")" if self.hi_open else "]")
            bound = f"in {left}{self.lo:g}, {self.hi:g}{right}"
        else:
            bound = lo or hi or "(finite)"
        return f"{kind} {bound}" + (" or null" if self.none_ok else "")

    def holds(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))


@dataclass(frozen=True)
class Choice:
    """One of ``options``."""

    options: tuple
    why: str = ""


_W = "weight of the {} loss; a negative weight rewards what the loss penalises"
RULES: dict[str, Range | Choice] = {
    # shapes and sizes
    "num_classes": Range(2, integer=True, why="number of classes"),
    "in_chans": Range(1, integer=True, why="input channels"),
    "image_size": Range(1, integer=True, why="side of the square input images in pixels"),
    "d": Range(1, integer=True, why="generator width"),
    "groups": Range(1, integer=True, why="GroupNorm groups of the generator"),
    "swap_probes_per_class": Range(1, integer=True, why="reference images per class for the swap control"),
    "probe_candidates": Range(1, integer=True, none_ok=True, why="training images searched for swap probes"),
    "ablation_batches": Range(1, integer=True, why="train batches averaged for mean ablation"),
    # losses and their schedule
    "lambda_sp": Range(0, why=_W.format("sparsity")),
    "lambda_swap": Range(0, why=_W.format("swap")),
    "lambda_zero": Range(0, why=_W.format("zero-image")),
    "lambda_cls": Range(0, why=_W.format("PDN class")),
    "lambda_con": Range(0, why=_W.format("prototype")),
    "tap_weights": Range(0, each=True, none_ok=True, why="per-tap weights of the sparsity loss"),
    "temperature": Range(0, lo_open=True, why="kd temperature T; logits are divided by it"),
    "kappa": Range(0, 1, why="faithfulness margin: sparsity acts while p^m >= kappa p"),
    "init_score": Range(
        0, 1, lo_open=True, hi_open=True, why="initial keep score, a probability whose logit is the head bias"
    ),
    "sparsity_ramp_epochs": Range(0, why="epochs over which lambda_sp ramps in; 0 applies it at once"),
    "dependence_gate": Range(
        0, 1, lo_open=True, none_ok=True, why="forcing probability above which sparsity stops; null turns it off"
    ),
    "proto_momentum": Range(0, 1, hi_open=True, why="EMA momentum of the class prototypes"),
    "control_fraction": Range(0, 1, lo_open=True, why="share of each batch running the swap and zero controls"),
    "w_swap": Range(0, why="weight of swap forcing in val/score"),
    "w_zero": Range(0, why="weight of zero forcing in val/score"),
    "w_kept": Range(0, why="weight of the kept fraction in val/score"),
    # optimisation
    "lr": Range(0, lo_open=True, why="learning rate"),
    "weight_decay": Range(0, why="Adam weight decay"),
    "label_smoothing": Range(0, 1, hi_open=True, why="cross-entropy label smoothing"),
    # data
    "eval_batch_size": Range(1, integer=True, none_ok=True, why="evaluation batch size; null uses batch_size"),
    **{
        name: Range(lo, integer=True, why=why)
        for name, lo, why in (  # counts of the data modules
            ("batch_size", 1, "training batch size"),
            ("num_workers", 0, "DataLoader worker processes; 0 loads in the main process"),
            ("val_size", 1, "images held out of train for validation"),
            ("seed", 0, "data seed"),
            ("n_train", 2, "synthetic train images"),
            ("n_test", 1, "synthetic test images"),
            ("pattern_size", 1, "side of the synthetic class pattern"),
        )
    },
    "noise": Range(0, why="std of the synthetic background noise"),
    "signal": Range(0, why="std of the synthetic class pattern"),
    "grid": Range(1, integer=True, why="side of the synthetic class pattern before upsampling"),
    "std": Range(0, lo_open=True, each=True, why="normalisation std; images are divided by it"),
    "mean": Range(each=True, why="normalisation mean"),
    # banks
    "taus": Range(0, 1, lo_open=True, each=True, none_ok=True, why="candidate class-pathway thresholds"),
    "min_agreement": Range(0, 1, why="transfer agreement a tau must reach"),
    "val_batches": Range(1, integer=True, none_ok=True, why="validation batches of the tau search; null uses all"),
}
OWNER_RULES: dict[str, dict[str, Range | Choice]] = {
    "ImageFolderDataModule": {"in_chans": Choice((1, 3), why="images are converted to grey (1) or RGB (3)")},
}


def init_args(obj: Any) -> dict[str, Any]:
    """The arguments of every ``__init__`` running for ``obj`` on the call stack (subclass values win).

    Lets a base class check the settings of the subclass that called it (as Lightning's ``save_hyperparameters``
    collects them).
    """
    found: dict[str, Any] = {}
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame else None
        while frame is not None:
            local = frame.f_locals
            if frame.f_code.co_name == "__init__" and local.get("self") is obj:
                names = frame.f_code.co_varnames[: frame.f_code.co_argcount + frame.f_code.co_kwonlyargcount]
                found = {**{n: local[n] for n in names if n != "self" and n in local}, **found}
            frame = frame.f_back
    finally:
        del frame
    return found


def _default(owner: Any, name: str) -> Any:
    cls = owner if isinstance(owner, type) else type(owner)
    try:
        param = inspect.signature(cls.__init__).parameters.get(name)
    except (TypeError, ValueError):
        return inspect.Parameter.empty
    if param is None and hasattr(cls, "setting_defaults"):  # grouped settings (GenCNP's dataclasses)
        return cls.setting_defaults().get(name, inspect.Parameter.empty)
    return inspect.Parameter.empty if param is None else param.default


def _fix(owner_name: str, name: str, rule: Range | Choice, default: Any) -> str:
    good = default is not inspect.Parameter.empty and default is not None and _problem(rule, default) is None
    example = f", e.g. {default!r} (the default)" if good else ""
    target = rule.expected() if isinstance(rule, Range) else f"one of {list(rule.options)}"
    return f"Set {name} to {target}{example}."


def _problem(rule: Range | Choice, value: Any) -> tuple[type[Exception], str] | None:
    """``(exception type, what is wrong)`` or ``None`` when ``value`` satisfies ``rule``."""
    if isinstance(rule, Choice):
        return None if value in rule.options and not isinstance(value, bool) else (ValueError, "is not allowed")
    if value is None:
        return None if rule.none_ok else (TypeError, "is unset")
    if rule.each and not isinstance(value, (int, float)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            return TypeError, f"is a {type(value).__name__}, not a list of numbers"
        for i, v in enumerate(value):
            bad = _problem(Range(rule.lo, rule.hi, rule.lo_open, rule.hi_open, rule.integer), v)
            if bad:
                return bad[0], f"has entry #{i} = {v!r}, which {bad[1]}"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return TypeError, f"is a {type(value).__name__}, not a number"
    if rule.integer and not isinstance(value, int):
        return TypeError, "is not an integer"
    if not math.isfinite(value):
        return ValueError, "is not finite"
    if not rule.holds(value):
        return ValueError, "is out of range"
    return None


def _raise(owner_name: str, name: str, value: Any, rule: Range | Choice, default: Any, problem) -> None:
    kind, what = problem
    expected = rule.expected() if isinstance(rule, Range) else f"one of {list(rule.options)}"
    why = f" ({rule.why})" if rule.why else ""
    raise kind(
        f"{owner_name}: {name}={value!r} {what}: expected {expected}{why}. {_fix(owner_name, name, rule, default)}"
    )


def check_range(
    owner: Any,
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
    none_ok: bool = False,
    why: str = "",
) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``value`` is a finite number in the given range.

    ``owner`` is the object or class whose setting it is (its name leads the message, its default is suggested).
    """
    rule = Range(lo, hi, lo_open, hi_open, integer, none_ok, why=why)
    problem = _problem(rule, value)
    if problem:
        _raise(_owner_name(owner), name, value, rule, _default(owner, name), problem)


def check_choice(owner: Any, name: str, value: Any, options: Sequence[Any], why: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``options``."""
    rule = Choice(tuple(options), why)
    problem = _problem(rule, value)
    if problem:
        _raise(_owner_name(owner), name, value, rule, _default(owner, name), problem)


def _owner_name(owner: Any) -> str:
    return owner.__name__ if isinstance(owner, type) else type(owner).__name__


def check_settings(owner: Any, values: Mapping[str, Any], rules: Mapping[str, Range | Choice] | None = None) -> None:
    """Check every argument in ``values`` that has a rule (``RULES``, narrowed by ``OWNER_RULES`` for the owner's
    class or a base class); call as ``check_settings(self, locals())`` first thing in ``__init__``.

    Raises:
        TypeError: a value of the wrong type (a string where a number belongs, a float where an integer does).
        ValueError: a value out of range, not finite, or not among the allowed choices.
    """
    cls = owner if isinstance(owner, type) else type(owner)
    table = dict(RULES)
    for base in reversed(cls.__mro__):
        table.update(OWNER_RULES.get(base.__name__, {}))
    table.update(rules or {})
    for name, value in values.items():
        rule = table.get(name)
        if rule is None or name == "self":
            continue
        problem = _problem(rule, value)
        if problem:
            _raise(_owner_name(owner), name, value, rule, _default(owner, name), problem)
