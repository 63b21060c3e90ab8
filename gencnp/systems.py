"""LightningModules: ``TargetClassifier`` (trains a target) and ``GenCNP`` (trains the pathway generator).

Systems orchestrate: steps, logging, optimisers. The maths lives in ``generator``, ``losses`` and ``metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from gencnp import losses as LS
from gencnp.checkpointing import VerifiedLoading, verify_state_hash
from gencnp.generator import PathwayGenerator
from gencnp.metrics import PathwayMetrics
from gencnp.settings import check_settings
from gencnp.taps import channel_means
from gencnp.targets import FrozenTarget, load_target

__all__ = ["TargetClassifier", "GenCNP", "FORMAT_VERSION"]
FORMAT_VERSION = 1


def _check_data(num_classes: int, input_shape: Sequence[int] | None, datamodule, what: str) -> None:
    """Fail before training when the data cannot feed the model."""
    if datamodule is None:
        return
    k = getattr(datamodule, "num_classes", None)
    if k is not None and k != num_classes:
        raise ValueError(
            f"{what} has num_classes={num_classes} but the data has {k} classes ({type(datamodule).__name__}); "
            f"set model num_classes: {k}, or use a checkpoint trained on this data."
        )
    shape = getattr(datamodule, "input_shape", None)
    if input_shape is not None and shape is not None and tuple(shape) != tuple(input_shape):
        raise ValueError(
            f"{what} expects images of shape {tuple(input_shape)} (C, H, W) but the data gives {tuple(shape)}; "
            "set in_chans/image_size to match the data, or resize the data."
        )


def _record_classes(module: L.LightningModule, checkpoint: dict) -> None:
    """Store the data's class names in the checkpoint, so later data can be checked against them (preflight)."""
    names = getattr(getattr(module._trainer, "datamodule", None), "class_names", None) if module._trainer else None
    if names:
        checkpoint["class_names"] = [str(c) for c in names]


def _check_finite(x: torch.Tensor, stage: str, batch_idx: int) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{stage} batch {batch_idx} holds NaN or Inf inputs; clean the data (check normalisation and files).")


class TargetClassifier(VerifiedLoading, L.LightningModule):
    """Cross-entropy training of a target classifier (any name ``create_target`` accepts).

    Args:
        arch: target name (``fmnist_cnn``, a timm or torchvision name, or your registered one).
        checkpoint: optional weights to start from (fine-tuning).
        image_size: input side, used to check the data before training.
    """

    def __init__(self, arch: str = "fmnist_cnn", num_classes: int = 10, in_chans: int = 1, image_size: int = 28,
                 pretrained: bool = False, checkpoint: str | None = None, lr: float = 2e-3, weight_decay: float = 0.0,
                 label_smoothing: float = 0.0, schedule: str = "cosine", model_kwargs: dict | None = None):  # fmt: skip
        super().__init__()
        check_settings(self, locals())  # types and ranges of every setting (gencnp.settings.RULES)
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got '{schedule}'.")
        self.save_hyperparameters()
        self.model = load_target(arch, checkpoint, num_classes, in_chans, pretrained, **(model_kwargs or {}))
        self.input_shape = (in_chans, image_size, image_size)
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def check_data(self, datamodule) -> None:
        _check_data(self.num_classes, self.input_shape, datamodule, f"target '{self.hparams.arch}'")

    def setup(self, stage: str) -> None:
        self.check_data(getattr(self.trainer, "datamodule", None))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        _record_classes(self, checkpoint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch, stage: str, metric, batch_idx: int):
        x, y = batch[0], batch[1]
        _check_finite(x, stage, batch_idx)
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing if stage == "train" else 0.0)
        metric(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", on_step=stage == "train", on_epoch=True)
        self.log(f"{stage}/acc", metric, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train", self.train_acc, batch_idx)

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val", self.val_acc, batch_idx)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test", self.test_acc, batch_idx)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.schedule == "constant":
            return opt
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches,
                                                    pct_start=0.15)  # fmt: skip
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class GenCNP(VerifiedLoading, L.LightningModule):
    """GEN-CNP: a generator predicting each input's pathway in the frozen target, in one pass.

    ``L = kd + lambda_sp(t) * sparsity + lambda_swap * swap + lambda_zero * zero + lambda_cls * cls + lambda_con * con``
    (DESIGN section 5). ``zero`` is gencnp's addition: the all-zero image through a pathway must not give its
    class (the ``zero_forcing`` control as a loss; 0 disables it).

    Args:
        target / target_checkpoint: the frozen classifier (arch name and weights).
        taps: tap names or ``'auto'``; ``shallow_taps``: names or count of the shallow branch.
        ablation: ``'zero'`` (masked channels are 0) or ``'mean'`` (they keep their training-set mean activation).
        class_source: ``'pred'`` (the target's prediction) or ``'label'``.
        swap_probes_per_class: reference images per class (seeded, from the train split, correctly classified)
            used by the ``swap_forcing`` control; sample i is paired with a probe of another class chosen by a
            hash of its pixels, so the control does not depend on batching or process count.
        sparsity_per: ``'tap'`` (every tap's mean score counts the same) or ``'channel'`` (every channel counts the
            same: the sparsity term is the expected ``kept_mean``).
        swap_partner: the training ``swap`` partner of sample i: ``'roll'`` (the next sample of the batch) or
            ``'hard'`` (a sample of the batch whose class is x_i's runner-up class under the target, the class
            most easily forced; ``losses.partners``).
        dependence_gate: when set, a sample's sparsity pressure also stops while its pathway gives its class a
            probability above this value on its swap partner or on the all-zero image (``None``: faithfulness only).
        selection weights: checkpoints select on ``val/score = agreement - w_swap swap_forcing - w_zero
            zero_forcing - w_kept kept_mean``.
        control_fraction: opt-in speed setting (default 1.0: every sample). The ``swap`` and ``zero`` losses (and
            the dependence gate) use only the first ``ceil(control_fraction * B)`` samples of each training batch,
            so the masked pass holds ``B + 2 ceil(f B)`` rather than ``3B`` images; samples outside that subset are
            gated by faithfulness only. Validation and test always run the controls on every sample.
        channels_last: opt-in speed setting, the frozen target in ``channels_last`` memory format
            (``FrozenTarget``); results agree to float rounding.
    """

    def __init__(self, target: str = "fmnist_cnn", target_checkpoint: str | None = "runs/fashion_mnist/target/best.ckpt",
                 num_classes: int = 10, in_chans: int = 1, image_size: int = 28, taps: str | list[str] = "auto",
                 shallow_taps: int | list[str] | None = None, d: int = 64, groups: int = 8, init_score: float = 0.9,
                 binarizer: str = "daq", ablation: str = "zero", ablation_batches: int = 20, class_source: str = "pred",
                 lambda_sp: float = 1.0, lambda_swap: float = 1.0, lambda_zero: float = 0.0, lambda_cls: float = 1.0,
                 lambda_con: float = 0.1, temperature: float = 4.0, kappa: float = 0.9,
                 sparsity_ramp_epochs: float = 1.0, tap_weights: list[float] | None = None, sparsity_per: str = "tap",
                 dependence_gate: float | None = None,
                 proto_momentum: float = 0.9, swap_probes_per_class: int = 4, swap_partner: str = "roll", lr: float = 1e-3,
                 weight_decay: float = 0.0, schedule: str = "cosine", w_swap: float = 1.0, w_zero: float = 0.5,
                 w_kept: float = 0.25, target_kwargs: dict | None = None, control_fraction: float = 1.0,
                 channels_last: bool = False):  # fmt: skip
        super().__init__()
        if not 0 < control_fraction <= 1:
            raise ValueError(f"control_fraction must lie in (0, 1] (1: controls on every sample), got {control_fraction}.")
        for name, value, allowed in (("ablation", ablation, ("zero", "mean")), ("class_source", class_source, ("pred", "label")),
                                     ("schedule", schedule, ("cosine", "constant")), ("sparsity_per", sparsity_per, ("tap", "channel")),
                                     ("swap_partner", swap_partner, ("roll", "hard"))):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got '{value}'.")
        check_settings(self, locals())  # types and ranges of every setting (gencnp.settings.RULES)
        self.save_hyperparameters()
        model = load_target(target, target_checkpoint, num_classes, in_chans, **(target_kwargs or {}))
        self.target = FrozenTarget(model, taps, (in_chans, image_size, image_size), shallow_taps, arch=target,
                                   channels_last=channels_last)  # fmt: skip
        if tap_weights is not None and len(tap_weights) != len(self.target.tap_names):
            raise ValueError(f"tap_weights has {len(tap_weights)} entries for {len(self.target.tap_names)} taps {self.target.tap_names}.")
        self.num_classes = num_classes
        self.generator = PathwayGenerator(self.target.tap_channels, len(self.target.shallow_names), num_classes, d, groups,
                                          init_score, binarizer)  # fmt: skip
        dd = self.target.num_channels
        self.register_buffer("prototypes", torch.zeros(num_classes, dd))
        self.register_buffer("proto_seen", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("fill", torch.zeros(dd))
        self.register_buffer("fill_ready", torch.zeros((), dtype=torch.bool))
        p = swap_probes_per_class
        self.register_buffer("probes", torch.zeros(num_classes * p, in_chans, image_size, image_size))
        self.register_buffer("probe_class", torch.full((num_classes * p,), -1, dtype=torch.long))
        self.val_metrics = PathwayMetrics(self.target.tap_names, self.target.tap_channels)
        self.test_metrics = PathwayMetrics(self.target.tap_names, self.target.tap_channels)
        # loss_kd as a sample-weighted float64 mean synced across processes (Lightning's sync_dist averages the
        # per-process means, which is wrong when the processes hold different numbers of samples).
        self.val_kd, self.test_kd = MeanMetric().set_dtype(torch.float64), MeanMetric().set_dtype(torch.float64)

    # ----- checkpoints: the target's weights stay out, its identity goes in -----
    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for key in [k for k in state if k.startswith(prefix + "target.")]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        merged = dict(state_dict)
        for k, v in self.target.state_dict(prefix="target.").items():
            merged.setdefault(k, v)
        return super().load_state_dict(merged, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["gencnp"] = {
            "format_version": FORMAT_VERSION, "target_arch": self.hparams.target,
            "target_checkpoint": str(self.hparams.target_checkpoint), "target_hash": self.target.tensor_hash(),
            "taps": self.target.tap_names, "tap_channels": self.target.tap_channels,
        }  # fmt: skip
        _record_classes(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint)

    def check_checkpoint(self, checkpoint: dict, source: str = "this checkpoint") -> None:
        """Raise ``ValueError`` unless ``checkpoint`` is an intact GenCNP checkpoint for this target and taps."""
        # Weights only: the file's hyper-parameters were checked when it was read (read_checkpoint, VerifiedLoading);
        # here they may already hold load_from_checkpoint's keyword overrides.
        verify_state_hash(checkpoint, source, settings=False)
        meta = checkpoint.get("gencnp")
        if not isinstance(meta, dict):
            raise ValueError(
                f"{source} has no 'gencnp' section: it is not a GenCNP generator checkpoint (a target checkpoint "
                "goes to target_checkpoint, not --ckpt_path); pass a checkpoint written by fit with a GenCNP config."
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{source} has generator checkpoint format {meta.get('format_version')!r}, but this gencnp reads "
                f"format {FORMAT_VERSION} only; retrain the generator, or use the gencnp version that wrote it."
            )
        missing = [k for k in ("target_arch", "target_checkpoint", "target_hash", "taps") if k not in meta]
        if missing:
            raise ValueError(f"{source} is damaged: its 'gencnp' section lacks {missing}; retrain the generator.")
        if meta["target_hash"] != self.target.tensor_hash():
            raise ValueError(
                f"{source}: generator checkpoint was trained for target '{meta['target_arch']}' from '{meta['target_checkpoint']}' "
                f"(tensor hash {meta['target_hash'][:12]}), but the configured target ('{self.hparams.target}' from "
                f"'{self.hparams.target_checkpoint}') has hash {self.target.tensor_hash()[:12]}; point target_checkpoint "
                "at the original target weights, or train a generator for this target."
            )
        if list(meta["taps"]) != self.target.tap_names:
            raise ValueError(
                f"{source}: generator checkpoint taps {meta['taps']} differ from the configured taps "
                f"{self.target.tap_names}; set model taps: {list(meta['taps'])}, or train a generator for these taps."
            )

    # ----- data-dependent state: probes and mean-ablation fill -----
    def check_data(self, datamodule) -> None:
        _check_data(self.num_classes, self.target.input_shape, datamodule, f"target '{self.hparams.target}'")

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        self.check_data(dm)
        if dm is not None and int((self.probe_class >= 0).sum()) == 0:
            self.build_probes(dm.split("train"))

    @torch.no_grad()
    def build_probes(self, dataset) -> None:
        """Pick ``swap_probes_per_class`` train images per class (seeded) that the target classifies correctly."""
        p, k = self.hparams.swap_probes_per_class, self.num_classes
        g = torch.Generator().manual_seed(12345)
        order = torch.randperm(len(dataset), generator=g)[: max(200 * k, 2000)].tolist()
        items = [dataset[i] for i in order]
        xs = torch.stack([it[0] for it in items]).to(self.device)
        ys = torch.as_tensor([int(it[1]) for it in items], device=self.device)
        preds = torch.cat([self.target(xs[i : i + 512]).argmax(1) for i in range(0, len(xs), 512)])
        probes, cls = torch.zeros_like(self.probes), torch.full_like(self.probe_class, -1)
        for c in range(k):
            idx = torch.nonzero((ys == c) & (preds == c))[:p, 0]
            probes[c * p : c * p + len(idx)] = xs[idx]
            cls[c * p : c * p + len(idx)] = c
        self.probes.copy_(probes)
        self.probe_class.copy_(cls)

    def partner_images(self, x: torch.Tensor, y_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each sample, a probe image of another class (chosen by an integer hash of its pixels).

        Returns ``(images [B, C, H, W], valid [B])``; ``valid`` is False when no probe of another class exists.
        """
        k, p = self.num_classes, self.hparams.swap_probes_per_class
        q = (x.detach().float().flatten(1) * 64).round().long()
        w = torch.arange(1, q.shape[1] + 1, device=x.device, dtype=torch.long) % 1009 + 1
        h = (q * w).sum(1).abs()
        avail = self.probe_class >= 0
        offset = 1 + h % (k - 1)
        slot = (h // (k - 1)) % p
        partner_cls = (y_hat + offset) % k
        index = partner_cls * p + slot
        # Fall back to the first filled slot of that class when the chosen slot is empty.
        filled = avail.view(k, p)
        first = torch.where(filled.any(1), filled.float().argmax(1), torch.zeros(k, dtype=torch.long, device=x.device))
        index = torch.where(avail[index], index, partner_cls * p + first[partner_cls])
        return self.probes[index], avail[index]

    @torch.no_grad()
    def compute_fill(self, loader, batches: int | None = None) -> None:
        """Mean ablation: the dataset-mean activation of every tap channel over ``batches`` train batches."""
        total, n = torch.zeros_like(self.fill), 0
        for i, batch in enumerate(loader):
            if i >= (batches or self.hparams.ablation_batches):
                break
            _, feats = self.target(batch[0].to(self.device), record=True)
            total += torch.cat([channel_means(f).sum(0) for f in feats]).to(total.dtype)
            n += batch[0].shape[0]
        if self._trainer is not None and self._trainer.world_size > 1:
            packed = self._trainer.strategy.reduce(torch.cat([total, torch.tensor([float(n)], device=total.device)]), reduce_op="sum")
            total, n = packed[:-1], float(packed[-1])
        self.fill.copy_(total / max(n, 1))
        self.fill_ready.fill_(True)

    def on_fit_start(self) -> None:
        if self.hparams.ablation == "mean" and not bool(self.fill_ready):
            self.compute_fill(self.trainer.datamodule.train_dataloader())

    def fills(self) -> list[torch.Tensor] | None:
        """Per-tap fill values for masked channels (``None``: zero ablation)."""
        if self.hparams.ablation != "mean":
            return None
        if not bool(self.fill_ready):
            raise RuntimeError("mean ablation needs the dataset-mean activations: run fit, or call compute_fill(loader).")
        return list(torch.split(self.fill, self.target.tap_channels))

    # ----- explanation -----
    def class_of(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.hparams.class_source == "label" and labels is not None:
            return labels
        return logits.argmax(1)

    def explain(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor | list]:
        """One-pass pathways for ``x [B, C, H, W]``.

        Returns:
            ``masks`` (per-tap bool ``[B, C_l]``), ``pathway`` (bool ``[B, D]``), ``kept`` (``[B]`` fraction),
            ``logits`` and ``masked_logits`` (``[B, K]``), ``y_hat`` (class source), ``prediction`` (masked argmax).
        """
        with torch.no_grad():
            logits, feats = self.target(x, record=True)
            out = self.generator(feats)
            pathway = out["masks"] > 0.5
            masks = self.generator.split(pathway)
            masked_logits = self.target(x, masks=masks, fill=self.fills(), first_tap=feats[0])
        return {"masks": masks, "pathway": pathway, "kept": pathway.float().mean(1), "logits": logits,
                "masked_logits": masked_logits, "y_hat": self.class_of(logits, labels),
                "prediction": masked_logits.argmax(1), "scores": out["scores"]}  # fmt: skip

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | list]:
        return self.explain(x)

    # ----- training -----
    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self._trainer is not None and self._trainer.world_size > 1:
            return self._trainer.strategy.reduce(t, reduce_op="sum")
        return t

    def lambda_sp_now(self) -> float:
        ramp = self.hparams.sparsity_ramp_epochs * max(1, self._trainer.num_training_batches if self._trainer else 1)
        if ramp <= 0:
            return self.hparams.lambda_sp
        return self.hparams.lambda_sp * min(1.0, self.global_step / ramp)

    def training_step(self, batch, batch_idx):
        x, labels = batch[0], batch[1]
        _check_finite(x, "train", batch_idx)
        h = self.hparams
        with torch.no_grad():
            logits, feats = self.target(x, record=True)
        y_hat = self.class_of(logits, labels)
        out = self.generator(feats)
        m = out["masks"]
        b = x.shape[0]
        # One masked forward over [x, swapped x, zero image]: bigger GEMMs than three small ones. The first tap's
        # output of every part is known (x: recorded above; swapped x: its rows permuted; zero image: one image's),
        # so the first tap's module does not run again (FrozenTarget first_tap).
        nc = b if h.control_fraction >= 1 else max(1, math.ceil(h.control_fraction * b))
        xs, ms, firsts = [x], [m], [feats[0]]
        idx, valid = LS.partners(y_hat, logits if h.swap_partner == "hard" else None)
        idx, valid = idx[:nc], valid[:nc]
        if h.lambda_swap > 0:
            xs.append(x[idx])
            ms.append(m[:nc])
            firsts.append(feats[0][idx])
        if h.lambda_zero > 0:
            xs.append(torch.zeros_like(x[:nc]))
            ms.append(m[:nc])
            with torch.no_grad():
                zero_first = self.target(xs[-1][:1], record=True)[1][0]
            firsts.append(zero_first.expand(nc, *zero_first.shape[1:]))
        all_logits = self.target(torch.cat(xs), masks=self.generator.split(torch.cat(ms)), fill=self.fills(),
                                 first_tap=torch.cat(firsts))  # fmt: skip
        chunks = list(torch.split(all_logits, [b] + [nc] * (len(xs) - 1)))
        masked_logits = chunks.pop(0)
        terms = {"kd": LS.kd(logits, masked_logits, y_hat, h.temperature)}
        gate = LS.faithful_gate(logits, masked_logits, y_hat, h.kappa)
        # Samples outside the control subset (control_fraction < 1) pass the dependence gate.
        rest = gate.new_ones(b - nc)
        if h.lambda_swap > 0:
            swapped = chunks.pop(0)
            terms["swap"] = LS.swap(swapped, y_hat[:nc], valid)
            if h.dependence_gate is not None:
                gate = gate * torch.cat([LS.dependence_gate(swapped, y_hat[:nc], h.dependence_gate, valid), rest])
        if h.lambda_zero > 0:
            zeroed = chunks.pop(0)
            terms["zero"] = LS.swap(zeroed, y_hat[:nc])
            if h.dependence_gate is not None:
                gate = gate * torch.cat([LS.dependence_gate(zeroed, y_hat[:nc], h.dependence_gate), rest])
        terms["sparsity"] = LS.sparsity(self.generator.split(out["scores"]), gate, h.tap_weights, h.sparsity_per)
        # cls and con always enter the graph (weight 0 included) so DDP never sees unused parameters.
        terms["cls"] = LS.cls(logits, out["class_logits"], y_hat)
        if not bool(self.proto_seen.all()):
            LS.update_prototypes(self.prototypes, self.proto_seen, out["scores"], y_hat, h.proto_momentum, self._all_reduce)
        terms["con"] = LS.con(out["scores"], self.prototypes, y_hat)
        weights = {"kd": 1.0, "sparsity": self.lambda_sp_now(), "swap": h.lambda_swap, "zero": h.lambda_zero,
                   "cls": h.lambda_cls, "con": h.lambda_con}  # fmt: skip
        result = LS.total_loss(terms, weights)
        for name, value in result.items():
            if not torch.isfinite(value):
                raise FloatingPointError(
                    f"loss term '{name}' became non-finite ({float(value)}) at global step {self.global_step} "
                    f"(batch {batch_idx}); lower lr, check the inputs, or disable the term."
                )
        if bool(self.proto_seen.all()):
            LS.update_prototypes(self.prototypes, self.proto_seen, out["scores"], y_hat, h.proto_momentum, self._all_reduce)
        self.log_dict({f"train/loss_{k}" if k != "loss" else "train/loss": v.detach() for k, v in result.items()},
                      on_step=True, on_epoch=False, prog_bar=False)  # fmt: skip
        self.log("train/kept", m.detach().mean(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/lambda_sp", self.lambda_sp_now(), on_step=True, on_epoch=False)
        return result["loss"]

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.schedule == "constant":
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----- evaluation -----
    def controls(self, x: torch.Tensor, ex: dict, necessity: bool = False) -> dict[str, torch.Tensor]:
        """Input-dependence controls for pathways ``ex['masks']``: probe swap, zero image, (complement)."""
        b = x.shape[0]
        partners, valid = self.partner_images(x, ex["y_hat"])
        masks = ex["pathway"].float()
        xs, ms = [partners, torch.zeros_like(x)], [masks, masks]
        if necessity:
            xs.append(x)
            ms.append(1.0 - masks)
        with torch.no_grad():
            logits = self.target(torch.cat(xs), masks=self.generator.split(torch.cat(ms)), fill=self.fills())
        chunks = torch.split(logits, b)
        out = {"swap_logits": chunks[0], "zero_logits": chunks[1], "swap_valid": valid}
        if necessity:
            out["necessity_logits"] = chunks[2]
        return out

    def _eval_step(self, batch, batch_idx, stage: str, metrics: PathwayMetrics):
        x, labels = batch[0], batch[1]
        _check_finite(x, stage, batch_idx)
        ex = self.explain(x, labels)
        ctrl = self.controls(x, ex)
        metrics.update(ex["logits"], ex["masked_logits"], ex["y_hat"], ex["pathway"], labels, **ctrl)
        kd = self.val_kd if stage == "val" else self.test_kd
        kd.update(LS.kd(ex["logits"].double(), ex["masked_logits"].double(), ex["y_hat"], self.hparams.temperature),
                  weight=x.shape[0])  # fmt: skip
        self.log(f"{stage}/loss_kd", kd, on_step=False, on_epoch=True, batch_size=x.shape[0])

    def _eval_end(self, stage: str, metrics: PathwayMetrics) -> None:
        vals = metrics.compute()
        metrics.reset()
        h = self.hparams
        vals["score"] = vals["agreement"] - h.w_swap * vals["swap_forcing"] - h.w_zero * vals["zero_forcing"] - h.w_kept * vals["kept_mean"]
        vals.pop("n", None)
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
        ex = self.explain(x, labels)
        return {"pathway": ex["pathway"], "y_hat": ex["y_hat"], "kept": ex["kept"], "prediction": ex["prediction"],
                "label": labels}  # fmt: skip
