"""RCOD as a method (jsr.methods.rcod): grouping, the fixed-abar step, degradation-aware VSD timesteps, visual
prompts, the generator loss's wiring, the sharding of the vision encoder, the release checkpoint and ``python -m
jsr.infer``; under ``-m slow``, training through the loop with exact resume and train.py -> export -> jsr.infer.

* Formulas against transcriptions of the release (``RCOD_O/rcod_o_model.py``: ``div_step``, ``alpha_prod_t``,
  ``time_step_group``) and NumPy, eagerly (no UNet compile).
* The release checkpoint: a ``torch.save`` dict laid out like RCOD's (OSEDiff's keys + ``state_dict_proj``), built on
  the embedded tiny SD model with diffusers + peft and a tiny transformers CLIP vision model, restored by
  ``load_restorer`` and compared with the PyTorch composition written here (bilinear antialiased resize of the
  [-1, 1] LQ -> CLIP -> Linear -> UNet at the code -> fixed-abar x0 -> decode); the CLI gives the same image.
* Slow: ``configs/rcod.py:tiny`` through ``jsr.train.loop.train`` (LPIPS off), 4 steps; a run killed after step 3 and
  resumed from step 2 ends bit-identical; its export restored by ``python -m jsr.infer --rcod_code 499`` equals the
  in-process restorer, and code 249 gives another image. And the command lines themselves, VSD and LPIPS on.

Compiled programs in the default run: the restorer's context / encode / forward / decode, once (the CLI subprocess
reads them from the session's XLA cache); everything else runs eagerly.
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
from jsr.methods import common, rcod
from jsr.methods.export import read_source
from jsr.methods.restorer import load_restorer
from jsr.models import lora as L
from jsr.models.clip_vision import clip_preprocess
from jsr.sr import infer
from tests.helpers import add_osediff_unet_adapters, override, randomise_torch, rel_error, train_py, upscaled_lq

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("encoder", "decoder", "others")
STEPS = 4


_lq = upscaled_lq


@pytest.fixture(scope="module")
def base():
    from jsr.sr.base import load_base

    return load_base("", dtype=jnp.float32)


@pytest.fixture(scope="module")
def vision_dir(base):
    from jsr.weights.tiny import default_tiny_clip_vision_dir, write_tiny_clip_vision

    return write_tiny_clip_vision(default_tiny_clip_vision_dir(0), seed=0)


@pytest.fixture(scope="module")
def tower(vision_dir):
    return rcod.load_vision(vision_dir)


# ---------------------------------------------------------------------------------------------------------------
# Formulas


def _release_div_step(cs, n_div):
    """``div_step`` of the release, transcribed: its if/elif chain compares a float32 tensor with Python floats,
    which PyTorch casts to float32 (so 0.7 means float32(0.7))."""
    f = np.float32
    if n_div == 4 and cs < f(0.3):
        return 999
    if cs < f(0.5):
        return 749
    if cs < f(0.7):
        return 499
    return 249


def test_grouping_thresholds_and_codes():
    rng = np.random.default_rng(0)
    cos = np.concatenate([rng.uniform(-1, 1, 200), [0.3, 0.5, 0.7, 0.2999999, 0.4999999, 0.6999999, 1.0, -1.0]])
    cos = cos.astype(np.float32)
    for groups in (3, 4):
        got = np.asarray(rcod.group_codes(jnp.asarray(cos), groups))
        want = [_release_div_step(c, groups) for c in cos]
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="3 or 4 groups"):
        rcod.group_codes(jnp.asarray(cos), 5)

    # Hand-built latent pairs of known similarity: z_LQ = cos(a) u + sin(a) v with u = z_HQ / |z_HQ|, v orthogonal.
    z_hq = rng.normal(size=(1, 8, 8, 4))
    u = z_hq.ravel() / np.linalg.norm(z_hq)
    v = rng.normal(size=u.shape)
    v -= (v @ u) * u
    v /= np.linalg.norm(v)
    targets = np.array([0.95, 0.72, 0.68, 0.52, 0.48, 0.31, 0.29, 0.05, -0.4])
    z_lq = np.stack([(c * u + np.sqrt(1 - c * c) * v).reshape(8, 8, 4) * (1 + i) for i, c in enumerate(targets)])
    z_hq_b = np.repeat(z_hq, len(targets), 0) * 0.3  # the similarity ignores scale
    got = np.asarray(rcod.latent_cosine(jnp.asarray(z_lq, jnp.float32), jnp.asarray(z_hq_b, jnp.float32)))
    np.testing.assert_allclose(got, targets, atol=1e-5)
    np.testing.assert_array_equal(rcod.group_codes(jnp.asarray(got), 3), [249, 249, 499, 499, 749, 749, 749, 749, 749])
    np.testing.assert_array_equal(rcod.group_codes(jnp.asarray(got), 4), [249, 249, 499, 499, 749, 749, 999, 999, 999])


def test_fixed_abar_step(base):
    # The release's constant is SD-2.1's alpha-bar at t = 200, not at the code 249 (DESIGN.md).
    abar = np.asarray(base.models.schedule.alphas_cumprod)
    assert abs(abar[200] - rcod.RELEASE_ABAR) < 1e-4 and abs(abar[249] - 0.6754) < 1e-4
    rng = np.random.default_rng(1)
    z, out = rng.normal(size=(2, 4, 4, 4)), rng.normal(size=(2, 4, 4, 4))
    a = 0.7537
    np.testing.assert_allclose(rcod.fixed_abar_x0(z, out), (z - np.sqrt(1 - a) * out) / np.sqrt(a), rtol=1e-5,
                               atol=1e-6)  # float32 vs float64
    np.testing.assert_allclose(rcod.fixed_abar_x0(z, out, 0.3, "v_prediction"),
                               np.sqrt(0.3) * z - np.sqrt(0.7) * out, rtol=1e-5, atol=1e-6)

    # The step: the UNet at each sample's code and context, then x0 at the same abar for every code (eager: two
    # UNet calls). One latent three times: (context A, 249), (A, 749), (B, 249).
    m, up = base.models, base.unet_params
    zl = jnp.asarray(np.repeat(rng.normal(size=(1, 8, 8, 4)), 3, 0), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)[jnp.asarray([0, 0, 1])]
    codes = jnp.asarray([249.0, 749.0, 249.0])
    got = np.asarray(rcod.rcod_latent(m, up, None, zl, ctx, codes))
    eps = m.unet.apply({"params": up}, zl, codes, ctx)
    assert rel_error(got, (np.asarray(zl) - np.sqrt(1 - a) * np.asarray(eps)) / np.sqrt(a)) < 1e-5
    assert np.abs(got[0] - got[1]).mean() > 1e-3  # the code moves the output
    assert np.abs(got[0] - got[2]).mean() > 1e-3  # so does the context


def test_vsd_timesteps_follow_the_group():
    """Per-sample ranges (``time_step_group``): [20, 980) for codes below 749, [200, 980) from 749 on; uniform
    integers (a fixed-seed statistical check over 40,000 draws)."""
    rng = np.random.default_rng(2)
    codes = rng.choice([249.0, 499.0, 749.0, 999.0], size=40_000)
    t = np.asarray(rcod.vsd_timesteps(jax.random.key(0), jnp.asarray(codes)))
    assert np.all(t == np.round(t))
    low, high = t[codes < 749], t[codes >= 749]
    assert low.min() == 20 and low.max() == 979 and high.min() == 200 and high.max() == 979
    # Uniform: means (lo + hi - 1) / 2 within 4 standard errors, and the share below 200 (180 of 960 values).
    for x, lo in ((low, 20), (high, 200)):
        se = (980 - lo) / np.sqrt(12 * len(x))
        assert abs(x.mean() - (lo + 979) / 2) < 4 * se, (lo, x.mean())
    p = 180 / 960
    assert abs(np.mean(low < 200) - p) < 4 * np.sqrt(p * (1 - p) / len(low))
    np.testing.assert_array_equal(t, rcod.vsd_timesteps(jax.random.key(0), jnp.asarray(codes)))  # seeded


def test_visual_prompt_context_and_zero_image_negative(base, tower):
    m = jsr.methods.get("rcod")
    proj = rcod.init_projection(jax.random.key(3), tower.config.hidden_size, 32)
    trees = {"vision": tower, "proj": proj}
    x = jnp.asarray(np.concatenate([_lq(0), _lq(1)]) * 2 - 1)
    ctx = m.context(base.models, trees, x, None, m.knob_values())
    assert ctx.shape == (2, tower.config.num_positions, 32) == (2, 17, 32)
    # P(CLIP(pre(x))) written out: transformers' module order is tested in test_clip_vision.
    h = tower.module().apply({"params": tower.params}, clip_preprocess((x + 1) / 2, 32, "clip")).last_hidden_state
    assert rel_error(ctx, h @ proj["kernel"] + proj["bias"]) < 1e-5
    rel = m.context(base.models, trees, x, None, m.knob_values({"rcod_preprocess": "release"}))
    assert rel_error(rel, ctx) > 1e-2  # the two preprocessings differ

    # The negative: the same path on an all-zero [-1, 1] image; in release mode CLIP sees exact zeros.
    neg = rcod.zero_image_context(tower, proj, "release")
    h0 = tower.module().apply({"params": tower.params}, jnp.zeros((1, 32, 32, 3))).last_hidden_state
    assert rel_error(neg, h0 @ proj["kernel"] + proj["bias"]) < 1e-5
    for mode in ("clip", "release"):
        big = m.context(base.models, trees, jnp.zeros((1, 64, 48, 3)), None, m.knob_values({"rcod_preprocess": mode}))
        assert rel_error(big, rcod.zero_image_context(tower, proj, mode)) < 1e-5
    assert rel_error(ctx[0], ctx[1]) > 1e-2  # two images, two prompts (their effect on the UNet: test above)
    with pytest.raises(ValueError, match="--lora vision="):
        m.context(base.models, {"proj": proj}, x, None, m.knob_values())


def test_projection_masking():
    """``rcod.train_projection=False`` (the release's optimizer never holds the projection): its updates are zero,
    AdamW's weight decay included, while the LoRAs move."""
    from configs import rcod as cfg

    c = cfg.get_config("tiny")
    conv = {"a": jnp.ones((3, 3, 4, 2)), "b": jnp.ones((1, 1, 2, 8))}
    gen = {"unet": L.LoRA(factors={"conv_in": conv}, overrides={"conv_in": {"bias": jnp.ones((8,))}}),
           "proj": {"kernel": jnp.ones((6, 4)), "bias": jnp.ones((4,))}}
    grads = jax.tree.map(jnp.ones_like, gen)
    for train, moved in ((False, False), (True, True)):
        opt = rcod._optimizer(c, train)
        upd, _ = opt.update(grads, opt.init(gen), gen)
        assert all(np.abs(np.asarray(u)).max() > 0 for u in jax.tree.leaves(upd["unet"]))
        assert all((np.abs(np.asarray(u)).max() > 0) == moved for u in jax.tree.leaves(upd["proj"])), train


@pytest.fixture(scope="module")
def setup_(base):
    """The training setup of ``_config()`` as the loop builds it (seed 0)."""
    from jsr.train import loop

    return loop.build(_config(), base, jax.random.fold_in(jax.random.key(0), 1))[1]


@pytest.mark.parametrize("vsd_prompt", ["text", "visual"])
def test_generator_loss_wiring(base, setup_, monkeypatch, vsd_prompt):
    """The generator's loss evaluated once with its heavy parts replaced by recorders (the VAE by 8x8 pooling, the
    UNet step, VSD and the fake score's loss: their math is tested above and in jsr.sr): the UNet's context is the
    LQ's visual prompt; each sample's code comes from the latent grouping of its LQ and HQ latents and chooses its
    VSD range. ``rcod.vsd_prompt="text"`` (default, the release's reading): VSD and the fake score see the text
    prompt, VSD the text negative. ``"visual"`` (the paper's reading): both see the visual prompt and VSD's
    negative is the projected CLIP tokens of an all-zero image."""
    if vsd_prompt == "visual":
        from jsr.train import loop

        setup_ = loop.build(_config(**{"rcod.vsd_prompt": "visual"}), base,
                            jax.random.fold_in(jax.random.key(0), 1))[1]
    seen = {}
    real_t = rcod.vsd_timesteps

    def encode(models, vae_params, x, lora=None, rng=None):  # pooled pixels as a 4-channel latent
        assert lora is setup_.params["gen"]["vae"] and rng is not None  # the LoRA'd encoder, posterior samples
        b, h, w, _ = x.shape
        z = x.reshape(b, h // 8, 8, w // 8, 8, 3).mean((2, 4))
        return jnp.concatenate([z, z[..., :1]], -1)

    def decode(models, vae_params, z):
        return jnp.repeat(jnp.repeat(z[..., :3], 8, 1), 8, 2)

    def latent_rec(models, up, lora, z, ctx, code, abar):
        seen.update(ctx=ctx, code=code, abar=abar, lora=lora)
        return z * 0.5

    def t_rec(rng, codes, *args):
        seen["t_args"] = (codes, args)
        seen["t"] = real_t(rng, codes, *args)
        return seen["t"]

    def vsd_rec(z_hat, c, c_neg, rng, **kw):
        seen["vsd"] = (c, c_neg, kw["t"], kw["cfg_scale"])
        return jnp.float32(0.25), {"vsd": jnp.float32(0.25)}

    def fake_rec(z, c, rng, **kw):
        seen["fake"] = (z, c)
        return jnp.float32(0.5), {"fake_score": jnp.float32(0.5)}

    monkeypatch.setattr(rcod.generator, "encode", encode)
    monkeypatch.setattr(rcod.generator, "decode", decode)
    monkeypatch.setattr(rcod, "rcod_latent", latent_rec)
    monkeypatch.setattr(rcod, "vsd_timesteps", t_rec)
    monkeypatch.setattr(common.losses, "vsd_loss", vsd_rec)
    monkeypatch.setattr(common.losses, "fake_score_loss", fake_rec)
    # Pooled latents: sample 0's HQ is its LQ (cos 1 -> 249); sample 1's the LQ mirrored around 0.5 (cos -1 -> 749).
    lq = np.concatenate([_lq(0), _lq(1)])
    hq = np.stack([lq[0], 1 - lq[1]])
    batch = {"lq": jnp.asarray(lq), "hq": jnp.asarray(hq), "c": base.prompts(["a photo", "a cat"]),
             "step": jnp.asarray(0, jnp.int32)}
    gen, fake = setup_.phases[0][1]
    assert (gen.group, fake.group) == ("gen", "fake")
    total, (parts, carry) = gen.loss(setup_.params, setup_.frozen, batch, jax.random.key(5), None)
    assert np.isclose(float(total), float(parts["rec"]) + 0.25)
    np.testing.assert_allclose([float(parts["cos"]), float(parts["code"])], [0.0, 499.0], atol=1e-6)
    want_ctx = rcod.visual_context(setup_.frozen["vision"], setup_.params["gen"]["proj"], batch["lq"] * 2 - 1,
                                   "release")
    assert rel_error(seen["ctx"], want_ctx) < 1e-6 and seen["abar"] == rcod.RELEASE_ABAR
    assert seen["lora"] is setup_.params["gen"]["unet"]
    np.testing.assert_array_equal(seen["code"], [249.0, 749.0])
    codes, args = seen["t_args"]
    np.testing.assert_array_equal(codes, [249.0, 749.0])
    assert args == (20, 200, 980, 749)
    c, c_neg, t, cfg = seen["vsd"]
    np.testing.assert_array_equal(t, seen["t"])
    assert cfg == 7.5
    if vsd_prompt == "text":
        np.testing.assert_array_equal(c, batch["c"])
        np.testing.assert_array_equal(c_neg, setup_.frozen["c_neg"])
        want_c = batch["c"]
    else:
        assert rel_error(c, want_ctx) < 1e-6 and c.shape[0] == 2
        s = setup_.frozen["vision"].config.image_size
        zero = rcod.visual_context(setup_.frozen["vision"], setup_.params["gen"]["proj"],
                                   jnp.zeros((1, s, s, 3), jnp.float32), "release")
        assert c_neg.shape[0] == 1 and rel_error(c_neg, zero) < 1e-6
        assert float(jnp.abs(c_neg - c[:1]).max()) > 1e-3  # the zero image is not the LQ
        want_c = c
    fake.loss(setup_.params, setup_.frozen, batch, jax.random.key(6), carry)
    np.testing.assert_array_equal(seen["fake"][1], want_c)
    np.testing.assert_array_equal(seen["fake"][0], carry["z_hat"])


def test_vision_encoder_is_sharded_like_the_base(base, setup_):
    """The frozen vision encoder under the base's rules (fsdp on its width, tensor on heads/MLP); the trainable trees
    (the projection with the LoRAs) are replicated by the loop like every trainable tree."""
    from jsr.train import loop, sharding

    assert setup_.requires["vision"].endswith("tiny-clip-vision-0")
    assert setup_.knob_defaults == {"rcod_preprocess": "release", "rcod_abar": rcod.RELEASE_ABAR}
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sh = loop._frozen_shardings(setup_.frozen, base, mesh, True, axes=setup_.frozen_axes)
    assert isinstance(sh["vision"], rcod.VisionTower)
    specs = [s.spec for s in jax.tree.leaves(sh["vision"])]
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
    placed = jax.device_put(setup_.frozen["vision"], sh["vision"])
    q = placed.params["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    unsharded = loop._frozen_shardings(setup_.frozen, base, mesh, False, axes=setup_.frozen_axes)
    assert all(s.spec == jax.sharding.PartitionSpec() for s in jax.tree.leaves(unsharded["vision"]))


# ---------------------------------------------------------------------------------------------------------------
# The release checkpoint


@pytest.fixture(scope="module")
def release(base, vision_dir, tmp_path_factory):
    """RCOD's checkpoint layout on the tiny model, plus the PyTorch modules it came from."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from tests.test_peft_io import _osediff_vae_targets, _perturb_lora

    unet = diffusers.UNet2DConditionModel.from_pretrained(base.path / "unet").eval()
    lists = add_osediff_unet_adapters(unet, rank=4)
    _perturb_lora(unet, 5, also=("conv_in",))  # B non-zero; conv_in fully trained
    vae = diffusers.AutoencoderKL.from_pretrained(base.path / "vae").eval()
    vae_targets = _osediff_vae_targets([n for n, _ in vae.named_parameters()])
    vae.add_adapter(peft.LoraConfig(r=4, init_lora_weights="gaussian", target_modules=vae_targets),
                    adapter_name="default_encoder")
    vae.set_adapter(["default_encoder"])
    _perturb_lora(vae, 6)
    clip = transformers.CLIPVisionModel.from_pretrained(vision_dir).eval()
    proj = randomise_torch(torch.nn.Linear(clip.config.hidden_size, unet.config.cross_attention_dim), seed=7).eval()
    ckpt = {"vae_lora_encoder_modules": vae_targets, **{f"unet_lora_{g}_modules": lists[g] for g in GROUPS},
            "rank_unet": 4, "rank_vae": 4,
            "state_dict_unet": {k: v.detach().clone() for k, v in unet.state_dict().items()
                                if "lora" in k or "conv_in" in k},
            "state_dict_vae": {k: v.detach().clone() for k, v in vae.state_dict().items() if "lora" in k},
            "state_dict_proj": {k: v.detach().clone() for k, v in proj.state_dict().items()}}
    path = tmp_path_factory.mktemp("release") / "rcod_o.pkl"
    torch.save(ckpt, path)
    return dict(path=path, unet=unet, vae=vae, clip=clip, proj=proj, ckpt=ckpt)


def _torch_restore(rel, x, code):
    """The release's forward in PyTorch (``OSEDiff_test.forward`` with the posterior mean): images [B, H, W, 3]
    in [-1, 1] -> [0, 1] NHWC numpy (as the restorer returns them, colour fix off)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        s = rel["clip"].config.image_size
        # torchvision's T.Resize((224, 224)) on a tensor: bilinear, antialiased, half-pixel centres.
        pixels = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        ctx = rel["proj"](rel["clip"](pixels).last_hidden_state)
        sf = rel["vae"].config.scaling_factor
        z = rel["vae"].encode(x).latent_dist.mean * sf
        eps = rel["unet"](z, torch.tensor([code]), encoder_hidden_states=ctx).sample
        a = torch.tensor(0.7537)
        x0 = (z - (1 - a) ** 0.5 * eps) / a ** 0.5
        out = rel["vae"].decode(x0 / sf).sample.clamp(-1, 1)
    return (out.numpy().transpose(0, 2, 3, 1) + 1) / 2


def test_release_checkpoint_matches_a_torch_composition(base, release, vision_dir):
    src = read_source(release["path"], base)
    assert src.method == "rcod" and sorted(src.roles) == ["proj", "unet", "vae"]
    assert src.knobs == {"rcod_preprocess": "release"}
    lo = src.roles["unet"]
    assert (lo.rank, lo.alpha) == (4, 8.0) and sorted(lo.overrides["conv_in"]) == ["bias", "kernel"]
    np.testing.assert_array_equal(src.roles["proj"]["kernel"], release["proj"].weight.detach().numpy().T)
    r = load_restorer(base, [str(release["path"]), f"vision={vision_dir}"])
    assert r.method == "rcod" and r.label == "RCOD" and r.context is not None
    assert r.knob_defaults["rcod_preprocess"] == "release" and r.knob_defaults["rcod_code"] == 249
    x_up = _lq()
    opts = infer.RestoreOptions(color_fix="none")
    outs = {}
    for code in (499, 249):
        got = r(x_up, opts.with_knobs(rcod_code=code))
        want = _torch_restore(release, x_up * 2 - 1, code)
        assert rel_error(got, want) < 1e-4, (code, rel_error(got, want))
        outs[code] = got
    assert np.abs(outs[499] - outs[249]).mean() > 1e-3  # the code moves the image
    with pytest.raises(ValueError, match="needs the vision tree"):
        load_restorer(_real_view(base), [str(release["path"])])


def _real_view(base):
    """The same base, seen as real weights (where missing trees are errors, not random stand-ins)."""
    import dataclasses

    return dataclasses.replace(base, random_weights=False)


def test_only_rcod_files_are_read_as_rcod(base, release, tmp_path):
    torch = pytest.importorskip("torch")
    m = jsr.methods.get("rcod")
    osediff_like = {k: v for k, v in release["ckpt"].items() if k != "state_dict_proj"}
    torch.save(osediff_like, tmp_path / "osediff.pkl")
    assert m.import_release(tmp_path / "osediff.pkl", base) is None
    src = read_source(tmp_path / "osediff.pkl", base)
    assert src.method is None and sorted(src.roles) == ["unet", "vae"]  # OSEDiff picks it up
    assert m.import_release(tmp_path, base) is None  # a folder that is not CLIP
    wide = dict(release["ckpt"], state_dict_proj={"weight": torch.zeros(48, 48), "bias": torch.zeros(48)})
    torch.save(wide, tmp_path / "wide.pkl")
    with pytest.raises(ValueError, match="outputs 48 channels, but the base's UNet cross-attention takes 32"):
        m.import_release(tmp_path / "wide.pkl", base)


def _run_cli(args, out, env=None, model="tiny"):
    cmd = [sys.executable, "-m", "jsr.infer", *map(str, args), "--model", str(model), "--color_fix", "none",
           "--output", str(out), "--no_progress"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env or dict(os.environ), capture_output=True, text=True, timeout=900)
    print(f"jsr.infer subprocess: {time.perf_counter() - t0:.0f} s")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with rcod" in proc.stderr
    return proc


def _lq_file(folder):
    folder.mkdir()
    lq8 = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
    Image.fromarray(lq8).save(folder / "a.png")
    return infer.upscale_bicubic(lq8.astype(np.float32) / 255.0, 4)[None]


def test_jsr_infer_runs_the_release_file(base, release, vision_dir, tmp_path):
    """``python -m jsr.infer --lora rcod_o.pkl --lora vision=DIR --rcod_code 499`` gives the in-process restorer's
    image (the programs the release test compiled, through the session's XLA cache), on an SD folder without
    ``text_encoder/`` and ``tokenizer/``: RCOD's context is the visual prompt, no text encoder loads."""
    x_up = _lq_file(tmp_path / "in")
    textless = tmp_path / "sd-without-text"
    textless.mkdir()
    for part in ("unet", "vae", "scheduler", "model_index.json"):
        (textless / part).symlink_to(base.path / part)
    _run_cli([tmp_path / "in", "--lora", release["path"], "--lora", f"vision={vision_dir}", "--rcod_code", "499"],
             tmp_path / "o", model=textless)
    cli = np.asarray(Image.open(tmp_path / "o" / "a_sr.png"), np.float32)
    from jsr.sr.base import load_base

    textless_base = load_base(textless)
    r = load_restorer(textless_base, [str(release["path"]), f"vision={vision_dir}"])
    want = r(x_up, infer.RestoreOptions(color_fix="none", knobs={"rcod_code": 499}))[0] * 255
    assert not textless_base.prompts.loaded
    with pytest.raises(FileNotFoundError, match="no text_encoder/ or tokenizer/"):
        textless_base.prompts([""])  # a method that needs the text says which folders are missing
    assert cli.shape == (64, 64, 3) and np.abs(cli - want).max() <= 1.0  # to 8-bit rounding


# ---------------------------------------------------------------------------------------------------------------
# Training through the loop, resume, export, jsr.infer (-m slow: the train step's compile)


def _config(**over):
    from configs import rcod as cfg

    c = cfg.get_config("tiny")
    c.total_steps = STEPS
    c.loss.lpips = 0.0  # LPIPS is the shared reconstruction loss (tested elsewhere); off, the step compiles faster
    c.log.image_every = 0
    c.checkpoint.every = 2
    c.mesh.num_devices = 1
    # The release's preprocessing: the restorer's programs (whose static knobs include it) are then the ones the
    # release test compiled; the clip mode's context is checked eagerly above.
    c.rcod.preprocess = "release"
    return override(c, over)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from jsr.train import loop

    work = tmp_path_factory.mktemp("rcod")
    t0 = time.perf_counter()
    out = loop.train(_config(), work)
    print(f"rcod tiny: {STEPS} loop steps incl. compile in {time.perf_counter() - t0:.0f} s")
    assert out["status"] == "done" and out["step"] == STEPS
    return work, out


def _params(summary):
    return jax.tree.map(np.asarray, jax.device_get(summary["state"].params))


@pytest.mark.slow  # the train step's compile (~2 min on an idle 2-core CPU) is over this file's default budget
def test_kill_and_resume_is_bit_exact(trained, tmp_path):
    from jsr.train import loop

    _, ref = trained
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match="simulated crash"):
        loop.train(_config(**{"debug.crash_after_step": 3}), run)  # dies after step 3; last checkpoint is 2
    done = loop.train(_config(), run)
    assert done["status"] == "done" and done["step"] == STEPS
    jax.tree.map(np.testing.assert_array_equal, _params(done), _params(ref))


@pytest.mark.slow
def test_trains_exports_and_restores_through_jsr_infer(trained, base, setup_, tmp_path):
    torch = pytest.importorskip("torch")
    from jsr.weights.io import read_safetensors

    work, out = trained
    m = out["metrics"]
    for k in ("gen/rec_l2", "gen/cos", "gen/code", "gen/low_code_frac", "gen/vsd", "gen/vsd_t", "fake/fake_score"):
        assert np.isfinite(m[k]), k
    assert 249 <= m["gen/code"] <= 749 and -1 <= m["gen/cos"] <= 1
    manifest = json.loads((work / "export" / "gen" / "jsr_export.json").read_text())
    assert manifest["method"] == "rcod"
    assert manifest["trees"] == {"unet": {"role": "unet", "kind": "lora", "model": "unet"},
                                 "vae": {"role": "vae", "kind": "lora", "model": "vae"},
                                 "proj": {"role": "proj", "kind": "module"}}
    assert manifest["requires"]["vision"].endswith("tiny-clip-vision-0")
    assert manifest["knobs"] == {"rcod_preprocess": "release", "rcod_abar": rcod.RELEASE_ABAR}
    # The projection file is the release's state_dict_proj: a torch Linear loads it strictly.
    state = read_safetensors(work / "export" / "gen" / "proj" / "model.safetensors")
    trained_proj = _params(out)["gen"]["proj"]
    np.testing.assert_array_equal(state["weight"], trained_proj["kernel"].T)
    torch.nn.Linear(48, 32).load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    assert not (work / "export" / "fake").exists()  # the fake score is a training device, not a result
    init = setup_.params["gen"]["proj"]
    assert np.abs(trained_proj["kernel"] - np.asarray(init["kernel"])).max() > 0  # it trained

    x_up = _lq_file(tmp_path / "in")
    r = load_restorer(base, [str(work / "export")])  # compiled first, in this process
    assert r.method == "rcod" and r.knob_defaults["rcod_preprocess"] == "release"  # the run's, from the manifest
    at499 = r(x_up, infer.RestoreOptions(color_fix="none", knobs={"rcod_code": 499}))[0] * 255
    at249 = r(x_up, infer.RestoreOptions(color_fix="none"))[0] * 255
    _run_cli([tmp_path / "in", "--lora", work / "export", "--rcod_code", "499"], tmp_path / "o")
    cli = np.asarray(Image.open(tmp_path / "o" / "a_sr.png"), np.float32)
    assert cli.shape == (64, 64, 3)
    assert np.abs(cli - at499).max() <= 1.0  # the CLI's image, to 8-bit rounding
    assert np.abs(at499 - at249).mean() > 0.5  # two codes, two images


@pytest.mark.slow
def test_train_py_then_jsr_infer(tmp_path):
    """The command lines themselves: ``train.py --config configs/rcod.py:tiny`` (2 steps) -> export ->
    ``python -m jsr.infer --lora <export> --rcod_code 499``."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    work = tmp_path / "w"
    train_py("configs/rcod.py:tiny", work, "--config.total_steps=2")
    assert (work / "export" / "gen" / "proj" / "model.safetensors").is_file()
    assert not (work / "export" / "fake").exists()  # the fake score is a training device, not a result
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)).save(src / "a.png")
    outs = []
    for code in ("499", "249"):
        cmd = [sys.executable, "-m", "jsr.infer", str(src), "--model", "tiny", "--lora", str(work / "export"),
               "--rcod_code", code, "--output", str(tmp_path / code), "--no_progress"]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append(np.asarray(Image.open(tmp_path / code / "a_sr.png"), np.float32))
    assert np.abs(outs[0] - outs[1]).mean() > 0.5
