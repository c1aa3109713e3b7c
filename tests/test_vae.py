"""The Flax AutoencoderKL against diffusers' PyTorch AutoencoderKL with the same random weights.

Tiny VAEs are built in diffusers, every parameter randomised (norm scales near 1, biases small, weights with a
1/sqrt(fan_in) spread so activations stay O(1)), saved with ``save_pretrained`` and loaded through
``jsr.weights.load_vae``. Tolerance: relative L2 error < 1e-4 in float32 (summation order differs in convs,
matmuls and the attention softmax; measured ~1e-6).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.models import common
from jsr.models import lora as L
from jsr.models.vae import AutoencoderKL, VAEConfig
from jsr.weights import convert, io
from jsr.weights.vae import VAE_INDEXED, WEIGHTS_NAME, legacy_rename, load_vae, save_vae, vae_from_config
from tests.helpers import rel_error as _rel, randomise_torch

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[32, 64],
    down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=0.18215,
)
# Supported options away from SD's: three levels, two resnets per block (three in the decoder), other channel
# counts, no quant convs, no mid-block attention, another activation.
OPTIONS = dict(
    in_channels=2, out_channels=5, latent_channels=3, block_out_channels=[8, 16, 16],
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    layers_per_block=2, norm_num_groups=4, act_fn="mish", use_quant_conv=False, use_post_quant_conv=False,
    mid_block_add_attention=False, sample_size=16,
)
# The SD-2.1-base vae/config.json architecture (stabilityai/stable-diffusion-2-1-base).
SD21_BASE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=768, scaling_factor=0.18215,
)
SD21_BASE_PARAMS = 83_653_863

LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _torch_vae(config, seed=0):
    return randomise_torch(diffusers.AutoencoderKL(**config).eval(), seed, spread=0.1)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _torch_encode(model, x):
    with torch.no_grad():
        d = model.encode(_nchw(x)).latent_dist
    return _nhwc(d.mean), _nhwc(d.logvar)


def _torch_decode(model, z):
    with torch.no_grad():
        return _nhwc(model.decode(_nchw(z)).sample)


def _images(batch, h, w, c, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, h, w, c)).astype(np.float32)


def _random_like(tree, std, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [std * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves)])


def _encode(module, params, x):
    return jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))(params, x)


def _decode(module, params, z):
    return jax.jit(lambda p, z: module.apply({"params": p}, z, method=module.decode))(params, z)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_vae")
    model = _torch_vae(TINY, seed=1)
    model.save_pretrained(folder)
    module, params = load_vae(folder)
    return model, module, params, folder


def test_encode_decode_parity(tiny):
    model, module, params, _ = tiny
    x = _images(2, 32, 32, 3)
    mean, logvar = _encode(module, params, x)
    ref_mean, ref_logvar = _torch_encode(model, x)
    assert mean.shape == ref_mean.shape == (2, 16, 16, 4)
    assert _rel(mean, ref_mean) < 1e-4
    assert _rel(logvar, ref_logvar) < 1e-4
    z = np.random.default_rng(3).normal(size=(2, 16, 16, 4)).astype(np.float32)
    y = _decode(module, params, z)
    ref = _torch_decode(model, z)
    assert y.shape == ref.shape == (2, 32, 32, 3)
    assert _rel(y, ref) < 1e-4
    # __call__ is decode(mean): init goes through every layer.
    full = jax.jit(module.apply)({"params": params}, x)
    assert _rel(full, _torch_decode(model, ref_mean)) < 1e-4
    # Nothing dropped or duplicated; latents stay unscaled, the factor is kept for the caller.
    assert sum(v.size for v in jax.tree.leaves(params)) == sum(p.numel() for p in model.parameters())
    assert module.config.scaling_factor == pytest.approx(0.18215)


def test_logvar_is_clipped_like_diffusers(tiny, tmp_path):
    model, module, params, _ = tiny
    # Push the log-variance channels of quant_conv far out of [-30, 20], half up and half down.
    bias = np.array(params["quant_conv"]["bias"])
    bias[4:6], bias[6:] = 1e4, -1e4
    params = dict(params, quant_conv=dict(params["quant_conv"], bias=jnp.asarray(bias)))
    _, logvar = _encode(module, params, _images(1, 32, 32, 3))
    assert np.all(np.asarray(logvar)[..., :2] == 20.0) and np.all(np.asarray(logvar)[..., 2:] == -30.0)
    save_vae(module, params, tmp_path)
    _, ref = _torch_encode(diffusers.AutoencoderKL.from_pretrained(tmp_path).eval(), _images(1, 32, 32, 3))
    np.testing.assert_array_equal(np.asarray(logvar), ref)


def test_supported_options_parity(tmp_path):
    model = _torch_vae(OPTIONS, seed=4)
    model.save_pretrained(tmp_path)
    module, params = load_vae(tmp_path)
    assert "quant_conv" not in params and "attentions_0" not in params["encoder"]["mid_block"]
    # Odd, non-square sizes: diffusers' bottom/right padding before each stride-2 conv.
    x = _images(2, 21, 26, 2, seed=5)
    mean, logvar = _encode(module, params, x)
    ref_mean, ref_logvar = _torch_encode(model, x)
    assert mean.shape == ref_mean.shape == (2, 5, 6, 3)
    assert _rel(mean, ref_mean) < 1e-4 and _rel(logvar, ref_logvar) < 1e-4
    z = np.random.default_rng(6).normal(size=(1, 3, 5, 3)).astype(np.float32)
    y = _decode(module, params, z)
    ref = _torch_decode(model, z)
    assert y.shape == ref.shape == (1, 12, 20, 5)
    assert _rel(y, ref) < 1e-4


def test_round_trip_to_diffusers(tiny, tmp_path):
    model, module, params, _ = tiny
    save_vae(module, params, tmp_path)
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    original = model.state_dict()
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), original[k].numpy(), err_msg=k)
    x = _images(1, 32, 32, 3, seed=7)
    mean, _ = _encode(module, params, x)
    ref_mean, _ = _torch_encode(back, x)
    assert _rel(mean, ref_mean) < 1e-4
    # And back into jsr: identical parameters.
    _, again = load_vae(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, again, params)


@pytest.mark.parametrize("conv_shaped", [False, True], ids=["linear", "1x1-conv"])
def test_legacy_attention_names_load(tiny, tmp_path, conv_shaped):
    _, module, params, folder = tiny
    state = dict(io.read_state_dict(folder))
    renamed = {}
    for key, value in state.items():
        for new, old in LEGACY.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if conv_shaped and value.ndim == 2:
                    value = value[:, :, None, None]
        renamed[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in renamed
    assert legacy_rename("decoder.mid_block.attentions.0.query.bias") == "decoder.mid_block.attentions.0.to_q.bias"
    io.write_config(tmp_path, io.read_config(folder))
    io.write_safetensors(tmp_path / WEIGHTS_NAME, renamed)
    _, loaded = load_vae(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_strict_loading_names_the_tensor(tiny, tmp_path):
    _, _, _, folder = tiny
    state = dict(io.read_state_dict(folder))
    io.write_config(tmp_path, io.read_config(folder))

    missing = {k: v for k, v in state.items() if k != "decoder.up_blocks.1.resnets.0.conv2.bias"}
    io.write_safetensors(tmp_path / WEIGHTS_NAME, missing)
    with pytest.raises(convert.CheckpointMismatchError,
                       match=r"missing 1 .*decoder\.up_blocks\.1\.resnets\.0\.conv2\.bias"):
        load_vae(tmp_path)

    wrong = dict(state)
    wrong["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    wrong["encoder.extra.weight"] = np.zeros((2,), np.float32)
    io.write_safetensors(tmp_path / WEIGHTS_NAME, wrong)
    with pytest.raises(convert.CheckpointMismatchError) as err:
        load_vae(tmp_path)
    assert "encoder.extra.weight" in str(err.value)
    assert "'encoder.conv_in.weight' has shape (32, 3, 5, 5) but the model expects (32, 3, 3, 3)" in str(err.value)


@pytest.mark.parametrize("change,needle", [
    (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]), "down_block_types\\[1\\]"),
    (dict(layers_per_block=[1, 2]), "layers_per_block"),
    (dict(norm_num_groups=24), "norm_num_groups=24"),
    (dict(use_tiling_magic=True), "use_tiling_magic"),
    (dict(act_fn="softsign"), "act_fn='softsign'"),
    (dict(_class_name="AutoencoderTiny"), "AutoencoderTiny"),
])
def test_unsupported_config_is_named(change, needle):
    with pytest.raises(ValueError, match=needle):
        VAEConfig.from_diffusers(dict(TINY, **change))


def test_bad_input_shapes_are_named(tiny):
    _, module, params, _ = tiny
    with pytest.raises(ValueError, match="NHWC images with 3 channels"):
        module.apply({"params": params}, np.zeros((1, 3, 32, 32), np.float32), method="encode")
    with pytest.raises(ValueError, match="NHWC latents with 4 channels"):
        module.apply({"params": params}, np.zeros((1, 4, 8, 8), np.float32), method="decode")


def test_config_round_trip_and_axes(tiny):
    _, module, params, folder = tiny
    cfg = VAEConfig.from_diffusers(io.read_config(folder))
    assert cfg.to_diffusers() == io.read_config(folder) and hash(cfg) == hash(module.config)
    assert cfg.downscale == 2
    # Every parameter has logical axis names, in the same tree as the parameters.
    axes = common.logical_axes(module)
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) == \
        jax.tree.structure(params)
    assert tuple(axes["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"]) == ("embed", "heads")


def test_osediff_vae_lora_reaches_every_encoder_target(tiny):
    """OSEDiff's VAE LoRA targets the encoder's convs and attention projections and quant_conv: applying it
    through the ``lora`` collection equals merging it into the weights, so every targeted layer took it."""
    _, module, params, _ = tiny
    selected = {L.module_name(p, VAE_INDEXED) for p in L.select(params, L.OSEDIFF_VAE_TARGETS, VAE_INDEXED)["encoder"]}
    assert {"quant_conv", "encoder.conv_in", "encoder.mid_block.attentions.0.to_q",
            "encoder.mid_block.attentions.0.to_out.0", "encoder.down_blocks.0.downsamplers.0.conv"} <= selected
    assert not any(n.startswith(("decoder", "post_quant_conv")) for n in selected)
    lora = L.init(jax.random.key(0), params, L.OSEDIFF_VAE, VAE_INDEXED)
    lora = lora.replace(factors=_random_like(lora.factors, 0.1, 1))
    x = _images(1, 32, 32, 3, seed=8)
    with_lora = jax.jit(lambda v, x: module.apply(v, x, method="encode"))(L.variables(params, lora), x)
    merged = _encode(module, L.merge(params, lora), x)
    plain = _encode(module, params, x)
    assert _rel(with_lora[0], merged[0]) < 1e-5
    assert _rel(with_lora[0], plain[0]) > 1e-2


def test_lora_on_the_decoder_upsampler_conv(tiny):
    """The decoder's upsample conv runs as a 2x2 sub-pixel conv; a LoRA on it still equals the merged weights."""
    _, module, params, _ = tiny
    spec = L.LoRASpec(L.Targets(patterns=("upsamplers",)), rank=2, alpha=2.0)
    lora = L.init(jax.random.key(2), params, spec, VAE_INDEXED)
    assert [L.module_name(p, VAE_INDEXED) for p in lora.paths()] == ["decoder.up_blocks.0.upsamplers.0.conv"]
    lora = lora.replace(factors=_random_like(lora.factors, 0.2, 3))
    z = np.random.default_rng(12).normal(size=(1, 5, 7, 4)).astype(np.float32)
    with_lora = jax.jit(lambda v, z: module.apply(v, z, method="decode"))(L.variables(params, lora), z)
    assert _rel(with_lora, _decode(module, L.merge(params, lora), z)) < 1e-5
    assert _rel(with_lora, _decode(module, params, z)) > 1e-2


def test_bf16(tiny):
    # Rematerialisation (gradients, memory, parameter names) is tested in tests/test_remat.py.
    _, module, params, _ = tiny
    x = _images(1, 32, 32, 3, seed=9)
    # bf16 compute over float32 parameters: ~3 significant digits.
    mean32, _ = _encode(module, params, x)
    mean16, _ = _encode(module.clone(dtype=jnp.bfloat16), params, x)
    assert mean16.dtype == jnp.bfloat16 and _rel(mean16, mean32) < 5e-2


def test_vae_from_config_builds_the_preset():
    from jsr.models.presets import SD21_BASE_VAE

    module = vae_from_config(SD21_BASE_VAE)
    n = sum(np.prod(v.shape) for v in jax.tree.leaves(common.abstract_params(module)))
    assert n == SD21_BASE_PARAMS


@pytest.mark.slow
def test_full_size_sd21_base_vae(tmp_path):
    model = _torch_vae(SD21_BASE, seed=10)
    assert sum(p.numel() for p in model.parameters()) == SD21_BASE_PARAMS
    model.save_pretrained(tmp_path)
    module, params = load_vae(tmp_path)
    assert isinstance(module, AutoencoderKL)
    assert sum(v.size for v in jax.tree.leaves(params)) == SD21_BASE_PARAMS
    x = _images(1, 256, 256, 3, seed=11)
    mean, logvar = _encode(module, params, x)
    ref_mean, ref_logvar = _torch_encode(model, x)
    assert mean.shape == (1, 32, 32, 4)
    assert _rel(mean, ref_mean) < 1e-4 and _rel(logvar, ref_logvar) < 1e-4
    y = _decode(module, params, ref_mean)
    ref = _torch_decode(model, ref_mean)
    assert y.shape == (1, 256, 256, 3) and _rel(y, ref) < 1e-4
