"""The web demo without the web (jsr.demo.controls, jsr.demo.engine): knob schemas become the right controls, the
engine refuses bad input with one-line messages before any work, restores like ``python -m jsr.infer``, sweeps a
knob without recompiling, and estimates time from what it measured. Stand-in restorers: no SD model, seconds."""
import json

import numpy as np
import pytest
from PIL import Image

from jsr import infer as cli
from jsr.data.images import to_uint8
from jsr.demo import controls
from jsr.demo.engine import DemoEngine, DemoInputError
from jsr.methods import registry
from jsr.sr.infer import RestoreOptions, upscale_bicubic
from tests.helpers import standin_restorer


def _save(path, h, w, seed=0):
    Image.fromarray((np.random.default_rng(seed).uniform(size=(h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def engine(tmp_path):
    return DemoEngine(standin_restorer(method="ctsr"), RestoreOptions(color_fix="none"), out_dir=tmp_path / "out",
                      max_pixels=128 * 128, model_name="standin")


def test_controls_follow_the_knob_schema():
    knobs = registry.all_knobs()
    names = ("t", "t_steps", "t_scale", "seed", "rcod_code", "lfim_radius", "lfim_high")
    got = {c.name: c for c in controls.controls_for(names, {"t_scale": 500.0}, {"t": 0.3})}
    assert (got["t"].widget, got["t"].step, got["t"].value) == ("slider", 0.01, 0.3)  # the command line's value
    assert got["t_scale"].value == 500.0  # the export's default over the knob's own
    assert (got["lfim_high"].widget, got["lfim_high"].step) == ("slider", 0.01)
    assert (got["rcod_code"].widget, got["rcod_code"].step) == ("slider", 1)
    assert got["seed"].widget == "number"  # 2^31 values: no slider
    assert got["lfim_radius"].widget == "choice" and got["lfim_radius"].recompiles
    order = [c.name for c in controls.controls_for(names, {})]
    assert order == ["t", "seed", "rcod_code", "lfim_high", "t_steps", "t_scale", "lfim_radius"]  # static last
    assert "recompiles" in got["t_steps"].info() and "recompiles" not in got["t"].info()
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        controls.controls_for(("t",), {}, {"t": 2.0})
    assert controls.slider_step(knobs["lfim_sharp"]) == 1.0 and controls.slider_step(knobs["rcod_abar"]) == 0.001


def test_sweep_values():
    c = {c.name: c for c in controls.controls_for(("t", "rcod_code", "lfim_low", "t_steps", "seed"), {})}
    assert controls.sweep_values(c["t"], 6) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]  # CTSR's declared sweep
    assert controls.sweep_values(c["t"], 3) == [0.0, 0.5, 1.0]
    assert controls.sweep_values(c["lfim_low"], 4) == [0.0, 1.33, 2.67, 4.0]  # on the slider's 0.01 grid
    assert controls.sweep_values(c["rcod_code"], 3) == [249, 499, 749]
    assert controls.sweep_values(c["seed"], 2) == [0, 2147483647]
    with pytest.raises(ValueError, match="recompiles"):
        controls.sweep_values(c["t_steps"], 3)
    with pytest.raises(ValueError, match="at least 2"):
        controls.sweep_values(c["t"], 1)


def test_restore_equals_the_command_line_and_t_moves_it(engine, tmp_path):
    src = _save(tmp_path / "photo.png", 16, 12)
    a = engine.restore(src, 4, knobs={"t": 0.0})
    assert a.sr.shape == (64, 48, 3) and np.isfinite(a.sr).all() and 0 <= a.sr.min() and a.sr.max() <= 1
    assert a.path.name == "photo_sr.png" and a.path.is_file() and "Restored 12x16 → 48x64" in a.summary
    meta = json.loads(Image.open(a.path).getexif()[0x010E])
    assert meta["knobs"] == {"t": 0.0} and meta["method"] == "ctsr"
    # What python -m jsr.infer computes for the same file and options.
    x = upscale_bicubic(cli.read_image(src), 4)[None]
    np.testing.assert_array_equal(a.sr, engine.restorer(x, RestoreOptions(color_fix="none", knobs={"t": 0.0}))[0])
    np.testing.assert_array_equal(np.asarray(Image.open(a.path)), to_uint8(a.sr))
    b = engine.restore(src, 4, knobs={"t": 0.9})
    assert np.abs(a.sr - b.sr).mean() > 1e-2
    assert b.programs == 0 and "no compiling" in b.summary  # a new knob value reuses the compiled program
    assert "(t=0.9)" in b.summary and "(t=" not in a.summary  # knobs moved from their initial values are named


def test_bad_inputs_are_one_line_messages(engine, tmp_path):
    src = _save(tmp_path / "ok.png", 16, 16)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DemoInputError, match=r"^shown.png: not a readable image"):
        engine.restore(tmp_path / "notes.png", 4, name="shown.png")  # the user's name, not the upload's path
    with pytest.raises(DemoInputError, match=r"t must be in \[0, 1\], got 1.5"):
        engine.restore(src, 4, knobs={"t": 1.5})
    with pytest.raises(DemoInputError, match="want a float"):
        engine.restore(src, 4, knobs={"t": "much"})
    with pytest.raises(DemoInputError, match="has no knob 'lambda_sem'"):
        engine.restore(src, 4, knobs={"lambda_sem": 0.5})
    with pytest.raises(DemoInputError, match=r"upscale must be in \[1, 16\]"):
        engine.restore(src, 0.5)
    with pytest.raises(DemoInputError, match="color_fix"):
        engine.restore(src, 4, color_fix="hist")
    big = _save(tmp_path / "big.png", 40, 40)
    with pytest.raises(DemoInputError, match=r"160x160 output .* over this demo's limit of 0.02 MP"):
        engine.restore(big, 4)
    assert not list((tmp_path / "out").glob("*/*.png"))  # refused before any work


def test_estimate_before_and_after_a_measurement(engine, tmp_path):
    src = _save(tmp_path / "a.png", 16, 16)
    text = engine.estimate(src, 4)
    assert "16x16 → **64x64**" in text and "no estimate yet" in text
    engine.restore(src, 4)
    other = _save(tmp_path / "b.png", 24, 16)
    text = engine.estimate(other, 4)
    assert "Estimated time" in text and "plus compiling for this size" in text  # 96x64 was never run
    assert "plus compiling" not in engine.estimate(src, 4)
    with pytest.raises(DemoInputError, match="over this demo's limit"):
        engine.estimate(_save(tmp_path / "c.png", 40, 40), 4)


def test_sweep_strip(engine, tmp_path):
    src = _save(tmp_path / "a.png", 16, 16)
    engine.restore(src, 4)  # compiles
    strip, summary = engine.sweep(src, 4, "t", 3)
    assert [v for v, _ in strip] == [0.0, 0.5, 1.0] and "no compiling" in summary
    assert all(img.shape == (64, 64, 3) for _, img in strip)
    assert np.abs(strip[0][1] - strip[2][1]).mean() > 1e-2
    with pytest.raises(DemoInputError, match="no knob 'lfim_low' to sweep"):
        engine.sweep(src, 4, "lfim_low", 3)


def test_results_kept_for_download_are_bounded(engine, tmp_path, monkeypatch):
    monkeypatch.setattr("jsr.demo.engine.KEEP_RESULTS", 2)
    src = _save(tmp_path / "a.png", 8, 8)
    paths = [engine.restore(src, 4).path for _ in range(4)]
    assert [p.is_file() for p in paths] == [False, False, True, True]
