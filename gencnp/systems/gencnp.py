"""LightningModules: ``GenCNP`` (trains the pathway generator) and ``TargetClassifier`` (trains a target;
``gencnp.systems.classifier``, re-exported here).

Systems orchestrate: steps, logging, optimisers. The maths lives in ``generator``, ``losses`` and ``metrics``;
the training step's parts in ``training``.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from gencnp.io.checkpoint_io import VerifiedLoading, seal, state_hash, verify_state_hash
from gencnp.pathways import losses as LS
from gencnp.pathways import nulls as NL
from gencnp.pathways.baselines import tap_counts, topk_per_tap
from gencnp.pathways.generator import PathwayGenerator
from gencnp.pathways.metrics import PathwayMetrics
from gencnp.pathways.selection import W_KEPT, W_SWAP, W_ZERO, selection_score
from gencnp.settings import check_settings
from gencnp.systems import probes as PR
from gencnp.systems import training as ST
from gencnp.systems.classifier import TargetClassifier, _check_data, _check_finite, _record_classes
from gencnp.targets.hooks import channel_means
from gencnp.targets.loading import FrozenTarget, build_target

__all__ = ["TargetClassifier", "GenCNP", "FORMAT_VERSION", "DEFAULT_NULL_FAMILIES"]
FORMAT_VERSION = 1
# Null families measured in validation and test when ``null_families`` is not set.
DEFAULT_NULL_FAMILIES = ("gaussian", "shuffle", "smooth")


def partner_classes(h: torch.Tensor, y_hat: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Swap-partner class of each sample: the ``(h mod n)``-th class after ``y_hat`` (cyclically) among the ``n``
    classes other than ``y_hat`` that have probes. With every class available this is ``y_hat + 1 + h mod (K-1)``.
    A sample with no other available class gets ``y_hat`` (its partner is then marked invalid).

    Args:
        h: ``[B]`` non-negative integer hash of each input; y_hat: ``[B]`` classes; available: ``[K]`` bool.
    """
    k = available.shape[0]
    rel = (torch.arange(k, device=h.device)[None, :] - y_hat[:, None]) % k  # [B, K]: 0 for y_hat itself
    ok = available[None, :] & (rel > 0)
    n = ok.sum(1)
    j = h % n.clamp(min=1)
    # Rank the available classes by their distance after y_hat; pick rank j.
    order = torch.where(ok, rel, torch.full_like(rel, k)).argsort(1)
    pick = order.gather(1, j[:, None])[:, 0]
    return torch.where(n > 0, pick, y_hat)


def check_probes(probe_class: torch.Tensor, num_classes: int, class_names=None) -> None:
    """Before training: the swap control needs correctly classified probe images of at least two classes; warn
    about classes without any (their samples' partners come from the other classes)."""
    have = set(probe_class[probe_class >= 0].tolist())
    lacking = [c for c in range(num_classes) if c not in have]
    if not lacking:
        return
    names = [f"{c} ({class_names[c]})" if class_names and c < len(class_names) else str(c) for c in lacking]
    fix = (
        "the target classifies no sampled training image of these classes correctly: train the target longer "
        "or check that target_checkpoint, num_classes and the data belong together"
    )
    if len(have) < 2:
        raise ValueError(
            f"the swap_forcing control needs probe images of at least two classes, but classes {', '.join(names)} have "
            f"none ({len(have)} class with probes); {fix}. Nothing was trained."
        )
    rank_zero_warn(f"classes {', '.join(names)} have no swap probes; their images are never swap partners ({fix}).")


class GenCNP(VerifiedLoading, L.LightningModule):
    """GEN-CNP: a generator predicting each input's pathway in the frozen target, in one pass.

    ``L = kd + lambda_sp(t) sparsity + lambda_swap swap + lambda_zero zero + lambda_null null + lambda_cls cls
    + lambda_con con (+ lambda_lookup lookup + lambda_nested nested)``. The defaults are the recommended
    configuration (``configs/fashion_mnist/gencnp.yaml``, chosen on the validation split).
    (docs/design.md section 5). ``zero`` is gencnp's addition: the all-zero image through a pathway must not give its
    class (the ``zero_forcing`` control as a loss; 0 disables it).

    Args:
        target: the frozen classifier (as ``TargetClassifier.arch``). ``target``, ``num_classes``, ``in_chans``,
            ``image_size`` and ``target_kwargs`` left unset are read from the spec the target checkpoint records; a
            value that differs from it is an error naming both.
        target_checkpoint: its weights (a ``TargetClassifier`` checkpoint or a state dict).
        embed_target: keep the target's weights in this model's checkpoints, so ``GenCNP.load_from_checkpoint(path)``
            works without the target checkpoint (from any folder); the tensor-hash check stays.
        target_spec: filled in by gencnp (the resolved target, stored in checkpoints); leave it unset.
        taps: tap names or ``'auto'``; ``shallow_taps``: names or count of the shallow branch.
        ablation: ``'zero'`` (masked channels are 0) or ``'mean'`` (they keep their training-set mean activation).
        class_source: ``'pred'`` (the target's prediction) or ``'label'``.
        swap_probes_per_class: reference images per class (seeded, from the train split, correctly classified)
            used by the ``swap_forcing`` control; sample i is paired with a probe of another class chosen by a
            hash of its pixels, so the control does not depend on batching or process count.
        sparsity_per: ``'tap'`` (every tap's mean score counts the same) or ``'channel'`` (every channel counts the
            same: the sparsity term is the expected ``kept_mean``).
        probe_filter: ``'correct'`` (probes are training images the target classifies correctly; the default) or
            ``'label'`` (the first images of each class, no target forward: for targets too weak to classify two
            classes, such as the 50-step ImageNet-shape smoke configs).
        probe_candidates: training images searched for probes (seeded order; the search stops once every class has
            its probes); ``None``: ``max(200 K, 2000)``.
        swap_partner: the training ``swap`` partner of sample i: ``'roll'`` (the next sample of the batch) or
            ``'hard'`` (a sample of the batch whose class is x_i's runner-up class under the target, the class
            most easily forced; ``losses.partners``).
        dependence_gate: when set, a sample's sparsity pressure also stops while its pathway gives its class a
            probability above this value on its swap partner or on the all-zero image (``None``: faithfulness only).
        w_swap: checkpoints select on ``val/score = agreement - w_swap swap_forcing - w_zero zero_forcing - w_kept
            kept_mean`` (``w_zero`` and ``w_kept`` likewise).
        control_fraction: opt-in speed setting (default 1.0: every sample). The ``swap`` and ``zero`` losses (and
            the dependence gate) use only the first ``ceil(control_fraction * B)`` samples of each training batch,
            so the masked pass holds ``B + 2 ceil(f B)`` rather than ``3B`` images; samples outside that subset are
            gated by faithfulness only. Validation and test always run the controls on every sample.
        channels_last: opt-in speed setting, the frozen target in ``channels_last`` memory format
            (``FrozenTarget``); results agree to float rounding.
        null_families: null-input families (``gencnp.pathways.nulls.FAMILIES``) measured in validation and test:
            ``null_forcing/<family>`` (the paired null input through a pathway gives its class) beside
            ``null_chance/<family>`` (the unmasked target gives that class on the same inputs). ``[]`` disables.
        null_train: families drawn in training for the ``null`` loss (one family per step, in turn; a fresh draw
            every step). Families evaluated but never trained on measure whether the control generalises.
        lambda_null: weight of the ``null`` loss, ``-log(1 - p^{m_i}(n_i)_{y_i})`` for the null input ``n_i``
            paired with ``x_i`` (the ``zero`` loss generalised to families of uninformative inputs).
        lambda_lookup: the ``lookup`` loss (``lookup_margin``: its margin) asks each pathway to beat the class lookup at
            the same per-tap counts: ``relu(KL(p || p^m) - KL(p || p^lookup) + margin)`` per sample, where the lookup
            keeps, per tap, the sample's own number of channels ranked by the class's running selection frequency
            (``class_freq``, an EMA of the hard pathways of each predicted class, momentum ``freq_momentum``). The same
            lookup is measured in validation and test (``lookup_agreement``, ``lookup_gain`` = agreement minus lookup
            agreement).
        lambda_nested: the ``nested`` loss (``nested_min``: see ``rho``) trains the score *ranking* below the operating
            point: each step, every sample keeps only its top ``rho`` share of its own kept channels per tap (by
            generator score, ``rho ~ U(nested_min, 1)``), and ``kd`` is applied to that thinner pathway. Its gradient
            reaches the scores of the channels kept, so the most useful channels of each input rank first.
        class_prior: weight ``alpha`` of a class prior on the score logits: ``alpha * (f_c - mean_j f_c)`` with ``f_c``
            the running selection frequencies ``class_freq`` of the predicted class. The generator then starts
            from its class's ranking and learns per-input corrections; 0 disables it.
        gate_top_margin: when set, the sparsity gate also requires the masked output to keep the sample's class on
            top by this many nats (``losses.faithful_gate``); ``None``: the ratio ``kappa`` alone.
    """

    def __init__(
        self,
        target: str | dict | None = None,
        target_checkpoint: str | None = "runs/fashion_mnist/target/best.ckpt",
        num_classes: int | None = None,
        in_chans: int | None = None,
        image_size: int | None = None,
        taps: str | list[str] = "auto",
        shallow_taps: int | list[str] | None = None,
        d: int = 64,
        groups: int = 8,
        init_score: float = 0.9,
        binarizer: str = "daq",
        ablation: str = "mean",
        ablation_batches: int = 20,
        class_source: str = "pred",
        lambda_sp: float = 14.0,
        lambda_swap: float = 6.0,
        lambda_zero: float = 1.0,
        lambda_cls: float = 1.0,
        lambda_con: float = 0.1,
        temperature: float = 1.0,
        kappa: float = 0.7,
        sparsity_ramp_epochs: float = 0.25,
        tap_weights: list[float] | None = None,
        sparsity_per: str = "channel",
        dependence_gate: float | None = 0.15,
        proto_momentum: float = 0.9,
        swap_probes_per_class: int = 4,
        swap_partner: str = "roll",
        probe_filter: str = "correct",
        probe_candidates: int | None = None,
        lr: float = 5e-3,
        weight_decay: float = 0.0,
        schedule: str = "cosine",
        w_swap: float = W_SWAP,
        w_zero: float = W_ZERO,
        w_kept: float = W_KEPT,
        target_kwargs: dict | None = None,
        control_fraction: float = 1.0,
        channels_last: bool = False,
        null_families: list[str] | None = None,
        null_train: Sequence[str] | None = ("uniform", "smooth", "constant"),
        lambda_null: float = 2.0,
        lambda_lookup: float = 0.0,
        lookup_margin: float = 0.0,
        freq_momentum: float = 0.98,
        lambda_nested: float = 0.0,
        nested_min: float = 0.5,
        gate_top_margin: float | None = None,
        class_prior: float = 4.0,
        embed_target: bool = True,
        target_spec: dict | None = None,
    ):
        super().__init__()
        if not 0 < control_fraction <= 1:
            raise ValueError(
                f"control_fraction must lie in (0, 1] (1: controls on every sample), got {control_fraction}."
            )
        for name, value, allowed in (
            ("ablation", ablation, ("zero", "mean")),
            ("class_source", class_source, ("pred", "label")),
            ("schedule", schedule, ("cosine", "constant")),
            ("sparsity_per", sparsity_per, ("tap", "channel")),
            ("swap_partner", swap_partner, ("roll", "hard")),
            ("probe_filter", probe_filter, ("correct", "label")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got '{value}'.")
        # Types and ranges of every setting (gencnp.settings.RULES); the target's shape settings may be unset here
        # (read from the spec the target checkpoint records) and are checked once resolved.
        spec_keys = ("target", "num_classes", "in_chans", "image_size")
        check_settings(self, {k: v for k, v in locals().items() if not (k in spec_keys and v is None)})
        self.null_eval = NL.check_families(
            DEFAULT_NULL_FAMILIES if null_families is None else null_families, "null_families"
        )
        self.null_train = NL.check_families(null_train, "null_train")
        if lambda_null > 0 and not self.null_train:
            raise ValueError(
                f"lambda_null is {lambda_null} but null_train is empty; list the families to train on "
                f"(from {list(NL.FAMILIES)}), or set lambda_null: 0."
            )
        if not 0 < nested_min <= 1:
            raise ValueError(f"nested_min must lie in (0, 1] (the smallest share of a pathway kept), got {nested_min}.")
        if not 0 <= freq_momentum < 1:
            raise ValueError(f"freq_momentum must lie in [0, 1), got {freq_momentum}.")
        self.save_hyperparameters()
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
        target, num_classes, in_chans, image_size = (
            spec["arch"],
            spec["num_classes"],
            spec["in_chans"],
            spec["image_size"],
        )
        self.hparams.update(
            target=target,
            num_classes=num_classes,
            in_chans=in_chans,
            image_size=image_size,
            target_kwargs=spec["kwargs"],
            target_spec=spec,
        )
        check_settings(self, {"num_classes": num_classes, "in_chans": in_chans, "image_size": image_size})
        self.target = FrozenTarget(
            model, taps, (in_chans, image_size, image_size), shallow_taps, arch=target, channels_last=channels_last
        )
        if not loaded:  # built from the recorded spec; the weights come with the GEN-CNP checkpoint (load_state_dict)
            self.target.weights_pending = (
                f"target_checkpoint '{target_checkpoint}' does not exist and no target weights were loaded from a "
                "GEN-CNP checkpoint; fix target_checkpoint, or load a checkpoint that embeds them (embed_target)."
            )
        if tap_weights is not None and len(tap_weights) != len(self.target.tap_names):
            raise ValueError(
                f"tap_weights has {len(tap_weights)} entries for {len(self.target.tap_names)} taps {self.target.tap_names}."
            )
        self.num_classes = num_classes
        self.generator = PathwayGenerator(
            self.target.tap_channels, len(self.target.shallow_names), num_classes, d, groups, init_score, binarizer
        )
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
        # Swap probes as training-set indices (gencnp.systems.probes): the images are re-read from the attached data, so
        # neither the model nor its checkpoints grow with image size or class count beyond O(K p) integers.
        p = swap_probes_per_class
        self.register_buffer("probe_index", torch.full((num_classes * p,), -1, dtype=torch.long))
        self.register_buffer("probe_class", torch.full((num_classes * p,), -1, dtype=torch.long))
        self._probe_source: PR.ProbeImages | None = None  # plain attributes: never in the state dict
        self._legacy_probes: torch.Tensor | None = None
        self.val_metrics = PathwayMetrics(self.target.tap_names, self.target.tap_channels, self.null_eval)
        self.test_metrics = PathwayMetrics(self.target.tap_names, self.target.tap_channels, self.null_eval)
        self.val_lookup, self.test_lookup = MeanMetric().set_dtype(torch.float64), MeanMetric().set_dtype(torch.float64)
        # loss_kd as a sample-weighted float64 mean synced across processes (Lightning's sync_dist averages the
        # per-process means, which is wrong when the processes hold different numbers of samples).
        self.val_kd, self.test_kd = MeanMetric().set_dtype(torch.float64), MeanMetric().set_dtype(torch.float64)

    # ----- checkpoints: the target's weights go in (embed_target) or stay out, its identity always goes in -----
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
        h = self.hparams
        classify = self.target if h.get("probe_filter", "correct") == "correct" else None
        k, p = self.num_classes, h.swap_probes_per_class
        index, cls = PR.select_probes(dataset, classify, k, p, self.device, limit=h.get("probe_candidates"))
        self.probe_index.copy_(index)
        self.probe_class.copy_(cls)
        self._legacy_probes = None
        if self._probe_source is None or self._probe_source.dataset is not dataset:
            self._probe_source = PR.ProbeImages(dataset, self.target.input_shape)

    def partner_images(self, x: torch.Tensor, y_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each sample, a probe image of another class (chosen by an integer hash of its pixels).

        Returns ``(images [B, C, H, W], valid [B])``; ``valid`` is False when no probe of another class exists.
        """
        k, p = self.num_classes, self.hparams.swap_probes_per_class
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
            if i >= (batches or self.hparams.ablation_batches):
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
        needs_fill = self.hparams.ablation == "mean" and not bool(self.fill_ready)
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
        if self.hparams.get("class_prior", 0.0) == 0 or not bool(self.freq_seen.all()):
            return None
        f = self.class_freq[y_hat]
        return self.hparams.class_prior * (f - f.mean(dim=1, keepdim=True))

    def class_lookup(self, pathway: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
        """The class lookup at ``pathway``'s per-sample, per-tap counts: bool ``[B, D]``, channels ranked by the
        running selection frequency ``class_freq`` of class ``y_hat``."""
        chans = self.target.tap_channels
        return topk_per_tap(self.class_freq[y_hat], tap_counts(pathway, chans), chans)

    def fills(self) -> list[torch.Tensor] | None:
        """Per-tap fill values for masked channels (``None``: zero ablation)."""
        if self.hparams.ablation != "mean":
            return None
        if not bool(self.fill_ready):
            raise RuntimeError(
                "mean ablation needs the dataset-mean activations: run fit, or call compute_fill(loader)."
            )
        return list(torch.split(self.fill, self.target.tap_channels))

    # ----- explanation -----
    def class_of(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if self.hparams.class_source == "label" and labels is not None:
            return labels
        return logits.argmax(1)

    def explain(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor | list]:
        """One-pass pathways for ``x [B, C, H, W]``.

        Returns:
            ``masks`` (``{tap name: bool [B, C_l]}``, tap order), ``pathway`` (bool ``[B, D]``), ``kept`` (``[B]`` fraction),
            ``logits`` and ``masked_logits`` (``[B, K]``), ``y_hat`` (class source), ``prediction`` (masked argmax).
        """
        with torch.no_grad():
            logits, feats = self.target(x, record=True)
            out = self.generator(feats, self.prior(self.class_of(logits, labels)))
            pathway = out["masks"] > 0.5
            masks = self.generator.split(pathway)
            masked_logits = self.target(x, masks=masks, fill=self.fills(), first_tap=feats[0])
        return {
            "masks": dict(zip(self.target.tap_names, masks)),
            "pathway": pathway,
            "kept": pathway.float().mean(1),
            "logits": logits,
            "masked_logits": masked_logits,
            "y_hat": self.class_of(logits, labels),
            "prediction": masked_logits.argmax(1),
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

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.schedule == "constant":
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----- evaluation -----
    @torch.no_grad()
    def control_inputs(self, x: torch.Tensor, y_hat: torch.Tensor) -> dict:
        """The inputs every pathway of ``x`` is checked on (``controls``): the swap probes, the null families of
        ``null_eval`` and the unmasked target's logits on those (chance). They depend on ``x`` and ``y_hat`` only, so
        callers that check several pathways of one batch compute them once and pass them to ``controls``."""
        partners, valid = self.partner_images(x, y_hat)
        nulls = [self.null_inputs(f, x) for f in self.null_eval]
        chance = torch.split(self.target(torch.cat(nulls)), x.shape[0]) if nulls else []
        return {"partners": partners, "valid": valid, "nulls": nulls, "chance": list(chance)}

    def controls(self, x: torch.Tensor, ex: dict, necessity: bool = False, inputs: dict | None = None) -> dict:
        """Input-dependence controls for pathways ``ex['pathway']``: probe swap, zero image, the null families of
        ``null_eval`` (with the unmasked target's logits on them: the chance level), (complement).

        ``inputs``: ``control_inputs(x, ex['y_hat'])`` when already computed for this batch."""
        b = x.shape[0]
        if inputs is None:
            inputs = self.control_inputs(x, ex["y_hat"])
        masks = ex["pathway"].float()
        nulls = inputs["nulls"]
        xs, ms = [inputs["partners"], torch.zeros_like(x), *nulls], [masks] * (2 + len(nulls))
        if necessity:
            xs.append(x)
            ms.append(1.0 - masks)
        with torch.no_grad():
            logits = self.target(torch.cat(xs), masks=self.generator.split(torch.cat(ms)), fill=self.fills())
        chunks = torch.split(logits, b)
        out = {"swap_logits": chunks[0], "zero_logits": chunks[1], "swap_valid": inputs["valid"]}
        if nulls:
            out["null_logits"] = dict(zip(self.null_eval, chunks[2 : 2 + len(nulls)]))
            out["null_chance_logits"] = dict(zip(self.null_eval, inputs["chance"]))
        if necessity:
            out["necessity_logits"] = chunks[-1]
        return out

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
            LS.kd(ex["logits"].double(), ex["masked_logits"].double(), ex["y_hat"], self.hparams.temperature),
            weight=x.shape[0],
        )
        self.log(f"{stage}/loss_kd", kd, on_step=False, on_epoch=True, batch_size=x.shape[0])

    def _eval_end(self, stage: str, metrics: PathwayMetrics) -> None:
        vals = metrics.compute()
        metrics.reset()
        h = self.hparams
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
        ex = self.explain(x, labels)
        return {
            "pathway": ex["pathway"],
            "y_hat": ex["y_hat"],
            "kept": ex["kept"],
            "prediction": ex["prediction"],
            "label": labels,
        }
