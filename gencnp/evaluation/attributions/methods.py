"""One attribution verb over every input-attribution method: ``attribute(method, model, x, target)``.

| method | source | map |
|---|---|---|
| ``gradient`` | Captum ``Saliency(abs=False)`` of the unmasked target | signed ``dS_y/dx`` |
| ``saliency`` | Captum ``Saliency`` (Simonyan et al., 2014) | ``|dS_y/dx|`` |
| ``integrated_gradients`` | Captum ``IntegratedGradients`` (Sundararajan et al., 2017), zero baseline | signed |
| ``grad_cam`` | Captum ``LayerGradCam`` (Selvaraju et al., 2017) at the last tap, bilinearly upsampled | ``>= 0`` |
| ``pathway_gradient_gencnp`` | gradient of ``H(x; m)`` through GEN-CNP's pathway of ``x`` | signed |
| ``pathway_gradient_class`` | the same through the bank's class pathway ``M_y`` | signed |
| ``pathway_gradient_mct`` | the same through NeuronMCT's pathway (Khakzar et al., CVPR 2021) at GEN-CNP's per-tap counts | signed |
| ``pathway_integrated_gradients`` | Captum ``IntegratedGradients`` of ``H(x; m)``, GEN-CNP's pathway, zero baseline | signed |
| ``pathway_grad_cam`` | Captum ``LayerGradCam`` at the last tap of ``H(x; m)``, GEN-CNP's pathway | ``>= 0`` |

The pathway gradients are Captum ``Saliency(abs=False)`` of the masked forward ``H(.; m)``
(``FrozenTarget.forward(x, masks=m, fill=...)``): gencnp supplies only the masked forward, Captum the gradient.
``S_y`` is the pre-softmax logit. Maps are ``[B, H, W]``; colour channels are reduced to the signed value of largest
magnitude (the largest for ``saliency``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from gencnp.pathways.baselines import grad_enabled, neuron_mct_scores, plain, split_pathway, tap_counts, topk_per_tap
from gencnp.pathways.gradients import grad_cam
from gencnp.targets.hooks import forward_hooked
from gencnp.targets.loading import FrozenTarget

__all__ = ["ATTRIBUTION_METHODS", "AttributionModel", "attribute", "cascade_layers", "randomised"]


@dataclass
class AttributionModel:
    """What the attribution methods read: the frozen target and, for the pathway methods, the pathways' sources.

    Args:
        target: the frozen classifier.
        generator: a ``GenCNP`` (its ``explain`` gives the pathway; it reads ``target``'s features, so under
            ``randomised`` it reads the randomised target). Needed by ``pathway_gradient_gencnp`` and, for its
            per-tap counts, ``pathway_gradient_mct``.
        class_pathways: bool ``[K, D]`` class pathways of a bank (``PathwayBank.class_pathways()``); needed by
            ``pathway_gradient_class``.
        fill: per-tap fill values of removed channels (mean ablation) or ``None`` (zeros).
        ig_steps: integration points of ``integrated_gradients``.
        ig_internal_batch: images per Captum internal batch of ``integrated_gradients`` (memory bound).
    """

    target: FrozenTarget
    generator: nn.Module | None = None
    class_pathways: torch.Tensor | None = None
    fill: Sequence[torch.Tensor | None] | None = None
    ig_steps: int = 32
    ig_internal_batch: int | None = 512

    @classmethod
    def from_gencnp(cls, model: nn.Module, class_pathways: torch.Tensor | None = None, **kwargs) -> AttributionModel:
        """From a trained ``GenCNP`` (its target, generator and mean-ablation fill)."""
        return cls(target=model.target, generator=model, class_pathways=class_pathways, fill=model.fills(), **kwargs)

    def methods(self) -> list[str]:
        """The methods this model can run (pathway methods need their pathway source)."""
        out = []
        for name, m in ATTRIBUTION_METHODS.items():
            if m.needs == "generator" and self.generator is None:
                continue
            if m.needs == "class_pathways" and self.class_pathways is None:
                continue
            out.append(name)
        return out


@dataclass(frozen=True)
class AttributionMethod:
    name: str
    source: str
    signed: bool
    needs: str | None
    run: Callable[[AttributionModel, torch.Tensor, torch.Tensor], torch.Tensor]


def _reduce_colour(a: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H, W]``: per pixel the channel value of largest magnitude (sign kept)."""
    if a.shape[1] == 1:
        return a[:, 0]
    idx = a.abs().argmax(dim=1, keepdim=True)
    return a.gather(1, idx)[:, 0]


def _leaf(x: torch.Tensor) -> torch.Tensor:
    """A detached copy that requires grad (call inside ``grad_enabled``; Captum then does not warn)."""
    return plain(x).requires_grad_(True)


def _saliency(
    forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, abs_: bool
) -> torch.Tensor:
    from captum.attr import Saliency  # captum only for its methods (a slow import)

    with grad_enabled():
        return Saliency(forward).attribute(_leaf(x), target=y, abs=abs_).detach()


def _gradient(am: AttributionModel, x, y):
    return _reduce_colour(_saliency(am.target, x, y, abs_=False))


def _abs_saliency(am: AttributionModel, x, y):
    return _saliency(am.target, x, y, abs_=True).amax(dim=1)


def _integrated_gradients(am: AttributionModel, x, y):
    from captum.attr import IntegratedGradients  # captum only for its methods (a slow import)

    with grad_enabled():
        a = IntegratedGradients(am.target).attribute(
            _leaf(x), baselines=0.0, target=y, n_steps=am.ig_steps, internal_batch_size=am.ig_internal_batch
        )
    return _reduce_colour(a.detach())


def _grad_cam(am: AttributionModel, x, y):
    target = am.target
    last = target.tap_names[-1]
    if len(target.tap_shapes[-1]) != 3:
        # Token outputs [B, N, C]: Captum's LayerGradCam averages gradients over every non-batch dimension but the
        # second, which is the token axis here; gencnp's own Grad-CAM reshapes the tokens to their square grid.
        return grad_cam(target, x, None, y)
    from captum.attr import LayerAttribution, LayerGradCam  # captum only for its methods (a slow import)

    with grad_enabled():
        cam = LayerGradCam(target, target.model.get_submodule(last)).attribute(
            _leaf(x), target=y, relu_attributions=True
        )
    return LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]


def _masked_gradient(am: AttributionModel, x: torch.Tensor, y: torch.Tensor, pathway: torch.Tensor) -> torch.Tensor:
    """Captum ``Saliency(abs=False)`` of the masked forward ``H(.; m)`` with ``pathway`` bool ``[B, D]``."""
    masks = split_pathway(pathway.to(x.dtype), am.target.tap_channels)
    fill = am.fill

    def forward(inp: torch.Tensor) -> torch.Tensor:
        return am.target(inp, masks=masks, fill=fill)

    return _reduce_colour(_saliency(forward, x, y, abs_=False))


def _masked_forward(am: AttributionModel) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``H(inp; m)`` with the pathway ``m`` (``[B, D]``) as a second argument, so Captum expands it with the inputs
    (``additional_forward_args``: integrated gradients runs ``n_steps`` copies of every image)."""

    def forward(inp: torch.Tensor, pathway: torch.Tensor) -> torch.Tensor:
        return am.target(inp, masks=split_pathway(pathway.to(inp.dtype), am.target.tap_channels), fill=am.fill)

    return forward


def _masked_integrated_gradients(am: AttributionModel, x: torch.Tensor, y: torch.Tensor, pathway: torch.Tensor):
    """Captum ``IntegratedGradients`` of the masked forward ``H(.; m)``: the path integral only sees the channels
    the pathway keeps (removed channels hold their fill along the whole path)."""
    from captum.attr import IntegratedGradients  # captum only for its methods (a slow import)

    with grad_enabled():
        a = IntegratedGradients(_masked_forward(am)).attribute(
            _leaf(x),
            baselines=0.0,
            target=y,
            additional_forward_args=(pathway,),
            n_steps=am.ig_steps,
            internal_batch_size=am.ig_internal_batch,
        )
    return _reduce_colour(a.detach())


def _masked_grad_cam(am: AttributionModel, x: torch.Tensor, y: torch.Tensor, pathway: torch.Tensor):
    """Captum ``LayerGradCam`` at the last tap of the masked forward ``H(.; m)``: the tap's kept channels only (the
    mask's hook runs before Captum's, so the layer output Captum reads is the masked one)."""
    target = am.target
    last = target.tap_names[-1]
    if len(target.tap_shapes[-1]) != 3:
        masks = split_pathway(pathway.to(x.dtype), target.tap_channels)
        return grad_cam(target, x, masks, y, fill=am.fill)  # token outputs: gencnp's own Grad-CAM through m
    from captum.attr import LayerAttribution, LayerGradCam  # captum only for its methods (a slow import)

    with grad_enabled():
        cam = LayerGradCam(_masked_forward(am), target.model.get_submodule(last)).attribute(
            _leaf(x), target=y, additional_forward_args=(pathway,), relu_attributions=True
        )
    return LayerAttribution.interpolate(cam.detach(), tuple(x.shape[-2:]), interpolate_mode="bilinear")[:, 0]


def _pig_gencnp(am: AttributionModel, x, y):
    return _masked_integrated_gradients(am, x, y, gencnp_pathway(am, x))


def _pgc_gencnp(am: AttributionModel, x, y):
    return _masked_grad_cam(am, x, y, gencnp_pathway(am, x))


def gencnp_pathway(am: AttributionModel, x: torch.Tensor) -> torch.Tensor:
    """GEN-CNP's pathway of ``x`` (bool ``[B, D]``), read from the target as it is now (one forward)."""
    return am.generator.explain(plain(x))["pathway"]


def _pg_gencnp(am: AttributionModel, x, y):
    return _masked_gradient(am, x, y, gencnp_pathway(am, x))


def _pg_class(am: AttributionModel, x, y):
    return _masked_gradient(am, x, y, am.class_pathways.to(x.device)[y])


def _pg_mct(am: AttributionModel, x, y):
    counts = tap_counts(gencnp_pathway(am, x), am.target.tap_channels)
    scores = neuron_mct_scores(am.target, x, y, fill=am.fill)
    return _masked_gradient(am, x, y, topk_per_tap(scores, counts, am.target.tap_channels))


ATTRIBUTION_METHODS: dict[str, AttributionMethod] = {
    m.name: m
    for m in (
        AttributionMethod("gradient", "Captum Saliency(abs=False), unmasked target", True, None, _gradient),
        AttributionMethod("saliency", "Captum Saliency (Simonyan et al., 2014)", False, None, _abs_saliency),
        AttributionMethod(
            "integrated_gradients",
            "Captum IntegratedGradients (Sundararajan et al., 2017), zero baseline",
            True,
            None,
            _integrated_gradients,
        ),
        AttributionMethod(
            "grad_cam", "Captum LayerGradCam (Selvaraju et al., 2017) at the last tap", False, None, _grad_cam
        ),
        AttributionMethod(
            "pathway_gradient_gencnp",
            "gradient through GEN-CNP's pathway (masked forward)",
            True,
            "generator",
            _pg_gencnp,
        ),
        AttributionMethod(
            "pathway_gradient_class", "gradient through the bank's class pathway M_y", True, "class_pathways", _pg_class
        ),
        AttributionMethod(
            "pathway_integrated_gradients",
            "Captum IntegratedGradients of the masked forward through GEN-CNP's pathway, zero baseline",
            True,
            "generator",
            _pig_gencnp,
        ),
        AttributionMethod(
            "pathway_grad_cam",
            "Captum LayerGradCam at the last tap of the masked forward through GEN-CNP's pathway",
            False,
            "generator",
            _pgc_gencnp,
        ),
        AttributionMethod(
            "pathway_gradient_mct",
            "gradient through NeuronMCT's pathway (Khakzar et al., CVPR 2021) at GEN-CNP's per-tap counts",
            True,
            "generator",
            _pg_mct,
        ),
    )
}


def attribute(method: str, model: AttributionModel, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Input attribution of class ``target`` for a batch.

    Args:
        method: a key of ``ATTRIBUTION_METHODS``.
        model: the target and the pathway sources (``AttributionModel``).
        x: ``[B, C, H, W]`` inputs of the target's shape.
        target: ``[B]`` class whose logit is explained (usually the target's prediction).

    Returns:
        ``[B, H, W]`` float map (signed for the gradient methods, non-negative for ``saliency`` and ``grad_cam``).

    Raises:
        KeyError: unknown method. ValueError: bad shapes, or a pathway method without its pathway source.
    """
    if method not in ATTRIBUTION_METHODS:
        raise KeyError(f"unknown attribution method '{method}'; known methods: {', '.join(ATTRIBUTION_METHODS)}.")
    m = ATTRIBUTION_METHODS[method]
    if m.needs == "generator" and model.generator is None:
        raise ValueError(
            f"'{method}' needs a GEN-CNP generator; build the model with AttributionModel.from_gencnp(...)."
        )
    if m.needs == "class_pathways" and model.class_pathways is None:
        raise ValueError(
            f"'{method}' needs class pathways; pass class_pathways=PathwayBank.load(...).class_pathways()."
        )
    model.target.check_input(x)
    target = torch.as_tensor(target, device=x.device).long().reshape(-1)
    if target.shape[0] != x.shape[0]:
        raise ValueError(f"target must hold one class per image ([{x.shape[0]}]), got {list(target.shape)}.")
    if bool((target < 0).any()) or bool((target >= model.target.num_classes).any()):
        raise ValueError(f"target classes must lie in [0, {model.target.num_classes - 1}], got {target.tolist()[:8]}.")
    return m.run(model, x, target).float()


# ----- model randomisation (Adebayo et al., NeurIPS 2018) -----
def cascade_layers(target: FrozenTarget) -> list[tuple[str, list[nn.Module]]]:
    """Parameterised layers of the target grouped for cascading randomisation, **top first**.

    Each tap is one group (its name); every parameterised module outside the taps (head, stem) is a group of its
    own. Groups are ordered by when they first run in a forward pass, then reversed.
    """
    order: list[str] = []
    hooks = [
        (mod, lambda m, a, o, name=name: order.append(name))
        for name, mod in target.model.named_modules()
        if name and any(True for _ in mod.parameters(recurse=False))
    ]
    forward_hooked(target.model, hooks, target.input_shape)
    groups: dict[str, list[nn.Module]] = {}
    for name in order:
        tap = next((t for t in target.tap_names if name == t or name.startswith(t + ".")), None)
        key = tap or name
        mod = target.model.get_submodule(name)
        if mod not in groups.setdefault(key, []):
            groups[key].append(mod)
    return list(reversed(list(groups.items())))


@contextlib.contextmanager
def randomised(target: FrozenTarget, modules: Sequence[nn.Module], seed: int = 0) -> Iterator[FrozenTarget]:
    """Re-initialise ``modules`` of the target (their ``reset_parameters``, seeded) inside the ``with`` block.

    The weights are restored when the block ends, even when it raises. BatchNorm layers get their initial affine
    weights and running statistics.
    """
    saved = {k: v.detach().clone() for k, v in target.model.state_dict().items()}
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.no_grad():
                for mod in modules:
                    for sub in mod.modules():
                        if hasattr(sub, "reset_parameters"):
                            sub.reset_parameters()
                        if hasattr(sub, "reset_running_stats"):
                            sub.reset_running_stats()
        target._hash = None
        yield target
    finally:
        target.model.load_state_dict(saved)
        target._hash = None
