"""Pathway scores for flagging inputs (docs/design.md section 12): one named function per score, pure tensor maths.

Every score is per image, ``[B]`` (per tap: ``[B, L]``), and **higher means more anomalous** as written; the
detector may flip a score's sign once, on validation (``orient`` in ``gencnp.detection.combine``). ``ŷ`` is the
target's predicted class, ``m`` the input's binary GEN-CNP pathway (``[B, D]``), ``M_c`` the bank's class pathway
(``f_c >= tau``) and ``f_c`` its selection frequencies (``[K, D]``). The idea is CDRP's (Qiu et al., "Adversarial
Defense Through Network Profiling Based Path Extraction", CVPR 2019; Wang et al., "Interpret Neural Networks by
Identifying Critical Data Routing Paths", CVPR 2018): an input routed unlike its predicted class's inputs is suspect.
"""

from __future__ import annotations

import torch

__all__ = [
    "PATHWAY_SCORES",
    "class_margin",
    "class_pathway_gap",
    "class_standardise",
    "class_stats",
    "kept_fraction",
    "masked_logit_gap",
    "pathway_distance",
    "pathway_surprise",
    "score_margin",
    "tap_distances",
]


def _jaccard_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - |a ∩ b| / |a ∪ b|`` over the last dimension of two bool tensors; 0 where both are empty."""
    inter = (a & b).sum(-1).double()
    union = (a | b).sum(-1).double()
    return torch.where(union > 0, 1.0 - inter / union.clamp_min(1), torch.zeros_like(union))


def tap_distances(
    pathway: torch.Tensor, class_paths: torch.Tensor, y_hat: torch.Tensor, chans: list[int]
) -> torch.Tensor:
    """Per-tap Jaccard distance of the input's pathway to its predicted class's bank pathway.

    ``d_l(x) = 1 - |m_l ∩ M_ŷ,l| / |m_l ∪ M_ŷ,l|`` (0 when both are empty), one column per tap.

    Args:
        pathway: bool ``[B, D]``, taps concatenated in depth order.
        class_paths: bool ``[K, D]``, the bank's class pathways.
        y_hat: ``[B]`` predicted classes.
        chans: channels per tap, summing to ``D``.

    Returns:
        float64 ``[B, L]`` in ``[0, 1]``.
    """
    ref = class_paths[y_hat].bool()
    cols = [_jaccard_distance(m, r) for m, r in zip(pathway.bool().split(chans, dim=1), ref.split(chans, dim=1))]
    return torch.stack(cols, dim=1)


def pathway_distance(pathway: torch.Tensor, class_paths: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """Pooled Jaccard distance to the predicted class's bank pathway, over all ``D`` channels at once.

    ``d(x) = 1 - |m ∩ M_ŷ| / |m ∪ M_ŷ|``: float64 ``[B]`` in ``[0, 1]``.
    """
    return _jaccard_distance(pathway.bool(), class_paths[y_hat].bool())


def pathway_surprise(
    pathway: torch.Tensor, freqs: torch.Tensor, y_hat: torch.Tensor, eps: float = 1e-3
) -> torch.Tensor:
    """Mean Bernoulli surprise of the pathway under the predicted class's selection frequencies.

    ``s(x) = -(1/D) Σ_c [m_c log f_ŷ,c + (1 - m_c) log(1 - f_ŷ,c)]`` with ``f`` clipped to ``[eps, 1 - eps]``: the
    negative log-likelihood per channel of ``m`` if channels were kept independently at the class's training
    frequencies. Unlike the distance to ``M_ŷ`` it weighs a rarely kept channel more than a borderline one.
    Accepts soft pathways (scores in ``[0, 1]``), which the adaptive attack differentiates.

    Returns:
        ``[B]`` (float64 for bool input), >= 0.
    """
    f = freqs[y_hat].clamp(eps, 1 - eps)
    m = pathway.to(f.dtype)
    return -(m * f.log() + (1 - m) * (1 - f).log()).mean(1)


def kept_fraction(pathway: torch.Tensor) -> torch.Tensor:
    """The generator's kept fraction ``|m| / D``: ``[B]`` in ``[0, 1]``. Direction is not known a priori (an input the
    target finds hard may need more channels): the detector orients it on validation."""
    return pathway.double().mean(1)


def score_margin(scores: torch.Tensor) -> torch.Tensor:
    """The generator's indecision: ``1 - (1/D) Σ_c |2 a_c - 1|`` for keep probabilities ``a [B, D]``.

    0 when every channel is scored 0 or 1 (a confident pathway), 1 when every score is 0.5. Returns ``[B]``.
    """
    return 1.0 - (2.0 * scores.double() - 1.0).abs().mean(1)


def class_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{k != y} z_k`` per row of ``logits [B, K]`` (float64 ``[B]``)."""
    z = logits.double()
    own = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf")).amax(1)
    return own - others


def masked_logit_gap(logits: torch.Tensor, masked_logits: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """Class margin the input's own pathway loses: ``g(x) = margin(H(x), ŷ) - margin(H(x; m), ŷ)``,
    ``margin(z, y) = z_y - max_{k≠y} z_k``. Large when the pathway does not carry the prediction. ``[B]``."""
    return class_margin(logits, y_hat) - class_margin(masked_logits, y_hat)


def class_pathway_gap(logits: torch.Tensor, class_logits: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """Class margin lost through the predicted class's **bank** pathway: ``margin(H(x), ŷ) - margin(H(x; M_ŷ), ŷ)``.

    An input whose prediction rests on channels its class does not normally use loses its margin when routed
    through ``M_ŷ``: the transfer of the class pathway (docs/design.md section 6) used as a test. ``[B]``.
    """
    return class_margin(logits, y_hat) - class_margin(class_logits, y_hat)


def class_stats(values: torch.Tensor, y_hat: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per predicted class, the mean and std of a score over (clean validation) inputs: float64 ``[K]`` each. A class
    with fewer than 2 inputs takes the pooled mean and std; a std of 0 becomes 1."""
    v = values.double()
    mean = torch.full((num_classes,), float(v.mean()), dtype=torch.float64)
    std = torch.full((num_classes,), float(v.std()) if len(v) > 1 else 1.0, dtype=torch.float64)
    for c in range(num_classes):
        sel = v[y_hat == c]
        if len(sel) >= 2:
            mean[c], std[c] = sel.mean(), sel.std()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def class_standardise(values: torch.Tensor, y_hat: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A score relative to its predicted class: ``(s(x) - mu_ŷ) / sigma_ŷ`` with ``mu``, ``sigma`` from
    ``class_stats`` on clean validation inputs. Classes differ in how much their inputs' pathways stray (a class with
    varied shapes keeps more varied channels); standardising per class stops a whole class from looking anomalous.
    Returns float64 ``[B]``."""
    return (values.double() - mean[y_hat]) / std[y_hat]


# Scores computed for every input: name -> one-line formula (the report's legend). Per-tap distances are added as
# ``tap_distance/<tap>``; every score also as ``<name>@class`` (``class_standardise``).
PATHWAY_SCORES = {
    "pathway_distance": "1 - |m ∩ M_ŷ| / |m ∪ M_ŷ| (pooled over taps)",
    "pathway_surprise": "-(1/D) Σ [m log f_ŷ + (1-m) log(1-f_ŷ)]",
    "kept_fraction": "|m| / D (sign set on validation)",
    "score_margin": "1 - mean |2a - 1|",
    "masked_logit_gap": "margin(H(x)) - margin(H(x; m))",
    "class_pathway_gap": "margin(H(x)) - margin(H(x; M_ŷ))",
}
