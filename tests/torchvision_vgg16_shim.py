"""The one piece of torchvision that the `lpips` and `DISTS_pytorch` reference packages need: ``models.vgg16``.

Why a shim: both packages do ``from torchvision import models`` at import time, but no torchvision wheel that
imports beside our CPU torch 2.13.0 exists on PyPI (0.28.0, the release paired with torch 2.13, is a CUDA build
whose ``_C`` extension fails with "operator torchvision::nms does not exist"; the CPU wheels live only on
PyTorch's own index, out of reach). The references only use ``vgg16(...).features``, an ``nn.Sequential`` whose
layer indices fix the state-dict keys, so we rebuild that container in plain torch with torchvision's layout
(configuration "D": 3x3 convs with padding 1, each followed by ``ReLU(inplace=True)``, ``MaxPool2d(2, 2)``
between blocks) and its conv initialisation (Kaiming normal, fan_out, zero bias). Weights are random: the tests
overwrite them anyway, and ``pretrained=True`` (which DISTS_pytorch passes) cannot be honoured offline.

The shim sits in ``sys.modules`` only inside :func:`reference_torchvision` (the reference package keeps its own
reference to it after import), and only when the real torchvision is missing or broken.
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Iterator

import torch
from torch import nn

_CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class _VGG16(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in _CFG_D:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                conv = nn.Conv2d(c, v, kernel_size=3, padding=1)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                layers += [conv, nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)


def _vgg16(pretrained: bool = False, weights=None, **_) -> _VGG16:
    return _VGG16()


def _real_torchvision_imports() -> bool:
    try:
        import torchvision.models  # noqa: F401
        return True
    except Exception:  # missing, or a CUDA build that cannot load beside the CPU torch
        for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[name]
        return False


@contextlib.contextmanager
def reference_torchvision() -> Iterator[str]:
    """Within the block, ``import torchvision`` works: the real one if it imports, else the shim.

    Yields ``"torchvision"`` or ``"shim"``. Import the reference packages inside the block.
    """
    if _real_torchvision_imports():
        yield "torchvision"
        return
    names = ("torchvision", "torchvision.models", "torchvision.transforms")
    saved = {n: sys.modules.get(n) for n in names}
    tv = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.vgg16 = _vgg16
    transforms = types.ModuleType("torchvision.transforms")  # DISTS_pytorch imports it, uses it only in a CLI
    tv.models, tv.transforms = models, transforms
    sys.modules.update({"torchvision": tv, "torchvision.models": models, "torchvision.transforms": transforms})
    try:
        yield "shim"
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def random_vgg_biases_(module: nn.Module, seed: int, std: float = 0.05) -> None:
    """Give every conv a random bias (torchvision starts at zero), so parity tests also check the biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * std)
