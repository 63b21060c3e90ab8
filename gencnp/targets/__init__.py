"""Frozen targets: the registry of classifiers (``zoo``), checkpoint loading and ``FrozenTarget`` (``loading``),
forward hooks that read and mask tap outputs (``hooks``), and tap discovery (``taps``).

May import ``gencnp.io`` and the base modules (``registry``, ``settings``); never Lightning.
"""

from gencnp.targets.loading import (
    ConvBlockNet,
    FrozenTarget,
    TargetSpec,
    arch_name,
    check_input_size,
    create_target,
    list_targets,
    load_target,
    load_weights,
    read_state_dict,
    read_target_spec,
    register_target,
    resolve_target_spec,
    tensor_hash,
)
from gencnp.targets.zoo import TARGETS, ChannelToy, TimmTarget, TorchvisionTarget, channel_toy_batch

__all__ = [
    "ConvBlockNet",
    "FrozenTarget",
    "TargetSpec",
    "arch_name",
    "check_input_size",
    "create_target",
    "list_targets",
    "load_target",
    "load_weights",
    "read_state_dict",
    "read_target_spec",
    "register_target",
    "resolve_target_spec",
    "tensor_hash",
    "TARGETS",
    "ChannelToy",
    "TimmTarget",
    "TorchvisionTarget",
    "channel_toy_batch",
]
