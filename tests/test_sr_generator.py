"""The one-step restorers, teachers and model-backed losses on tiny random SD-2-family models (``preset("tiny")``).

What is checked: the generator forms against hand-written compositions of the models (OSEDiff x0 step,
PiSA-SR's weighted residual, CTSR's control), stage 2 at ``t = 0`` reproducing stage 1 exactly, the teacher
adapters, the VSD fake score learning on a fixed batch, and that one jitted training function holding the
generator, real/fake scores, both CTSR teachers and the student takes the frozen base exactly once.
Tolerances: same-framework float32 recompositions agree to rtol 1e-5 (summation order only).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jsr.models import common
from jsr.models import lora as lora_lib
from jsr.models.presets import preset
from jsr.models.unet import UNet2DConditionModel, UNetConfig
from jsr.models.vae import AutoencoderKL, VAEConfig
from jsr.sr import generator as G
from jsr.sr import losses as L
from jsr.sr import schedule as S
from jsr.sr.teachers import RestoredLatentTeacher, UNetTeacher, restorer_teacher
from jsr.weights.unet import UNET_INDEXED

CFG = preset("tiny")
B, HL = 2, 4  # batch, latent side (images 8x larger)
RTOL, ATOL = 1e-5, 1e-5


def _random_params(module, seed):
    """Random parameters from the abstract tree in NumPy (a jitted Flax init of the UNet costs ~30 s of XLA
    compile on a 2-core CPU): kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.05^2)."""
    r = np.random.default_rng(seed)

    def leaf(path, a):
        name = path[-1].key
        if name == "kernel":
            x = r.standard_normal(a.shape) / np.sqrt(np.prod(a.shape[:-1]))
        elif name == "scale":
            x = 1.0 + 0.1 * r.standard_normal(a.shape)
        elif name == "embedding":
            x = 0.02 * r.standard_normal(a.shape)
        else:
            x = 0.05 * r.standard_normal(a.shape)
        return jnp.asarray(x.astype(np.float32))

    return jax.tree_util.tree_map_with_path(leaf, common.abstract_params(module))


def _random_lora(key, params, spec=lora_lib.OSEDIFF_UNET, scale=0.3):
    """A LoRA with non-zero B factors (a fresh one is the identity), so that networks really differ."""
    k1, k2 = jax.random.split(key)
    lo = lora_lib.init(k1, params, spec, UNET_INDEXED)
    leaves, tree = jax.tree_util.tree_flatten_with_path(lo.factors)
    keys = jax.random.split(k2, len(leaves))
    new = [scale * jax.random.normal(k, x.shape) if path[-1].key == "b" else x
           for (path, x), k in zip(leaves, keys)]
    return lora_lib.LoRA(factors=jax.tree_util.tree_unflatten(tree, new), overrides=lo.overrides, rank=lo.rank,
                         alpha=lo.alpha)


@pytest.fixture(scope="module")
def unet():
    module = UNet2DConditionModel(UNetConfig.from_diffusers(CFG["unet"]))
    return module, _random_params(module, 0)


@pytest.fixture(scope="module")
def vae():
    module = AutoencoderKL(VAEConfig.from_diffusers(CFG["vae"]))
    return module, _random_params(module, 1)


@pytest.fixture(scope="module")
def schedule():
    return S.DDPMSchedule.from_config(CFG["scheduler"])


@pytest.fixture(scope="module")
def batch():
    r = np.random.default_rng(0)
    d = CFG["unet"]["cross_attention_dim"]
    return {"x_lq": jnp.asarray(r.uniform(-1, 1, (B, 8 * HL, 8 * HL, 3)).astype(np.float32)),
            "x_hq": jnp.asarray(r.uniform(-1, 1, (B, 8 * HL, 8 * HL, 3)).astype(np.float32)),
            "z_lq": jnp.asarray(r.standard_normal((B, HL, HL, 4)).astype(np.float32)),
            "z_gt": jnp.asarray(r.standard_normal((B, HL, HL, 4)).astype(np.float32)),
            "c": jnp.asarray(r.standard_normal((B, 77, d)).astype(np.float32)),
            "c_neg": jnp.asarray(r.standard_normal((1, 77, d)).astype(np.float32))}


def test_unet_teacher_eps_and_v_conversion(unet, schedule, batch):
    module, params = unet
    lo = _random_lora(jax.random.key(1), params)
    t = jnp.asarray([10.0, 700.5])
    raw = module.apply(lora_lib.variables(params, lo), batch["z_lq"], t, batch["c"])
    eps_t = UNetTeacher(params=params, lora=lo, schedule=schedule, unet=module)
    np.testing.assert_allclose(np.asarray(eps_t.eps(batch["z_lq"], t, batch["c"])), np.asarray(raw),
                               rtol=RTOL, atol=ATOL)
    v_sched = S.DDPMSchedule.from_config(dict(CFG["scheduler"], prediction_type="v_prediction"))
    v_t = UNetTeacher(params=params, lora=lo, schedule=v_sched, unet=module)
    abar = np.asarray(S.alpha_bar(v_sched, t)).reshape(-1, 1, 1, 1)
    want = np.sqrt(1 - abar) * np.asarray(batch["z_lq"]) + np.sqrt(abar) * np.asarray(raw)
    np.testing.assert_allclose(np.asarray(v_t.eps(batch["z_lq"], t, batch["c"])), want, rtol=RTOL, atol=ATOL)


def test_restored_latent_teacher_reads_off_the_shared_noise(schedule):
    r = np.random.default_rng(2)
    z, z_r, n = (jnp.asarray(r.standard_normal((B, HL, HL, 4)).astype(np.float32)) for _ in range(3))
    t = jnp.asarray([50.0, 800.0])
    teacher = RestoredLatentTeacher(z_restored=z_r, schedule=schedule)
    eps = teacher.eps(S.add_noise(schedule, z, n, t), t, None)
    # "re-encode, add the same noise": the implied noise of the restored latent noised with n is n itself ...
    np.testing.assert_allclose(np.asarray(teacher.eps(S.add_noise(schedule, z_r, n, t), t, None)), np.asarray(n),
                               rtol=1e-4, atol=1e-4)
    # ... and for another clean latent it is n shifted by sqrt(abar / (1 - abar)) (z - z_r).
    abar = np.asarray(S.alpha_bar(schedule, t)).reshape(-1, 1, 1, 1)
    want = np.asarray(n) + np.sqrt(abar / (1 - abar)) * (np.asarray(z) - np.asarray(z_r))
    np.testing.assert_allclose(np.asarray(eps), want, rtol=1e-4, atol=1e-4)


def test_pisasr_weights(unet, schedule, batch):
    module, params = unet
    pix = _random_lora(jax.random.key(3), params, lora_lib.PISASR_UNET)
    sem = _random_lora(jax.random.key(4), params, lora_lib.PISASR_UNET)
    models = G.SDModels(unet=module, vae=None, schedule=schedule, scaling_factor=0.18215)
    z, c = batch["z_lq"], batch["c"]
    one = lambda lo: module.apply(lora_lib.variables(params, lo), z, jnp.ones((B,)), c)  # noqa: E731
    e_pix = np.asarray(one(pix))
    e_both = np.asarray(one(lora_lib.stack([(pix, 1.0), (sem, 1.0)])))
    for lp, ls in [(1.0, 1.0), (0.5, 1.5), (1.0, 0.0)]:
        got = G.pisasr_latent(models, params, pix, sem, z, c, lambda_pix=lp, lambda_sem=ls)
        want = np.asarray(z) - (lp * e_pix + ls * (e_both - e_pix))
        np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=1e-4)
    np.testing.assert_allclose(np.asarray(G.pisasr_latent(models, params, pix, None, z, c)),
                               np.asarray(z) - e_pix, rtol=RTOL, atol=1e-4)


def test_fake_score_update_lowers_its_loss(unet, schedule, batch):
    """A few AdamW steps of the VSD fake score on a fixed batch (fixed key: same t' and noise) lower its own
    diffusion loss. The LoRA targets the attention projections only: the update code is the same for every
    target, and conv LoRAs triple the backward's XLA compile time on CPU (conv LoRA math: tests/test_lora.py)."""
    module, params = unet
    spec = lora_lib.LoRASpec(lora_lib.Targets(patterns=("to_q", "to_k", "to_v", "to_out.0")))
    fake = lora_lib.init(jax.random.key(5), params, spec, UNET_INDEXED)
    z_hat = batch["z_gt"]
    key = jax.random.key(6)

    def loss_fn(lo):
        net = UNetTeacher(params=params, lora=lo, schedule=schedule, unet=module)
        return L.fake_score_loss(z_hat, batch["c"], key, fake_output=net.output, schedule=schedule)[0]

    opt = optax.adamw(1e-2)
    state = opt.init(fake)
    step = jax.jit(jax.value_and_grad(loss_fn))
    losses = []
    for _ in range(6):
        v, g = step(fake)
        updates, state = opt.update(g, state, fake)
        fake = optax.apply_updates(fake, updates)
        losses.append(float(v))
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.fixture(scope="module")
def models(unet, vae, schedule):
    return G.SDModels(unet=unet[0], vae=vae[0], schedule=schedule, scaling_factor=CFG["vae"]["scaling_factor"])


@pytest.fixture(scope="module")
def loras(unet, vae):
    up, vp = unet[1], vae[1]
    gen = _random_lora(jax.random.key(10), up)
    # OSEDiff trains conv_in in full: give the override a visible change.
    gen = lora_lib.LoRA(factors=gen.factors, overrides=jax.tree.map(lambda x: x * 1.5, gen.overrides),
                        rank=gen.rank, alpha=gen.alpha)
    vae_lo = lora_lib.init(jax.random.key(11), vp, lora_lib.OSEDIFF_VAE)
    leaves, tree = jax.tree_util.tree_flatten_with_path(vae_lo.factors)
    vae_lo = lora_lib.LoRA(factors=jax.tree_util.tree_unflatten(
        tree, [0.3 * jnp.ones_like(x) if p[-1].key == "b" else x for p, x in leaves]), overrides={},
        rank=vae_lo.rank, alpha=vae_lo.alpha)
    return {"gen": gen, "vae": vae_lo, "fake": _random_lora(jax.random.key(12), up),
            "real_teacher": _random_lora(jax.random.key(13), up),
            "control": _random_lora(jax.random.key(14), up, lora_lib.LoRASpec(lora_lib.OSEDIFF_UNET_TARGETS))}


def test_osediff_restore_is_the_x0_step(models, unet, vae, loras, batch):
    (um, up), (vm, vp) = unet, vae
    sf = models.scaling_factor
    x_sr, z_hat = G.osediff_restore(models, up, vp, loras["gen"], loras["vae"], batch["x_lq"], batch["c"])
    mean, logvar = vm.apply(lora_lib.variables(vp, loras["vae"]), batch["x_lq"], method="encode")
    mean_base, _ = vm.apply({"params": vp}, batch["x_lq"], method="encode")
    assert float(jnp.max(jnp.abs(mean - mean_base))) > 1e-3  # the VAE encoder LoRA is applied
    z_l = np.asarray(mean) * sf
    eps = np.asarray(um.apply(lora_lib.variables(up, loras["gen"]), jnp.asarray(z_l), jnp.full((B,), 999.0),
                              batch["c"]))
    abar = float(np.asarray(models.schedule.alphas_cumprod)[999])
    want_z = (z_l - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
    np.testing.assert_allclose(np.asarray(z_hat), want_z, rtol=1e-4, atol=1e-4)
    want_x = np.clip(np.asarray(vm.apply({"params": vp}, jnp.asarray(want_z / sf), method="decode")), -1, 1)
    np.testing.assert_allclose(np.asarray(x_sr), want_x, rtol=1e-4, atol=1e-4)
    assert x_sr.shape == batch["x_lq"].shape and float(jnp.max(jnp.abs(x_sr))) <= 1.0
    # with an rng the posterior is sampled: mean + exp(logvar / 2) * n, n from that key
    key = jax.random.key(3)
    z_s = G.encode(models, vp, batch["x_lq"], loras["vae"], key)
    n = jax.random.normal(key, mean.shape)
    np.testing.assert_allclose(np.asarray(z_s), np.asarray((mean + jnp.exp(0.5 * logvar) * n) * sf),
                               rtol=1e-5, atol=1e-6)


def test_ctsr_stage2_at_t0_reproduces_stage1_exactly(models, unet, vae, loras, batch):
    up, vp = unet[1], vae[1]
    x1, z1 = G.osediff_restore(models, up, vp, loras["gen"], loras["vae"], batch["x_lq"], batch["c"])
    for steps in (0, 2):
        x0, z0 = G.ctsr_restore(models, up, vp, loras["gen"], loras["vae"], loras["control"], batch["x_lq"],
                                batch["c"], 0.0, steps=steps)
        np.testing.assert_array_equal(np.asarray(z0), np.asarray(z1))
        np.testing.assert_array_equal(np.asarray(x0), np.asarray(x1))
    # at t = 0.5: z0 + 0.5 eps_S(z0, 499.5) with S = base + stage-1 LoRA + control LoRA
    _, zh = G.ctsr_restore(models, up, vp, loras["gen"], loras["vae"], loras["control"], batch["x_lq"],
                           batch["c"], jnp.asarray([0.5, 0.5]))
    both = lora_lib.stack([(loras["gen"], 1.0), (loras["control"], 1.0)], up)
    e = unet[0].apply(lora_lib.variables(up, both), z1, jnp.full((B,), 499.5), batch["c"])
    np.testing.assert_allclose(np.asarray(zh), np.asarray(z1 + 0.5 * e), rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(zh - z1))) > 1e-3


def test_restorer_teacher_from_image_and_from_latent(models, vae, schedule, batch):
    vm, vp = vae
    restore = lambda x: 0.5 * x  # noqa: E731 - any pixel-space restorer
    t1 = restorer_teacher(restore, vae=vm, vae_params=vp, scaling_factor=models.scaling_factor,
                          schedule=schedule, x_lq=batch["x_lq"])
    mean, _ = vm.apply({"params": vp}, 0.5 * batch["x_lq"], method="encode")
    np.testing.assert_allclose(np.asarray(t1.z_restored), np.asarray(mean) * models.scaling_factor, rtol=1e-5,
                               atol=1e-6)
    z_l = G.encode(models, vp, batch["x_lq"])
    t2 = restorer_teacher(restore, vae=vm, vae_params=vp, scaling_factor=models.scaling_factor,
                          schedule=schedule, z_lq=z_l)
    x_dec = jnp.clip(vm.apply({"params": vp}, z_l / models.scaling_factor, method="decode"), -1, 1)
    mean2, _ = vm.apply({"params": vp}, 0.5 * x_dec, method="encode")
    np.testing.assert_allclose(np.asarray(t2.z_restored), np.asarray(mean2) * models.scaling_factor, rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        restorer_teacher(restore, vae=vm, vae_params=vp, scaling_factor=1.0, schedule=schedule)


def test_one_base_shared_by_generator_scores_and_teachers(models, unet, vae, loras, batch):
    """One jitted training function: OSEDiff generator (UNet + VAE-encoder LoRA) -> rec + VSD (real = base,
    fake = base + fake LoRA) + CTSR dual teacher (T_r = base + LoRA, T_f = a pixel-restorer adapter, student =
    the generator's LoRA) + the fake score's loss. Its arguments hold the base UNet and VAE once each."""
    up, vp = unet[1], vae[1]
    toy_lpips = lambda a, b: jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))  # noqa: E731

    def train_loss(unet_base, vae_base, trainable, frozen_loras, data, rng):
        k1, k2, k3, k4 = jax.random.split(rng, 4)
        x_sr, z_hat = G.osediff_restore(models, unet_base, vae_base, trainable["gen"], trainable["vae"],
                                        data["x_lq"], data["c"], rng=k1)
        rec, _ = L.reconstruction_loss(x_sr, data["x_hq"], toy_lpips)
        real = UNetTeacher(params=unet_base, lora=None, schedule=models.schedule, unet=models.unet)
        fake = UNetTeacher(params=unet_base, lora=frozen_loras["fake"], schedule=models.schedule, unet=models.unet)
        vsd, _ = L.vsd_loss(z_hat, data["c"], data["c_neg"], k2, real_eps=real.eps, fake_eps=fake.eps,
                            schedule=models.schedule)
        t_r = UNetTeacher(params=unet_base, lora=frozen_loras["real_teacher"], schedule=models.schedule,
                          unet=models.unet)
        t_f = restorer_teacher(lambda x: 0.5 * x, vae=models.vae, vae_params=vae_base,
                               scaling_factor=models.scaling_factor, schedule=models.schedule, x_lq=data["x_lq"])
        student = UNetTeacher(params=unet_base, lora=trainable["gen"], schedule=models.schedule, unet=models.unet)
        z_gt = G.encode(models, vae_base, data["x_hq"])
        dual, _ = L.dual_teacher_loss(z_hat, z_gt, data["c"], k3, student_eps=student.eps, fidelity_eps=t_f.eps,
                                      realism_eps=t_r.eps, schedule=models.schedule)
        fake_l, _ = L.fake_score_loss(z_hat, data["c"], k4, fake_output=fake.output, schedule=models.schedule)
        return rec + vsd + dual + fake_l

    trainable = {"gen": loras["gen"], "vae": loras["vae"]}
    frozen = {"fake": loras["fake"], "real_teacher": loras["real_teacher"]}
    data = {k: batch[k] for k in ("x_lq", "x_hq", "c", "c_neg")}
    args = (up, vp, trainable, frozen, data, jax.random.key(0))
    # The gradient program (what a train step compiles): traced, not compiled, to keep the test fast.
    closed = jax.make_jaxpr(jax.grad(train_loss, argnums=2))(*args)
    n_leaves = lambda t: len(jax.tree.leaves(t))  # noqa: E731
    size = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))  # noqa: E731
    invars = closed.jaxpr.invars
    assert len(invars) == sum(n_leaves(a) for a in args)
    assert sum(int(np.prod(v.aval.shape)) for v in invars) == size(args)  # no input twice
    # nothing the size of a weight was baked in as a constant (only the 1000-entry schedule table and scalars)
    assert sum(int(np.size(c)) for c in closed.consts) <= 2 * models.schedule.num_train_timesteps
    # The jitted function's lowered signature: exactly the flattened arguments, the base once. (Compiling it
    # costs minutes of XLA time on a loaded 2-core CPU; the same functions run eagerly in the tests above.)
    lowered = jax.jit(train_loss).lower(*args)
    assert len(jax.tree.leaves(lowered.args_info)) == sum(n_leaves(a) for a in args)
    main = next(line for line in lowered.as_text().splitlines() if "func.func public @main(" in line)
    assert main.count("%arg") == len(invars)


# ------------------------------------------------------------------------------------------------ prompts

@pytest.fixture(scope="module")
def prompt_encoder(tmp_path_factory):
    import json

    from jsr.models.clip_text import CLIPTextConfig, CLIPTextModel, Tokenizer
    from jsr.sr.prompts import PromptEncoder

    # A real CLIPTokenizer folder with a byte-level vocabulary and no merges (every character is a token).
    folder = tmp_path_factory.mktemp("tokenizer")
    # GPT-2/CLIP byte-level alphabet: printable Latin-1 bytes stand for themselves, the rest map to chr(256 + k).
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    chars = [chr(b) for b in keep] + [chr(256 + k) for k in range(len(extra))]
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>",
                                                                                   "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    module = CLIPTextModel(CLIPTextConfig.from_transformers(CFG["text_encoder"]))
    params = _random_params(module, 2)
    return PromptEncoder(module, params, Tokenizer(folder), chunk=2, max_cache=3), module, params, Tokenizer(folder)


def test_prompt_encoder_caches_per_distinct_prompt(prompt_encoder):
    enc, module, params, tok = prompt_encoder
    out = enc(["a cat", "a dog", "a cat"])
    assert out.shape == (3, 77, CFG["text_encoder"]["hidden_size"]) and enc.calls == 1
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(out[2]))
    direct = module.apply({"params": params}, jnp.asarray(tok(["a cat", "a dog"])))
    np.testing.assert_allclose(np.asarray(out[:2]), np.asarray(direct), rtol=1e-5, atol=1e-5)
    enc("a dog")
    assert enc.calls == 1  # cached
    neg = enc.negative()
    assert neg.shape == (1, 77, CFG["text_encoder"]["hidden_size"]) and enc.calls == 2
    enc(["x", "y"])  # LRU bound 3: the least recently used prompts go
    assert len(enc) == 3 and enc.calls == 3
    enc("a cat")
    assert enc.calls == 4  # was evicted, encoded again
    with pytest.raises(ValueError, match="no prompts"):
        enc([])


def test_drop_prompts():
    from jsr.sr.prompts import drop_prompts

    p = ["a", "b", "c", "d"]
    assert drop_prompts(p, 0.0, np.random.default_rng(0)) == p
    assert drop_prompts(p, 1.0, np.random.default_rng(0)) == [""] * 4
    assert drop_prompts(p, 0.5, np.random.default_rng(1)) == drop_prompts(p, 0.5, np.random.default_rng(1))
    with pytest.raises(ValueError):
        drop_prompts(p, 1.5, np.random.default_rng(0))
