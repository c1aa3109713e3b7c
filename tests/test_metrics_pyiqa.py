"""The optional pyiqa bridge (MUSIQ, MANIQA, CLIPIQA).

pyiqa is not installed here (it requires torchvision, whose PyPI build does not import beside torch's CPU
build, plus timm, transformers >= 5, bitsandbytes...), and no weights can be downloaded, so:

* the real-pyiqa test runs only where pyiqa imports and its weights are on disk, and skips otherwise, saying which;
* the bridge's own logic (error messages, weight paths, download blocking, NHWC -> NCHW, batching) is tested with
  a stand-in ``pyiqa`` module that exposes ``create_metric`` the way pyiqa does.
"""

from __future__ import annotations

import os
import re
import sys
import types
import urllib.request

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jsr.metrics import pyiqa_bridge as pb  # noqa: E402

_TORCH_HOME = os.environ.get("TORCH_HOME")  # the real setting, for the real-pyiqa test


@pytest.fixture(autouse=True)
def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    pb.clear_cache()
    yield
    pb.clear_cache()


class _FakeMetric:
    """Scores that depend on layout and values: 10 * mean + the red value of the top-left pixel."""

    def __init__(self, name: str, device: str) -> None:
        self.name, self.device, self.shapes = name, device, []

    def __call__(self, t):
        assert isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[1] == 3
        self.shapes.append(tuple(t.shape))
        return (10 * t.mean(dim=(1, 2, 3)) + t[:, 0, 0, 0]).reshape(-1, 1)  # pyiqa returns [N, 1]


def _fake_pyiqa(monkeypatch, create_metric=None) -> types.ModuleType:
    mod = types.ModuleType("pyiqa")
    mod.created = []

    def default_create(name, device=None, **kw):
        mod.created.append(_FakeMetric(name, device))
        return mod.created[-1]

    mod.create_metric = create_metric or default_create
    monkeypatch.setitem(sys.modules, "pyiqa", mod)
    return mod


def _place_weights(name: str) -> None:
    for p in pb.required_files(name):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"weights stand-in")


def test_unknown_metric():
    with pytest.raises(ValueError, match=r"unknown pyiqa metric 'brisque'.*clipiqa.*maniqa.*musiq"):
        pb.available("brisque")


def test_without_pyiqa_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # `import pyiqa` now raises ImportError
    for name in pb.METRICS:
        assert not pb.available(name)
    with pytest.raises(pb.PyiqaUnavailableError, match=r"pyiqa is not usable here.*pip install pyiqa"):
        pb.score("musiq", np.zeros((1, 32, 32, 3), np.float32))
    # Where the weights would have to go follows torch.hub's rule.
    assert pb.required_files("musiq") == [tmp_path / "torch_home" / "hub" / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth"]
    assert pb.required_files("CLIPIQA") == [tmp_path / "torch_home" / "hub" / "clip" / "RN50.pt"]


def test_missing_weights_names_the_file(monkeypatch, tmp_path):
    fake = _fake_pyiqa(monkeypatch)
    assert not pb.available("maniqa")
    want = tmp_path / "torch_home" / "hub" / "pyiqa" / "MANIQA_PIPAL-ae6d356b.pth"
    with pytest.raises(pb.MissingWeightsError, match=re.escape(str(want))) as e:
        pb.score("maniqa", np.zeros((1, 32, 32, 3), np.float32))
    assert "maniqa-pipal" in str(e.value) and "vit_base_patch8_224" in str(e.value)
    assert fake.created == []  # nothing was built, nothing fetched


def test_score_with_stand_in(monkeypatch):
    fake = _fake_pyiqa(monkeypatch)
    _place_weights("musiq")
    assert pb.available("musiq") and not pb.available("clipiqa")
    rng = np.random.default_rng(0)
    x = rng.random((5, 24, 40, 3)).astype(np.float32)
    got = pb.score("musiq", x, batch_size=2)
    want = 10 * x.mean(axis=(1, 2, 3)) + x[:, 0, 0, 0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.shape == (5,) and got.dtype == np.float64
    m = fake.created[0]
    assert m.name == "musiq" and m.device == "cpu" and m.shapes == [(2, 3, 24, 40), (2, 3, 24, 40), (1, 3, 24, 40)]
    one = pb.score("musiq", x[0])  # the metric object is reused
    assert one.shape == () and len(fake.created) == 1
    np.testing.assert_allclose(one, want[0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        pb.score("musiq", x * 255)
    with pytest.raises(ValueError, match="RGB"):
        pb.score("musiq", x[..., :1])


def test_downloads_are_blocked(monkeypatch, tmp_path):
    target = tmp_path / "torch_home" / "hub" / "checkpoints" / "backbone.pth"

    def create_metric(name, device=None, **kw):  # what pyiqa/timm do when a file is absent
        if name == "clipiqa":
            torch.hub.download_url_to_file("https://example.invalid/backbone.pth", str(target))
        urllib.request.urlopen("https://example.invalid/other.pt")

    _fake_pyiqa(monkeypatch, create_metric)
    offline_before = os.environ.get("HF_HUB_OFFLINE")
    real_download, real_urlopen = torch.hub.download_url_to_file, urllib.request.urlopen
    _place_weights("clipiqa")
    _place_weights("musiq")
    blocked = re.escape(f"download https://example.invalid/backbone.pth to {target}")
    with pytest.raises(pb.MissingWeightsError, match=blocked):
        pb.score("clipiqa", np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(pb.MissingWeightsError, match=r"https://example\.invalid/other\.pt"):
        pb.score("musiq", np.zeros((1, 32, 32, 3), np.float32))
    # Everything is restored afterwards.
    assert torch.hub.download_url_to_file is real_download and urllib.request.urlopen is real_urlopen
    assert os.environ.get("HF_HUB_OFFLINE") == offline_before


@pytest.mark.parametrize("name", sorted(pb.METRICS))
def test_real_pyiqa(name, monkeypatch):
    if _TORCH_HOME is None:  # the real cache location
        monkeypatch.delenv("TORCH_HOME")
    else:
        monkeypatch.setenv("TORCH_HOME", _TORCH_HOME)
    try:
        import pyiqa  # noqa: F401
    except Exception as e:
        pytest.skip(f"pyiqa not importable: {type(e).__name__}: {e}")
    if not pb.available(name):
        pytest.skip(f"weights for {name} not on disk: {[str(p) for p in pb.required_files(name)]}")
    x = np.random.default_rng(1).random((2, 256, 256, 3)).astype(np.float32)
    s = pb.score(name, x)
    assert s.shape == (2,) and np.isfinite(s).all()
