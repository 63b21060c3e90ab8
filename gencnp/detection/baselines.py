"""The field's detectors, from pytorch-ood (Kirchheim et al., CVPR-W 2022), not rewritten: MSP, Energy, Mahalanobis,
ViM and KNN on the same target's logits and penultimate features. Each returns an outlier score, higher = more
anomalous (pytorch-ood's convention)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BASELINES", "Baselines"]

BASELINES = ("msp", "energy", "mahalanobis", "vim", "knn")


class Baselines:
    """pytorch-ood detectors fitted on in-distribution **train** features (never validation or test).

    Args:
        names: which of ``BASELINES``.
        head: the target's linear head (ViM reads its weight and bias).
        knn_k: KNN's ``k`` (the ``k``-th nearest normalised train feature; pytorch-ood's default 50).
        vim_dim: ViM's principal subspace dimension; lowered to half the feature width when the features are
            narrower (recorded in ``settings``).
    """

    def __init__(self, names: list[str], head: nn.Linear, knn_k: int = 50, vim_dim: int = 64):
        unknown = [n for n in names if n not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; available: {list(BASELINES)}.")
        self.names, self.head, self.knn_k, self.vim_dim = list(names), head, knn_k, vim_dim
        self.detectors: dict = {}
        self.settings: dict = {}

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> Baselines:
        """Fit the feature detectors on ``features [N, F]`` of train images with their ``labels [N]``."""
        from pytorch_ood.detector import KNN, EnergyBased, Mahalanobis, MaxSoftmax, ViM

        f = features.float().cpu()
        y = labels.long().cpu()
        for name in self.names:
            if name == "msp":
                self.detectors[name] = MaxSoftmax(None)
                self.settings[name] = "max softmax probability, T = 1 (Hendrycks & Gimpel 2017)"
            elif name == "energy":
                self.detectors[name] = EnergyBased(None)
                self.settings[name] = "-T logsumexp(z / T), T = 1 (Liu et al. 2020)"
            elif name == "mahalanobis":
                self.detectors[name] = Mahalanobis(None).fit_features(f, y)
                self.settings[name] = "class means, tied covariance on penultimate features, no input preprocessing"
            elif name == "vim":
                d = min(self.vim_dim, f.shape[1] // 2)
                w, b = self.head.weight.detach().cpu().float(), self.head.bias.detach().cpu().float()
                self.detectors[name] = ViM(None, d=d, w=w, b=b).fit_features(f, y)
                self.settings[name] = f"principal subspace d = {d} of {f.shape[1]} features (Wang et al. 2022)"
            else:
                k = min(self.knn_k, len(f))
                self.detectors[name] = KNN(None, k=k)
                self.detectors[name].fit_features(f, y)
                self.settings[name] = f"k = {k}, normalised features (Sun et al. 2022)"
        return self

    def score(self, logits: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Outlier scores (float64 ``[B]``) of every fitted detector for the target's ``logits`` and ``features``."""
        out = {}
        for name, det in self.detectors.items():
            with torch.no_grad():
                if name in ("msp", "energy"):
                    out[name] = det.predict_logits(logits.float()).double().cpu()
                else:
                    out[name] = det.predict_features(features.float()).double().cpu()
        return out
