"""GenCNP's checkpoints: the target's weights go in (``embed_target``) or stay out, its identity always goes in, and
a checkpoint is checked against the configured target and taps before its weights are used (docs/design.md
section 10)."""

from __future__ import annotations

import torch

from gencnp.io.checkpoint_io import seal, state_hash, verify_state_hash
from gencnp.systems import probes as PR
from gencnp.systems.classifier import _record_classes

__all__ = ["FORMAT_VERSION", "GeneratorCheckpoints"]
FORMAT_VERSION = 1


class GeneratorCheckpoints:
    """Mixin of ``GenCNP`` (a ``LightningModule`` with ``target``, ``hparams`` and the generator's buffers)."""

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        if prefix + "probe_index" in state:  # a probe not found in the data (old checkpoint) is not saved
            index, cls = state[prefix + "probe_index"], state[prefix + "probe_class"]
            state[prefix + "probe_class"] = torch.where(index >= 0, cls, torch.full_like(cls, -1))
        if self.hparams.get("embed_target", True):
            return state
        for key in [k for k in state if k.startswith(prefix + "target.")]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        merged = dict(state_dict)
        embedded = any(k.startswith("target.") for k in merged)
        if self.target.weights_pending and not embedded:
            raise FileNotFoundError(self.target.weights_pending)
        for k, v in self.target.state_dict(prefix="target.").items():
            merged.setdefault(k, v)
        # Generators saved before null inputs and the class lookup existed: those buffers start empty.
        for k in ("input_mean", "input_std", "input_ready", "class_freq", "freq_seen"):
            merged.setdefault(k, getattr(self, k))
        self._legacy_probes = PR.migrate_state(merged, self.probe_index)
        out = super().load_state_dict(merged, strict=strict, assign=assign)
        self.target.weights_pending, self.target._hash = None, None
        return out

    def upgrade_state(self, state: dict) -> dict:
        """A copy of ``state`` in the current layout (a ``probes`` image buffer becomes ``probe_index``), for checks
        that compare a checkpoint's keys with this model's before loading it (``preflight.check_checkpoint``)."""
        state = dict(state)
        PR.migrate_state(state, self.probe_index)
        return state

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["gencnp"] = {
            "format_version": FORMAT_VERSION,
            "target_arch": self.hparams.target,
            "target_checkpoint": str(self.hparams.target_checkpoint),
            "target_hash": self.target.tensor_hash(),
            "taps": self.target.tap_names,
            "tap_channels": self.target.tap_channels,
        }
        _record_classes(self, checkpoint)
        seal(checkpoint)  # the last hook of any Trainer's save: plain L.Trainer checkpoints are hashed too

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
        embedded = {
            k.removeprefix("target.model."): v
            for k, v in (checkpoint.get("state_dict") or {}).items()
            if k.startswith("target.model.")
        }
        if embedded and state_hash(embedded) != meta["target_hash"]:
            raise ValueError(
                f"{source} is damaged: its embedded target weights (hash {state_hash(embedded)[:12]}) are not the "
                f"target it was trained for (hash {meta['target_hash'][:12]}); retrain the generator."
            )
        if not self.target.weights_pending and meta["target_hash"] != self.target.tensor_hash():
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
