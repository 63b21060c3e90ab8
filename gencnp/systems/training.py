"""GenCNP's training step in named steps: the parts of its one masked pass, and the loss terms read from it.

The functions take the ``GenCNP`` module (``model``) and read its settings (``model.settings``), target, generator and buffers.
"""

from __future__ import annotations

import math

import torch

from gencnp.pathways import losses as LS
from gencnp.pathways.baselines import global_percentile, tap_counts, topk_per_tap

__all__ = ["budget_masks", "budget_pathways", "masked_parts", "loss_terms", "check_finite_losses"]


def masked_parts(model, x: torch.Tensor, logits: torch.Tensor, feats: list, y_hat: torch.Tensor, out: dict):
    """The inputs, masks and first-tap outputs of the one masked forward of a training step.

    One masked forward over [x, swapped x, zero image, ...]: bigger GEMMs than several small ones. The first tap's
    output of every part is known (x: recorded; swapped x: its rows permuted; zero image: one image's), so the
    first tap's module does not run again (``FrozenTarget`` ``first_tap``).

    Returns:
        ``(xs, ms, firsts, nc, valid)``: per part the inputs, masks and first-tap outputs; ``nc`` the samples that
        run the controls (``control_fraction``); ``valid`` whether each of them has a swap partner.
    """
    h = model.settings
    m = out["masks"]
    b = x.shape[0]
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
            zero_first = model.target(xs[-1][:1], record=True)[1][0]
        firsts.append(zero_first.expand(nc, *zero_first.shape[1:]))
    if h.lambda_null > 0:
        family = model.null_train[model.global_step % len(model.null_train)]
        null_x = model.null_inputs(family, x[:nc], salt=model.global_step + 1)
        with torch.no_grad():  # only as far as the first tap where the masked pass can start there
            if model.target.hooks.can_skip_first:
                null_first = model.target.first_tap_output(null_x)
            else:
                null_first = model.target(null_x, record=True)[1][0]
        xs.append(null_x)
        ms.append(m[:nc])
        firsts.append(null_first)
    if h.lambda_nested > 0:
        with torch.no_grad():
            hard = m.detach() > 0.5
            rho = h.nested_min + (1 - h.nested_min) * torch.rand(b, 1, device=x.device, dtype=torch.float64)
            keep = torch.round(tap_counts(hard, model.target.tap_channels).double() * rho).long()
            sub = topk_per_tap(out["scores"].detach(), keep, model.target.tap_channels)
        xs.append(x)
        ms.append(m * sub.to(m.dtype))
        firsts.append(feats[0])
    if h.lambda_budget > 0:  # x through a drawn budget's top channels, and (lambda_swap > 0) its swap partner
        bm = budget_masks(out["scores"], h)
        xs.append(x)
        ms.append(bm)
        firsts.append(feats[0])
        if h.lambda_swap > 0:
            xs.append(x[idx])
            ms.append(bm[:nc])
            firsts.append(feats[0][idx])
    if h.lambda_lookup > 0 and bool(model.freq_seen.all()):
        with torch.no_grad():
            lookup = model.class_lookup(m.detach() > 0.5, y_hat).float()
        xs.append(x)
        ms.append(lookup)
        firsts.append(feats[0])
    return xs, ms, firsts, nc, valid


def budget_pathways(scores: torch.Tensor, budget: float | torch.Tensor) -> torch.Tensor:
    """Each sample's top ``max(1, round(b D))`` channels by score over all taps, at kept budgets ``b`` (a float or
    ``[B]``): bool ``[B, D]``. One ranking over the taps, so the generator's scores decide how many channels each
    tap keeps (the threshold 0.5 moved per sample until the budget is met)."""
    b = torch.as_tensor(budget, dtype=torch.float64, device=scores.device).expand(scores.shape[0])
    return global_percentile(scores, torch.maximum(b, torch.full_like(b, 1.0 / scores.shape[1])))


def budget_masks(scores: torch.Tensor, h) -> torch.Tensor:
    """Straight-through top-k masks ``[B, D]`` at a kept budget drawn per sample from ``[budget_min, budget_max]``:
    forward exactly ``budget_pathways``, gradient through a sigmoid around each sample's cut."""
    b = scores.shape[0]
    with torch.no_grad():
        budget = h.budget_min + (h.budget_max - h.budget_min) * torch.rand(b, device=scores.device)
        hard = budget_pathways(scores.detach(), budget)
        logit = torch.logit(scores.detach().double().clamp(1e-6, 1 - 1e-6))
        # the cut: midway between the lowest kept and the highest dropped score logit of the sample
        low_kept = logit.masked_fill(~hard, float("inf")).amin(1, keepdim=True)
        high_drop = logit.masked_fill(hard, float("-inf")).amax(1, keepdim=True)
        cut = torch.where(torch.isfinite(high_drop), (low_kept + high_drop) / 2, low_kept - 1)
    z = torch.logit(scores.clamp(1e-6, 1 - 1e-6))
    soft = torch.sigmoid((z - cut.to(z.dtype)) / h.budget_temperature)
    return hard.to(soft.dtype) + (soft - soft.detach())


def loss_terms(
    model, logits: torch.Tensor, chunks: list, y_hat: torch.Tensor, out: dict, nc: int, valid: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The loss terms of a training step from the masked pass's logits ``chunks`` (in ``masked_parts`` order).

    Updates the class prototypes while not every class has one yet (before ``con`` reads them).
    """
    h = model.settings
    masked_logits = chunks.pop(0)
    terms = {"kd": LS.kd(logits, masked_logits, y_hat, h.temperature)}
    gate = LS.faithful_gate(logits, masked_logits, y_hat, h.kappa, h.gate_top_margin)
    # Samples outside the control subset (control_fraction < 1) pass the dependence gate.
    rest = gate.new_ones(logits.shape[0] - nc)
    for name, weight in (("swap", h.lambda_swap), ("zero", h.lambda_zero), ("null", h.lambda_null)):
        if weight > 0:
            forced = chunks.pop(0)
            ok = valid if name == "swap" else None  # the zero image and null inputs are partners of every class
            terms[name] = LS.swap(forced, y_hat[:nc], ok)
            if h.dependence_gate is not None:
                gate = gate * torch.cat([LS.dependence_gate(forced, y_hat[:nc], h.dependence_gate, ok), rest])
    if h.lambda_nested > 0:
        terms["nested"] = LS.kd(logits, chunks.pop(0), y_hat, h.temperature)
    if h.lambda_budget > 0:  # faithful at the budget, and (as the main pathway) not forcing a partner's image
        terms["budget"] = LS.kd(logits, chunks.pop(0), y_hat, h.temperature)
        if h.lambda_swap > 0:
            terms["budget"] = terms["budget"] + h.lambda_swap * LS.swap(chunks.pop(0), y_hat[:nc], valid)
    if h.lambda_lookup > 0:
        terms["lookup"] = (
            LS.lookup(logits, masked_logits, chunks.pop(0).detach(), h.lookup_margin)
            if bool(model.freq_seen.all())
            else masked_logits.sum() * 0.0
        )
    terms["sparsity"] = LS.sparsity(model.generator.split(out["scores"]), gate, h.tap_weights, h.sparsity_per)
    # cls and con always enter the graph (weight 0 included) so DDP never sees unused parameters.
    terms["cls"] = LS.cls(logits, out["class_logits"], y_hat)
    if not bool(model.proto_seen.all()):
        LS.update_prototypes(
            model.prototypes, model.proto_seen, out["scores"], y_hat, h.proto_momentum, model._all_reduce
        )
    terms["con"] = LS.con(out["scores"], model.prototypes, y_hat)
    return terms


def check_finite_losses(result: dict[str, torch.Tensor], global_step: int, batch_idx: int) -> None:
    """Raise ``FloatingPointError`` naming the first loss term that is NaN or infinite."""
    for name, value in result.items():
        if not torch.isfinite(value):
            raise FloatingPointError(
                f"loss term '{name}' became non-finite ({float(value)}) at global step {global_step} "
                f"(batch {batch_idx}); lower lr, check the inputs, or disable the term."
            )
