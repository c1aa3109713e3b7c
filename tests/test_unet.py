"""The Flax UNet against diffusers' PyTorch UNet2DConditionModel with the same random weights.

Tiny SD-2-style (linear projections, per-block head counts) and SD-1-style (1x1-conv projections, one head count)
models are built in diffusers with every parameter randomised (the default init leaves norm scales at 1 and
biases at 0, which would hide a swapped or dropped scale/bias), saved with ``save_pretrained`` and loaded through
``jsr.weights.load_unet``. Tolerance: relative L2 error < 1e-4 in float32
(different summation orders in convs/matmuls over ~20 layers; measured ~1e-6).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.models import common
from jsr.models.presets import preset
from jsr.models.unet import UNetConfig
from jsr.weights import convert, io, native
from jsr.weights.unet import UNET_INDEXED, WEIGHTS_NAME, load_unet, save_unet, unet_from_config
from tests.helpers import rel_error as _rel, randomise_torch as _randomise

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD2_STYLE = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1, attention_head_dim=[2, 4], cross_attention_dim=48, norm_num_groups=8,
    use_linear_projection=True, act_fn="silu", flip_sin_to_cos=True, freq_shift=0,
)
SD1_STYLE = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=[16, 32, 32],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    layers_per_block=1, attention_head_dim=2, cross_attention_dim=24, norm_num_groups=8,
    use_linear_projection=False,
)
# Options outside plain SD, but in the supported set: gelu activations, only-cross-attention, two transformer
# layers per block, bottom/right downsample padding, a centred input, mid-block output scale, other time
# embedding flags and widths, non-3x3 conv_in/out; the odd latent size forces non-x2 nearest upsampling.
OPTIONS_A = dict(
    SD2_STYLE, act_fn="gelu", only_cross_attention=True, transformer_layers_per_block=2, downsample_padding=0,
    center_input_sample=True, mid_block_scale_factor=1.5, flip_sin_to_cos=False, freq_shift=1,
    time_embedding_dim=40, conv_in_kernel=1, conv_out_kernel=5, upcast_attention=True, in_channels=3,
    out_channels=5,
)
OPTIONS_B = dict(SD1_STYLE, mid_block_type=None, only_cross_attention=[False, True, False], act_fn="mish",
                 layers_per_block=[1, 2, 1], norm_eps=1e-6)


# The real stabilityai/stable-diffusion-2-1-base unet/config.json values.
SD21_BASE = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.8.0", "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "sample_size": 64, "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                          "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}


def _torch_unet(config, seed=0):
    return _randomise(diffusers.UNet2DConditionModel(**config).eval(), seed)


def _torch_forward(model, x, t, ctx):
    with torch.no_grad():
        tt = torch.from_numpy(np.asarray(t, np.float32)) if not isinstance(t, float) else t
        out = model(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()), tt,
                    torch.from_numpy(np.asarray(ctx))).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _inputs(config, batch=2, size=(16, 16), ctx_len=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, *size, config["in_channels"])).astype(np.float32)
    ctx = rng.normal(size=(batch, ctx_len, config["cross_attention_dim"])).astype(np.float32)
    return x, ctx


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2_unet")
    model = _torch_unet(SD2_STYLE, seed=1)
    model.save_pretrained(folder)
    module, params = load_unet(folder)
    return model, module, params, folder


def _apply(module, params, x, t, ctx):
    return jax.jit(module.apply)({"params": params}, x, t, ctx)


@pytest.mark.parametrize("config", [SD2_STYLE, SD1_STYLE], ids=["sd2-style", "sd1-style"])
def test_parity_with_diffusers(config, tmp_path):
    model = _torch_unet(config, seed=2)
    model.save_pretrained(tmp_path)
    module, params = load_unet(tmp_path)
    x, ctx = _inputs(config)
    t = np.array([999.0, 37.0], np.float32)
    y = _apply(module, params, x, t, ctx)
    ref = _torch_forward(model, x, t, ctx)
    assert y.shape == ref.shape == x.shape
    assert _rel(y, ref) < 1e-4
    # Parameter count equals PyTorch's: nothing is dropped or duplicated.
    n_jsr = sum(v.size for v in jax.tree.leaves(params))
    assert n_jsr == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config,size", [(OPTIONS_A, (9, 11)), (OPTIONS_B, (12, 10))], ids=["options-a", "options-b"])
def test_parity_supported_options(config, size, tmp_path):
    model = _torch_unet(config, seed=3)
    model.save_pretrained(tmp_path)
    module, params = load_unet(tmp_path)
    x, ctx = _inputs(config, size=size, ctx_len=5)
    t = np.array([500.25, 3.0], np.float32)
    y = _apply(module, params, x, t, ctx)
    ref = _torch_forward(model, x, t, ctx)
    assert y.shape == (2, *size, config["out_channels"])
    assert _rel(y, ref) < 1e-4


def test_float_timesteps(sd2):
    """Fractional timesteps (the control knob), scalars broadcast to the batch, and a [B] vector."""
    model, module, params, _ = sd2
    x, ctx = _inputs(SD2_STYLE)
    apply = jax.jit(module.apply)
    outs = {}
    for t in (999.0, 0.5, 250.75):
        y = apply({"params": params}, x, jnp.float32(t), ctx)
        assert _rel(y, _torch_forward(model, x, t, ctx)) < 1e-4
        outs[t] = np.asarray(y)
    np.testing.assert_array_equal(apply({"params": params}, x, 0.5, ctx), outs[0.5])  # a Python float works too
    tv = np.array([0.5, 999.0], np.float32)
    yv = apply({"params": params}, x, tv, ctx)
    assert _rel(yv, _torch_forward(model, x, tv, ctx)) < 1e-4
    # Each batch entry got its own timestep.
    assert _rel(yv[0], outs[0.5][0]) < 1e-5 and _rel(yv[1], outs[999.0][1]) < 1e-5
    assert _rel(outs[0.5], outs[999.0]) > 1e-2  # the timestep actually matters


def test_roundtrip_through_diffusers(sd2, tmp_path):
    model, module, params, folder = sd2
    save_unet(module, params, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    original = io.read_config(folder)
    assert saved["_class_name"] == "UNet2DConditionModel"
    assert {k: v for k, v in saved.items() if not k.startswith("_")} == \
        {k: v for k, v in original.items() if not k.startswith("_")}
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "out").eval()
    x, ctx = _inputs(SD2_STYLE)
    t = np.array([999.0, 0.5], np.float32)
    ref = _torch_forward(model, x, t, ctx)
    np.testing.assert_array_equal(_torch_forward(back, x, t, ctx), ref)  # f32 tensors copied bit-exactly
    assert _rel(_apply(module, params, x, t, ctx), ref) < 1e-4
    # bf16 files: written as bf16, read back as the bf16-rounded parameters.
    save_unet(module, params, tmp_path / "bf16", dtype=jnp.bfloat16)
    state = io.read_state_dict(tmp_path / "bf16")
    assert {str(v.dtype) for v in state.values()} == {"bfloat16"}
    m16, p16 = load_unet(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert m16.dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(p16), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))


def test_loads_bin_and_native_folders(sd2, tmp_path):
    model, module, params, folder = sd2
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not list((tmp_path / "bin").glob("*.safetensors"))
    _, from_bin = load_unet(tmp_path / "bin")
    native.write_native(tmp_path / "native", params, io.read_config(folder))
    _, from_native = load_unet(tmp_path / "native")
    for tree in (from_bin, from_native):
        assert jax.tree.structure(tree) == jax.tree.structure(params)
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _rewrite(src, dst, edit):
    state = dict(io.read_state_dict(src))
    edit(state)
    io.write_safetensors(dst / WEIGHTS_NAME, state)
    io.write_config(dst, io.read_config(src))


def test_checkpoint_errors_name_the_tensor(sd2, tmp_path):
    _, _, _, folder = sd2
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"

    _rewrite(folder, tmp_path / "missing", lambda s: s.pop(key))
    with pytest.raises(convert.CheckpointMismatchError, match=r"missing 1 tensor.*" + key.replace(".", r"\.")):
        load_unet(tmp_path / "missing")

    def reshape(s):
        s[key] = np.zeros((8, 47), np.float32)
    _rewrite(folder, tmp_path / "shape", reshape)
    with pytest.raises(convert.CheckpointMismatchError, match=key.replace(".", r"\.") + r".*\(8, 47\)"):
        load_unet(tmp_path / "shape")

    def extra(s):
        s["mid_block.attentions.0.extra.weight"] = np.zeros((2,), np.float32)
    _rewrite(folder, tmp_path / "extra", extra)
    with pytest.raises(convert.CheckpointMismatchError, match=r"unexpected 1 tensor.*extra\.weight"):
        load_unet(tmp_path / "extra")


def test_config_errors_name_the_option():
    bad = dict(SD2_STYLE, down_block_types=["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"])
    with pytest.raises(ValueError, match=r"down_block_types\[1\] = 'SimpleCrossAttnDownBlock2D'"):
        UNetConfig.from_diffusers(bad)
    with pytest.raises(ValueError, match=r"up_block_types\[0\] = 'AttnUpBlock2D'"):
        UNetConfig.from_diffusers(dict(SD2_STYLE, up_block_types=["AttnUpBlock2D", "CrossAttnUpBlock2D"]))
    with pytest.raises(ValueError, match="mid_block_type = 'UNetMidBlock2DSimpleCrossAttn'"):
        UNetConfig.from_diffusers(dict(SD2_STYLE, mid_block_type="UNetMidBlock2DSimpleCrossAttn"))
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        UNetConfig.from_diffusers(dict(SD2_STYLE, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        UNetConfig.from_diffusers(dict(SD2_STYLE, addition_embed_type="text_time"))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['frobnicate'\]"):
        UNetConfig.from_diffusers(dict(SD2_STYLE, frobnicate=1))
    with pytest.raises(ValueError, match="attention_head_dim has 3 entries"):
        UNetConfig.from_diffusers(dict(SD2_STYLE, attention_head_dim=[2, 4, 8]))
    with pytest.raises(ValueError, match="do not split into 3 attention heads"):
        common.abstract_params(unet_from_config(dict(SD2_STYLE, attention_head_dim=[3, 4])))
    # The config is hashable (a valid linen attribute) and keeps the original dict.
    cfg = UNetConfig.from_diffusers(SD2_STYLE)
    assert hash(cfg) == hash(UNetConfig.from_diffusers(dict(SD2_STYLE)))
    assert cfg.to_diffusers() == SD2_STYLE
    assert cfg.heads == (2, 4)


def test_presets_and_full_size_parameter_count():
    """The SD-2.1-base architecture has 865,910,724 UNet parameters (diffusers' count for the real checkpoint);
    shapes only, no weights."""
    abstract = common.abstract_params(unet_from_config(SD21_BASE))
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(abstract)) == 865_910_724
    assert unet_from_config(preset("sd21-base")["unet"]).config == UNetConfig.from_diffusers(
        preset("sd21-base")["unet"])
    tiny = unet_from_config(preset("tiny")["unet"])
    assert tiny.config.heads == (2, 4) and tiny.config.use_linear_projection


def test_bf16_compute_close_to_f32(sd2):
    """bf16 activations over f32 parameters: 8-bit mantissas (~0.4 % per rounding) through ~20 layers; we
    accept 5 % relative L2 error (measured ~1 %)."""
    _, module, params, _ = sd2
    x, ctx = _inputs(SD2_STYLE)
    t = np.array([999.0, 10.0], np.float32)
    y32 = _apply(module, params, x, t, ctx)
    y16 = _apply(module.clone(dtype=jnp.bfloat16), params, x, t, ctx)
    assert y16.dtype == jnp.bfloat16
    assert _rel(y16.astype(jnp.float32), y32) < 5e-2


def test_logical_axes_match_params(sd2):
    _, module, params, _ = sd2
    axes = common.logical_axes(module)
    assert jax.tree.structure(axes, is_leaf=lambda a: isinstance(a, jax.sharding.PartitionSpec)) == \
        jax.tree.structure(params)
    flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda a: isinstance(a, jax.sharding.PartitionSpec))[0]
    named = {"/".join(k.key for k in path): tuple(spec) for path, spec in flat}
    blk = "down_blocks_0/attentions_0/transformer_blocks_0"
    assert named[f"{blk}/attn1/to_q/kernel"] == ("embed", "heads")
    assert named[f"{blk}/attn2/to_out_0/kernel"] == ("heads", "embed")
    assert named[f"{blk}/ff/net_0/proj/kernel"] == ("embed", "mlp")
    assert named[f"{blk}/ff/net_2/kernel"] == ("mlp", "embed")
    shapes = {"/".join(k.key for k in path): v.shape for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert all(len(named[k]) == len(s) for k, s in shapes.items())
    # Every parameter maps to a PyTorch key.
    keys = {convert.torch_key(tuple(k.split("/")), UNET_INDEXED) for k in shapes}
    assert "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight" in keys
    assert "up_blocks.0.upsamplers.0.conv.weight" in keys


@pytest.mark.slow
def test_full_sd21_base_parity(tmp_path):
    """Random weights at the real size, 64x64 latent (512 px), 77 context tokens (~1 minute, ~8 GB RAM)."""
    cfg = {k: v for k, v in SD21_BASE.items() if not k.startswith("_")}
    model = _torch_unet(cfg, seed=4)
    model.save_pretrained(tmp_path)
    del model
    module, params = load_unet(tmp_path)
    model = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    x, ctx = _inputs(cfg, batch=1, size=(64, 64), ctx_len=77)
    t = np.array([999.0], np.float32)
    assert _rel(_apply(module, params, x, t, ctx), _torch_forward(model, x, t, ctx)) < 1e-4
