"""LoRA parity against peft-wrapped diffusers models, and peft/OSEDiff/PiSA-SR checkpoints in and out.

A tiny SD-2-style diffusers UNet (and VAE) with random weights is saved with ``save_pretrained`` and loaded through
jsr. LoRA weights are random and non-zero everywhere (B included), so every LoRA layer moves the output.
Tolerance: relative L2 error < 1e-4 in float32 against PyTorch (as the base-model parity tests: different
summation orders over ~20 layers, measured ~1e-6); jsr-vs-jsr comparisons (merged vs hook) < 1e-5.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jsr.models import lora as L
from jsr.weights import peft as P
from jsr.weights.unet import load_unet, save_unet
from jsr.weights.vae import VAE_INDEXED, load_vae
from tests.helpers import osediff_unet_groups, randomise_torch as _randomise, rel_error as _rel

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1, attention_head_dim=[2, 4], cross_attention_dim=48, norm_num_groups=8,
    use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32],
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=0.18215,
)
GROUPS = ("encoder", "decoder", "others")


def _osediff_vae_targets(names):
    """OSEDiff's VAE target rule as the oracle: no 'bias'/'norm'; a pattern inside 'encoder', or quant_conv
    (not post_quant_conv)."""
    return sorted({n.removesuffix(".weight") for n in names if not ("bias" in n or "norm" in n) and (
        (any(p in n for p in L.VAE_PATTERNS) and "encoder" in n) or ("quant_conv" in n and "post_quant_conv" not in n))})


def _to_torch(x):
    x = np.asarray(x, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.T if x.ndim == 2 else x.transpose(3, 2, 0, 1)))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _torch_unet_out(model, x, t, ctx):
    with torch.no_grad():
        out = model(_nchw(x), torch.tensor([t], dtype=torch.float32), torch.from_numpy(np.asarray(ctx))).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _random_lora(lora: L.LoRA, seed: int) -> L.LoRA:
    """Random non-zero factors (B included; spread 1/sqrt(fan_in) so each branch is O(1) of the base) and
    overrides moved away from the base."""
    rng = np.random.default_rng(seed)
    new = jax.tree_util.tree_map(
        lambda x: (1.2 * rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))).astype(np.float32),
        lora.factors)
    ov = jax.tree_util.tree_map(lambda v: np.asarray(v) * 1.1 + 0.05, lora.overrides)
    return lora.replace(factors=new, overrides=ov)


@pytest.fixture(scope="module")
def unet_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet")
    base = _randomise(diffusers.UNet2DConditionModel(**UNET_CONFIG).eval(), 0)
    base.save_pretrained(folder, safe_serialization=True)
    module, params = load_unet(folder)
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 8, 8, 4)), np.float32)
    ctx = np.asarray(jax.random.normal(jax.random.key(2), (2, 5, 48)), np.float32)
    run = jax.jit(lambda v, x, ctx: module.apply(v, x, 999.0, ctx))
    return dict(folder=folder, module=module, params=params, x=x, ctx=ctx, run=run)


@pytest.fixture(scope="module")
def vae_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    _randomise(diffusers.AutoencoderKL(**VAE_CONFIG).eval(), 10).save_pretrained(folder, safe_serialization=True)
    module, params = load_vae(folder)
    x = np.asarray(jax.random.uniform(jax.random.key(11), (2, 16, 16, 3), minval=-1, maxval=1), np.float32)
    run = jax.jit(lambda v, x: module.apply(v, x, method="encode"))
    return dict(folder=folder, module=module, params=params, x=x, run=run)


def _fresh_torch_vae(case):
    return diffusers.AutoencoderKL.from_pretrained(case["folder"]).eval()


def _torch_encode(model, x):
    with torch.no_grad():
        d = model.encode(_nchw(x)).latent_dist
    return d.mean.numpy().transpose(0, 2, 3, 1), d.logvar.numpy().transpose(0, 2, 3, 1)


def _fresh_torch_unet(case):
    return diffusers.UNet2DConditionModel.from_pretrained(case["folder"]).eval()


def _osediff_wrapped(case, lists, rank, adapters=("default_encoder", "default_decoder", "default_others"),
                     alpha=None):
    """A diffusers UNet with OSEDiff's three adapters (peft, gaussian init, alpha default unless given)."""
    model = _fresh_torch_unet(case)
    for g, name in zip(GROUPS, adapters):
        kw = {} if alpha is None else {"lora_alpha": alpha}
        model.add_adapter(peft.LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=lists[g], **kw),
                          adapter_name=name)
    model.set_adapter(list(adapters))
    return model


def test_unet_targets_match_osediff(unet_case):
    names = [n for n, _ in _fresh_torch_unet(unet_case).named_parameters()]
    want = osediff_unet_groups(names)
    got = L.select(unet_case["params"], L.OSEDIFF_UNET_TARGETS)
    for g in GROUPS:
        assert sorted(L.module_name(p) for p in got[g]) == sorted(want[g]), g
    assert sum(len(v) for v in want.values()) > 30


@pytest.fixture(scope="module")
def osediff_lora(unet_case):
    """A jsr OSEDiff-style UNet LoRA (rank 4, alpha 8, conv_in trained in full), random and non-zero, and the
    same LoRA copied into a peft-wrapped diffusers UNet by hand (layouts transposed here, not by jsr)."""
    params = unet_case["params"]
    lora = _random_lora(L.init(jax.random.key(3), params, L.OSEDIFF_UNET), 4)
    lists = {g: [L.module_name(p) for p in paths] for g, paths in L.select(params, L.OSEDIFF_UNET_TARGETS).items()}
    model = _osediff_wrapped(unet_case, lists, rank=4)
    with torch.no_grad():
        for g, adapter in zip(GROUPS, ("default_encoder", "default_decoder", "default_others")):
            for name in lists[g]:
                node = L._get(lora.factors, L.flax_path(name))
                mod = model.get_submodule(name)
                mod.lora_A[adapter].weight.copy_(_to_torch(node["a"]).reshape(mod.lora_A[adapter].weight.shape))
                mod.lora_B[adapter].weight.copy_(_to_torch(node["b"]).reshape(mod.lora_B[adapter].weight.shape))
        model.conv_in.base_layer.weight.copy_(_to_torch(lora.overrides["conv_in"]["kernel"]))
        model.conv_in.base_layer.bias.copy_(torch.from_numpy(np.array(lora.overrides["conv_in"]["bias"])))
    ref = _torch_unet_out(model, unet_case["x"], 999.0, unet_case["ctx"])
    return dict(lora=lora, lists=lists, torch_model=model, ref=ref)


def test_unet_lora_matches_peft(unet_case, osediff_lora):
    """(a) jsr UNet + LoRA == peft-wrapped diffusers UNet; (b) merged == unmerged; merged export loads in diffusers."""
    c, o = unet_case, osediff_lora
    y = c["run"](L.variables(c["params"], o["lora"]), c["x"], c["ctx"])
    base = c["run"](L.variables(c["params"]), c["x"], c["ctx"])
    assert _rel(base, o["ref"]) > 0.05  # the LoRA changes the output a lot
    assert _rel(y, o["ref"]) < 1e-4
    merged = L.merge(c["params"], o["lora"])
    assert _rel(c["run"]({"params": merged}, c["x"], c["ctx"]), y) < 1e-5
    folder = save_unet(c["module"], merged, c["folder"].parent / "merged")
    plain = diffusers.UNet2DConditionModel.from_pretrained(folder).eval()
    assert _rel(_torch_unet_out(plain, c["x"], 999.0, c["ctx"]), o["ref"]) < 1e-4


def test_export_loads_in_peft_and_diffusers(unet_case, osediff_lora, tmp_path):
    """(c) save_peft_lora -> peft (inject + set_peft_model_state_dict) and diffusers (load_lora_adapter)."""
    c, o = unet_case, osediff_lora
    file = P.save_peft_lora(o["lora"], tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / P.ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    overrides = {k: torch.from_numpy(np.array(v)) for k, v in P.io.read_safetensors(
        tmp_path / "lora" / P.OVERRIDES_WEIGHTS).items()}
    assert sorted(overrides) == ["conv_in.bias", "conv_in.weight"]

    # peft's own API.
    from safetensors.torch import load_file
    m1 = _fresh_torch_unet(c)
    m1.load_state_dict(overrides, strict=False)
    conf = peft.LoraConfig.from_pretrained(str(tmp_path / "lora"))
    m1 = peft.inject_adapter_in_model(conf, m1, adapter_name="jsr")
    res = peft.set_peft_model_state_dict(m1, load_file(file), adapter_name="jsr")
    assert not [k for k in res.unexpected_keys if "lora" in k]
    assert _rel(_torch_unet_out(m1, c["x"], 999.0, c["ctx"]), o["ref"]) < 1e-4

    # diffusers' loader (reads the config from the file's header).
    m2 = _fresh_torch_unet(c)
    m2.load_state_dict(overrides, strict=False)
    m2.load_lora_adapter(str(tmp_path / "lora"), weight_name=P.ADAPTER_WEIGHTS, prefix=None, adapter_name="jsr")
    assert _rel(_torch_unet_out(m2, c["x"], 999.0, c["ctx"]), o["ref"]) < 1e-4

    # And back into jsr: the same tree.
    back = P.load_peft_lora(tmp_path / "lora", params={"default": c["params"]})["default"]
    assert (back.rank, back.alpha) == (4, 8.0)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(o["lora"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _release_state(model, keep):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if keep(k)}


def _perturb_lora(model, seed, also=()):
    """Non-zero random LoRA weights (B included) in a peft-wrapped torch model, plus the named base tensors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or any(a in n for a in also):
                p.copy_(p + torch.randn(p.shape, generator=g) * (0.3 / np.sqrt(p[0].numel())))


def test_import_osediff_release(unet_case, vae_case, tmp_path):
    """(d) A file laid out like OSEDiff's release (built here with peft) -> jsr gives the same UNet output and the
    same VAE encoding."""
    c, v = unet_case, vae_case
    names = [n for n, _ in _fresh_torch_unet(c).named_parameters()]
    lists = osediff_unet_groups(names)
    model = _osediff_wrapped(c, lists, rank=4)
    _perturb_lora(model, 5, also=("conv_in",))
    ref = _torch_unet_out(model, c["x"], 999.0, c["ctx"])
    release = {"unet_lora_encoder_modules": lists["encoder"], "unet_lora_decoder_modules": lists["decoder"],
               "unet_lora_others_modules": lists["others"], "rank_unet": 4,
               "state_dict_unet": _release_state(model, lambda k: "lora" in k or "conv_in" in k)}
    assert "conv_in.base_layer.weight" in release["state_dict_unet"]
    vae_targets = _osediff_vae_targets([n for n, _ in _fresh_torch_vae(v).named_parameters()])
    vae = _fresh_torch_vae(v)
    vae.add_adapter(peft.LoraConfig(r=4, init_lora_weights="gaussian", target_modules=vae_targets),
                    adapter_name="default_encoder")
    _perturb_lora(vae, 6)
    ref_mean, ref_logvar = _torch_encode(vae, v["x"])
    release.update(vae_lora_encoder_modules=vae_targets, rank_vae=4,
                   state_dict_vae=_release_state(vae, lambda k: "lora" in k))
    torch.save(release, tmp_path / "osediff.pkl")
    loras = P.load_peft_lora(tmp_path / "osediff.pkl", params={"unet": c["params"], "vae": v["params"]})
    assert sorted(loras) == ["unet", "vae"]
    mean, logvar = v["run"](L.variables(v["params"], loras["vae"]), v["x"])
    assert _rel(mean, ref_mean) < 1e-4 and _rel(logvar, ref_logvar) < 1e-4
    lo = loras["unet"]
    assert (lo.rank, lo.alpha) == (4, 8.0) and sorted(lo.overrides["conv_in"]) == ["bias", "kernel"]
    y = c["run"](L.variables(c["params"], lo), c["x"], c["ctx"])
    assert _rel(y, ref) < 1e-4

    # A target list that disagrees with the tensors, and unknown keys, are errors that name them.
    bad = dict(release, unet_lora_others_modules=lists["others"][1:])
    torch.save(bad, tmp_path / "bad.pkl")
    with pytest.raises(P.PeftFormatError, match=lists["others"][0].replace(".", r"\.")):
        P.load_peft_lora(tmp_path / "bad.pkl")
    sd = dict(release["state_dict_unet"])
    sd["mid_block.resnets.0.conv1.lora_magnitude_vector.default_others"] = torch.ones(3)
    sd.pop(next(k for k in sd if "lora_B" in k and "up_blocks" in k))
    torch.save({"rank_unet": 4, "state_dict_unet": sd}, tmp_path / "bad2.pkl")
    with pytest.raises(P.PeftFormatError) as e:
        P.load_peft_lora(tmp_path / "bad2.pkl")
    assert "lora_magnitude_vector" in str(e.value) and "only one of lora_A/lora_B" in str(e.value)


def test_import_pisasr_release_and_stack(unet_case, tmp_path):
    """(d, e) PiSA-SR's layout: pixel and semantic adapters of different ranks -> two LoRAs; stacking them with
    weights equals the diffusers UNet with all six adapters active at those weights."""
    c = unet_case
    names = [n for n, _ in _fresh_torch_unet(c).named_parameters()]
    lists = osediff_unet_groups(names)
    model = _fresh_torch_unet(c)
    ranks = {"pix": 4, "sem": 2}
    for kind in ("pix", "sem"):
        for g in GROUPS:
            model.add_adapter(peft.LoraConfig(r=ranks[kind], init_lora_weights="gaussian",
                                              target_modules=lists[g]), adapter_name=f"default_{g}_{kind}")
    _perturb_lora(model, 7)
    release = {f"unet_lora_{g}_modules_{k}": lists[g] for g in GROUPS for k in ranks}
    release.update(lora_rank_unet_pix=4, lora_rank_unet_sem=2,
                   state_dict_unet=_release_state(model, lambda k: "lora" in k))
    torch.save(release, tmp_path / "pisa_sr.pkl")
    loras = P.load_peft_lora(tmp_path / "pisa_sr.pkl", params={"unet": c["params"]})
    assert sorted(loras) == ["unet_pix", "unet_sem"]
    assert (loras["unet_pix"].rank, loras["unet_sem"].rank) == (4, 2)
    w_pix, w_sem = 1.0, 0.6
    adapters = [f"default_{g}_{k}" for k in ("pix", "sem") for g in GROUPS]
    model.set_adapters(adapters, weights=[w_pix] * 3 + [w_sem] * 3)
    ref = _torch_unet_out(model, c["x"], 999.0, c["ctx"])
    stacked = L.stack([(loras["unet_pix"], w_pix), (loras["unet_sem"], w_sem)])
    assert stacked.rank == 6
    y = c["run"](L.variables(c["params"], stacked), c["x"], c["ctx"])
    assert _rel(y, ref) < 1e-4
    # Only the pixel LoRA (sem off) is a different output.
    model.set_adapters(adapters[:3])
    ref_pix = _torch_unet_out(model, c["x"], 999.0, c["ctx"])
    assert _rel(ref_pix, ref) > 1e-2
    assert _rel(c["run"](L.variables(c["params"], L.stack([(loras["unet_pix"], 1.0)])), c["x"], c["ctx"]),
                ref_pix) < 1e-4


def test_grads_on_unet(unet_case, osediff_lora):
    """(f) A loss through the UNet: every LoRA factor and override gets a non-zero gradient; the base gets none."""
    c = unet_case

    @jax.jit
    def grad(lora, base):
        return jax.grad(lambda l: jnp.mean(c["module"].apply(L.variables(base, l), c["x"], 500.0, c["ctx"]) ** 2))(
            lora)

    g = grad(osediff_lora["lora"], c["params"])
    assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(osediff_lora["lora"])
    zero = [p for p, v in traverse_util.flatten_dict({"f": g.factors, "o": g.overrides}).items()
            if not float(jnp.abs(v).max()) > 0]
    assert not zero


def test_vae_encoder_lora_matches_peft_and_exports(vae_case, tmp_path):
    """(a) jsr VAE encoder + OSEDiff VAE LoRA == peft-wrapped diffusers VAE; (c) its export loads in peft."""
    c = vae_case
    names = [n for n, _ in _fresh_torch_vae(c).named_parameters()]
    targets = _osediff_vae_targets(names)
    got = L.select(c["params"], L.OSEDIFF_VAE_TARGETS, VAE_INDEXED)
    assert sorted(L.module_name(p, VAE_INDEXED) for p in got["encoder"]) == targets
    assert "quant_conv" in targets and "encoder.mid_block.attentions.0.to_q" in targets
    lora = _random_lora(L.init(jax.random.key(12), c["params"], L.OSEDIFF_VAE, VAE_INDEXED), 13)
    model = _fresh_torch_vae(c)
    model.add_adapter(peft.LoraConfig(r=4, init_lora_weights="gaussian", target_modules=targets),
                      adapter_name="default_encoder")
    with torch.no_grad():
        for name in targets:
            node = L._get(lora.factors, L.flax_path(name))
            mod = model.get_submodule(name)
            mod.lora_A["default_encoder"].weight.copy_(_to_torch(node["a"]).reshape(mod.lora_A["default_encoder"].weight.shape))
            mod.lora_B["default_encoder"].weight.copy_(_to_torch(node["b"]).reshape(mod.lora_B["default_encoder"].weight.shape))
    ref_mean, ref_logvar = _torch_encode(model, c["x"])
    mean, logvar = c["run"](L.variables(c["params"], lora), c["x"])
    plain, _ = c["run"](L.variables(c["params"]), c["x"])
    assert _rel(plain, ref_mean) > 0.05
    assert _rel(mean, ref_mean) < 1e-4 and _rel(logvar, ref_logvar) < 1e-4
    merged_mean, _ = c["run"]({"params": L.merge(c["params"], lora)}, c["x"])
    assert _rel(merged_mean, mean) < 1e-5

    from safetensors.torch import load_file
    file = P.save_peft_lora(lora, tmp_path / "vae_lora")
    m2 = peft.inject_adapter_in_model(peft.LoraConfig.from_pretrained(str(tmp_path / "vae_lora")),
                                      _fresh_torch_vae(c), adapter_name="jsr")
    peft.set_peft_model_state_dict(m2, load_file(file), adapter_name="jsr")
    assert _rel(_torch_encode(m2, c["x"])[0], ref_mean) < 1e-4


def test_cli_export_lora_and_merge(unet_case, vae_case, tmp_path):
    """``python -m jsr.weights export-lora`` and ``merge`` on an SD folder made of the tiny UNet and VAE."""
    import shutil

    from jsr.weights.__main__ import main

    sd = tmp_path / "sd"
    shutil.copytree(unet_case["folder"], sd / "unet")
    shutil.copytree(vae_case["folder"], sd / "vae")
    (sd / "scheduler").mkdir()
    (sd / "scheduler" / "scheduler_config.json").write_text("{}")
    unet_params, vae_params = unet_case["params"], vae_case["params"]
    unet_lora = _random_lora(L.init(jax.random.key(20), unet_params, L.OSEDIFF_UNET), 21)
    vae_lora = _random_lora(L.init(jax.random.key(22), vae_params, L.OSEDIFF_VAE, VAE_INDEXED), 23)
    P.save_peft_lora(unet_lora, tmp_path / "unet_lora")
    P.save_peft_lora(vae_lora, tmp_path / "vae_lora", prefix="vae")

    assert main(["export-lora", str(tmp_path / "unet_lora"), str(tmp_path / "exported")]) == 0
    a = P.io.read_safetensors(tmp_path / "unet_lora" / P.ADAPTER_WEIGHTS)
    b = P.io.read_safetensors(tmp_path / "exported" / "default" / P.ADAPTER_WEIGHTS)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)

    assert main(["merge", str(sd), str(tmp_path / "unet_lora"), str(tmp_path / "vae_lora"), str(tmp_path / "out"),
                 "--weight", "vae=0.5"]) == 0
    _, merged_unet = load_unet(tmp_path / "out" / "unet")
    _, merged_vae = load_vae(tmp_path / "out" / "vae")
    want_unet = L.merge(unet_params, unet_lora)
    want_vae = L.merge(vae_params, L.stack([(vae_lora, 0.5)]))
    for got, want in ((merged_unet, want_unet), (merged_vae, want_vae)):
        for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    assert (tmp_path / "out" / "scheduler" / "scheduler_config.json").is_file()
