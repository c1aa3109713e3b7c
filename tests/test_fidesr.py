"""FiDeSR as a method (jsr.methods.fidesr) and LFIM on every residual-form method (jsr.methods.lfim_knobs).

* The release checkpoint: a ``torch.save`` dict laid out like FiDeSR's, built here on the embedded tiny SD model
  (diffusers UNet + peft with its three adapters, rank 8; the release's LRRB rebuilt in plain torch) is read by
  ``read_source``/``load_restorer``, and the restored image equals the PyTorch composition (VAE mean -> UNet at
  t = 1 -> + LRRB -> z_L - r' [-> LFIM] -> VAE decode) written here.
* Training: ``configs/fidesr.py:tiny`` through ``jsr.train.loop.train`` (the train.py path; 30 steps, DAW on from
  step 0, a larger lr), exported with its manifest, restored by ``python -m jsr.infer --lfim_low 0.2 --lfim_high
  0.3``; the same run's 30 steps lower the DAW-weighted reconstruction loss on a fixed batch.
* LFIM gains 0 leave every residual-form method's output exactly as it was.

Compiled programs (the costly part on a 2-core CPU): one train step (the loop's) and the restorer's encode /
forward / decode, shared by the in-process restorers and (through the session's XLA cache) the CLI subprocess; the
other checks run eagerly (no UNet graph compile).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jsr.methods
from jsr.methods import lfim_knobs
from jsr.methods.export import read_source
from jsr.methods.fidesr import fidesr_latent
from jsr.methods.restorer import load_restorer
from jsr.models import lora as L
from jsr.models.lrrb import LRRBConfig, init_lrrb_params, lrrb_to_torch
from jsr.sr import generator, infer, lfim
from tests.helpers import add_osediff_unet_adapters, randomise_torch, rel_error, train_py, upscaled_lq

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("encoder", "decoder", "others")
STEPS = 30


_lq = upscaled_lq


@pytest.fixture(scope="module")
def base():
    from jsr.sr.base import load_base

    return load_base("", dtype=jnp.float32)


@pytest.fixture(scope="module")
def release(base, tmp_path_factory):
    """FiDeSR's checkpoint layout on the tiny model, plus the PyTorch modules it came from."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from tests.test_fidesr_blocks import _torch_lrrb  # the release's LRRB in plain torch

    unet = diffusers.UNet2DConditionModel.from_pretrained(base.path / "unet").eval()
    lists = add_osediff_unet_adapters(unet, rank=8)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:  # B non-zero: every LoRA layer moves the output
                p.copy_(p + torch.randn(p.shape, generator=gen) * (0.3 / np.sqrt(p[0].numel())))
    lrrb = randomise_torch(_torch_lrrb(LRRBConfig()), seed=6).eval()  # its zero-initialised layers too
    vae = diffusers.AutoencoderKL.from_pretrained(base.path / "vae").eval()
    ckpt = {"lora_rank_unet": 8, **{f"unet_lora_{g}_modules": lists[g] for g in GROUPS},
            "state_dict_unet": {k: v.detach().clone() for k, v in unet.state_dict().items() if "lora" in k},
            "lrrb_state_dict": lrrb.state_dict()}
    path = tmp_path_factory.mktemp("release") / "fidesr.pkl"
    torch.save(ckpt, path)
    return dict(path=path, unet=unet, lrrb=lrrb, vae=vae, lists=lists)


def _torch_latents(rel, x, c):
    """The release's forward in PyTorch: ``(z_L, r', z = z_L - r')`` NHWC numpy (VAE posterior mean)."""
    import torch

    with torch.no_grad():
        sf = rel["vae"].config.scaling_factor
        z = rel["vae"].encode(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).latent_dist.mean * sf
        eps = rel["unet"](z, torch.tensor([1]), encoder_hidden_states=torch.from_numpy(np.asarray(c))).sample
        r = eps + rel["lrrb"](torch.cat([z, eps], 1))
        out = z - r
    return tuple(t.numpy().transpose(0, 2, 3, 1) for t in (z, r, out))


def _torch_decode(rel, z):
    """``(D(z / s) clipped + 1) / 2``: [0, 1] images, as the restorer returns them (colour fix off)."""
    import torch

    with torch.no_grad():
        x = rel["vae"].decode(torch.from_numpy(np.ascontiguousarray(z.transpose(0, 3, 1, 2)))
                              / rel["vae"].config.scaling_factor).sample.clamp(-1, 1)
    return (x.numpy().transpose(0, 2, 3, 1) + 1) / 2


def test_release_checkpoint_matches_a_torch_composition(base, release):
    src = read_source(release["path"], base)
    assert src.method == "fidesr" and sorted(src.roles) == ["lrrb", "unet"]
    lo = src.roles["unet"]
    assert (lo.rank, lo.alpha, lo.overrides) == (8, 8.0, {})
    r = load_restorer(base, [str(release["path"])])
    assert r.method == "fidesr" and r.uses_image and r.label == "FiDeSR"
    assert (r.knob_defaults["lfim_low"], r.knob_defaults["lfim_high"]) == (0.2, 0.3)  # the release's gains
    assert set(lfim_knobs.LFIM_KNOB_NAMES) <= set(r.knobs)

    x_up = _lq()
    x = x_up * 2 - 1
    c = np.asarray(base.prompts([""]))
    z_lq, res, z = _torch_latents(release, x, c)
    opts = dict(color_fix="none")
    plain = r(x_up, infer.RestoreOptions(knobs={"lfim_low": 0.0, "lfim_high": 0.0}, **opts))
    want = _torch_decode(release, z)
    assert rel_error(plain, want) < 1e-4, rel_error(plain, want)
    # The release's default gains: LFIM (checked against NumPy in test_fidesr_blocks) on the PyTorch latents, with
    # the LRRB-refined residual as eps_hat and the LQ pixels in [-1, 1].
    edited = r(x_up, infer.RestoreOptions(**opts))
    want_l = _torch_decode(release, np.asarray(lfim.lfim(z, z_lq, res, x, lfim.LFIMOptions(0.2, high_gain=0.3))))
    assert np.abs(want_l - want).mean() > 1e-3  # LFIM moves the image
    assert rel_error(edited, want_l) < 1e-4, rel_error(edited, want_l)
    # --lfim_radius released: the release's own filters (eager, no compile), from the PyTorch z_L.
    fid = jsr.methods.get("fidesr")
    got = fid.forward(base.models, base.unet_params, src.roles, jnp.asarray(z_lq), c,
                      fid.knob_values({"lfim_radius": "released"}), x_lq=jnp.asarray(x))
    want_r = lfim.lfim(z, z_lq, res, x, lfim.LFIMOptions(radius="released"))
    assert rel_error(got, want_r) < 1e-4 and rel_error(want_r, lfim.lfim(z, z_lq, res, x)) > 1e-4


def test_only_fidesr_files_are_read_as_fidesr(base, release, tmp_path):
    torch = pytest.importorskip("torch")
    fid = jsr.methods.get("fidesr")
    ckpt = torch.load(release["path"], weights_only=True)
    osediff_like = {k: v for k, v in ckpt.items() if k not in ("lrrb_state_dict", "lora_rank_unet")}
    torch.save({**osediff_like, "rank_unet": 8}, tmp_path / "osediff.pkl")
    assert fid.import_release(tmp_path / "osediff.pkl", base) is None
    src = read_source(tmp_path / "osediff.pkl", base)
    assert src.method is None and list(src.roles) == ["unet"]  # a plain LoRA: OSEDiff picks it up
    (tmp_path / "notes.txt").write_text("lrrb_state_dict")
    assert fid.import_release(tmp_path / "notes.txt", base) is None and fid.import_release(tmp_path, base) is None
    widen = {"in_conv.weight": lambda v: torch.cat([v, v], 1), "out_conv.weight": lambda v: torch.cat([v, v]),
             "out_conv.bias": lambda v: torch.cat([v, v])}  # an LRRB for 8-channel latents
    wide = dict(ckpt, lrrb_state_dict={k: widen.get(k, lambda v: v)(v) for k, v in ckpt["lrrb_state_dict"].items()})
    torch.save(wide, tmp_path / "wide.pkl")
    with pytest.raises(ValueError, match="the LRRB takes 16 channels, but the base's latent has 4"):
        fid.import_release(tmp_path / "wide.pkl", base)


# ---------------------------------------------------------------------------------------------------------------
# Training through the loop, export, jsr.infer


def _config():
    from configs import fidesr

    c = fidesr.get_config("tiny")
    c.total_steps = STEPS
    c.optim.lr = 1e-3  # a visible change in 30 steps (the release's 5e-5 is for 200k)
    c.fidesr.daw_warmup, c.fidesr.daw_ramp = 0, 10  # DAW weights the losses from the first step
    c.log.image_every = 0
    c.checkpoint.every = 1000
    c.mesh.num_devices = 1
    return c


def test_daw_weights_each_loss_term(base, monkeypatch):
    """FiDeSR's generator loss evaluated once with its heavy parts replaced (the VAE by 8x8 pooling, the one step
    by a fixed map, LPIPS by a stand-in spatial map, CSD by a recorder): the DAW weight ``w`` (its maps are tested
    in test_fidesr_blocks) multiplies the per-pixel L2 and the LPIPS map, and reaches CSD resized to the latent
    grid with the release's ``+ 1e-6``; total = 1 L2 + 2 LPIPS + 1 CSD. Past the ramp, so ``w`` is not 1."""
    import jsr.metrics.lpips as lpips_mod
    from jsr.methods import fidesr as fidesr_mod
    from jsr.sr import daw, losses
    from jsr.train import loop

    def encode(models, vae_params, x, lora=None, rng=None):
        b, h, w, _ = x.shape
        z = x.reshape(b, h // 8, 8, w // 8, 8, 3).mean((2, 4))
        return jnp.concatenate([z, z[..., :1]], -1)

    def decode(models, vae_params, z):
        return jnp.tanh(jnp.repeat(jnp.repeat(z[..., :3], 8, 1), 8, 2))

    def one_step(models, up, lora, lrrb, z, c):
        return z * 0.5 + 0.1, None

    def lp_map(_, a, b, precision=None):  # [B, H, W, 1], inputs in [0, 1] as LPIPS takes them
        return jnp.mean(jnp.abs(a - b), -1, keepdims=True) + 0.1

    seen = {}

    def csd_rec(z_hat, c, c_neg, rng, **kw):
        seen.update(z_hat=z_hat, **kw)
        return jnp.float32(0.25), {"csd": jnp.float32(0.25)}

    monkeypatch.setattr(lpips_mod, "lpips_spatial", lp_map)  # read when the setup is built
    monkeypatch.setattr(generator, "encode", encode)
    monkeypatch.setattr(generator, "decode", decode)
    monkeypatch.setattr(fidesr_mod, "fidesr_latent", one_step)
    monkeypatch.setattr(losses, "csd_loss", csd_rec)
    config = _config()
    setup_ = loop.build(config, base, jax.random.fold_in(jax.random.key(0), 1))[1]
    rng = np.random.default_rng(4)
    lq = rng.random((2, 64, 64, 3), np.float32)
    hq = np.clip(lq + rng.normal(0, 0.2, lq.shape), 0, 1).astype(np.float32)
    hq[:, 16:32, 16:32] = rng.random((2, 16, 16, 3))  # a detailed patch, so the weight varies
    step = config.fidesr.daw_warmup + config.fidesr.daw_ramp + 5
    batch = {"lq": jnp.asarray(lq), "hq": jnp.asarray(hq), "c": base.prompts(["", ""]),
             "step": jnp.asarray(step, jnp.int32)}
    gen = setup_.phases[0][1][0]
    total, (parts, _) = gen.loss(setup_.params, setup_.frozen, batch, jax.random.key(3), None)
    x_lq, x_hq = batch["lq"] * 2 - 1, batch["hq"] * 2 - 1
    x_sr = decode(None, None, one_step(None, None, None, None, encode(None, None, x_lq), None)[0])
    lp = lp_map(None, x_sr * 0.5 + 0.5, x_hq * 0.5 + 0.5)
    fc = config.fidesr  # the release's DAW flags, as FiDeSR's setup reads them
    w = daw.daw_weight(x_sr, x_hq, lp, step, daw.DAWOptions(
        alpha_hf=fc.daw_alpha, alpha_lf=fc.daw_alpha_lf, warmup=fc.daw_warmup, ramp=fc.daw_ramp, p_perc=fc.daw_p,
        wmax=fc.daw_wmax, lf_smooth=fc.daw_lf_smooth))
    assert float(jnp.std(w)) > 0.05 and abs(float(jnp.mean(w)) - 1) < 1e-5
    np.testing.assert_allclose(float(parts["l2"]), float(jnp.mean(w * jnp.square(x_sr - x_hq))), rtol=1e-5)
    np.testing.assert_allclose(float(parts["lpips"]), float(jnp.mean(w * lp)), rtol=1e-5)
    assert not np.isclose(float(parts["l2"]), float(jnp.mean(jnp.square(x_sr - x_hq))), rtol=1e-3)
    want_map = daw.resize_to_latent(w, (8, 8))
    assert seen["w_eps"] == 1e-6 and seen["weight_map"].shape == (2, 8, 8, 1)
    np.testing.assert_allclose(np.asarray(seen["weight_map"]), np.asarray(want_map), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(total), float(parts["l2"]) + 2 * float(parts["lpips"]) + 0.25, rtol=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from jsr.train import loop

    work = tmp_path_factory.mktemp("fidesr")
    t0 = time.perf_counter()
    out = loop.train(_config(), work)
    print(f"fidesr tiny: {STEPS} loop steps incl. compile in {time.perf_counter() - t0:.0f} s")
    assert out["status"] == "done" and out["step"] == STEPS
    return work, out


def test_trains_exports_and_restores_through_jsr_infer(trained, base, tmp_path):
    torch = pytest.importorskip("torch")
    from tests.test_fidesr_blocks import _torch_lrrb

    work, out = trained
    m = out["metrics"]
    assert all(np.isfinite(v) for v in m.values()) and m["gen/daw_alpha"] == pytest.approx(0.6)
    assert m["gen/daw_w_max"] > 1.0  # the weight is not flat
    manifest = json.loads((work / "export" / "gen" / "jsr_export.json").read_text())
    assert manifest["method"] == "fidesr"
    assert manifest["trees"] == {"unet": {"role": "unet", "kind": "lora", "model": "unet"},
                                 "lrrb": {"role": "lrrb", "kind": "module"}}
    cfg = json.loads((work / "export" / "gen" / "lrrb" / "config.json").read_text())
    assert cfg == LRRBConfig(in_channels=8).to_dict()
    # The LRRB file is the release's state dict: the PyTorch twin loads it strictly.
    from jsr.weights.io import read_safetensors

    state = read_safetensors(work / "export" / "gen" / "lrrb" / "model.safetensors")
    params = jax.device_get(out["state"].params["gen"])
    want = lrrb_to_torch(params["lrrb"])
    assert sorted(state) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(state[k], want[k])
    _torch_lrrb(LRRBConfig()).load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    assert np.abs(params["lrrb"]["out_conv"]["kernel"]).max() > 0  # zero-initialised, trained
    assert max(np.abs(x).max() for x in jax.tree.leaves(params["unet"].factors)) > 0

    src = tmp_path / "in"
    src.mkdir()
    lq8 = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
    Image.fromarray(lq8).save(src / "a.png")
    env = dict(os.environ)  # this session's XLA cache (conftest) and flags: the restorer compiled here is reused
    cmd = [sys.executable, "-m", "jsr.infer", str(src), "--model", "tiny", "--lora", str(work / "export"),
           "--lfim_low", "0.2", "--lfim_high", "0.3", "--color_fix", "none", "--output", str(tmp_path / "o"),
           "--no_progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(f"jsr.infer subprocess: {time.perf_counter() - t0:.0f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with fidesr" in proc.stderr
    cli = np.asarray(Image.open(tmp_path / "o" / "a_sr.png"), np.float32)
    assert cli.shape == (64, 64, 3)
    # The same model in this process: the CLI's image to 8-bit rounding; LFIM off is another image.
    r = load_restorer(base, [str(work / "export")])
    x_up = infer.upscale_bicubic(lq8.astype(np.float32) / 255.0, 4)[None]
    on = r(x_up, infer.RestoreOptions(color_fix="none", knobs={"lfim_low": 0.2, "lfim_high": 0.3}))[0] * 255
    off = r(x_up, infer.RestoreOptions(color_fix="none", knobs={"lfim_low": 0.0, "lfim_high": 0.0}))[0] * 255
    assert np.abs(cli - on).max() <= 1.0
    # LFIM acts through the export: gains 0 are the identity bit for bit, so any clear difference shows it; its
    # size depends on the random tiny weights (0.38 levels on the numpy-drawn tiny model of 2026-11-30).
    assert np.abs(on - off).mean() > 0.1


def test_resume_after_a_crash_gives_the_uninterrupted_parameters(trained, tmp_path):
    """A run that dies after step 15 (last checkpoint 10) and resumes ends with the uninterrupted run's parameters,
    bit for bit: the DAW ramp, the null-prompt draws and the data stream all continue from the checkpoint. Reuses the
    module's compiled step (the loop caches it per config, checkpoint/debug fields aside)."""
    from jsr.train import loop

    _, ref = trained
    run = tmp_path / "run"
    c = _config()
    c.checkpoint.every = 10
    c.debug.crash_after_step = 15
    with pytest.raises(SystemExit, match="simulated crash"):
        loop.train(c, run)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())[-1] == 10
    c.debug.crash_after_step = -1
    done = loop.train(c, run)
    assert done["status"] == "done" and done["step"] == STEPS
    got, want = (jax.tree.map(np.asarray, jax.device_get(o["state"].params)) for o in (done, ref))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_thirty_steps_lower_the_weighted_loss(trained, base):
    """The DAW-weighted generator loss the run descends (L2 + 2 LPIPS + CSD) on the loop's first batch, at a fixed
    key and the DAW weights of step 30: after the run's 30 steps it is lower than at the initial parameters (eager
    evaluation). The total, not the reconstruction part alone: which terms a 30-step run on a random tiny model
    trades is numerics-dependent (with XLA:CPU's YNNPACK fusions off, 2026-11-30: L2 + 2 LPIPS 0.546 -> 0.598
    while CSD fell 1.47 -> 0.00)."""
    from jsr.data import make_iterator
    from jsr.train import loop

    work, out = trained
    c = _config()
    setup = loop.build(c, base, jax.random.fold_in(jax.random.key(c.seed), 1))[1]
    data = c.data.to_dict()
    data["seed"] = c.data.seed or c.seed
    it = make_iterator(data)
    b = next(it)
    it.close()
    batch = {"hq": jnp.asarray(b["hq"]), "lq": jnp.asarray(b["lq"]), "c": base.prompts(list(b["prompt"])),
             "step": jnp.asarray(STEPS, jnp.int32)}
    loss = setup.phases[0][1][0].loss
    key = jax.random.key(123)
    t0 = time.perf_counter()
    total_before, (before, _) = loss(setup.params, setup.frozen, batch, key, None)
    total_after, (after, _) = loss(jax.device_get(out["state"].params), setup.frozen, batch, key, None)
    rec = {k: float(p["l2"] + c.loss.lpips * p["lpips"]) for k, p in (("before", before), ("after", after))}
    print(f"weighted L2 + 2 LPIPS: {rec['before']:.4f} -> {rec['after']:.4f}; CSD {float(before['csd']):.4f} -> "
          f"{float(after['csd']):.4f}; total {float(total_before):.4f} -> {float(total_after):.4f} "
          f"({time.perf_counter() - t0:.0f} s, eager)")
    assert float(total_after) < 0.95 * float(total_before)
    assert np.isfinite(rec["after"])


# ---------------------------------------------------------------------------------------------------------------
# LFIM on every residual-form method


def _lo(params, seed, spec=L.OSEDIFF_UNET):
    lo = L.init(jax.random.key(seed), params, spec)
    leaves, tree = jax.tree.flatten(lo.factors)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return lo.replace(factors=jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, x.shape)
                                                        for x, k in zip(leaves, keys)]))


def test_lfim_knobs_are_shared_and_gains_zero_change_nothing(base):
    names = ("osediff", "fidelity", "pisasr", "ctsr", "fidesr")
    for name in names:
        m = jsr.methods.get(name)
        assert m.uses_image and all(m.knob(k.name) == k for k in lfim_knobs.LFIM_KNOBS), name
        gains = (m.knob_values()["lfim_low"], m.knob_values()["lfim_high"])
        assert gains == ((0.2, 0.3) if name == "fidesr" else (0.0, 0.0)), name

    # Eager (no UNet compile): every forward at gains 0 is its plain composition, bit for bit.
    mo, up = base.models, base.unet_params
    x = jnp.asarray(_lq(3) * 2 - 1)
    c = base.prompts(["a photo"])
    z = generator.encode(mo, base.vae_params, x)
    u, v = _lo(up, 1), _lo(up, 2, L.LoRASpec(L.OSEDIFF_UNET_TARGETS))
    off = {"lfim_low": 0.0, "lfim_high": 0.0}

    def run(name, trees, **knobs):
        m = jsr.methods.get(name)
        return np.asarray(m.forward(mo, up, trees, z, c, m.knob_values({**off, **knobs}), x_lq=x))

    np.testing.assert_array_equal(run("osediff", {"unet": u}), generator.osediff_latent(mo, up, u, z, c))
    np.testing.assert_array_equal(run("pisasr", {"pix": u}, lambda_pix=0.7),
                                  generator.pisasr_latent(mo, up, u, None, z, c, 0.7, 1.0))
    z0 = generator.osediff_latent(mo, up, u, z, c)
    np.testing.assert_array_equal(
        run("ctsr", {"unet": u, "control": v}, t=0.3),
        generator.control_latent(z0, 0.3, c, student_eps=generator.ctsr_student(mo, up, u, v).eps))
    lrrb = jax.tree.map(lambda a: a + 1e-3, init_lrrb_params(jax.random.key(4), LRRBConfig()))  # non-zero output
    plain, res = fidesr_latent(mo, up, u, lrrb, z, c)
    np.testing.assert_array_equal(run("fidesr", {"unet": u, "lrrb": lrrb}), plain)
    # The release gains move it; the implied residual of OSEDiff is z_L - z.
    np.testing.assert_allclose(run("fidesr", {"unet": u, "lrrb": lrrb}, lfim_low=0.2, lfim_high=0.3),
                               lfim.lfim(plain, z, res, x, lfim.LFIMOptions(0.2, high_gain=0.3)), rtol=1e-6)
    np.testing.assert_allclose(run("osediff", {"unet": u}, lfim_high=0.5),
                               lfim.lfim(z0, z, z - z0, x, lfim.LFIMOptions(0.0, high_gain=0.5)), rtol=1e-6)

    # Traced gains (the restorer's jitted forward): gains 0 return z exactly; others equal the static form.
    traced = jax.jit(lambda lo, hi: lfim.lfim_traced(plain, z, res, x, lo, hi))
    np.testing.assert_array_equal(traced(0.0, 0.0), plain)
    for lo, hi in ((0.2, 0.3), (0.2, 0.0), (0.0, 0.4)):
        np.testing.assert_allclose(traced(lo, hi), lfim.lfim(plain, z, res, x, lfim.LFIMOptions(lo, high_gain=hi)),
                                   rtol=1e-6)  # one program vs another: XLA may fuse differently
    with pytest.raises(ValueError, match="needs the LQ image"):
        jsr.methods.get("osediff").forward(mo, up, {"unet": u}, z, c, {"lfim_low": 0.1})


# ---------------------------------------------------------------------------------------------------------------
# The command lines themselves (-m slow: each subprocess compiles its programs)


def _infer_cli(args, out):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "jsr.infer", *map(str, args), "--model", "tiny", "--color_fix", "none", "--output",
           str(out), "--no_progress"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "with fidesr" in p.stderr
    return np.asarray(Image.open(Path(out) / "a_sr.png"), np.float32)


def _lq_folder(folder):
    folder.mkdir()
    lq8 = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
    Image.fromarray(lq8).save(folder / "a.png")
    return infer.upscale_bicubic(lq8.astype(np.float32) / 255.0, 4)[None]


@pytest.mark.slow
def test_train_py_then_jsr_infer(tmp_path):
    """``train.py --config configs/fidesr.py:tiny`` (2 steps) -> export (peft LoRA + LRRB safetensors/JSON +
    manifest) -> ``python -m jsr.infer --lora <export> --lfim_low 0.2 --lfim_high 0.3``, and LFIM's gains move
    the output (gains 0 vs the release's)."""
    work = tmp_path / "w"
    train_py("configs/fidesr.py:tiny", work, "--config.total_steps=2")
    assert (work / "export" / "gen" / "lrrb" / "model.safetensors").is_file()
    assert json.loads((work / "export" / "gen" / "lrrb" / "config.json").read_text())["growth"] > 0
    assert json.loads((work / "export" / "gen" / "jsr_export.json").read_text())["method"] == "fidesr"
    _lq_folder(tmp_path / "in")
    on = _infer_cli([tmp_path / "in", "--lora", work / "export", "--lfim_low", "0.2", "--lfim_high", "0.3"],
                    tmp_path / "on")
    off = _infer_cli([tmp_path / "in", "--lora", work / "export", "--lfim_low", "0", "--lfim_high", "0"],
                     tmp_path / "off")
    assert on.shape == (64, 64, 3) and np.abs(on - off).max() > 0


@pytest.mark.slow
def test_jsr_infer_runs_the_release_file(base, release, tmp_path):
    """``python -m jsr.infer --lora fidesr.pkl`` gives the in-process restorer's image of the release file."""
    x_up = _lq_folder(tmp_path / "in")
    cli = _infer_cli([tmp_path / "in", "--lora", release["path"]], tmp_path / "o")
    r = load_restorer(base, str(release["path"]))
    want = r(x_up, infer.RestoreOptions(color_fix="none"))[0] * 255
    assert cli.shape == (64, 64, 3) and np.abs(cli - want).max() <= 1.0  # to 8-bit rounding
