"""Metric weight discovery (jsr.metrics.files, issue 18): each file is found where the PyTorch packages keep it, in
fake caches built in a temporary HOME (torch hub, Hugging Face hub, fake site-packages for lpips, DISTS_pytorch,
basicsr) with decoys beside the right files; the first usable place wins; given files beat discovery; a found file
of the wrong shape is reported, not used; ``python -m jsr.metrics files`` and evaluate.py's summary and plot line;
the fidelity-vs-t plot drawn when no realism metric is available."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jsr.eval as ev
from jsr.metrics import files as mf
from jsr.metrics import niqe as niqe_lib
from jsr.metrics.__main__ import main as files_main
from jsr.metrics.vgg import TAP_CHANNELS, conv_indices
from tests.helpers import standin_restorer

ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("lpips", "DISTS_pytorch", "basicsr", "pyiqa")
_ENV = ("TORCH_HOME", "XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty HOME, no cache variables, a fake site-packages first on sys.path (packages added by the test), a
    fake sys.prefix; the real lpips/DISTS_pytorch/basicsr/pyiqa hidden (``sys.modules[name] = None`` makes
    ``find_spec`` report them absent) until a test puts a fake one in the fake site."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    for var in _ENV:
        monkeypatch.delenv(var, raising=False)
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    for name in _PACKAGES:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    return h


def _package(site: Path, name: str, monkeypatch) -> Path:
    """A fake installed package ``name`` in ``site`` (visible to find_spec from now on)."""
    d = site / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "__init__.py").write_text("raise ImportError('a stand-in: jsr must not import it')\n")
    monkeypatch.delitem(sys.modules, name, raising=False)
    return d


def _touch(path: Path, data: bytes = b"stand-in") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _torch_save(path: Path, state: dict) -> Path:
    torch = pytest.importorskip("torch")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, path)
    return path


def _heads(shapes=TAP_CHANNELS) -> dict:
    """LPIPS heads as the lpips package stores them (with the Dropout index): lin{k}.model.1.weight [1, C, 1, 1]."""
    return {f"lin{k}.model.1.weight": np.full((1, c, 1, 1), 0.01 * (k + 1), np.float32) for k, c in enumerate(shapes)}


def _vgg16() -> dict:
    """torchvision's VGG16 conv tensors (features.N.weight/bias, full size), each a constant naming its index."""
    state, cin = {}, 3
    for i, cout in zip(conv_indices(), (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)):
        state[f"features.{i}.weight"] = np.full((cout, cin, 3, 3), i / 1000, np.float32)
        state[f"features.{i}.bias"] = np.full((cout,), -i / 1000, np.float32)
        cin = cout
    return state


def _niqe_params(seed: int) -> niqe_lib.NIQEParams:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(36, 36))
    return niqe_lib.NIQEParams(rng.normal(size=36), a @ a.T / 36 + np.eye(36))


def _images(folder: Path, names, seed: int, noise: float = 0.0) -> Path:
    """32x32 random RGB PNGs (``noise``: the same images, perturbed: an SR folder that is not the HQ)."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        img = np.random.default_rng(seed + k).integers(0, 256, (32, 32, 3)).astype(np.float64)
        img += np.random.default_rng(99 + k).normal(0, noise, img.shape)
        Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8)).save(folder / f"{name}.png")
    return folder


def _hub(home: Path) -> Path:
    return home / ".cache" / "torch" / "hub"


def test_torch_hub_dirs_follow_torchs_rule(home, tmp_path, monkeypatch):
    default = _hub(home)
    assert mf.torch_hub_dirs() == [default]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mf.torch_hub_dirs() == [tmp_path / "xdg" / "torch" / "hub", default]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert mf.torch_hub_dirs() == [tmp_path / "th" / "hub", tmp_path / "xdg" / "torch" / "hub", default]
    torch = pytest.importorskip("torch")
    assert mf.torch_hub_dirs()[0] == Path(torch.hub.get_dir())  # the folder torch itself uses comes first
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert mf.hf_hub_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hfc"))
    assert mf.hf_hub_dir() == tmp_path / "hfc"


def test_each_file_is_found_where_its_package_keeps_it(home, tmp_path, monkeypatch):
    site = tmp_path / "site"
    hub = _hub(home)
    want = {
        "vgg16": _touch(hub / "checkpoints" / "vgg16-397923af.pth"),
        "inception": _touch(hub / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"),
        "lpips": _touch(_package(site, "lpips", monkeypatch) / "weights" / "v0.1" / "vgg.pth"),
        "niqe": _touch(_package(site, "basicsr", monkeypatch) / "metrics" / "niqe_pris_params.npz"),
        "musiq": _touch(hub / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth"),
        "maniqa": _touch(hub / "pyiqa" / "MANIQA_PIPAL-ae6d356b.pth"),
        "clip_rn50": _touch(hub / "clip" / "RN50.pt"),
    }
    _package(site, "DISTS_pytorch", monkeypatch)  # 0.1's wheel puts weights.pt into sys.prefix, not the package
    want["dists"] = _touch(tmp_path / "prefix" / "weights.pt")
    vit = home / ".cache" / "huggingface" / "hub" / "models--timm--vit_base_patch8_224.augreg2_in21k_ft_in1k"
    _touch(vit / "refs" / "main", b"abc123\n")
    want["maniqa_vit"] = _touch(vit / "snapshots" / "abc123" / "model.safetensors")
    # Decoys: other versions and other networks' files next to the right ones.
    _touch(hub / "checkpoints" / "vgg16_bn-6c64b313.pth")
    _touch(site / "lpips" / "weights" / "v0.0" / "vgg.pth")
    _touch(site / "lpips" / "weights" / "v0.1" / "alex.pth")
    _touch(vit / "snapshots" / "0ld" / "model.safetensors")  # not the revision refs/main names
    _touch(hub / "pyiqa" / "niqe_modelparameters.mat")  # basicsr's file comes first

    for key, path in want.items():
        assert mf.find(key).path == path, key
    assert mf.discover("lpips") == [want["vgg16"], want["lpips"]]  # the loader's order: trunk, then heads
    assert mf.discover("dists") == [want["vgg16"], want["dists"]]
    assert mf.discover("fid") == [want["inception"]]
    assert mf.discover("niqe") == [want["niqe"]]
    assert mf.discover("maniqa") == [want["maniqa"], want["maniqa_vit"]]
    assert mf.missing_packages("musiq") == ["pyiqa"]  # the files are there, pyiqa is not
    _package(site, "pyiqa", monkeypatch)
    assert mf.missing_packages("musiq") == [] and mf.why_missing("clipiqa") == ""
    # A copy bundled inside DISTS_pytorch itself comes before the one in sys.prefix.
    inside = _touch(site / "DISTS_pytorch" / "weights.pt")
    assert mf.find("dists").path == inside


def test_first_usable_place_wins(home, tmp_path, monkeypatch):
    default = _hub(home)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    # jsr reads VGG16 itself: a copy in ~/.cache/torch is used when TORCH_HOME's hub lacks it ...
    old = _touch(default / "checkpoints" / "vgg16-397923af.pth")
    assert mf.find("vgg16").path == old
    new = _touch(tmp_path / "th" / "hub" / "checkpoints" / "vgg16-397923af.pth")
    assert mf.find("vgg16").path == new  # ... and the one torch uses wins when both exist
    # pyiqa reads only torch's folder: a copy elsewhere is not used, and the hint says what to set.
    _touch(default / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth")
    look = mf.find("musiq")
    assert look.path is None and look.expected == tmp_path / "th" / "hub" / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth"
    assert look.hint() == (f"{default / 'pyiqa' / 'musiq_koniq_ckpt-e95806b9.pth'} exists but pyiqa reads "
                           f"{tmp_path / 'th' / 'hub'}: set TORCH_HOME={home / '.cache' / 'torch'}")


def test_missing_files_list_where_looked_and_how_to_get_them(home, capsys):
    data = mf.listing()
    assert [m["metric"] for m in data["metrics"]] == ["lpips", "dists", "fid", "niqe", "musiq", "maniqa", "clipiqa"]
    assert all(m["status"] == "missing" for m in data["metrics"])
    lp = {f["key"]: f for f in data["metrics"][0]["files"]}
    assert lp["vgg16"]["looked_in"][0]["path"] == str(_hub(home) / "checkpoints" / "vgg16-397923af.pth")
    assert "torchvision.models.vgg16(weights='IMAGENET1K_V1')" in lp["vgg16"]["get"]
    assert lp["lpips"]["looked_in"][0] == {"path": None, "usable": True,
                                          "note": "the lpips package's weights/v0.1/vgg.pth (lpips is not installed)"}
    assert "pip install --no-deps lpips" in lp["lpips"]["get"]
    assert data["metrics"][4]["missing_packages"] == ["pyiqa"]
    assert "pyiqa.create_metric('musiq')" in data["metrics"][4]["files"][0]["get"]
    assert mf.why_missing("fid") == "pt_inception-2015-12-05-6726825d.pth not found"
    assert mf.why_missing("niqe", how=True) == ("niqe_pris_params.npz (or niqe_modelparameters.mat) not found (get it: "
                                                + mf.FILES["niqe"].get + ")")
    assert mf.why_missing("maniqa") == ("pyiqa is not installed; MANIQA_PIPAL-ae6d356b.pth not found; timm's "
                                        "vit_base_patch8_224 weights not found")

    assert files_main(["files"]) == 0  # a missing file is information, not an error
    text = capsys.readouterr().out
    assert "LPIPS: missing\n  vgg16: missing: torchvision's ImageNet VGG16 (vgg16-397923af.pth)\n" in text
    assert f"      looked in {_hub(home) / 'checkpoints' / 'vgg16-397923af.pth'}  (torch hub cache)\n" in text
    assert "DISTS: missing\n  vgg16: missing (see LPIPS above)\n" in text
    assert "pip install pytorch-fid, then python -c \"from pytorch_fid.inception import fid_inception_v3" in text
    assert files_main(["files", "--json", "niqe"]) == 0
    assert [m["metric"] for m in json.loads(capsys.readouterr().out)["metrics"]] == ["niqe"]
    with pytest.raises(SystemExit) as e:
        files_main(["files", "psnr"])
    assert e.value.code == 2 and "unknown metric(s) psnr" in capsys.readouterr().err


def test_wrong_shaped_files_are_reported_not_used(home, tmp_path, monkeypatch):
    site = tmp_path / "site"
    heads = _torch_save(_package(site, "lpips", monkeypatch) / "weights" / "v0.1" / "vgg.pth",
                        _heads((64, 128, 128, 512, 512)))
    assert mf.check_file("lpips", heads) == (f"{heads}: does not match LPIPS-VGG: tensor 'lin2.weight' has shape "
                                             "(1, 128, 1, 1) but LPIPS-VGG expects (1, 256, 1, 1)")
    good = _torch_save(tmp_path / "good.pth", _heads())
    assert mf.check_file("lpips", good) == "ok"
    _package(site, "DISTS_pytorch", monkeypatch)
    dists = _torch_save(site / "DISTS_pytorch" / "weights.pt", {"alpha": np.ones((1, 1475, 1, 1), np.float32)})
    assert "missing tensor 'beta'" in mf.check_file("dists", dists)
    niqe = _package(site, "basicsr", monkeypatch) / "metrics" / "niqe_pris_params.npz"
    niqe.parent.mkdir(parents=True)
    np.savez(niqe, mu_pris_param=np.zeros(35), cov_pris_param=np.eye(36))
    assert "mu_pris_param has shape (35,)" in mf.check_file("niqe", niqe)
    assert mf.check_file("musiq", heads).startswith("not checked")

    data = mf.listing(["lpips", "niqe"], check=True)
    assert data["metrics"][1]["status"] == "unusable"
    assert data["metrics"][1]["files"][0]["check"] == mf.check_file("niqe", niqe)
    assert data["metrics"][0]["files"][1]["status"] == "unusable"  # the heads; VGG16 is missing
    # evaluate's loader: the found NIQE file does not load, so NIQE is skipped with the file and the problem named.
    suite = ev.load_metrics(lpips=["none"], dists=["none"], pyiqa=["none"])
    assert suite.niqe is None and suite.weights["niqe"]["source"] == "unusable"
    assert suite.skipped["niqe"].startswith(f"found {niqe} but it does not load: {niqe}: mu_pris_param has shape")


def test_given_files_win_and_none_turns_off(home, tmp_path, monkeypatch):
    site = tmp_path / "site"
    found = _package(site, "basicsr", monkeypatch) / "metrics" / "niqe_pris_params.npz"
    niqe_lib.save_niqe_params(found, _niqe_params(0))
    given = tmp_path / "mine.npz"
    niqe_lib.save_niqe_params(given, _niqe_params(1))
    suite = ev.load_metrics(pyiqa=["none"])
    np.testing.assert_array_equal(suite.niqe.mu, _niqe_params(0).mu)  # discovered and loaded
    assert suite.weights["niqe"] == {"source": "found", "files": [str(found)], "note": ""}
    assert suite.weights["lpips"]["source"] == "missing" and suite.lpips is None
    assert "vgg16-397923af.pth not found" in suite.skipped["lpips"] and "--lpips=FILE" in suite.skipped["lpips"]
    suite = ev.load_metrics(niqe=str(given), pyiqa=["none"])
    np.testing.assert_array_equal(suite.niqe.mu, _niqe_params(1).mu)  # the given file, not the found one
    assert suite.weights["niqe"]["source"] == "given"
    suite = ev.load_metrics(niqe="none", pyiqa=["none"])
    assert suite.niqe is None and suite.skipped["niqe"] == "turned off (--niqe=none)"
    assert ev.load_metrics(pyiqa=["none"], discover=False).niqe is None
    with pytest.raises(ValueError, match=r"pyiqa metric\(s\) requested but not available: musiq: pyiqa is not "
                                         r"installed; musiq_koniq_ckpt-e95806b9.pth not found"):
        ev.load_metrics(pyiqa=["musiq"])
    lines = ev.weights_summary(ev.load_metrics(niqe="none", pyiqa=["auto"]))
    assert lines[2:5] == ["  FID      missing  pt_inception-2015-12-05-6726825d.pth not found",
                          "  NIQE     off      --niqe=none",
                          "  MUSIQ    missing  pyiqa is not installed; musiq_koniq_ckpt-e95806b9.pth not found"]


def test_discovered_lpips_weights_are_the_ones_loaded(home, tmp_path, monkeypatch):
    _torch_save(_hub(home) / "checkpoints" / "vgg16-397923af.pth", _vgg16())
    _torch_save(_package(tmp_path / "site", "lpips", monkeypatch) / "weights" / "v0.1" / "vgg.pth", _heads())
    suite = ev.load_metrics(dists=["none"], niqe="none", pyiqa=["none"])
    assert suite.weights["lpips"]["source"] == "found"
    assert float(suite.lpips["net"]["features_28"]["bias"][0]) == pytest.approx(-0.028)
    assert float(suite.lpips["lin3"]["kernel"].reshape(-1)[0]) == pytest.approx(0.04)


def test_the_training_lpips_loss_finds_its_weights_too(home, tmp_path, monkeypatch):
    """``loss.lpips > 0`` on a real base without lpips_vgg/lpips_heads: the training loss loads the files found in
    the caches (the same as evaluate.py), says where it looked when they are missing, and a given path still wins."""
    import types

    import jax
    import ml_collections

    from jsr.methods import common

    real_base = types.SimpleNamespace(random_weights=False)
    cfg = ml_collections.ConfigDict({"loss": {"lpips": 2.0, "lpips_vgg": "", "lpips_heads": ""}})
    with pytest.raises(ValueError, match="vgg16-397923af.pth not found.*python -m jsr.metrics files"):
        common.lpips_params(cfg, real_base, jax.random.key(0))
    _torch_save(_hub(home) / "checkpoints" / "vgg16-397923af.pth", _vgg16())
    _torch_save(_package(tmp_path / "site", "lpips", monkeypatch) / "weights" / "v0.1" / "vgg.pth", _heads())
    found = common.lpips_params(cfg, real_base, jax.random.key(0))
    assert float(found["net"]["features_28"]["bias"][0]) == pytest.approx(-0.028)
    assert float(found["lin3"]["kernel"].reshape(-1)[0]) == pytest.approx(0.04)
    given = tmp_path / "mine" / "vgg.pth"
    _torch_save(given, {k: v * 2 for k, v in _heads().items()})
    cfg.loss.lpips_vgg, cfg.loss.lpips_heads = str(_hub(home) / "checkpoints" / "vgg16-397923af.pth"), str(given)
    mine = common.lpips_params(cfg, real_base, jax.random.key(0))
    assert float(mine["lin3"]["kernel"].reshape(-1)[0]) == pytest.approx(0.08)


def test_cli_as_a_module(home):
    env = dict(os.environ, HOME=str(home))
    r = subprocess.run([sys.executable, "-m", "jsr.metrics", "files", "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(r.stdout)
    assert data["torch_hub"] == [str(_hub(home))]
    assert len(data["metrics"]) == 7


def test_evaluate_py_prints_the_summary_and_uses_found_files(home, tmp_path):
    """evaluate.py with no metric flags (compare folder only, no model): the summary comes first, NIQE runs on the
    parameters found in a fake basicsr, the report records them; 32 px images give NIQE no value, so the plot
    line says why there is no fidelity-vs-realism plot."""
    site = tmp_path / "site"
    niqe = site / "basicsr" / "metrics" / "niqe_pris_params.npz"
    niqe_lib.save_niqe_params(niqe, _niqe_params(0))
    (site / "basicsr" / "__init__.py").write_text("")
    hq = _images(tmp_path / "hq", "ab", 0)
    sr = _images(tmp_path / "sr", "ab", 0, noise=20)
    env = {k: v for k, v in os.environ.items() if k not in _ENV}
    env.update(HOME=str(home), PYTHONPATH=str(site), MPLCONFIGDIR=str(tmp_path / "mpl"))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "evaluate.py", f"--out={out}", f"--dataset=X:hq={hq}", "--no_model",
                        f"--compare=B={sr}", "--dists=none", "--noprogress", "--num_samples=0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stderr.splitlines()
    start = err.index("metric weights (python -m jsr.metrics files: where each is looked for):")
    assert err[start + 1].startswith("  LPIPS    missing  vgg16-397923af.pth not found")
    assert err[start + 2] == "  DISTS    off      --dists=none"
    assert err[start + 4] == f"  NIQE     found    {niqe}"
    assert err[start + 5].startswith("  MUSIQ    missing  ")
    report = json.loads((out / "results.json").read_text())
    assert report["metric_weights"]["niqe"] == {"source": "found", "files": [str(niqe)], "note": ""}
    assert "niqe" in [c["key"] for c in report["columns"]]
    assert [line for line in r.stdout.splitlines() if line.startswith("plot:")] == [
        "plot: fidelity_realism.png not drawn: no finite NIQE value in any row"]


def test_fidelity_vs_t_plot_when_no_realism_metric(tmp_path):
    hq = _images(tmp_path / "hq", "pq", 0)
    sr = _images(tmp_path / "sr", "pq", 0, noise=20)
    ds = ev.EvalDataset(ev.parse_dataset(f"Syn:hq={hq},seed=1"))
    out = tmp_path / "out"
    (out / "fidelity_realism.png").parent.mkdir()
    (out / "fidelity_realism.png").write_bytes(b"an earlier run's plot")
    report = ev.evaluate([ds], out, restorer=standin_restorer(method="ctsr"), suite=ev.MetricSuite(),
                         t_values=[0, 0.5, 1], compare=[("Noisy", str(sr))], progress=False, log=lambda m: None,
                         num_samples=0, save_images=False)
    files = ev.write_outputs(report, out)
    assert "plot" not in files and not (out / "fidelity_realism.png").exists()
    assert files["plot_t"] == str(out / "fidelity_t.png")
    written = ev.load_report(files["json"])
    assert written["plot_t_metrics"] == ["psnr", "ssim"] and written["plot_missing"].startswith("no realism metric")
    md = (out / "results.md").read_text()
    assert "Instead, fidelity_t.png plots PSNR and SSIM against t." in md
    fig = ev.plots.fidelity_t_figure(written)
    assert [ax.get_title() for ax in fig.axes] == ["Fidelity vs t: PSNR", "Fidelity vs t: SSIM"]
    line, = fig.axes[0].get_lines()[:1]
    assert list(line.get_xdata()) == [0.0, 0.5, 1.0]
    np.testing.assert_allclose(line.get_ydata(), [r["psnr"] for r in written["rows"] if r["t"] is not None])
    hline = fig.axes[0].get_lines()[1]  # the compare folder: a dashed level
    assert hline.get_linestyle() == "--" and hline.get_label() == "Syn: Noisy"
    # A run without a sweep has no t axis: said, and no stale fallback plot is left behind.
    single = dict(report, rows=[r for r in report["rows"] if r["t"] is None])
    files = ev.write_outputs(single, out)
    assert "plot_t" not in files and not (out / "fidelity_t.png").exists()
    assert "No fidelity-vs-t plot either: no knob was swept, so there is no t axis." in (out / "results.md").read_text()
