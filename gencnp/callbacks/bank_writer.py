"""``PathwayBankWriter``: export a pathway bank from ``trainer.predict`` of a ``GenCNP`` model (docs/design.md section 6).

The callback only observes: it feeds each predicted batch to a ``gencnp.banks.bank.PathwayBank``, sums the counts
across processes, measures transferred class pathways on the **validation** split for a grid of ``tau`` values
(never the test split, which stays for reporting transfer), lets ``gencnp.banks.bank.choose_tau`` pick one, and asks
the bank to save itself on rank 0. Run it through the predict loop (Lightning's unrepeated sampler), so no
sample is counted twice::

    python train.py predict --config configs/fashion_mnist/bank.yaml --ckpt_path runs/fashion_mnist/gencnp/best.ckpt
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from tqdm.auto import tqdm

from gencnp.banks.bank import DEFAULT_BANK, DEFAULT_TAUS, PathwayBank, choose_tau
from gencnp.io.files import check_writable, json_safe
from gencnp.pathways.metrics import per_sample
from gencnp.pathways.selection import W_KEPT, W_SWAP, W_ZERO, choose_class_taus
from gencnp.settings import check_settings
from gencnp.targets.loading import FrozenTarget

__all__ = ["PathwayBankWriter"]

# Per-tau sums over validation samples (NaN-aware: a control not run has its own count). Every sum is a count of
# integers, exact in float64 whatever the order, so the tau search is identical under any number of processes.
_SUMS = ("n", "agree", "masked_correct", "n_labelled", "swap_forced", "n_swap", "zero_forced", "kept")


def _per_sample_sums(v: dict[str, torch.Tensor], pathway: torch.Tensor) -> torch.Tensor:
    """``[B, 8]`` float64 per image, columns ``_SUMS``: 1, agree, masked correct, labelled, swap forced, swap run,
    zero forced, kept channels (NaN, a control not run, counts 0 and is not counted)."""

    def val(t: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(t.double(), nan=0.0)

    def ran(t: torch.Tensor) -> torch.Tensor:
        return (~torch.isnan(t.double())).double()

    cols = [
        torch.ones_like(v["agree"], dtype=torch.float64),
        val(v["agree"]),
        val(v["masked_correct"]),
        ran(v["masked_correct"]),
        val(v["swap_forced"]),
        ran(v["swap_forced"]),
        val(v["zero_forced"]),
        pathway.double().sum(1),
    ]
    return torch.stack(cols, dim=1)


class PathwayBankWriter(L.Callback):
    """Accumulate a ``PathwayBank`` during ``trainer.predict``, choose ``tau`` on validation, save it on rank 0.

    Tau rule (``gencnp.banks.bank.choose_tau``): for each candidate ``tau``, every validation image ``x`` of class
    ``c`` (the model's class source) goes through its class pathway ``H(x; M_c)``, with the swap and zero-image
    forcing controls of ``GenCNP.controls``. Among the taus with transfer agreement ``>= min_agreement`` and
    kept fraction ``<= max_kept`` (when set), the highest ``agreement - w_swap swap_forcing - w_zero zero_forcing - w_kept kept`` wins; if none qualifies, the
    highest score overall. The table of every tau is stored in the bank's ``info['tau_search']``.

    Args:
        path: where rank 0 writes the bank (one ``.safetensors`` file, atomically).
        taus: candidate thresholds in ``(0, 1]`` (default ``0.05, 0.10, ..., 0.95``).
        min_agreement: transfer agreement a tau must reach on validation to be preferred.
        w_swap: weight of swap forcing in the selection score (GenCNP's ``val/score`` default).
        w_zero: weight of zero forcing in the selection score (GenCNP's ``val/score`` default).
        w_kept: weight of the kept fraction in the selection score (GenCNP's ``val/score`` default).
        max_kept: kept budget of the class pathways (fraction of the ``D`` channels, measured on validation);
            ``None``: no budget.
        val_batches: validation batches used for the search (all when ``None``).
        progress: show a progress bar for the search (rank 0 only).
        per_class: also choose a threshold per class (``gencnp.pathways.selection.choose_class_taus``: greedy from
            the sparsest class pathways until validation transfer agreement reaches ``min_agreement``, within
            ``max_kept`` and ``max_swap``), stored as the bank's ``class_taus``; the global ``tau`` is still chosen
            and stored.
        max_swap: swap-forcing budget of the per-class choice (validation); ``None``: none.
    """

    def __init__(
        self,
        path: str = DEFAULT_BANK,
        taus: list[float] | None = None,
        min_agreement: float = 0.95,
        w_swap: float = W_SWAP,
        w_zero: float = W_ZERO,
        w_kept: float = W_KEPT,
        max_kept: float | None = None,
        val_batches: int | None = None,
        progress: bool = True,
        per_class: bool = False,
        max_swap: float | None = None,
    ):
        super().__init__()
        taus = list(DEFAULT_TAUS if taus is None else taus)
        if not taus:
            raise ValueError("taus is empty; give candidate thresholds in (0, 1], e.g. [0.25, 0.5, 0.75].")
        bad = [t for t in taus if not isinstance(t, (int, float)) or not 0.0 < float(t) <= 1.0]
        if bad:
            raise ValueError(
                f"taus must lie in (0, 1], got {bad}; M_c = f_c >= tau keeps every channel at tau <= 0 "
                "and none above 1. Give values such as [0.25, 0.5, 0.75], or leave taus unset (0.05, 0.10, ..., 0.95)."
            )
        if not 0.0 <= min_agreement <= 1.0:
            raise ValueError(f"min_agreement must lie in [0, 1], got {min_agreement}.")
        if max_kept is not None and not 0.0 < max_kept <= 1.0:
            raise ValueError(f"max_kept must lie in (0, 1] (a fraction of the channels) or be null, got {max_kept}.")
        if val_batches is not None and val_batches < 1:
            raise ValueError(f"val_batches must be >= 1 or None (all), got {val_batches}.")
        if not str(path).endswith(".safetensors"):
            raise ValueError(f"bank path '{path}' must end with '.safetensors' (the bank is one safetensors file).")
        check_settings(self, {**locals(), "taus": taus})  # types and ranges (gencnp.settings.RULES)
        self.path = str(path)
        self.taus = sorted({float(t) for t in taus})
        self.min_agreement = float(min_agreement)
        self.max_kept = None if max_kept is None else float(max_kept)
        self.w_swap, self.w_zero, self.w_kept = float(w_swap), float(w_zero), float(w_kept)
        self.val_batches = val_batches
        self.progress = progress
        if max_swap is not None and not 0.0 <= max_swap <= 1.0:
            raise ValueError(f"max_swap must lie in [0, 1] or be null, got {max_swap}.")
        self.per_class, self.max_swap = bool(per_class), max_swap
        self.class_sums: torch.Tensor | None = None
        self.bank: PathwayBank | None = None

    # ----- accumulation -----
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        target = getattr(pl_module, "target", None)
        if not isinstance(target, FrozenTarget) or not hasattr(pl_module, "controls"):
            raise TypeError(
                f"PathwayBankWriter needs a GenCNP model (with .target and .controls), got {type(pl_module).__name__}."
            )
        # The bank reads pathways and classes only: skip the masked forward of each batch unless another callback
        # (a prediction writer) reads the masked prediction.
        pl_module.predict_masked = any(type(c).__name__ == "PathwayPredictionWriter" for c in trainer.callbacks)
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "val_dataloader"):
            raise ValueError(
                "PathwayBankWriter chooses tau on the validation split: run trainer.predict with a "
                "datamodule that has val_dataloader() (e.g. configs/*/bank.yaml)."
            )
        split = str(getattr(dm, "predict_split", "unknown"))
        if split == "test":
            raise ValueError(
                "PathwayBankWriter refuses to build a bank on the test split (test stays for reporting "
                "transfer); set data.init_args.predict_split: train."
            )
        if split == "val":
            rank_zero_warn(
                "PathwayBankWriter: the bank is built on the validation split, where tau is chosen too; "
                "prefer predict_split: train."
            )
        class_names = getattr(dm, "class_names", None)
        class_source = getattr(pl_module, "hparams", {}).get("class_source", "pred")
        self.bank = PathwayBank.for_target(target, class_names, class_source, split)
        if trainer.is_global_zero:
            check_writable(self.path)  # before the pass over the data, not after

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or "pathway" not in outputs or "y_hat" not in outputs:
            raise TypeError(
                "PathwayBankWriter expects predict_step to return a dict with 'pathway' [B, D] and 'y_hat' [B] "
                f"(GenCNP.predict_step), got {type(outputs).__name__}."
            )
        self.bank.update(outputs["pathway"], outputs["y_hat"])

    # ----- reduction, tau, save -----
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.predict_masked = True  # the model's default again after this export

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bank = self.bank
        bank.counts = _sum_over_ranks(trainer, pl_module, bank.counts).long()
        bank.n = _sum_over_ranks(trainer, pl_module, bank.n).long()
        if int(bank.n.sum()) == 0:
            raise ValueError(
                f"PathwayBankWriter saw no samples on the '{bank.split}' split; "
                "check the data and limit_predict_batches."
            )
        table = self.tau_search(trainer, pl_module)
        tau, rule, scores = choose_tau(
            self.taus,
            table["agreement"],
            table["swap_forcing"],
            table["zero_forcing"],
            table["kept"],
            self.min_agreement,
            self.w_swap,
            self.w_zero,
            self.w_kept,
            self.max_kept,
        )
        table["score"] = scores
        bank.tau = tau
        class_choice = None
        if self.per_class:
            taus, class_rule, totals = choose_class_taus(
                self.taus,
                self.class_sums,
                bank.num_channels,
                self.min_agreement,
                self.w_swap,
                self.w_zero,
                self.max_kept,
                self.max_swap,
            )
            bank.class_taus = taus
            class_choice = {"rule": class_rule, "class_taus": taus, "validation": totals}
            rule = f"{rule}; {class_rule} (used for the class pathways)"
        hp = getattr(pl_module, "hparams", {})
        bank.info = {
            "tau_rule": rule,
            "tau_search": json_safe(table),
            "min_agreement": self.min_agreement,
            "max_kept": self.max_kept,
            "weights": {"w_swap": self.w_swap, "w_zero": self.w_zero, "w_kept": self.w_kept},
            "ablation": hp.get("ablation", "zero"),
            "generator_checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "target_checkpoint": str(hp.get("target_checkpoint")) if hp.get("target_checkpoint") else None,
            "world_size": trainer.world_size,
            "per_class": class_choice,
        }
        if trainer.is_global_zero:
            bank.save(self.path)
            rank_zero_info(self.report(table, rule))
        trainer.strategy.barrier("PathwayBankWriter.save")

    @torch.no_grad()
    def tau_search(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, list]:
        """Transfer metrics of ``M_c = f_c >= tau`` on the validation split, per candidate tau (summed over ranks)."""
        bank, device, target = self.bank, pl_module.device, pl_module.target
        loader = trainer.datamodule.val_dataloader()
        total = len(loader) if self.val_batches is None else min(len(loader), self.val_batches)
        fills = pl_module.fills() if hasattr(pl_module, "fills") else None
        class_of = getattr(pl_module, "class_of", lambda logits, labels: logits.argmax(1))
        # Taus giving identical class pathways give identical results: evaluate each distinct M once.
        distinct: dict[bytes, int] = {}
        group = []
        for tau in self.taus:
            key = bank.class_pathways(tau).numpy().tobytes()
            group.append(distinct.setdefault(key, len(distinct)))
        first = {g: self.taus[group.index(g)] for g in set(group)}
        pathways = {g: bank.class_pathways(tau).to(device) for g, tau in first.items()}
        sums = torch.zeros(len(first), bank.num_classes, len(_SUMS), dtype=torch.float64)  # per predicted class
        bar = tqdm(
            total=total * len(first),
            desc=f"tau search on validation ({len(self.taus)} taus, {len(first)} distinct)",
            unit="batch",
            disable=not (self.progress and trainer.is_global_zero),
            leave=False,
        )
        try:
            for i, batch in enumerate(loader):
                if i >= total:
                    break
                x = batch[0].to(device)
                labels = batch[1].to(device) if len(batch) > 1 else None
                logits = target(x)
                y_hat = class_of(logits, labels)
                inputs = pl_module.control_inputs(x, y_hat, nulls=False)  # the rule reads swap and zero forcing
                # x, partners and the zero image to the first tap, once per batch: every pass below starts there
                firsts = pl_module.control_firsts(x, inputs) if hasattr(pl_module, "control_firsts") else None
                for j, tau in first.items():
                    p = pathways[j][y_hat]
                    if firsts is None:
                        masked = bank.apply(target, x, y_hat, fill=fills, tau=tau)
                    else:  # H(x; M_c) from the first tap, as bank.apply computes it from the input
                        masks = list(torch.split(p.to(x.dtype), target.tap_channels, dim=1))
                        masked = target(x, masks=masks, fill=fills, first_tap=firsts[: len(x)])
                    ctrl = pl_module.controls(x, {"pathway": p, "y_hat": y_hat}, inputs=inputs, firsts=firsts)
                    v = per_sample(logits, masked, y_hat, p, labels, **ctrl)
                    sums[j].index_add_(0, y_hat.cpu(), _per_sample_sums(v, p).cpu())
                    bar.update(1)
        finally:
            bar.close()
        per_class = _sum_over_ranks(trainer, pl_module, sums)[group]  # back to one row per tau: [T, K, 8]
        self.class_sums = per_class
        s = dict(zip(_SUMS, per_class.sum(1).T))
        if float(s["n"][0]) == 0:
            raise ValueError(
                "the validation split is empty: PathwayBankWriter needs validation images to choose tau; "
                "set data val_size > 0."
            )

        def ratio(a: torch.Tensor, b: torch.Tensor) -> list[float]:
            return [float(x / y) if y > 0 else math.nan for x, y in zip(a, b)]

        return {
            "split": "val",
            "n": int(s["n"][0]),
            "taus": list(self.taus),
            "class_source": bank.class_source,
            "agreement": ratio(s["agree"], s["n"]),
            "masked_accuracy": ratio(s["masked_correct"], s["n_labelled"]),
            "swap_forcing": ratio(s["swap_forced"], s["n_swap"]),
            "zero_forcing": ratio(s["zero_forced"], s["n"]),
            "kept": ratio(s["kept"], s["n"] * bank.num_channels),
        }

    def report(self, table: dict[str, Any], rule: str) -> str:
        """A readable tau table (chosen row marked) and where the bank went."""
        bank = self.bank
        lines = [
            f"PathwayBankWriter: {int(bank.n.sum())} '{bank.split}' samples, "
            f"tau search on {table['n']} validation images",
            f"{'tau':>6} {'agree':>7} {'swap':>7} {'zero':>7} {'kept':>7} {'score':>7}",
        ]
        for i, tau in enumerate(table["taus"]):
            mark = "  <- chosen" if tau == bank.tau else ""
            vals = [table[k][i] for k in ("agreement", "swap_forcing", "zero_forcing", "kept", "score")]
            lines.append(f"{tau:>6.2f} " + " ".join(f"{v:>7.3f}" for v in vals) + mark)
        lines.append(f"tau = {bank.tau:g}: {rule}")
        if bank.class_taus is not None:
            lines.append("class taus: " + ", ".join(f"{c} {t:g}" for c, t in zip(bank.class_names, bank.class_taus)))
        lines.append(f"bank written to {self.path}")
        return "\n".join(lines)


def _sum_over_ranks(trainer: L.Trainer, pl_module: L.LightningModule, t: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over processes (``strategy.reduce``); a single process returns it unchanged."""
    if trainer.world_size <= 1:
        return t
    return trainer.strategy.reduce(t.to(pl_module.device).clone(), reduce_op="sum").cpu()
