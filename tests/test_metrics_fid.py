"""FID: the Flax FID Inception-v3 against pytorch-fid's model with the same random weights, the weight converter
(.pth and safetensors, strict errors), the bilinear resize against PyTorch, frechet_distance against pytorch-fid
and an eigenvalue formula, and fid_from_folders against pytorch-fid's calculate_fid_given_paths.

pytorch-fid subclasses torchvision's Inception blocks, and torchvision's PyPI build does not import beside
torch's CPU build here. When the real torchvision is missing, a stand-in (below, written for this test from
torchvision's published layout) provides ``BasicConv2d``, ``InceptionA..E`` and ``inception_v3``; pytorch-fid's
own code then supplies everything FID-specific: the patched A/C/E forwards (average pools without padding, the max
pool in ``Mixed_7c``), the block split, the 299 resize and [-1, 1] scaling, the data loading and the statistics.

Weights: random, with every BatchNorm given random scale/shift and then statistics measured on real forward
passes, so that activations stay O(1) through all 94 layers and the running statistics are non-trivial.

Tolerance: relative L2 error < 1e-4 on float32 features (measured ~1e-6), as every jsr parity test.
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
from typing import Iterator

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from jsr.metrics.fid import (activation_statistics, fid_from_folders, folder_activations,  # noqa: E402
                             frechet_distance, image_activations, list_images, save_statistics)
from jsr.metrics.inception import (bilinear_matrix, inception_features, inception_params_from_torch,  # noqa: E402
                                   load_inception_params, resize_bilinear, save_inception_weights)
from jsr.weights.convert import CheckpointMismatchError  # noqa: E402
from tests.helpers import rel_error as _rel

REL_TOL = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# torchvision stand-in (only what pytorch-fid touches)


class _BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class _InceptionA(nn.Module):  # forward: pytorch-fid's FIDInceptionA
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = _BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = _BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _BasicConv2d(cin, pool_features, kernel_size=1)


class _InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionC(nn.Module):  # forward: pytorch-fid's FIDInceptionC
    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = _BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv2d(cin, 192, kernel_size=1)


class _InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = _BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = _BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionE(nn.Module):  # forward: pytorch-fid's FIDInceptionE_1 / FIDInceptionE_2
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch1x1 = _BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = _BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv2d(cin, 192, kernel_size=1)


class _Inception3(nn.Module):
    """torchvision's Inception3 modules (pytorch-fid only takes its children; no forward needed)."""

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True, **_) -> None:
        super().__init__()
        assert not aux_logits, "pytorch-fid builds its Inception without the auxiliary head"
        self.Conv2d_1a_3x3 = _BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = _BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = _InceptionA(192, pool_features=32)
        self.Mixed_5c = _InceptionA(256, pool_features=64)
        self.Mixed_5d = _InceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, channels_7x7=128)
        self.Mixed_6c = _InceptionC(768, channels_7x7=160)
        self.Mixed_6d = _InceptionC(768, channels_7x7=160)
        self.Mixed_6e = _InceptionC(768, channels_7x7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280)
        self.Mixed_7c = _InceptionE(2048)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(2048, num_classes)


class _ToTensor:
    def __call__(self, pic):
        return torch.from_numpy(np.asarray(pic, np.float32) / 255.0).permute(2, 0, 1).contiguous()


@contextlib.contextmanager
def _torchvision() -> Iterator[str]:
    """Within the block ``import torchvision`` works: the real one if it imports, else the stand-in."""
    try:
        import torchvision.models  # noqa: F401
        import torchvision.transforms  # noqa: F401
        yield "torchvision"
        return
    except Exception:  # missing, or a build that cannot load beside this torch
        for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[name]
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.30.0"  # pytorch-fid then passes init_weights=False and weights=None
    models = types.ModuleType("torchvision.models")
    inception = types.ModuleType("torchvision.models.inception")
    inception.BasicConv2d, inception.Inception3 = _BasicConv2d, _Inception3
    inception.InceptionA, inception.InceptionB, inception.InceptionC = _InceptionA, _InceptionB, _InceptionC
    inception.InceptionD, inception.InceptionE = _InceptionD, _InceptionE
    models.inception = inception
    models.inception_v3 = lambda **kw: _Inception3(**kw)
    transforms = types.ModuleType("torchvision.transforms")
    transforms.ToTensor = _ToTensor
    tv.models, tv.transforms = models, transforms
    names = {"torchvision": tv, "torchvision.models": models, "torchvision.models.inception": inception,
             "torchvision.transforms": transforms}
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(names)
    try:
        yield "stand-in"
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


# ---------------------------------------------------------------------------------------------------------------
# Fixtures


def _smooth_images(seed: int, n: int, h: int, w: int) -> np.ndarray:
    """[n, h, w, 3] float32 in [0, 1]: coarse structure plus fine noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, h // 8 + 1, w // 8 + 1, 3))
    x = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :h, :w]
    return (0.7 * x + 0.3 * rng.random((n, h, w, 3))).astype(np.float32)


def _nchw(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def ref():
    """pytorch-fid with random weights. Returns (pytorch_fid.inception, pytorch_fid.fid_score, the InceptionV3
    wrapper returning all four blocks, the torch state dict in the pt_inception layout)."""
    with _torchvision():
        pfid = pytest.importorskip("pytorch_fid.inception")
        fid_score = pytest.importorskip("pytorch_fid.fid_score")
    torchvision = pfid.torchvision  # the module pytorch-fid bound at import (real or stand-in)

    built: list = []
    real_factory = torchvision.models.inception_v3

    def factory(*args, **kw):
        built.append(real_factory(*args, **kw))
        return built[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torchvision.models, "inception_v3", factory)
        # The first build "downloads" its own (default-initialised) weights; later builds get the calibrated ones.
        state: dict = {}
        mp.setattr(pfid, "load_state_dict_from_url",
                   lambda *a, **k: {n: t.clone() for n, t in (state or built[-1].state_dict()).items()})
        torch.manual_seed(0)
        model = pfid.InceptionV3([0, 1, 2, 3])
        inception = built[-1]
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in inception.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                    m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average: one batch sets the statistics
            model.train()
            model(_nchw(_smooth_images(99, 4, 299, 299)))
            model.eval()
        state.update({k: v.detach().clone() for k, v in inception.state_dict().items()})
        yield pfid, fid_score, model, state


@pytest.fixture(scope="module")
def params(ref):
    return inception_params_from_torch({k: v.numpy() for k, v in ref[3].items()})


# ---------------------------------------------------------------------------------------------------------------
# Network


def test_features_match_pytorch_fid(ref, params):
    _, _, model, _ = ref
    x = _smooth_images(0, 2, 137, 181)  # resized to 299 by both sides
    with torch.no_grad():
        blocks = [b.mean(dim=(2, 3)).numpy() for b in model(_nchw(x))]
    ours = np.asarray(inception_features(params, jnp.asarray(x)))
    assert ours.shape == (2, 2048) and np.std(ours) > 1e-2  # not a degenerate (dead) network
    print(f"dims=2048 rel err {_rel(ours, blocks[3]):.2e}")
    assert _rel(ours, blocks[3]) < REL_TOL
    for dims, want in zip((64, 192, 768), blocks[:3]):
        got = np.asarray(inception_features(params, jnp.asarray(x), dims=dims))
        assert got.shape == (2, dims)
        print(f"dims={dims} rel err {_rel(got, want):.2e}")
        assert _rel(got, want) < REL_TOL, dims


def test_resize_matches_torch():
    rng = np.random.default_rng(3)
    # Up, down (large: float32 coordinate rounding matters there, see bilinear_matrix) and identity.
    for h, w in ((80, 120), (400, 350), (1024, 768), (299, 299)):
        x = rng.random((1, h, w, 3)).astype(np.float32)
        want = F.interpolate(_nchw(x), size=(299, 299), mode="bilinear", align_corners=False).numpy()
        got = np.asarray(resize_bilinear(jnp.asarray(x))).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(bilinear_matrix(299, 299), np.eye(299, dtype=np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Weights


def test_weight_files_roundtrip(ref, params, tmp_path):
    state = ref[3]
    torch.save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    from_pth = load_inception_params(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    save_inception_weights(from_pth, tmp_path / "inception.safetensors")
    from_st = load_inception_params(tmp_path / "inception.safetensors")
    a, b, c = (traverse_util.flatten_dict(t) for t in (params, from_pth, from_st))
    assert a.keys() == b.keys() == c.keys() and len(a) == 94 * 5
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], c[k])


def test_converter_errors(ref):
    state = {k: v.numpy() for k, v in ref[3].items()}
    missing = dict(state)
    del missing["Mixed_7c.branch_pool.bn.running_var"]
    with pytest.raises(CheckpointMismatchError, match=r"missing 1 .*Mixed_7c\.branch_pool\.bn\.running_var"):
        inception_params_from_torch(missing)
    extra = dict(state, **{"Mixed_8a.conv.weight": np.zeros((1, 1, 1, 1), np.float32)})
    with pytest.raises(CheckpointMismatchError, match=r"unexpected 1 .*Mixed_8a\.conv\.weight"):
        inception_params_from_torch(extra)
    shaped = dict(state)
    shaped["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    with pytest.raises(CheckpointMismatchError, match=r"Conv2d_1a_3x3\.conv\.weight.*\(32, 3, 5, 5\)"):
        inception_params_from_torch(shaped)


# ---------------------------------------------------------------------------------------------------------------
# Fréchet distance


def _eig_frechet(mu1, s1, mu2, s2) -> float:
    # tr sqrtm(S1 S2) = sum of square roots of the eigenvalues of S1 S2 (real, >= 0 for PSD S1, S2).
    ev = np.linalg.eigvals(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.abs(ev))))


def test_frechet_distance_references(ref):
    fid_score = ref[1]
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((16, 40)), rng.standard_normal((16, 40)) * 1.5
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = a @ a.T / 40, b @ b.T / 40
    got = frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(got, _eig_frechet(mu1, s1, mu2, s2), rtol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pytorch-fid passes sqrtm's deprecated disp=
        np.testing.assert_allclose(got, fid_score.calculate_frechet_distance(mu1, s1, mu2, s2), rtol=1e-10)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9
    # Rank-deficient covariances (fewer samples than dimensions), the usual small-set situation: still finite.
    c = rng.standard_normal((16, 3))
    assert np.isfinite(frechet_distance(mu1, c @ c.T, mu2, s2))


def test_frechet_distance_errors():
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    # Not a covariance: sqrtm(diag(1, -4)) = diag(1, 2i), an imaginary part no rounding explains.
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -4.0]))


# ---------------------------------------------------------------------------------------------------------------
# Folders


def _write_folder(path, seed: int, sizes: list[tuple[int, int]]) -> None:
    path.mkdir()
    for i, (h, w) in enumerate(sizes):
        img = (_smooth_images(seed + i, 1, h, w)[0] * 255).round().astype(np.uint8)
        Image.fromarray(img).save(path / f"{i:03d}.png")


def pytorch_fid_model(fid_score, dims: int):
    return fid_score.InceptionV3([fid_score.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval()


def test_fid_from_folders_matches_pytorch_fid(ref, params, tmp_path):
    _, fid_score, _, _ = ref
    a, b = tmp_path / "a", tmp_path / "b"
    _write_folder(a, 10, [(64, 48)] * 3 + [(80, 80)] * 2 + [(64, 48)])  # sizes change mid-folder
    _write_folder(b, 30, [(64, 48)] * 5)
    (a / "notes.txt").write_text("not an image")
    assert [p.name for p in list_images(a)] == [f"{i:03d}.png" for i in range(6)]
    dims = 64  # the stem only: keeps the test fast; the full network is covered above
    # Activations, image by image (pytorch-fid needs batch 1 for mixed sizes; ours resizes each image, then
    # batches 4 and pads the last batch).
    with torch.no_grad():
        want = fid_score.get_activations(list_images(a), pytorch_fid_model(fid_score, dims), batch_size=1,
                                          dims=dims, device="cpu", num_workers=0)
    got = folder_activations(a, params, batch_size=4, dims=dims)
    print(f"folder activations rel err {_rel(got, want):.2e}")
    assert got.shape == (6, dims) and _rel(got, want) < REL_TOL
    # The distance: 6 and 5 images in 64 dimensions give singular covariances, where sqrtm is ill-conditioned,
    # so the end-to-end comparison gets a looser bound than the features (still far below FID's meaningful digits).
    ours = fid_from_folders(a, b, params, batch_size=4, dims=dims)
    theirs = fid_score.calculate_fid_given_paths([str(a), str(b)], batch_size=1, device="cpu", dims=dims,
                                                 num_workers=0)
    print(f"FID dims={dims}: jsr {ours:.9g}, pytorch-fid {theirs:.9g}")
    assert ours > 0 and abs(ours - theirs) / theirs < 1e-5, (ours, theirs)  # measured 7e-8
    # Our own pipeline is exactly activations -> statistics -> distance, and a saved .npz stands in for a folder.
    mu_b, s_b = activation_statistics(folder_activations(b, params, batch_size=4, dims=dims))
    assert fid_from_folders(a, b, params, batch_size=4, dims=dims) == \
        frechet_distance(*activation_statistics(got), mu_b, s_b)
    save_statistics(tmp_path / "b_stats.npz", mu_b, s_b)
    assert fid_from_folders(a, tmp_path / "b_stats.npz", params, batch_size=4, dims=dims) == ours


def test_image_activations_batching(params):
    imgs = list(_smooth_images(5, 3, 96, 96)) + list(_smooth_images(6, 2, 80, 112))
    one_by_one = image_activations(imgs, params, batch_size=1, dims=64)
    batched = image_activations(imgs, params, batch_size=2, dims=64)  # mixes sizes within a batch
    direct = np.concatenate([inception_features(params, jnp.asarray(im[None]), dims=64) for im in imgs])
    assert batched.shape == (5, 64)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched, direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no images"):
        image_activations([], params)
    with pytest.raises(FileNotFoundError):
        folder_activations("/nonexistent/folder", params)
