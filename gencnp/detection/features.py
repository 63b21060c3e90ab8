"""``Scorer``: one pass over a batch gives every pathway score, the target's logits and its penultimate features (for
the pytorch-ood baselines); ``soft_surprise`` is the differentiable pathway score the adaptive attack pushes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gencnp.detection import scores as S
from gencnp.pathways.baselines import split_pathway

__all__ = ["Scorer", "head_of"]


def head_of(model: nn.Module) -> nn.Linear:
    """The classifier's last linear layer (its input is the penultimate feature the baselines read): timm's
    ``get_classifier()`` when it is a ``Linear``, else the last ``nn.Linear`` registered in the model."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Linear):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                f"target {type(model).__name__} has no nn.Linear head; the feature baselines (Mahalanobis, ViM, KNN) "
                "need one. Give the model a linear classifier, or remove those baselines from `baselines`."
            )
        head = linears[-1]
    return head


@contextmanager
def _penultimate(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record the input of ``head`` (flattened to ``[B, F]``) while the block runs; the hook is removed on exit."""
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().flatten(1)))
    try:
        yield seen
    finally:
        handle.remove()


class Scorer:
    """Pathway scores of a trained GEN-CNP model against a pathway bank.

    Args:
        model: a ``GenCNP`` system (eval mode, on its device).
        class_paths: bool ``[K, D]``, the bank's class pathways ``M_c``.
        freqs: ``[K, D]``, the bank's selection frequencies ``f_c``.
    """

    def __init__(self, model, class_paths: torch.Tensor, freqs: torch.Tensor):
        self.model, self.target = model, model.target
        self.dev = next(model.parameters()).device
        self.chans = list(self.target.tap_channels)
        self.tap_names = list(self.target.tap_names)
        self.class_paths = class_paths.bool().to(self.dev)
        self.freqs = freqs.double().to(self.dev)
        self.fills = model.fills()
        self.head = head_of(self.target.model)
        self.calib: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def names(self) -> list[str]:
        """The pathway score names in table order: the raw scores (per-tap distances included), then, once
        ``calibrate`` has run, each one standardised per predicted class (``<name>@class``)."""
        raw = [*S.PATHWAY_SCORES, *(f"tap_distance/{t}" for t in self.tap_names)]
        return raw + [f"{k}@class" for k in raw if k in self.calib]

    def calibrate(self, clean: dict) -> None:
        """Per predicted class, the mean and std of every raw score on ``clean`` (scored clean validation images);
        from now on ``batch`` and ``dataset`` add the ``<name>@class`` scores (``scores.class_standardise``)."""
        k = self.model.num_classes
        self.calib = {n: S.class_stats(clean[n], clean["y_hat"], k) for n in self.names()}

    def with_class_scores(self, s: dict) -> dict:
        """``s`` with the ``<name>@class`` scores added (after ``calibrate``)."""
        for n, (mean, std) in self.calib.items():
            s[f"{n}@class"] = S.class_standardise(s[n], s["y_hat"], mean, std)
        return s

    def batch(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every score of ``x [B, C, H, W]`` (float64 ``[B]`` each, on the CPU), plus ``logits [B, K]``,
        ``features [B, F]`` (the head's input) and ``y_hat``."""
        x = x.to(self.dev)
        with torch.no_grad(), _penultimate(self.head) as feats:
            ex = self.model.explain(x)
        with torch.no_grad():
            y_hat = ex["y_hat"]
            ref = split_pathway(self.class_paths[y_hat].to(x.dtype), self.chans)
            class_logits = self.target(x, masks=ref, fill=self.fills)
        pathway = ex["pathway"]
        out = {
            "pathway_distance": S.pathway_distance(pathway, self.class_paths, y_hat),
            "pathway_surprise": S.pathway_surprise(pathway, self.freqs, y_hat),
            "kept_fraction": S.kept_fraction(pathway),
            "score_margin": S.score_margin(ex["scores"]),
            "masked_logit_gap": S.masked_logit_gap(ex["logits"], ex["masked_logits"], y_hat),
            "class_pathway_gap": S.class_pathway_gap(ex["logits"], class_logits, y_hat),
        }
        taps = S.tap_distances(pathway, self.class_paths, y_hat, self.chans)
        out.update({f"tap_distance/{t}": taps[:, i] for i, t in enumerate(self.tap_names)})
        out = {k: v.double().cpu() for k, v in out.items()}
        out.update(logits=ex["logits"].float().cpu(), features=feats[0].float().cpu(), y_hat=y_hat.cpu())
        return self.with_class_scores(out)

    def dataset(self, data: Dataset | torch.Tensor, batch_size: int, desc: str, progress: bool) -> dict:
        """``batch`` over a dataset (or a tensor of images), concatenated; ``labels`` added when the data has them."""
        parts: list[dict] = []
        labels: list[torch.Tensor] = []
        if isinstance(data, torch.Tensor):
            batches = ((xb, None) for xb in data.split(batch_size))
        else:
            loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0)
            batches = ((b[0], b[1] if len(b) > 1 else None) for b in loader)
        for xb, yb in tqdm(batches, desc=desc, disable=not progress, leave=False):
            parts.append(self.batch(xb))
            if yb is not None:
                labels.append(torch.as_tensor(yb).long())
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if labels:
            out["labels"] = torch.cat(labels)
        return out

    def embed(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The head's input features ``[N, F]`` of images ``x`` (one unmasked forward each; fitting the baselines)."""
        parts = []
        with torch.no_grad(), _penultimate(self.head) as feats:
            for xb in x.split(batch_size):
                self.target(xb.to(self.dev))
                parts.append(feats.pop().float().cpu())
        return torch.cat(parts)

    def soft_keep(self, logits: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """The generator's keep probabilities ``a [B, D]``, differentiable in the input: its forward without the input
        ``detach`` (``PathwayGenerator.forward`` cuts the gradient to the target on purpose; an attacker does not).
        ``feats`` are the recorded tap outputs, ``logits`` the target's output (the class prior reads its argmax)."""
        gen = self.model.generator
        hs = gen.rfe_shallow(feats[: gen.n_shallow])
        hd = gen.rfe_deep(feats[gen.n_shallow :])
        z, _ = gen.pdn(hs[-1], hd[-1])
        score_logits = torch.cat(gen.rpd(z, hs + hd), dim=1)
        prior = self.model.prior(logits.argmax(1).detach())
        if prior is not None:
            score_logits = score_logits + prior.detach().to(score_logits.dtype)
        return torch.sigmoid(score_logits.float())

    def soft_surprise(self, x: torch.Tensor, logits: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """``pathway_surprise`` of the keep probabilities ``a`` instead of the binary pathway, differentiable in ``x``;
        ``ŷ`` is the current prediction (no gradient through the argmax)."""
        return S.pathway_surprise(self.soft_keep(logits, feats), self.freqs.float(), logits.argmax(1).detach())

    def soft_masked_gap(self, x: torch.Tensor, logits: torch.Tensor, feats: list[torch.Tensor]) -> torch.Tensor:
        """``masked_logit_gap`` with the pathway binarised by the generator's own binariser (DAQ: exact forward,
        soft-argmax gradient), differentiable in ``x``."""
        gen = self.model.generator
        m = gen.binarize(self.soft_keep(logits, feats))
        masked = self.target(x, masks=gen.split(m.to(x.dtype)), fill=self.fills)
        return S.masked_logit_gap(logits, masked, logits.argmax(1).detach())

    def adaptive_score(
        self, name: str, x: torch.Tensor, logits: torch.Tensor, feats: list[torch.Tensor]
    ) -> torch.Tensor:
        """A differentiable version of score ``name`` (``pathway_surprise`` or ``masked_logit_gap``, optionally
        ``@class``-standardised after ``calibrate``) for the adaptive attack, ``[B]``."""
        base, _, per_class = name.partition("@")
        fns = {"pathway_surprise": self.soft_surprise, "masked_logit_gap": self.soft_masked_gap}
        if base not in fns or (per_class and per_class != "class"):
            raise ValueError(f"adaptive_target must be one of {sorted(fns)}, optionally with '@class'; got '{name}'.")
        s = fns[base](x, logits, feats)
        if per_class:
            if base not in self.calib:
                raise ValueError(f"'{name}' needs the per-class statistics: call Scorer.calibrate first.")
            mean, std = self.calib[base]
            s = S.class_standardise(s, logits.argmax(1).detach(), mean.to(s.device), std.to(s.device))
        return s
