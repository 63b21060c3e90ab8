"""An own classifier for gencnp, given by class path (no registration, no gencnp import needed).

Use it from the repository root (train.py, evaluate.py and the pipeline put the working directory on sys.path):

    model:
      class_path: gencnp.TargetClassifier
      init_args:
        arch:
          class_path: examples.mynet.MyNet
          init_args: {width: 16}

gencnp passes ``num_classes`` and ``in_chans`` when the constructor takes them. Name the taps in the GEN-CNP config
(``taps: [stem, block1, block2, block3]``: block outputs, each run once per forward), or use ``taps: auto``.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_block(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class MyNet(nn.Module):
    """Four conv blocks (``width``, 2x, 2x, 4x channels; pools after the 1st and 3rd), global average pool, linear."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16):
        super().__init__()
        self.stem = conv_block(in_chans, width, pool=True)
        self.block1 = conv_block(width, 2 * width, pool=False)
        self.block2 = conv_block(2 * width, 2 * width, pool=True)
        self.block3 = conv_block(2 * width, 4 * width, pool=False)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))
