"""CODSR as a method (jsr.methods.codsr).

* The release checkpoint: a ``torch.save`` dict laid out like CODSR's public ``codsr.pkl`` (stage 2: the stage-1
  adapters ``default_<g>`` and the alignment adapters ``default_<g>_alignment`` in one ``state_dict_unet`` with
  ``conv_in``/``conv_out`` base tensors, ``*_default``/``*_sam`` target lists, a VAE LoRA, ``state_dict_sft``), built
  here on the embedded tiny SD model with diffusers + peft, is read by ``read_source``/``load_restorer``; the
  restored image equals a PyTorch composition written here (VAE mean -> region-weighted seeded noise at t = 100 ->
  UNet with both adapter sets and the SFT applied through a forward hook on ``conv_in`` -> z_L + k (eps_a - eps^)
  -> VAE decode). The stage-1 layout (no alignment adapters) reads too.
* Knobs: ``codsr_t`` and ``seed`` move the output; the same seed reproduces it.
* The discriminator update lowers its loss on a fixed batch (stand-in CLIP backbone, eager).

Compiled programs: the restorer's encode / forward / decode (one each); the rest runs eagerly.
"""
import numpy as np
import jax
import jax.numpy as jnp
import pytest

import jsr.methods
import jsr.methods.codsr  # noqa: F401 - registers the method
from jsr.methods.export import read_source
from jsr.methods.restorer import load_restorer
from jsr.sr import infer
from tests.helpers import add_osediff_unet_adapters, randomise_torch, rel_error

GROUPS = ("encoder", "decoder", "others")
RANK = 8


def _lq(seed=0, size=16):
    """An upscaled LQ batch [1, 4 size, 4 size, 3] in [0, 1] with flat and textured parts (so the region weight
    takes several values)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (size, size, 3)).astype(np.float32) / 255.0
    img[:, : size // 2] = 0.5
    return infer.upscale_bicubic(img, 4)[None]


@pytest.fixture(scope="module")
def base():
    from jsr.sr.base import load_base

    return load_base("", dtype=jnp.float32)


def _vae_targets(names):
    """OSEDiff's VAE rule (CODSR's initialize_vae): no bias/norm; a pattern inside the encoder, or quant_conv."""
    from jsr.models import lora as L

    return sorted({n.removesuffix(".weight") for n in names if not ("bias" in n or "norm" in n) and (
        (any(p in n for p in L.VAE_PATTERNS) and "encoder" in n) or ("quant_conv" in n and "post_quant_conv" not in n))})


def _perturb(model, seed, keep=lambda n: True):
    """Random non-zero LoRA factors (B too) on the LoRA tensors ``keep`` selects."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and keep(n):
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 / np.sqrt(p[0].numel())))


@pytest.fixture(scope="module")
def release(base, tmp_path_factory):
    """CODSR's stage-2 checkpoint on the tiny model, plus the PyTorch modules it came from."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    from tests.test_codsr_blocks import _torch_sft

    unet = diffusers.UNet2DConditionModel.from_pretrained(base.path / "unet").eval()
    lists = add_osediff_unet_adapters(unet, rank=RANK, activate=False)
    add_osediff_unet_adapters(unet, rank=RANK, suffix="_alignment", activate=False, lists=lists)
    _perturb(unet, 5, keep=lambda n: "alignment" not in n)
    # Stage 2 trains only the alignment adapters' attn2 layers; the others keep B = 0 (their gaussian A stays).
    _perturb(unet, 6, keep=lambda n: "alignment" in n and "attn2" in n)
    unet.set_adapter([f"default_{g}{s}" for s in ("", "_alignment") for g in GROUPS])
    vae = diffusers.AutoencoderKL.from_pretrained(base.path / "vae").eval()
    vae_targets = _vae_targets([n for n, _ in vae.named_parameters()])
    vae.add_adapter(peft.LoraConfig(r=4, init_lora_weights="gaussian", target_modules=vae_targets),
                    adapter_name="default_encoder")
    _perturb(vae, 7)
    width = unet.config.block_out_channels[0]
    sft = randomise_torch(_torch_sft(192, width), seed=8).eval()  # its zero-initialised convs too
    state_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()
                  if "lora" in k or "conv_in" in k or "conv_out" in k}  # CODSR_gen_Stage2.save_model's filter
    assert any("base_layer" in k for k in state_unet)
    ckpt = {"vae_lora_encoder_modules": vae_targets, "rank_vae": 4, "rank_unet": RANK,
            **{f"unet_lora_{g}_modules_default": lists[g] for g in GROUPS},
            **{f"unet_lora_{g}_modules_sam": lists[g] for g in GROUPS},
            "state_dict_unet": state_unet,
            "state_dict_vae": {k: v.detach().clone() for k, v in vae.state_dict().items() if "lora" in k},
            "state_dict_sft": sft.state_dict()}
    folder = tmp_path_factory.mktemp("codsr-release")
    torch.save(ckpt, folder / "codsr.pkl")
    # The stage-1 layout: OSEDiff's lists, the default adapters only.
    s1 = {k: v for k, v in ckpt.items() if not k.startswith("unet_lora_")}
    s1.update({f"unet_lora_{g}_modules": lists[g] for g in GROUPS})
    s1["state_dict_unet"] = {k: v for k, v in state_unet.items() if "lora" in k and "alignment" not in k}
    torch.save(s1, folder / "codsr_stage1.pkl")
    sched = diffusers.DDPMScheduler.from_pretrained(base.path / "scheduler")
    return dict(path=folder / "codsr.pkl", stage1=folder / "codsr_stage1.pkl", unet=unet, vae=vae, sft=sft,
                abar=sched.alphas_cumprod.double().numpy())


def _torch_weight(x):
    """The release's GraygradToWeight_Patchwise_Sobel (inference form) on x [B, 3, H, W] in [-1, 1], in torch."""
    import torch
    import torch.nn.functional as F

    g = x * 0.5 + 0.5
    gray = (0.299 * g[:, 0] + 0.587 * g[:, 1] + 0.114 * g[:, 2])[:, None]
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])[None, None]
    p = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    grad = F.conv2d(p, kx).abs() + F.conv2d(p, kx.transpose(2, 3)).abs()
    h, w = grad.shape[-2:]
    grad = F.pad(grad, (0, -w % 16, 0, -h % 16), mode="replicate")
    m = F.avg_pool2d(grad, 16, 16)
    wt = torch.where(m <= 0.15, torch.full_like(m, 0.3), torch.where(m <= 0.25, 7.0 * (m - 0.15) + 0.3,
                                                                      torch.ones_like(m)))
    return wt.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, : h // 8, : w // 8]


def _torch_restore(rel, x, c, noise, t=100):
    """The release's CODSR_test.forward in PyTorch (VAE posterior mean instead of a sample): [0, 1] NHWC numpy."""
    import torch

    unet = rel["unet"]
    with torch.no_grad():
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        sf = rel["vae"].config.scaling_factor
        z = rel["vae"].encode(xt).latent_dist.mean * sf
        abar = float(rel["abar"][t])
        k = (1 - abar) ** 0.5 / abar ** 0.5
        eps_a = torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))) * _torch_weight(xt)
        z_t = abar ** 0.5 * z + (1 - abar) ** 0.5 * eps_a
        scale, shift = rel["sft"](torch.nn.PixelUnshuffle(8)(xt))
        hook = unet.conv_in.register_forward_hook(lambda mod, inp, out: out * (1 + scale / k) + shift / k)
        try:
            eps = unet(z_t, torch.tensor([t]), encoder_hidden_states=torch.from_numpy(np.asarray(c))).sample
        finally:
            hook.remove()
        z_hat = z + k * (eps_a - eps)
        out = rel["vae"].decode(z_hat / sf).sample.clamp(-1, 1)  # the VAE LoRA is on the encoder only
    return (out.numpy().transpose(0, 2, 3, 1) + 1) / 2


def test_release_checkpoint_matches_a_torch_composition(base, release):
    from jsr.methods.codsr import inference_noise

    src = read_source(release["path"], base)
    assert src.method == "codsr" and sorted(src.roles) == ["align", "sft", "unet", "vae"]
    u, a = src.roles["unet"], src.roles["align"]
    assert (u.rank, u.alpha, u.overrides, a.rank, a.alpha) == (RANK, 8.0, {}, RANK, 8.0)
    r = load_restorer(base, [str(release["path"])])
    assert r.method == "codsr" and r.uses_image and r.label == "CODSR"
    assert set(r.knobs) == {"codsr_t", "seed"} and r.knob_defaults["codsr_t"] == 100

    x_up = _lq()
    x = x_up * 2 - 1
    c = np.asarray(base.prompts([""]))
    opts = dict(color_fix="none")
    got = r(x_up, infer.RestoreOptions(**opts))
    noise = np.asarray(inference_noise(0, (1, 8, 8, 4)))
    want = _torch_restore(release, x, c, noise)
    assert rel_error(got, want) < 1e-4, rel_error(got, want)
    # The knobs: the same seed reproduces, another seed or timestep moves the image (and matches the release's).
    np.testing.assert_array_equal(r(x_up, infer.RestoreOptions(**opts)), got)
    other = r(x_up, infer.RestoreOptions(knobs={"seed": 3}, **opts))
    assert np.abs(other - got).mean() > 1e-4
    later = r(x_up, infer.RestoreOptions(knobs={"codsr_t": 200}, **opts))
    want_t = _torch_restore(release, x, c, noise, t=200)
    assert rel_error(later, want_t) < 1e-4 and np.abs(later - got).mean() > 1e-4

    # The stage-1 file: the same stage-1 LoRAs and SFT, no alignment LoRA (the forward above without it; an
    # eager check against PyTorch, no second compile).
    src1 = read_source(release["stage1"], base)
    assert src1.method == "codsr" and sorted(src1.roles) == ["sft", "unet", "vae"]
    for role in ("unet", "vae", "sft"):
        jax.tree.map(np.testing.assert_array_equal, src1.roles[role], src.roles[role])


def test_only_codsr_files_are_read_as_codsr(base, release, tmp_path):
    torch = pytest.importorskip("torch")
    m = jsr.methods.get("codsr")
    ckpt = torch.load(release["stage1"], weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "state_dict_sft"}, tmp_path / "osediff_like.pkl")
    assert m.import_release(tmp_path / "osediff_like.pkl", base) is None
    assert read_source(tmp_path / "osediff_like.pkl", base).method is None  # a plain OSEDiff-form LoRA
    def widen(k, v):  # an SFT for a UNet twice as wide
        if k.endswith("bias"):
            return torch.cat([v, v])
        v = torch.cat([v, v], 0)
        return torch.cat([v, v], 1) if "conv1" in k else v

    wide = dict(ckpt, state_dict_sft={k: widen(k, v) for k, v in ckpt["state_dict_sft"].items()})
    torch.save(wide, tmp_path / "wide.pkl")
    with pytest.raises(ValueError, match="another base model"):
        m.import_release(tmp_path / "wide.pkl", base)


# ---------------------------------------------------------------------------------------------------------------
# The discriminator


def test_discriminator_update_lowers_its_loss_on_a_fixed_batch():
    """The ``disc`` update of stage 1 (hinge loss on the stand-in CLIP backbone's multi-level heads): a few AdamW
    steps on fixed real/fake images lower it; the generator's adversarial loss moves the other way."""
    import optax

    from jsr.methods.codsr import STANDIN_BACKBONE
    from jsr.models.clip_vision import CLIPVisionConfig, CLIPVisionModel
    from jsr.models.common import init_params
    from jsr.models.vision_disc import default_layers, discriminator_logits, init_heads_params
    from jsr.sr import gan

    backbone = CLIPVisionModel(CLIPVisionConfig(**STANDIN_BACKBONE))
    bparams = init_params(backbone, jax.random.key(0))
    layers = default_layers(backbone.config.num_hidden_layers)
    assert layers == (1, 2, 3, 4)
    heads = init_heads_params(jax.random.key(1), backbone.config, layers, hidden=16)
    rng = np.random.default_rng(0)
    real = jnp.asarray(np.clip(rng.normal(0.2, 0.3, (4, 64, 64, 3)), -1, 1), jnp.float32)
    fake = jnp.asarray(np.clip(rng.normal(-0.2, 0.6, (4, 64, 64, 3)), -1, 1), jnp.float32)

    @jax.jit
    def losses(h):
        logits = lambda x: discriminator_logits(backbone, bparams, h, x, layers, 16)  # noqa: E731
        lr, lf = logits(real), logits(fake)
        return gan.discriminator_loss(lr, lf), gan.generator_loss(lf), lr

    opt = optax.adamw(1e-3)

    @jax.jit
    def train(h):
        def body(carry, _):
            h, s = carry
            g = jax.grad(lambda h_: losses(h_)[0])(h)
            u, s = opt.update(g, s, h)
            return (optax.apply_updates(h, u), s), None

        return jax.lax.scan(body, (h, opt.init(h)), None, length=20)[0][0]

    d0, g0, logits = losses(heads)
    assert [x.shape for x in logits] == [(4, 4, 4)] * 4
    d1, g1, _ = losses(train(heads))
    assert float(d1) < 0.8 * float(d0), (float(d0), float(d1))
    assert float(g1) > float(g0)  # a better discriminator makes the generator's term larger


def test_discriminator_backbone_is_sharded_like_the_base_and_gives_the_same_logits(base):
    """Stage 1's frozen ViT (``TrainSetup.frozen_axes``) takes the base's fsdp/tensor rules on a 2x2x2 mesh, the
    trainable heads and SFT stay replicated (the loop replicates every trainable tree), and the discriminator's
    logits on the sharded backbone equal the single-device ones (f32; 1e-5 relative: only reduction order can
    differ across shards)."""
    from configs import codsr as codsr_config
    from jsr.methods.codsr import STANDIN_BACKBONE
    from jsr.models.clip_vision import CLIPVisionConfig, CLIPVisionModel
    from jsr.models.vision_disc import default_layers, discriminator_logits
    from jsr.train import loop, sharding

    c = codsr_config.get_config("stage1-tiny")
    c.loss.lpips = 0.0
    setup = jsr.methods.get("codsr").setup(c, base, jax.random.key(0))
    assert set(setup.frozen_axes) == {"disc_backbone"} and {"gen", "disc"} <= set(setup.params)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    frozen_sh = loop._frozen_shardings(setup.frozen, base, mesh, True, sharding.DEFAULT_RULES, setup.frozen_axes)
    specs = [s.spec for s in jax.tree.leaves(frozen_sh["disc_backbone"])]
    sharded_over = {a for spec in specs for a in spec if a is not None}
    assert {"fsdp", "tensor"} <= sharded_over, specs

    backbone = CLIPVisionModel(CLIPVisionConfig(**STANDIN_BACKBONE))
    layers = default_layers(backbone.config.num_hidden_layers)
    heads = setup.params["disc"]["heads"]
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 64, 64, 3)), jnp.float32)
    logits = jax.jit(lambda b, h, x_: discriminator_logits(backbone, b, h, x_, layers, int(c.codsr.disc_hidden)))
    one = logits(setup.frozen["disc_backbone"], heads, x)
    rep = sharding.replicated(mesh)
    many = logits(jax.device_put(setup.frozen["disc_backbone"], frozen_sh["disc_backbone"]),
                  jax.device_put(heads, rep), jax.device_put(x, sharding.batch_sharding(mesh)))
    for a, b in zip(one, many):
        assert rel_error(np.asarray(b), np.asarray(a)) < 1e-5


def test_gan_losses_against_their_formulas():
    from jsr.sr import gan

    r = [jnp.asarray([[0.5, -2.0]]), jnp.asarray([[3.0]])]
    f = [jnp.asarray([[-0.5, 1.0]]), jnp.asarray([[0.0]])]
    hinge_d = (np.mean([0.5, 3.0]) + 0.0) / 2 + (np.mean([0.5, 2.0]) + 1.0) / 2
    np.testing.assert_allclose(float(gan.discriminator_loss(r, f)), hinge_d, rtol=1e-6)
    np.testing.assert_allclose(float(gan.generator_loss(f)), (np.mean([0.5, -1.0]) + 0.0) / 2, rtol=1e-6)
    sp = lambda v: np.log1p(np.exp(v))  # noqa: E731
    ns_d = (np.mean(sp(-np.array([0.5, -2.0]))) + sp(-3.0)) / 2 + (np.mean(sp(np.array([-0.5, 1.0]))) + sp(0.0)) / 2
    np.testing.assert_allclose(float(gan.discriminator_loss(r, f, "nonsat")), ns_d, rtol=1e-6)
    np.testing.assert_allclose(float(gan.generator_loss(f, "nonsat")),
                               (np.mean(sp(-np.array([-0.5, 1.0]))) + sp(0.0)) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="expected one of"):
        gan.generator_loss(f, "wgan")
