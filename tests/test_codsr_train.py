"""CODSR end to end (slow): ``configs/codsr.py:stage1-tiny`` through the training loop (the train.py path: both
phases, reconstruction only and then + GAN with the discriminator's own update), its export (peft LoRAs + the SFT
in the release's names), then ``:stage2-tiny`` on that export with image folders carrying noun masks (generated
here), its export, and ``python -m jsr.infer`` on the stage-2 export (which pulls the stage-1 trees it requires),
equal to the in-process restorer.

The stage-1 run is also crashed after a GAN step and resumed: the parameters (discriminator heads included)
equal the uninterrupted run's bit for bit.

Marked slow: three train-step programs (two stage-1 phases, stage 2 with VSD and attention capture) and the
restorer compile to minutes on a 2-core CPU. The default run covers the pieces (tests/test_codsr*.py).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import jsr.methods.codsr  # noqa: F401 - registers the method
from jsr.sr import infer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _dataset(folder: Path, n: int = 4, size: int = 96) -> Path:
    """``n`` procedural images with a red box and a blue band, each with a JSON noun sidecar (caption + masks)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = (rng.uniform(0.3, 0.6, (size, size, 3)) * 255).astype(np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        box = np.zeros((size, size), bool)
        box[y:y + size // 3, x:x + size // 3] = True
        band = np.zeros((size, size), bool)
        band[-size // 4:] = True
        img[box] = (220, 30, 30)
        img[band] = (30, 30, 220)
        Image.fromarray(img).save(folder / f"img{i}.png")
        Image.fromarray(box.astype(np.uint8) * 255).save(folder / f"img{i}.box.png")
        Image.fromarray(band.astype(np.uint8) * 255).save(folder / f"img{i}.band.png")
        (folder / f"img{i}.nouns.json").write_text(json.dumps({
            "caption": "a red box over a blue band", "nouns": [{"word": "box", "mask": f"img{i}.box.png"},
                                                              {"word": "band", "mask": f"img{i}.band.png"}]}))
    return folder


def _common(c, data: Path, steps: int):
    c.total_steps = steps
    c.data.source, c.data.path = "folder", str(data)
    c.log.image_every = 0
    c.checkpoint.every = 1000
    c.mesh.num_devices = 1
    return c


def test_stage1_stage2_export_and_jsr_infer(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from configs import codsr as cfg
    from jsr.methods.restorer import load_restorer
    from jsr.sr.base import load_base
    from jsr.train import loop
    from jsr.weights.io import read_safetensors
    from tests.test_codsr_blocks import _torch_sft

    tmp = tmp_path_factory.mktemp("codsr-e2e")
    data = _dataset(tmp / "data")

    c1 = _common(cfg.get_config("stage1-tiny"), data, 4)
    c1.codsr.gan_start = 2
    out1 = loop.train(c1, tmp / "s1")
    assert out1["status"] == "done" and out1["step"] == 4
    m1 = out1["metrics"]
    assert all(np.isfinite(v) for v in m1.values())
    assert {"gen/gan_g", "disc/gan_d", "disc/real_logit"} <= set(m1)  # the GAN phase ran (steps 2, 3)
    gen = tmp / "s1" / "export" / "gen"
    manifest = json.loads((gen / "jsr_export.json").read_text())
    assert manifest["method"] == "codsr" and manifest["trees"]["sft"] == {"role": "sft", "kind": "module"}
    state = read_safetensors(gen / "sft" / "model.safetensors")
    width = json.loads((gen / "sft" / "config.json").read_text())["channels"]
    _torch_sft(192, width).load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    params = jax.device_get(out1["state"].params)
    assert np.abs(params["gen"]["sft"]["SFT_scale_conv1"]["kernel"]).max() > 0  # zero-initialised, trained

    # Resume: a run that dies after step 3 (last checkpoint 3: after one GAN step, so the discriminator heads and
    # their AdamW state are in it) resumes into the GAN phase and ends with the uninterrupted run's parameters, bit
    # for bit. The loop's compiled steps are reused (its cache ignores the checkpoint/debug fields).
    c1r = _common(cfg.get_config("stage1-tiny"), data, 4)
    c1r.codsr.gan_start = 2
    c1r.checkpoint.every = 3
    c1r.debug.crash_after_step = 3
    with pytest.raises(SystemExit, match="simulated crash"):
        loop.train(c1r, tmp / "s1r")
    assert sorted(int(p.name) for p in (tmp / "s1r" / "checkpoints").iterdir() if p.name.isdigit())[-1] == 3
    c1r.debug.crash_after_step = -1
    resumed = loop.train(c1r, tmp / "s1r")
    assert resumed["status"] == "done" and resumed["step"] == 4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"].params), params)
    assert set(jax.device_get(resumed["state"].params)) == {"gen", "disc"}

    c2 = _common(cfg.get_config("stage2-tiny"), data, 2)
    c2.codsr.stage1 = str(gen)
    c2.data.null_prompt_ratio = 0.0
    out2 = loop.train(c2, tmp / "s2")
    assert out2["status"] == "done"
    m2 = out2["metrics"]
    assert all(np.isfinite(v) for v in m2.values())
    assert m2["align/match_nouns"] >= 2 and m2["align/match_token"] > 0 and m2["align/match_bce"] > 0
    assert "fake/fake_score" in m2 and m2["align/vsd"] > 0
    align = jax.device_get(out2["state"].params["align"]["unet"])
    assert all("attn2" in "/".join(p) for p in align.paths()) and align.paths()
    man2 = json.loads((tmp / "s2" / "export" / "align" / "jsr_export.json").read_text())
    assert man2["method"] == "codsr" and man2["requires"] == {"unet": str(gen), "vae": str(gen), "sft": str(gen)}

    src = tmp / "in"
    src.mkdir()
    lq8 = np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)
    Image.fromarray(lq8).save(src / "a.png")
    cmd = [sys.executable, "-m", "jsr.infer", str(src), "--model", "tiny", "--lora", str(tmp / "s2" / "export"),
           "--seed", "1", "--codsr_t", "120", "--color_fix", "none", "--output", str(tmp / "o"), "--no_progress"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with codsr" in proc.stderr
    cli = np.asarray(Image.open(tmp / "o" / "a_sr.png"), np.float32)
    r = load_restorer(load_base(""), [str(tmp / "s2" / "export")])
    assert r.method == "codsr"
    x_up = infer.upscale_bicubic(lq8.astype(np.float32) / 255.0, 4)[None]
    mine = r(x_up, infer.RestoreOptions(color_fix="none", knobs={"seed": 1, "codsr_t": 120}))[0] * 255
    assert cli.shape == (64, 64, 3) and np.abs(cli - mine).max() <= 1.0
    other = r(x_up, infer.RestoreOptions(color_fix="none", knobs={"seed": 2, "codsr_t": 120}))[0] * 255
    assert np.abs(other - mine).mean() > 0.01
