"""A damaged file the user points a command line at ends it with one ``error: <path>: <what>`` line and exit
status 2, from every command line (issue 13): ``python -m jsr.infer``, ``evaluate.py``, ``train.py`` (and
``python -m jsr.weights``, tested in test_weight_files.py). The data-folder case of train.py is in
test_train_stops.py."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jsr import cli as jsr_cli
from jsr import infer
from jsr.weights.io import CorruptFileError

ROOT = Path(__file__).resolve().parents[1]


def _bad_model(root: Path) -> Path:
    """An SD folder whose UNet config is not JSON."""
    for d in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (root / d).mkdir(parents=True)
    (root / "unet" / "config.json").write_text('{"sample_size": 96,')
    return root


def _assert_one_error_line(stderr: str, path: Path) -> None:
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"error: {path}"), lines[0]
    assert "Traceback" not in stderr, stderr[-3000:]


def test_guard_turns_user_errors_into_status_2_and_keeps_bugs(capsys):
    def damaged():
        raise CorruptFileError("/w/unet/config.json: not JSON\n(line 1 column 20)")

    assert jsr_cli.guard(damaged)() == 2
    assert capsys.readouterr().err == "error: /w/unet/config.json: not JSON (line 1 column 20)\n"

    def bug():
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        jsr_cli.guard(bug)()


def test_infer_with_a_damaged_model_file(tmp_path, capsys):
    model = _bad_model(tmp_path / "sd")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    assert infer.main([str(tmp_path / "x.png"), "--model", str(model), "--no-progress"]) == 2
    _assert_one_error_line(capsys.readouterr().err, model / "unet" / "config.json")


def test_evaluate_py_with_a_damaged_weight_file(tmp_path):
    hq = tmp_path / "hq"
    hq.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(hq / "a.png")
    bad = tmp_path / "lpips.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"w\": garbage}")
    r = subprocess.run([sys.executable, "evaluate.py", f"--out={tmp_path / 'o'}", f"--dataset=X:hq={hq}",
                        f"--lpips={bad}", "--no_model", f"--compare=B={hq}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    _assert_one_error_line(r.stderr, bad)


def test_train_py_with_a_damaged_model_file(tmp_path):
    model = _bad_model(tmp_path / "sd")
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/fidelity.py:tiny", "--workdir",
                        str(tmp_path / "w"), f"--config.model.path={model}", "--config.loss.lpips=0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    _assert_one_error_line(r.stderr, model / "unet" / "config.json")
