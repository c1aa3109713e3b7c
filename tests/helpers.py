"""Small helpers the parity tests share: the relative error they state tolerances in, and PyTorch models with
every parameter randomised (default inits leave zero biases and unit norms that would hide conversion mistakes)."""
import numpy as np


def rel_error(a, b) -> float:
    """Relative L2 error ``|a - b| / |b|`` in float64 (arrays of any framework that numpy can read)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def randomise_torch(model, seed: int, spread: float = 0.2):
    """Every parameter of a torch ``model`` random, in place (returns it): norms' scales ``1 + spread * n``, biases
    ``spread * n``, weights ``n / sqrt(fan_in)`` so activations stay O(1) through the depth."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + spread * noise)
            elif name.endswith("bias"):
                p.copy_(spread * noise)
            else:
                p.copy_(noise / np.sqrt(p[0].numel()))
    return model
