"""The method registry and interface: names, knobs, manifests, picking a method from files, and that each
built-in method computes exactly what a direct composition of ``jsr.sr`` functions computes (the move of the
methods into ``jsr/methods`` changed no number).

The equality tests run the tiny model *eagerly* (no jit): both paths execute the same operations one by one, so
equal programs give bit-identical results without compiling a UNet graph (minutes on the 2-core CPU).
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsr.methods
from jsr.methods import Knob, Method
from jsr.methods.export import base_record, check_base, read_source, write_export
from jsr.methods.restorer import check_options, parse_lora_arg, pick_method
from jsr.methods.export import Source
from jsr.models import lora as L
from jsr.sr import generator, losses
from jsr.sr.infer import Restorer, RestoreOptions
from tests.helpers import override


def test_registry_names_aliases_and_errors():
    assert jsr.methods.names()[:4] == ("osediff", "fidelity", "pisasr", "ctsr")
    assert jsr.methods.get("pisa") is jsr.methods.get("pisasr")  # the old training name
    with pytest.raises(KeyError, match="unknown method 'nope'; known: osediff, fidelity, pisasr, ctsr"):
        jsr.methods.get("nope")
    assert [m.label for m in map(jsr.methods.get, ("osediff", "pisasr", "ctsr"))] == ["OSEDiff", "PiSA-SR", "CTSR"]

    class Clash(Method):
        name = "clash"
        knobs = (Knob("t", float, 0.5, "another t"),)

    with pytest.raises(ValueError, match="knob 't' is already declared by method ctsr"):
        jsr.methods.register(Clash)
    assert "clash" not in jsr.methods.names()

    class Taken(Method):
        name = "osediff"

    with pytest.raises(ValueError, match="already registered"):
        jsr.methods.register(Taken)


def test_knob_parse_check_and_errors():
    k = Knob("gain", float, 1.0, "a gain", min=0.0, max=2.0)
    assert k.parse("0.5") == 0.5 and k.describe() == "a gain in [0, 2] (default 1.0)"
    with pytest.raises(ValueError, match=r"gain must be in \[0, 2\], got 3.0"):
        k.parse("3")
    with pytest.raises(ValueError, match="want a float"):
        k.parse("x")
    with pytest.raises(ValueError, match="want an integer"):
        Knob("n", int, 0, "n").parse(1.5)
    with pytest.raises(ValueError, match="taken by a command-line option"):
        Knob("model", float, 0.0, "x")
    with pytest.raises(ValueError, match="lower_snake_case"):
        Knob("Gain", float, 0.0, "x")
    with pytest.raises(ValueError, match="must be one of"):
        Knob("mode", str, "a", "x", choices=("a", "b")).parse("c")
    ctsr = jsr.methods.get("ctsr")
    from jsr.methods.lfim_knobs import LFIM_KNOB_NAMES  # LFIM acts on any CTSR model (no role needed)

    lfim = {k: v for k, v in ctsr.knob_values().items() if k in LFIM_KNOB_NAMES}
    assert ctsr.knob_values({"t": 0.3}) == {"t": 0.3, "t_steps": 0, "t_scale": 999.0, **lfim}
    assert ctsr.honoured_knobs(("unet",)) == LFIM_KNOB_NAMES
    assert ctsr.honoured_knobs(("unet", "control")) == ("t", "t_steps", "t_scale") + LFIM_KNOB_NAMES


def test_check_options_names_what_a_knob_needs():
    r = Restorer(*(lambda x: x,) * 3, method="osediff", knobs=())
    check_options(r, RestoreOptions(knobs={"t": 0.0}))  # a default value changes nothing: accepted
    with pytest.raises(ValueError, match=r"osediff model ignores lambda_sem, t \(its knobs: none\); lambda_sem "
                                         r"needs a PiSA-SR semantic LoRA; t needs a CTSR control LoRA"):
        check_options(r, RestoreOptions(knobs={"t": 0.5, "lambda_sem": 0.2}))
    with pytest.raises(ValueError, match="unknown knob"):
        check_options(r, RestoreOptions(knobs={"nope": 1}))
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        check_options(Restorer(*(lambda x: x,) * 3, knobs=("t",)), RestoreOptions(knobs={"t": 2.0}))


def test_parse_lora_arg(tmp_path):
    assert parse_lora_arg("control=/x/y") == ("control", "/x/y")
    assert parse_lora_arg("/x/y") == (None, "/x/y")
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert parse_lora_arg(str(odd)) == (None, str(odd))  # an existing path with '=' stays a path


_LORAS: dict = {}


def _lo(params, seed, spec=L.OSEDIFF_UNET):
    """A LoRA with random non-zero factors (cached: LoRA init compiles per layer shape, slow on 2 cores)."""
    key = (id(params), seed, spec)
    if key not in _LORAS:
        _LORAS[key] = _random_lora(params, seed, spec)
    return _LORAS[key]


def _random_lora(params, seed, spec):
    lo = L.init(jax.random.key(seed), params, spec)
    leaves, tree = jax.tree.flatten(lo.factors)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return lo.replace(factors=jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, x.shape)
                                                        for x, k in zip(leaves, keys)]))


def test_pick_method_from_roles(base):
    u, v = _lo(base.unet_params, 1), _lo(base.vae_params, 2, L.OSEDIFF_VAE)
    pick = lambda roles, method="auto": pick_method(method, Source(None, None, roles)).name  # noqa: E731
    assert pick({"unet": u, "vae": v}) == "osediff"
    assert pick({"unet": u, "vae": v, "control": u}) == "ctsr"
    assert pick({"pix": u, "sem": u}) == "pisasr" and pick({"unet": u, "sem": u}) == "pisasr"
    assert pick({"unet": u}, "fidelity") == "fidelity"
    with pytest.raises(ValueError, match="does not use the control"):
        pick({"unet": u, "control": u}, "osediff")
    with pytest.raises(ValueError, match="no method uses the trees given"):
        pick({"mystery": u})


def test_a_plugin_never_takes_over_the_automatic_choice():
    """A registered plugin that fits the trees given (here: none, the plain base) with fewer roles than the
    built-in that fits must not be picked without --method (a toy plugin once took over the demo's restorer)."""
    class Bare(Method):
        name = "bare_plugin"
        roles = {}

    jsr.methods.register(Bare)
    try:
        assert pick_method("auto", Source(None, None, {})).name == "osediff"
        assert pick_method("bare_plugin", Source(None, None, {})).name == "bare_plugin"
        assert not jsr.methods.registry.is_builtin(Bare()) and jsr.methods.registry.is_builtin(jsr.methods.get("ctsr"))
    finally:
        jsr.methods.registry.unregister("bare_plugin")


def test_export_manifest_round_trip_and_base_check(base, tmp_path):
    """write_export -> read_source: method, roles, knob defaults, required trees and the base record."""
    u, v, ctl = _lo(base.unet_params, 1), _lo(base.vae_params, 2, L.OSEDIFF_VAE), _lo(base.unet_params, 3)
    from jsr.methods.api import ExportEntry, TrainSetup

    s1 = TrainSetup(params={}, phases=[], frozen={},
                    export={"student": {"unet": jsr.methods.ExportEntry("unet"), "vae": ExportEntry("vae")}})
    write_export(tmp_path / "s1", "ctsr", s1, {"student": {"unet": u, "vae": v}}, base)
    s2 = dataclasses.replace(s1, export={"control": {"unet": ExportEntry("control")}},
                             requires={"unet": str(tmp_path / "s1" / "student")}, knob_defaults={"t_scale": 500.0})
    write_export(tmp_path / "s2", "ctsr", s2, {"control": {"unet": ctl}}, base)

    m = json.loads((tmp_path / "s2" / "control" / "jsr_export.json").read_text())
    assert m["format"] == "jsr-export-1" and m["base"] == base_record(base)
    assert m["trees"] == {"unet": {"role": "control", "kind": "lora", "model": "unet"}}
    src = read_source(tmp_path / "s2", base)  # the export root: every group under it
    assert (src.method, sorted(src.roles), src.knobs) == ("ctsr", ["control"], {"t_scale": 500.0})
    assert src.requires == {"unet": str(tmp_path / "s1" / "student")}
    jax.tree.map(np.testing.assert_array_equal, src.roles["control"].factors, ctl.factors)

    from jsr.methods.restorer import load_restorer, read_sources

    merged = read_sources([str(tmp_path / "s2")], base)  # the stage-1 trees come from the recorded path
    assert sorted(merged.roles) == ["control", "unet", "vae"] and not merged.requires
    r = load_restorer(base, [str(tmp_path / "s2")])
    assert r.method == "ctsr" and r.knob_defaults["t_scale"] == 500.0 and r.label == "CTSR"

    warnings = []
    other = dataclasses.replace(src, base={**src.base, "fingerprint": "0" * 16, "name": "sd15"})
    assert check_base(src, base, warnings.append) and not check_base(other, base, warnings.append)
    assert len(warnings) == 1 and "trained on base 'sd15'" in warnings[0]


def test_plain_lora_files_take_roles_by_name_or_fit(base, tmp_path):
    from jsr.weights import save_peft_lora

    u, v = _lo(base.unet_params, 1), _lo(base.vae_params, 2, L.OSEDIFF_VAE)
    save_peft_lora(u, tmp_path / "u")
    save_peft_lora(v, tmp_path / "v")
    assert list(read_source(tmp_path / "u", base).roles) == ["unet"]
    assert list(read_source(tmp_path / "v", base).roles) == ["vae"]  # unnamed: the model it fits
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_source(tmp_path / "missing", base)


# ---------------------------------------------------------------------------------------------------------------
# Bit-identical to the direct composition of jsr.sr functions (what jsr/train/methods.py computed before the move)


@pytest.fixture(scope="module")
def batch(base):
    rng = np.random.default_rng(0)
    return {"hq": jnp.asarray(rng.uniform(size=(1, 32, 32, 3)), jnp.float32),
            "lq": jnp.asarray(rng.uniform(size=(1, 32, 32, 3)), jnp.float32),
            "c": base.prompts(["a photo"])}


def _setup(name, base, **over):
    from configs import base as cb

    c = cb.tiny(cb.get_config(name))
    c.loss.lpips = 0.0
    override(c, over)
    return c, jsr.methods.get(name).setup(c, base, jax.random.key(3))


def _eq(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_osediff_losses_equal_the_direct_composition(base, batch):
    c, s = _setup("osediff", base)
    m, f, p = base.models, s.frozen, s.params
    p = jax.tree.map(lambda x: x + 0.01, p)  # non-zero B factors: every LoRA acts
    rng = jax.random.key(5)
    (gen, fake) = s.phases[0][1]
    got, (parts, carry) = gen.loss(p, f, batch, rng, None)
    # direct
    k_enc, k_vsd = jax.random.split(rng)
    x_lq, x_hq = batch["lq"] * 2.0 - 1.0, batch["hq"] * 2.0 - 1.0
    x_sr, z_hat = generator.osediff_restore(m, f["unet"], f["vae"], p["gen"]["unet"], p["gen"]["vae"], x_lq,
                                            batch["c"], rng=k_enc)
    net = lambda lo: generator.UNetTeacher(params=f["unet"], lora=lo, schedule=m.schedule, unet=m.unet)  # noqa: E731
    rec, _ = losses.reconstruction_loss(x_sr, x_hq, None, l2_weight=c.loss.l2, lpips_weight=0.0)
    vsd, _ = losses.vsd_loss(z_hat, batch["c"], f["c_neg"], k_vsd, real_eps=net(None).eps,
                             fake_eps=net(p["fake"]["unet"]).eps, schedule=m.schedule, cfg_scale=c.loss.cfg_scale,
                             t_min=c.loss.vsd_t_min, t_max=c.loss.vsd_t_max)
    _eq(got, rec + c.loss.vsd * vsd)
    fake_got, _ = fake.loss(p, f, batch, jax.random.key(6), carry)
    fake_want, _ = losses.fake_score_loss(z_hat, batch["c"], jax.random.key(6),
                                          fake_output=net(p["fake"]["unet"]).output, schedule=m.schedule)
    _eq(fake_got, fake_want)
    # the one-step forward (inference and previews) is OSEDiff's latent step
    z = generator.encode(m, f["vae"], x_lq, p["gen"]["vae"])
    _eq(jsr.methods.get("osediff").forward(m, f["unet"], p["gen"], z, batch["c"], {}),
        generator.osediff_latent(m, f["unet"], p["gen"]["unet"], z, batch["c"]))


def test_pisasr_losses_equal_the_direct_composition(base, batch):
    c, s = _setup("pisasr", base)
    m, f = base.models, s.frozen
    p = jax.tree.map(lambda x: x + 0.01, s.params)
    rng = jax.random.key(7)
    net = lambda lo: generator.UNetTeacher(params=f["unet"], lora=lo, schedule=m.schedule, unet=m.unet)  # noqa: E731
    x_lq, x_hq = batch["lq"] * 2.0 - 1.0, batch["hq"] * 2.0 - 1.0
    got, _ = s.phases[0][1][0].loss(p, f, batch, rng, None)
    x_sr, _ = generator.pisasr_restore(m, f["unet"], f["vae"], p["pix"]["unet"], None, x_lq, batch["c"], rng=rng)
    _eq(got, losses.reconstruction_loss(x_sr, x_hq, None, l2_weight=c.loss.l2, lpips_weight=0.0)[0])
    got, _ = s.phases[1][1][0].loss(p, f, batch, rng, None)
    k_enc, k_csd = jax.random.split(rng)
    x_sr, z_hat = generator.pisasr_restore(m, f["unet"], f["vae"], p["pix"]["unet"], p["sem"]["unet"], x_lq,
                                           batch["c"], rng=k_enc)
    csd, _ = losses.csd_loss(z_hat, batch["c"], f["c_neg"], k_csd, base_eps=net(None).eps, schedule=m.schedule,
                             cfg_scale=c.loss.cfg_scale, t_min=c.loss.csd_t_min, t_max=c.loss.csd_t_max)
    rec = losses.reconstruction_loss(x_sr, x_hq, None, l2_weight=c.loss.l2, lpips_weight=0.0)[0]
    _eq(got, rec + c.loss.csd * csd)


def test_ctsr_losses_and_forward_equal_the_direct_composition(base, batch, tmp_path):
    from jsr.weights import save_peft_lora

    c, s = _setup("ctsr", base)
    m, f = base.models, s.frozen
    p = s.params
    rng = jax.random.key(9)
    net = lambda lo: generator.UNetTeacher(params=f["unet"], lora=lo, schedule=m.schedule, unet=m.unet)  # noqa: E731
    x_lq, x_hq = batch["lq"] * 2.0 - 1.0, batch["hq"] * 2.0 - 1.0
    got, _ = s.phases[0][1][0].loss(p, f, batch, rng, None)
    k_enc, k_dual = jax.random.split(rng)
    st = p["student"]
    x_sr, z0s = generator.osediff_restore(m, f["unet"], f["vae"], st["unet"], st["vae"], x_lq, batch["c"], rng=k_enc)
    rec = losses.reconstruction_loss(x_sr, x_hq, None, l2_weight=c.loss.l2, lpips_weight=0.0)[0]
    dual, _ = losses.dual_teacher_loss(z0s, generator.encode(m, f["vae"], x_hq), batch["c"], k_dual,
                                       student_eps=net(st["unet"]).eps, fidelity_eps=net(f["teachers"]["fidelity"]).eps,
                                       realism_eps=net(f["teachers"]["realism"]).eps, schedule=m.schedule,
                                       g_time=c.ctsr.g_time, fl_weight=c.ctsr.fl_weight, rn_weight=c.ctsr.rn_weight,
                                       t_min=c.ctsr.t_min, t_max=c.ctsr.t_max)
    _eq(got, rec + dual)

    # stage 2 on a stage-1 LoRA file; then the inference forward at t = 0.3 against ctsr_restore's composition
    save_peft_lora(st["unet"], tmp_path / "s1" / "unet")
    save_peft_lora(st["vae"], tmp_path / "s1" / "vae")
    c2, s2 = _setup("ctsr", base, **{"ctsr.stage": 2, "ctsr.stage1": str(tmp_path / "s1")})
    f2 = s2.frozen
    ctl = jax.tree.map(lambda x: x + 0.01, s2.params)
    got, _ = s2.phases[0][1][0].loss(ctl, f2, batch, rng, None)
    s1 = f2["stage1"]
    z_lq = generator.encode(m, f2["vae"], x_lq, s1["vae"])
    z0 = generator.osediff_latent(m, f2["unet"], s1["unet"], z_lq, batch["c"])
    teacher = generator.ctsr_student(m, f2["unet"], s1["unet"], None)
    student = generator.ctsr_student(m, f2["unet"], s1["unet"], ctl["control"]["unet"])
    want, _ = losses.control_loss(z0, batch["c"], rng, teacher_eps=teacher.eps, student_eps=student.eps,
                                  t_scale=c2.ctsr.t_scale)
    _eq(got, want)
    method = jsr.methods.get("ctsr")
    trees = method.inference_trees(ctl, f2)
    z = method.forward(m, f2["unet"], trees, z_lq, batch["c"], method.knob_values({"t": 0.3}))
    _, want = generator.ctsr_restore(m, f2["unet"], f2["vae"], s1["unet"], s1["vae"], ctl["control"]["unet"], x_lq,
                                     batch["c"], 0.3)
    _eq(z, want)


def test_ctsr_pixel_space_fidelity_teacher_from_config(base, batch):
    """ctsr.fidelity_kind='restorer': a pixel-space restorer (here a box blur) as the fidelity teacher."""
    c, s = _setup("ctsr", base, **{"ctsr.fidelity_kind": "restorer", "ctsr.fidelity": "tests.test_methods:blur"})
    assert set(s.frozen["teachers"]) == {"realism"}
    loss, (parts, _) = s.phases[0][1][0].loss(s.params, s.frozen, batch, jax.random.key(1), None)
    assert np.isfinite(float(loss)) and float(parts["fl"]) > 0
    with pytest.raises(ValueError, match="cannot import the restorer"):
        _setup("ctsr", base, **{"ctsr.fidelity_kind": "restorer", "ctsr.fidelity": "tests.nope:blur"})
    with pytest.raises(ValueError, match="fidelity_kind must be"):
        _setup("ctsr", base, **{"ctsr.fidelity_kind": "magic"})


def blur(x):
    """A stand-in pixel-space restorer: 3x3 box blur of [B, H, W, 3] in [-1, 1]."""
    k = jnp.ones((3, 3, 1, 1), x.dtype) / 9.0
    y = jax.lax.conv_general_dilated(x.transpose(3, 0, 1, 2).reshape(-1, x.shape[1], x.shape[2], 1), k, (1, 1),
                                     "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(3, x.shape[0], x.shape[1], x.shape[2]).transpose(1, 2, 3, 0)


@pytest.fixture(scope="module")
def base():
    from jsr.sr.base import load_base

    return load_base("", dtype=jnp.float32)


class _ImageContext(Method):
    """forward: z + mean(c) per sample; context: the prompt shifted by each image's mean (an image-conditioned
    context, as RCOD's visual prompts)."""

    name = "ctx_probe"
    roles = {}

    def context(self, models, trees, x_lq, c, knobs):
        return c + jnp.mean(x_lq, axis=(1, 2, 3))[:, None, None]

    def forward(self, models, unet_params, trees, z_lq, c, knobs):
        return z_lq + jnp.mean(c, axis=(1, 2))[:, None, None, None]


def test_whole_image_context_reaches_every_tile(base):
    """A method's context() runs once per whole image and every latent tile of that image gets it, also when
    tiles of several images are batched together (tiles_per_call)."""
    from jsr.methods.restorer import load_restorer

    jsr.methods.register(_ImageContext)
    try:
        _check_whole_image_context(base, load_restorer(base, [], method="ctx_probe"))
    finally:
        # A method without roles fits a restorer with no trees: left registered, it would win pick_method's
        # automatic choice in every later test of this worker (the demo's did).
        jsr.methods.registry.unregister("ctx_probe")
    assert "ctx_probe" not in jsr.methods.names()
    plain = load_restorer(base, [], method="osediff")
    assert plain.context is None


def _check_whole_image_context(base, r) -> None:
    assert r.context is not None
    x = np.stack([np.full((128, 128, 3), 0.2, np.float32), np.full((128, 128, 3), 0.9, np.float32)])
    x[:, ::7] = 0.5  # not flat: the VAE output varies over the image
    opts = dict(color_fix="none", vae_tile=0)
    whole = r(x, RestoreOptions(**opts))
    tiled = r(x, RestoreOptions(latent_tile=8, latent_overlap=4, tiles_per_call=3, **opts))
    np.testing.assert_allclose(tiled, whole, atol=1e-5)  # a per-pixel step: tiling is exact up to blending
    shift = jnp.mean(base.prompts([""])) + x.mean(axis=(1, 2, 3))
    assert abs(shift[0] - shift[1]) > 0.5  # the two images really got different contexts


def test_null_prompt_ratio_drops_prompts_by_step():
    from jsr.train.loop import step_prompts

    p = [f"photo {i}" for i in range(64)]
    assert step_prompts(p, 0.0, 0, 5) == p and step_prompts(p, 1.0, 0, 5) == [""] * 64
    half = step_prompts(p, 0.5, 0, 5)
    assert half == step_prompts(p, 0.5, 0, 5) != step_prompts(p, 0.5, 0, 6)  # fixed by (seed, step): resumable
    assert 16 < half.count("") < 48 and all(a in ("", b) for a, b in zip(half, p))


def test_names_keep_the_builtin_order_whatever_is_imported_first():
    """A fresh process that imports a built-in method's module before the package (the demo and some tests do)
    still lists the built-ins in their fixed order (CLI help, tables and error messages read names())."""
    import subprocess
    import sys

    code = "import jsr.methods.pisasr, jsr.methods.rcod, jsr.methods; print(','.join(jsr.methods.names()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split()[-1].split(",")[:7] == ["osediff", "fidelity", "pisasr", "ctsr", "fidesr", "rcod",
                                                     "codsr"]
