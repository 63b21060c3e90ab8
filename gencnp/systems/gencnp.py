"""LightningModules: ``GenCNP`` (trains the pathway generator) and ``TargetClassifier`` (trains a target;
``gencnp.systems.classifier``, re-exported here).

Systems orchestrate: steps, logging, optimisers. The maths lives in ``generator``, ``losses`` and ``metrics``;
the training step's parts in ``training``.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from gencnp.io.checkpoint_io import VerifiedLoading
from gencnp.pathways import losses as LS
from gencnp.pathways import nulls as NL
from gencnp.pathways.baselines import tap_counts, topk_per_tap
from gencnp.pathways.generator import PathwayGenerator
from gencnp.pathways.metrics import PathwayMetrics
from gencnp.pathways.selection import selection_score
from gencnp.settings import check_settings
from gencnp.systems import options as OPT
from gencnp.systems import probes as PR
from gencnp.systems import training as ST
from gencnp.systems.checkpoints import FORMAT_VERSION, GeneratorCheckpoints
from gencnp.systems.classifier import TargetClassifier, _check_data, _check_finite
from gencnp.systems.controls import ControlPasses
from gencnp.systems.options import Controls, GeneratorSettings, Losses, Selection, Sparsity
from gencnp.systems.probes import check_probes, partner_classes
from gencnp.targets.hooks import channel_means
from gencnp.targets.loading import FrozenTarget, build_target

__all__ = ["TargetClassifier", "GenCNP", "FORMAT_VERSION", "DEFAULT_NULL_FAMILIES"]
# Null families measured in validation and test when ``null_families`` is not set.
DEFAULT_NULL_FAMILIES = ("gaussian", "shuffle", "smooth")


class GenCNP(ControlPasses, GeneratorCheckpoints, VerifiedLoading, L.LightningModule):
    """GEN-CNP: a generator predicting each input's pathway in the frozen target, in one pass.

    ``L = kd + lambda_sp(t) sparsity + lambda_swap swap + lambda_zero zero + lambda_null null + lambda_cls cls
    + lambda_con con (+ lambda_lookup lookup + lambda_nested nested)`` (docs/design.md section 5). The defaults of
    the settings groups are the recommended configuration (``configs/fashion_mnist/gencnp.yaml``, chosen on the
    validation split). ``zero`` is gencnp's addition: the all-zero image through a pathway must not give its class.

    Args:
        target: the frozen classifier's architecture (as ``TargetClassifier.arch``); with ``num_classes``,
            ``in_chans``, ``image_size`` and ``target_kwargs``, read from the spec that ``target_checkpoint`` records
            when left unset (a value that differs from it is an error naming both).
        target_checkpoint: the target's weights (a ``TargetClassifier`` checkpoint or a state dict).
        taps: tap names or ``'auto'``; shallow_taps: names or count of the shallow branch.
        target_kwargs: keyword arguments of the target's constructor.
        ablation: ``'zero'`` (masked channels are 0) or ``'mean'`` (they keep their training-set mean activation).
        ablation_batches: train batches averaged for the mean activations and the input statistics.
        class_source: ``'pred'`` (the target's prediction) or ``'label'``.
        channels_last: the frozen target in ``channels_last`` memory format (results agree to float rounding).
        embed_target: keep the target's weights in this model's checkpoints, so ``GenCNP.load_from_checkpoint(path)``
            works without the target checkpoint (from any folder); the tensor-hash check stays.
        generator / losses / sparsity / controls / selection: grouped settings (``gencnp.systems.options``), each a
            dataclass or a mapping of its fields; unset: the recommended defaults.
        optimizer: a callable taking the generator's parameters (``OptimizerCallable``; default Adam, lr 5e-3).
        lr_scheduler: a callable taking the optimiser (``LRSchedulerCallable``), stepped every training step;
            default cosine annealing over the run's steps.
        target_spec: filled in by gencnp (the resolved target, stored in checkpoints); leave it unset.
        **flat: settings in the flat form of gencnp 0.2 (``lambda_sp=...``, ``lr=...``): moved into their groups
            with a ``FutureWarning``, so checkpoints written by 0.2 load.
    """

    def __init__(
        self,
        target: str | dict | None = None,
        target_checkpoint: str | None = None,
        num_classes: int | None = None,
        in_chans: int | None = None,
        image_size: int | None = None,
        taps: str | list[str] = "auto",
        shallow_taps: int | list[str] | None = None,
        target_kwargs: dict | None = None,
        ablation: str = "mean",
        ablation_batches: int = 20,
        class_source: str = "pred",
        channels_last: bool = False,
        embed_target: bool = True,
        generator: GeneratorSettings | None = None,
        losses: Losses | None = None,
        sparsity: Sparsity | None = None,
        controls: Controls | None = None,
        selection: Selection | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        target_spec: dict | None = None,
        **flat: Any,
    ):
        super().__init__()
        given = {"generator": generator, "losses": losses, "sparsity": sparsity}
        given.update(controls=controls, selection=selection)
        groups, legacy, optimizer, lr_scheduler = self._groups(given, flat, optimizer, lr_scheduler)
        top = {"ablation": ablation, "ablation_batches": ablation_batches, "class_source": class_source}
        self.settings = SimpleNamespace(**OPT.flat_view(groups), **top)
        self.null_eval, self.null_train = OPT.check(self, locals(), DEFAULT_NULL_FAMILIES)
        self.optimizer_factory = OPT.as_callable(optimizer, "optimizer")
        self.scheduler_factory = OPT.as_callable(lr_scheduler, "lr_scheduler")
        self.save_hyperparameters(ignore=["flat"])
        for key in flat:
            self.hparams.pop(key, None)
        self.hparams.update({k: dataclasses.asdict(v) for k, v in groups.items()})
        if legacy:
            self.hparams.update(optimizer=optimizer, lr_scheduler=lr_scheduler)
        target, num_classes, in_chans, image_size = self._build_target(
            target, target_checkpoint, num_classes, in_chans, image_size, target_kwargs, target_spec
        )
        self.target = FrozenTarget(
            self._model,
            taps,
            (in_chans, image_size, image_size),
            shallow_taps,
            arch=target,
            channels_last=channels_last,
        )
        if not self._loaded:  # built from the recorded spec; the weights come with the GEN-CNP checkpoint
            self.target.weights_pending = (
                f"target_checkpoint '{target_checkpoint}' does not exist and no target weights were loaded from a "
                "GEN-CNP checkpoint; fix target_checkpoint, or load a checkpoint that embeds them (embed_target)."
            )
        del self._model, self._loaded
        self._build_generator(groups["generator"], num_classes, in_chans, image_size)

    @staticmethod
    def _groups(given: dict, flat: dict, optimizer, lr_scheduler) -> tuple[dict, dict, Any, Any]:
        """The settings groups as dataclasses, with 0.2's flat settings moved in (and their optimiser settings
        turned into ``optimizer``/``lr_scheduler`` specs). Returns ``(groups, legacy, optimizer, lr_scheduler)``."""
        groups = {name: dataclasses.replace(OPT.coerce(name, value)) for name, value in given.items()}
        legacy = OPT.migrate_flat(flat, groups)
        if legacy:
            check_settings(GenCNP, {k: v for k, v in legacy.items() if k in ("lr", "weight_decay")})
            old_opt, old_sched = OPT.legacy_optimizers(legacy)
            optimizer, lr_scheduler = optimizer or old_opt, lr_scheduler or old_sched
        return groups, legacy, optimizer, lr_scheduler

    def _build_generator(self, g: GeneratorSettings, num_classes: int, in_chans: int, image_size: int) -> None:
        """The generator on the target's taps, its buffers and the validation/test metrics."""
        s = self.settings
        if s.tap_weights is not None and len(s.tap_weights) != len(self.target.tap_names):
            raise ValueError(
                f"sparsity.tap_weights has {len(s.tap_weights)} entries for {len(self.target.tap_names)} taps "
                f"{self.target.tap_names}."
            )
        self.num_classes = num_classes
        self.generator = PathwayGenerator(
            self.target.tap_channels,
            len(self.target.shallow_names),
            num_classes,
            g.d,
            g.groups,
            g.init_score,
            g.binarizer,
        )
        self._register_state(num_classes, in_chans, image_size, s.swap_probes_per_class)
        self._build_metrics()

    @classmethod
    def setting_groups(cls) -> dict[str, str]:
        """Where each grouped setting lives: ``{'lambda_sp': 'sparsity.lambda_sp', ...}`` (config hints use it)."""
        return {name: OPT.grouped_key(name) for name in cls.setting_defaults()}

    @classmethod
    def setting_defaults(cls) -> dict[str, Any]:
        """Default of every grouped setting by name (error messages suggest them)."""
        return OPT.flat_view({name: group() for name, group in OPT.GROUPS.items()})

    def _build_target(self, target, target_checkpoint, num_classes, in_chans, image_size, target_kwargs, target_spec):
        """Build the target model from its spec and weights; records the resolved spec in the hyper-parameters."""
        model, spec, loaded = build_target(
            target,
            target_checkpoint,
            num_classes,
            in_chans,
            image_size,
            target_kwargs,
            target_spec,
            names={"arch": "target", "kwargs": "target_kwargs"},
        )
        resolved = (spec["arch"], spec["num_classes"], spec["in_chans"], spec["image_size"])
        self.hparams.update(dict(zip(("target", "num_classes", "in_chans", "image_size"), resolved)))
        self.hparams.update(target_kwargs=spec["kwargs"], target_spec=spec)
        check_settings(self, dict(zip(("num_classes", "in_chans", "image_size"), resolved[1:])))
        self._model, self._loaded = model, loaded
        return resolved

    def _build_metrics(self) -> None:
        """Validation and test metrics: pathway metrics, the class lookup's agreement and ``loss_kd``."""
        self.val_metrics = PathwayMetrics(self.target.tap_names, self.target.tap_channels, self.null_eval)
        self.test_metrics = PathwayMetrics(self.target.tap_names, self.target.tap_channels, self.null_eval)
        self.val_lookup, self.test_lookup = MeanMetric().set_dtype(torch.float64), MeanMetric().set_dtype(torch.float64)
        # loss_kd as a sample-weighted float64 mean synced across processes (Lightning's sync_dist averages the
        # per-process means, which is wrong when the processes hold different numbers of samples).
        self.val_kd, self.test_kd = MeanMetric().set_dtype(torch.float64), MeanMetric().set_dtype(torch.float64)

    def _register_state(self, num_classes: int, in_chans: int, image_size: int, probes_per_class: int) -> None:
        """Buffers: prototypes, fill values, input statistics, class frequencies and swap probes."""
        dd = self.target.num_channels
        self.register_buffer("prototypes", torch.zeros(num_classes, dd))
        self.register_buffer("proto_seen", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("fill", torch.zeros(dd))
        self.register_buffer("fill_ready", torch.zeros((), dtype=torch.bool))
        # Per-channel mean and std of the inputs (null inputs are drawn with them) and the running class selection
        # frequencies of the class lookup.
        self.register_buffer("input_mean", torch.zeros(in_chans))
        self.register_buffer("input_std", torch.ones(in_chans))
        self.register_buffer("input_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("class_freq", torch.zeros(num_classes, dd))
        self.register_buffer("freq_seen", torch.zeros(num_classes, dtype=torch.bool))
        # Swap probes as training-set indices (gencnp.systems.probes): the images are re-read from the attached data,
        # so neither the model nor its checkpoints grow with image size or class count beyond O(K p) integers.
        p = probes_per_class
        self.register_buffer("probe_index", torch.full((num_classes * p,), -1, dtype=torch.long))
        self.register_buffer("probe_class", torch.full((num_classes * p,), -1, dtype=torch.long))
        self._probe_source: PR.ProbeImages | None = None  # plain attributes: never in the state dict
        self._legacy_probes: torch.Tensor | None = None

    # ----- data-dependent state: probes and mean-ablation fill -----
    def check_data(self, datamodule) -> None:
        _check_data(self.num_classes, self.target.input_shape, datamodule, f"target '{self.hparams.target}'")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        self.check_data(dm)
        if dm is not None:
            self.attach_probe_data(dm.split("train"), getattr(dm, "class_names", None))
        if dm is not None and stage != "fit" and not bool(self.input_ready) and self.null_eval:
            # validate/test/predict of a model that never ran fit: null inputs need the data's statistics.
            self.compute_fill(DataLoader(dm.split("train"), batch_size=128, shuffle=False))

    def attach_probe_data(self, dataset, class_names=None) -> None:
        """Read swap probes from ``dataset`` (the training split the model was trained on): pick them first when none
        are recorded (``build_probes``, checked by ``check_probes``); recover the indices of an old checkpoint's stored
        probe images."""
        self._probe_source = PR.ProbeImages(dataset, self.target.input_shape)
        if int((self.probe_class >= 0).sum()) == 0:
            self.build_probes(dataset)
            check_probes(self.probe_class, self.num_classes, class_names)
        elif self._legacy_probes is not None:
            PR.adopt_legacy(self, dataset)

    @torch.no_grad()
    def build_probes(self, dataset) -> None:
        """Pick ``swap_probes_per_class`` train images per class (seeded) that the target classifies correctly; store
        their indices (``gencnp.systems.probes.select_probes``)."""
        s = self.settings
        classify = self.target if s.probe_filter == "correct" else None
        k, p = self.num_classes, s.swap_probes_per_class
        index, cls = PR.select_probes(dataset, classify, k, p, self.device, limit=s.probe_candidates)
        self.probe_index.copy_(index)
        self.probe_class.copy_(cls)
        self._legacy_probes = None
        if self._probe_source is None or self._probe_source.dataset is not dataset:
            self._probe_source = PR.ProbeImages(dataset, self.target.input_shape)

    def partner_images(self, x: torch.Tensor, y_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each sample, a probe image of another class (chosen by an integer hash of its pixels).

        Returns ``(images [B, C, H, W], valid [B])``; ``valid`` is False when no probe of another class exists.
        """
        k, p = self.num_classes, self.settings.swap_probes_per_class
        h = PR.pixel_hash(x)
        avail = self.probe_class >= 0
        slot = (h // (k - 1)) % p
        partner_cls = partner_classes(h, y_hat, avail.view(k, p).any(1))
        index = partner_cls * p + slot
        # Fall back to the first filled slot of that class when the chosen slot is empty.
        filled = avail.view(k, p)
        first = torch.where(filled.any(1), filled.float().argmax(1), torch.zeros(k, dtype=torch.long, device=x.device))
        index = torch.where(avail[index], index, partner_cls * p + first[partner_cls])
        return PR.probe_images(self, index).to(x.dtype), avail[index] & (partner_cls != y_hat)

    @torch.no_grad()
    def compute_fill(self, loader, batches: int | None = None) -> None:
        """Mean ablation: the dataset-mean activation of every tap channel over ``batches`` train batches; also the
        per-channel mean and std of the inputs (null inputs are drawn with them). Values already computed (a trained
        model's) are kept."""
        total, n = torch.zeros_like(self.fill), 0
        c = self.input_mean.shape[0]
        moments = torch.zeros(2 * c, dtype=torch.float64, device=self.fill.device)
        pixels = 0
        for i, batch in enumerate(loader):
            if i >= (batches or self.settings.ablation_batches):
                break
            x = batch[0].to(self.device)
            _, feats = self.target(x, record=True)
            total += torch.cat([channel_means(f).sum(0) for f in feats]).to(total.dtype)
            n += x.shape[0]
            xd = x.double().transpose(0, 1).reshape(c, -1)
            moments += torch.cat([xd.sum(1), (xd * xd).sum(1)])
            pixels += xd.shape[1]
        packed = torch.cat(
            [total.double(), moments, torch.tensor([float(n), float(pixels)], dtype=torch.float64, device=total.device)]
        )
        if self._trainer is not None and self._trainer.world_size > 1:
            packed = self._trainer.strategy.reduce(packed, reduce_op="sum")
        total, moments, n, pixels = packed[: len(total)], packed[len(total) : -2], float(packed[-2]), float(packed[-1])
        if not bool(self.fill_ready):
            self.fill.copy_((total / max(n, 1)).to(self.fill.dtype))
            self.fill_ready.fill_(True)
        if bool(self.input_ready):
            return
        mean = moments[:c] / max(pixels, 1)
        var = (moments[c:] / max(pixels, 1) - mean * mean).clamp_min(0)
        self.input_mean.copy_(mean.to(self.input_mean.dtype))
        self.input_std.copy_(var.sqrt().clamp_min(1e-6).to(self.input_std.dtype))
        self.input_ready.fill_(True)

    def on_fit_start(self) -> None:
        needs_fill = self.settings.ablation == "mean" and not bool(self.fill_ready)
        if needs_fill or not bool(self.input_ready):
            self.compute_fill(self.trainer.datamodule.train_dataloader())

    def null_inputs(self, family: str, x: torch.Tensor, salt: int = 0) -> torch.Tensor:
        """The ``family``'s null input paired with each image of ``x`` (``gencnp.pathways.nulls``), with the data's stats."""
        if not bool(self.input_ready):
            raise RuntimeError(
                "null inputs need the data's per-channel mean and std: run fit, or call compute_fill(loader)."
            )
        return NL.null_inputs(family, x, self.input_mean, self.input_std, salt)

    def prior(self, y_hat: torch.Tensor) -> torch.Tensor | None:
        """The class prior on the score logits (``class_prior``), or ``None`` when off or not yet learnt."""
        if self.settings.class_prior == 0 or not bool(self.freq_seen.all()):
            return None
        f = self.class_freq[y_hat]
        return self.settings.class_prior * (f - f.mean(dim=1, keepdim=True))

    def class_lookup(self, pathway: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        """The class lookup at ``pathway``'s per-sample, per-tap counts: bool ``[B, D]``, channels ranked by the
        running selection frequency ``class_freq`` of class ``y_hat``."""
        chans = self.target.tap_channels
        return topk_per_tap(self.class_freq[y_hat], tap_counts(pathway, chans), chans)

    def fills(self) -> list[torch.Tensor] | None:
        """Per-tap fill values for masked channels (``None``: zero ablation)."""
        if self.settings.ablation != "mean":
            return None
        if not bool(self.fill_ready):
            raise RuntimeError(
                "mean ablation needs the dataset-mean activations: run fit, or call compute_fill(loader)."
            )
        return list(torch.split(self.fill, self.target.tap_channels))

    # ----- explanation -----
    def class_of(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.settings.class_source == "label" and labels is not None:
            return labels
        return logits.argmax(1)

    def explain(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, masked: bool = True, kept: float | None = None
    ) -> dict[str, torch.Tensor | list]:
        """One-pass pathways for ``x [B, C, H, W]``.

        Args:
            masked: also run the masked forward (``masked_logits``, ``prediction``); ``False`` skips it for callers
                that need the pathways only (bank export).
            kept: a kept budget in ``(0, 1]``: the ``round(kept * D)`` highest-scoring channels over all taps (at
                least one) instead of the channels scored above 0.5 (the per-input sparsity the generator chose);
                the scores still decide how many channels each tap keeps. A generator trained with
                ``losses.lambda_budget`` ranks its channels for the budgets ``[budget_min, budget_max]``.

        Returns:
            ``masks`` (``{tap name: bool [B, C_l]}``, tap order), ``pathway`` (bool ``[B, D]``), ``kept`` (``[B]`` fraction),
            ``logits`` and ``masked_logits`` (``[B, K]``), ``y_hat`` (class source), ``prediction`` (masked argmax).
        """
        with torch.no_grad():
            logits, feats = self.target(x, record=True)
            out = self.generator(feats, self.prior(self.class_of(logits, labels)))
            if kept is None:
                pathway = out["masks"] > 0.5
            else:
                if not 0 < kept <= 1:
                    raise ValueError(f"kept must lie in (0, 1] (a fraction of all tapped channels), got {kept}.")
                pathway = ST.budget_pathways(out["scores"], float(kept))
            masks = self.generator.split(pathway)
            masked_logits = self.target(x, masks=masks, fill=self.fills(), first_tap=feats[0]) if masked else None
        return {
            "masks": dict(zip(self.target.tap_names, masks)),
            "pathway": pathway,
            "kept": pathway.float().mean(1),
            "logits": logits,
            "masked_logits": masked_logits,
            "y_hat": self.class_of(logits, labels),
            "prediction": masked_logits.argmax(1) if masked else None,
            "scores": out["scores"],
        }

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list]:
        return self.explain(x)

    # ----- training -----
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self._trainer is not None and self._trainer.world_size > 1:
            return self._trainer.strategy.reduce(t, reduce_op="sum")
        return t

    def lambda_sp_now(self) -> float:
        ramp = self.settings.sparsity_ramp_epochs * max(1, self._trainer.num_training_batches if self._trainer else 1)
        if ramp <= 0:
            return self.settings.lambda_sp
        return self.settings.lambda_sp * min(1.0, self.global_step / ramp)

    def training_step(self, batch, batch_idx):
        x, labels = batch[0], batch[1]
        _check_finite(x, "train", batch_idx)
        h = self.settings
        with torch.no_grad():
            logits, feats = self.target(x, record=True)
        y_hat = self.class_of(logits, labels)
        out = self.generator(feats, self.prior(y_hat))
        m = out["masks"]
        xs, ms, firsts, nc, valid = ST.masked_parts(self, x, logits, feats, y_hat, out)
        all_logits = self.target(
            torch.cat(xs), masks=self.generator.split(torch.cat(ms)), fill=self.fills(), first_tap=torch.cat(firsts)
        )
        chunks = list(torch.split(all_logits, [len(part) for part in xs]))
        terms = ST.loss_terms(self, logits, chunks, y_hat, out, nc, valid)
        weights = {
            "kd": 1.0,
            "sparsity": self.lambda_sp_now(),
            "swap": h.lambda_swap,
            "zero": h.lambda_zero,
            "cls": h.lambda_cls,
            "con": h.lambda_con,
            "null": h.lambda_null,
            "lookup": h.lambda_lookup,
            "nested": h.lambda_nested,
            "budget": h.lambda_budget,
        }
        result = LS.total_loss(terms, weights)
        ST.check_finite_losses(result, self.global_step, batch_idx)
        if bool(self.proto_seen.all()):
            LS.update_prototypes(
                self.prototypes, self.proto_seen, out["scores"], y_hat, h.proto_momentum, self._all_reduce
            )
        LS.update_prototypes(
            self.class_freq, self.freq_seen, (m.detach() > 0.5).float(), y_hat, h.freq_momentum, self._all_reduce
        )
        self.log_dict(
            {f"train/loss_{k}" if k != "loss" else "train/loss": v.detach() for k, v in result.items()},
            on_step=True,
            on_epoch=False,
            prog_bar=False,
        )
        self.log("train/kept", m.detach().mean(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lambda_sp", self.lambda_sp_now(), on_step=True, on_epoch=False)
        return result["loss"]

    def make_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser of the generator's parameters (``optimizer``, default Adam with lr 5e-3)."""
        return (self.optimizer_factory or OPT.default_optimizer)(self.generator.parameters())

    def configure_optimizers(self):
        opt = self.make_optimizer()
        if self.scheduler_factory is not None:
            sched = self.scheduler_factory(opt)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=max(1, self.trainer.estimated_stepping_batches)
            )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----- evaluation -----
    @torch.no_grad()
    def _eval_step(self, batch, batch_idx, stage: str, metrics: PathwayMetrics):
        x, labels = batch[0], batch[1]
        _check_finite(x, stage, batch_idx)
        ex = self.explain(x, labels)
        ctrl = self.controls(x, ex)
        metrics.update(ex["logits"], ex["masked_logits"], ex["y_hat"], ex["pathway"], labels, **ctrl)
        if bool(self.freq_seen.any()):
            with torch.no_grad():
                lk = self.class_lookup(ex["pathway"], ex["y_hat"])
                lk_logits = self.target(x, masks=self.generator.split(lk.float()), fill=self.fills())
            lookup = self.val_lookup if stage == "val" else self.test_lookup
            lookup.update((lk_logits.argmax(1) == ex["y_hat"]).double(), weight=1.0)
        kd = self.val_kd if stage == "val" else self.test_kd
        kd.update(
            LS.kd(ex["logits"].double(), ex["masked_logits"].double(), ex["y_hat"], self.settings.temperature),
            weight=x.shape[0],
        )
        self.log(f"{stage}/loss_kd", kd, on_step=False, on_epoch=True, batch_size=x.shape[0])

    def _eval_end(self, stage: str, metrics: PathwayMetrics) -> None:
        vals = metrics.compute()
        metrics.reset()
        h = self.settings
        vals["score"] = selection_score(
            vals["agreement"],
            vals["swap_forcing"],
            vals["zero_forcing"],
            vals["kept_mean"],
            h.w_swap,
            h.w_zero,
            h.w_kept,
        )
        vals.pop("n", None)
        lookup = self.val_lookup if stage == "val" else self.test_lookup
        if lookup.update_count > 0:
            vals["lookup_agreement"] = float(lookup.compute())
            vals["lookup_gain"] = vals["agreement"] - vals["lookup_agreement"]
        lookup.reset()
        vals = {k: v for k, v in vals.items() if v == v}  # drop controls that were not run (NaN)
        bar = {"agreement", "kept_mean", "swap_forcing"}
        for k, v in vals.items():
            self.log(f"{stage}/{k}", float(v), prog_bar=k in bar)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val", self.val_metrics)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test", self.test_metrics)

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0):
        x = batch[0]
        labels = batch[1] if len(batch) > 1 else None
        ex = self.explain(x, labels, masked=getattr(self, "predict_masked", True))
        return {
            "pathway": ex["pathway"],
            "y_hat": ex["y_hat"],
            "kept": ex["kept"],
            "prediction": ex["prediction"],
            "label": labels,
        }
