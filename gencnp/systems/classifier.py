"""``TargetClassifier``: cross-entropy training of a target, and the checks it shares with ``GenCNP``."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from gencnp.io.checkpoint_io import VerifiedLoading, seal
from gencnp.settings import check_settings
from gencnp.targets.loading import SPEC_KEY, check_input_size, load_target, make_target_spec

__all__ = ["TargetClassifier"]


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
        raise ValueError(
            f"{stage} batch {batch_idx} holds NaN or Inf inputs; clean the data (check normalisation and files)."
        )


class TargetClassifier(VerifiedLoading, L.LightningModule):
    """Cross-entropy training of a target classifier (any name ``create_target`` accepts).

    Args:
        arch: target name (``fmnist_cnn``, a timm or torchvision name, your registered one, or a dotted class
            path), or ``{class_path: mynet.MyNet, init_args: {...}}`` for any importable ``nn.Module``. Checkpoints
            record it (with the other arguments below) so GEN-CNP rebuilds the model from the checkpoint alone.
        checkpoint: optional weights to start from (fine-tuning).
        image_size: input side, used to check the data before training.
        channels_last: keep the model's weights and inputs in ``channels_last`` memory format (faster convolutions
            on GPUs, above all with ``trainer.precision: bf16-mixed``); results agree to float rounding.
    """

    def __init__(
        self,
        arch: str | dict = "fmnist_cnn",
        num_classes: int = 10,
        in_chans: int = 1,
        image_size: int = 28,
        pretrained: bool = False,
        checkpoint: str | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        label_smoothing: float = 0.0,
        schedule: str = "cosine",
        model_kwargs: dict | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        check_settings(self, locals())  # types and ranges of every setting (gencnp.settings.RULES)
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got '{schedule}'.")
        self.save_hyperparameters()
        self.model = load_target(arch, checkpoint, num_classes, in_chans, pretrained, **(model_kwargs or {}))
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.input_shape = (in_chans, image_size, image_size)
        check_input_size(self.model, self.input_shape, arch)  # a model that shrinks the input to nothing fails here
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def check_data(self, datamodule) -> None:
        _check_data(self.num_classes, self.input_shape, datamodule, f"target '{self.hparams.arch}'")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        h = self.hparams  # how to rebuild the model (GenCNP reads it from target_checkpoint)
        checkpoint[SPEC_KEY] = make_target_spec(h.arch, h.num_classes, h.in_chans, h.image_size, h.model_kwargs)
        _record_classes(self, checkpoint)
        seal(checkpoint)  # the last hook of any Trainer's save: plain L.Trainer checkpoints are hashed too

    def setup(self, stage: str) -> None:
        self.check_data(getattr(self.trainer, "datamodule", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.get("channels_last", False) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
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
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches, pct_start=0.15
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
