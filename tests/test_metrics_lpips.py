"""LPIPS-VGG: parity with the `lpips` PyTorch package (random VGG trunk, random and shipped heads), the weight
converters (.pth and safetensors), gradients and jit.

Tolerance: relative error < 1e-4 on the distances (f32 on CPU; measured 6e-8 against PyTorch's f32), as for
every jsr parity test.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torchvision_vgg16_shim import random_vgg_biases_, reference_torchvision  # noqa: E402

from jsr.metrics.lpips import (LPIPS, load_lpips_params, lpips_distance, lpips_params_from_torch,  # noqa: E402
                               save_lpips_weights, unit_normalize)
from jsr.metrics.vgg import conv_indices  # noqa: E402
from jsr.weights.convert import CheckpointMismatchError  # noqa: E402
from jsr.weights.io import write_safetensors  # noqa: E402
from tests.helpers import rel_error as _rel

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def lpips_pkg():
    with reference_torchvision():
        lpips = pytest.importorskip("lpips")
    return lpips


@pytest.fixture(scope="module")
def reference(lpips_pkg):
    """The `lpips` package's LPIPS-VGG with a random trunk (pnet_rand=True) and random non-negative heads."""
    torch.manual_seed(0)
    model = lpips_pkg.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    random_vgg_biases_(model.net, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for lin in model.lins:
            w = lin.model[-1].weight
            w.copy_(torch.rand(w.shape, generator=g) / w.shape[1])
    return model


def _vgg_state(model) -> dict[str, np.ndarray]:
    """torchvision's key layout (``features.N.*``) rebuilt from the lpips model's slices, whose child names are
    torchvision's feature indices."""
    out = {}
    for k, v in model.net.state_dict().items():
        _, idx, leaf = k.split(".")  # sliceK.N.weight
        out[f"features.{idx}.{leaf}"] = v.detach().numpy().copy()
    return out


def _head_state(model) -> dict[str, np.ndarray]:
    # Only linK.*, as in lpips' published vgg.pth (the module's state dict repeats them as lins.K.*).
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if re.match(r"lin\d\.", k)}


def _images(seed: int, n: int = 2, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Smooth content plus noise, so that every VGG block sees structure (pure noise would make deep taps flat).
    coarse = rng.random((n, size // 8, size // 8, 3))
    x = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2) * 0.7 + 0.3 * rng.random((n, size, size, 3))
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    return x.astype(np.float32), y.astype(np.float32)


def _torch_lpips(model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    tx = torch.from_numpy(x).permute(0, 3, 1, 2)
    ty = torch.from_numpy(y).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model(tx, ty, normalize=True).reshape(-1).numpy()


@pytest.fixture(scope="module")
def weight_files(reference, tmp_path_factory):
    """The two files as published: torchvision's vgg16 .pth (with its classifier) and lpips' heads .pth."""
    d = tmp_path_factory.mktemp("lpips_w")
    vgg = _vgg_state(reference)
    vgg_with_classifier = {k: torch.from_numpy(v) for k, v in vgg.items()}
    vgg_with_classifier["classifier.0.weight"] = torch.zeros(4, 8)  # stands for the (ignored) FC layers
    torch.save(vgg_with_classifier, d / "vgg16.pth")
    torch.save({k: torch.from_numpy(v) for k, v in _head_state(reference).items()}, d / "vgg_heads.pth")
    write_safetensors(d / "vgg16.safetensors", vgg)
    write_safetensors(d / "vgg_heads.safetensors", _head_state(reference))
    return d


@pytest.fixture(scope="module")
def params(weight_files):
    return load_lpips_params(weight_files / "vgg16.pth", weight_files / "vgg_heads.pth")


def test_matches_lpips_package(reference, params):
    x, y = _images(0)
    ref = _torch_lpips(reference, x, y)
    got = np.asarray(lpips_distance(params, jnp.asarray(x), jnp.asarray(y)))
    assert got.shape == (2,)
    assert np.all(ref > 0)
    assert _rel(got, ref) < REL_TOL, (got, ref)


def test_matches_with_shipped_heads(lpips_pkg, reference, weight_files):
    """The real head file inside the lpips package goes through our .pth loader (the VGG stays random)."""
    heads = Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    shipped = lpips_pkg.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    shipped.net.load_state_dict(reference.net.state_dict())
    p = load_lpips_params(weight_files / "vgg16.pth", heads)
    x, y = _images(1)
    assert _rel(lpips_distance(p, jnp.asarray(x), jnp.asarray(y)), _torch_lpips(shipped, x, y)) < REL_TOL


def test_safetensors_and_module_state_dict_load_the_same(reference, weight_files, params, tmp_path):
    from_st = load_lpips_params(weight_files / "vgg16.safetensors", weight_files / "vgg_heads.safetensors")
    from_module = lpips_params_from_torch({k: v.numpy() for k, v in reference.state_dict().items()})
    save_lpips_weights(params, tmp_path / "lpips_vgg.safetensors")
    roundtrip = load_lpips_params(tmp_path / "lpips_vgg.safetensors")
    for other in (from_st, from_module, roundtrip):
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, other)
    assert params["lin0"]["kernel"].shape == (1, 1, 64, 1)
    assert set(params["net"]) == {f"features_{i}" for i in conv_indices()}


def test_missing_head_is_named(reference):
    state = {k: v.numpy() for k, v in reference.state_dict().items() if not k.startswith("lin3")}
    with pytest.raises(CheckpointMismatchError, match="lin3.weight"):
        lpips_params_from_torch(state)


def test_gradient_matches_torch_and_jit(reference, params):
    x, y = _images(2)
    loss = lambda a: jnp.mean(lpips_distance(params, a, jnp.asarray(y)))  # noqa: E731
    g = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(x)))
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0

    # The reference gradient is taken in float64: PyTorch's own f32 CPU backward is ~1e-4 away from it (its
    # backward accumulates less exactly), while ours measured 1.0e-6.
    ref64 = copy.deepcopy(reference).double()
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).double().requires_grad_(True)
    ref64(tx, torch.from_numpy(y).permute(0, 3, 1, 2).double(), normalize=True).mean().backward()
    assert _rel(g, tx.grad.permute(0, 2, 3, 1).numpy()) < REL_TOL
    eager = lpips_distance(params, jnp.asarray(x), jnp.asarray(y))
    jitted = jax.jit(lpips_distance)(params, jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(jitted, eager, rtol=1e-5)


def test_identical_images_and_unbatched(params):
    x, y = _images(3, n=1, size=32)
    same = lpips_distance(params, jnp.asarray(x), jnp.asarray(x))
    # Zero up to rounding: the pair goes through the trunk as one stacked batch, and XLA:CPU's convolution (Eigen,
    # with jsr's YNNPACK fusions off) may sum the two rows' products in different orders (2e-16 seen).
    assert abs(float(same[0])) < 1e-12
    one = lpips_distance(params, jnp.asarray(x[0]), jnp.asarray(y[0]))
    assert one.shape == () and float(one) > 0


def test_unit_normalize_dead_pixel_gradient():
    """An all-zero feature vector (a pixel where every ReLU is off) must give a finite gradient, not NaN."""
    f = jnp.stack([jnp.zeros(8), jnp.arange(1.0, 9.0)])
    out = unit_normalize(f)
    np.testing.assert_allclose(out[1], np.arange(1, 9) / np.linalg.norm(np.arange(1, 9)), rtol=1e-6)
    assert np.all(np.asarray(out[0]) == 0)
    g = jax.grad(lambda a: jnp.sum(unit_normalize(a) * jnp.arange(8.0)))(f)
    assert np.all(np.isfinite(np.asarray(g)))


def test_bf16_trunk_is_close(params):
    x, y = _images(4, n=1, size=32)
    f32 = float(lpips_distance(params, jnp.asarray(x), jnp.asarray(y))[0])
    bf16 = float(lpips_distance(params, jnp.asarray(x), jnp.asarray(y), dtype=jnp.bfloat16)[0])
    assert abs(bf16 - f32) / f32 < 0.05  # bf16 has 8 mantissa bits; LPIPS as a loss tolerates that


def test_module_rejects_bad_shapes(params):
    with pytest.raises(ValueError, match="equal shape"):
        LPIPS().apply({"params": params}, jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 16, 3)))

