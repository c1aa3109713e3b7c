"""The Flax CLIP vision encoder against transformers' PyTorch CLIPVisionModel with the same random weights, its
checkpoint round trip, and CLIP preprocessing against transformers' image processor and PyTorch's resize.

Tiny models are built in transformers, every parameter randomised (``helpers.randomise_torch``), saved with
``save_pretrained`` and loaded through ``jsr.weights.load_clip_vision``. Tolerance: relative L2 error < 1e-4 in
float32 (summation order differs; measured ~1e-7 to 3e-7).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.models import common
from jsr.models.clip_vision import (CLIP_MEAN, CLIP_STD, CLIPVisionConfig, center_crop, clip_preprocess,
                                    resize_shortest_side, shortest_side_size)
from jsr.weights import convert, io
from jsr.weights.clip_vision import WEIGHTS_NAME, load_clip_vision, save_clip_vision
from tests.helpers import randomise_torch
from tests.helpers import rel_error as _rel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# ViT-B/16-like in miniature: OpenAI CLIP's quick_gelu, a 4x4 patch grid.
VIT_B = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
             patch_size=8, projection_dim=16, hidden_act="quick_gelu")
# OpenCLIP-like: exact gelu, another eps, and an image size the patches do not divide (the grid is floored).
OPENCLIP = dict(VIT_B, hidden_act="gelu", num_attention_heads=2, layer_norm_eps=1e-6, image_size=30, patch_size=7,
                num_hidden_layers=2)
# openai/clip-vit-large-patch14's vision tower (RCOD's visual-prompt encoder): 24 layers of width 1024 at 224 px.
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def _torch_model(config, seed=0, projection=False):
    cls = transformers.CLIPVisionModelWithProjection if projection else transformers.CLIPVisionModel
    return randomise_torch(cls(transformers.CLIPVisionConfig(**config)).eval(), seed)


def _pixels(config, batch=2, seed=0):
    s = config["image_size"]
    return np.random.default_rng(seed).normal(size=(batch, s, s, 3)).astype(np.float32)


def _torch_forward(model, pixels):
    with torch.no_grad():
        return model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)


def _apply(module, params, pixels, hidden=True):
    return jax.jit(module.apply, static_argnums=2)({"params": params}, pixels, hidden)


def _check_parity(out, ref, n_layers, projection):
    assert out.last_hidden_state.shape == tuple(ref.last_hidden_state.shape)
    assert _rel(out.last_hidden_state, ref.last_hidden_state) < 1e-4
    # transformers' CLIPVisionModel returns `pooler_output`; the projection variant only `image_embeds`.
    pooled = getattr(ref, "pooler_output", None)
    if pooled is not None:
        assert _rel(out.pooler_output, pooled) < 1e-4
    assert len(out.hidden_states) == len(ref.hidden_states) == n_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert _rel(a, b) < 1e-4, f"hidden state {i}"
    np.testing.assert_array_equal(out.hidden_states[-1], out.last_hidden_state)
    if projection:
        assert _rel(out.image_embeds, ref.image_embeds) < 1e-4
    else:
        assert out.image_embeds is None


@pytest.fixture(scope="module")
def vit_b(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_vision_b")
    model = _torch_model(VIT_B, seed=1)
    model.save_pretrained(folder)
    module, params = load_clip_vision(folder)
    return model, module, params, folder


@pytest.mark.parametrize("config,projection", [(VIT_B, False), (OPENCLIP, False), (VIT_B, True)],
                         ids=["vit-b-quick_gelu", "openclip-gelu-floored-grid", "with-projection"])
def test_parity_with_transformers(config, projection, tmp_path):
    model = _torch_model(config, seed=2, projection=projection)
    model.save_pretrained(tmp_path)
    module, params = load_clip_vision(tmp_path)
    cfg = module.config
    assert (cfg.hidden_act, cfg.with_projection) == (config["hidden_act"], projection)
    assert cfg.num_positions == (config["image_size"] // config["patch_size"]) ** 2 + 1
    pixels = _pixels(config)
    out = _apply(module, params, pixels)
    _check_parity(out, _torch_forward(model, pixels), config["num_hidden_layers"], projection)
    assert out.last_hidden_state.shape == (2, cfg.num_positions, 32)
    assert sum(v.size for v in jax.tree.leaves(params)) == sum(p.numel() for p in model.parameters())
    # Without hidden states only they are dropped.
    plain = _apply(module, params, pixels, hidden=False)
    assert plain.hidden_states is None
    np.testing.assert_allclose(plain.last_hidden_state, out.last_hidden_state, rtol=0, atol=1e-6)


def test_pooler_of_projection_model(tmp_path):
    """``CLIPVisionModelWithProjection`` hides the pooled token; compare it with its inner CLIPVisionModel."""
    model = _torch_model(VIT_B, seed=3, projection=True)
    model.save_pretrained(tmp_path)
    module, params = load_clip_vision(tmp_path)
    pixels = _pixels(VIT_B, seed=3)
    ref = _torch_forward(model.vision_model, pixels)
    assert _rel(_apply(module, params, pixels).pooler_output, ref.pooler_output) < 1e-4
    # Loading without the projection skips nothing silently: the file's visual_projection is unexpected.
    with pytest.raises(convert.CheckpointMismatchError, match="visual_projection.weight"):
        load_clip_vision(tmp_path, with_projection=False)


def test_full_clip_folder(tmp_path):
    """A whole ``CLIPModel`` folder (as openai/clip-vit-large-patch14 is) loads its vision tower, optionally with
    CLIP's image projection; the text tower is skipped."""
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=VIT_B, projection_dim=12)
    model = transformers.CLIPModel(config).eval()
    # The parts jsr reads (randomise_torch cannot fill the 0-d logit_scale; the text tower is skipped anyway).
    randomise_torch(model.vision_model, 4)
    randomise_torch(model.visual_projection, 5)
    model.save_pretrained(tmp_path)
    pixels = _pixels(VIT_B, seed=4)
    with torch.no_grad():
        ref = model.vision_model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)
        embeds = model.visual_projection(ref.pooler_output).numpy()
    module, params = load_clip_vision(tmp_path)
    assert not module.config.with_projection
    _check_parity(_apply(module, params, pixels), ref, VIT_B["num_hidden_layers"], projection=False)
    module, params = load_clip_vision(tmp_path, with_projection=True)
    assert module.config.projection_dim == 12
    assert _rel(_apply(module, params, pixels).image_embeds, embeds) < 1e-4


@pytest.mark.parametrize("projection", [False, True], ids=["plain", "with-projection"])
def test_round_trip_to_transformers(projection, tmp_path):
    model = _torch_model(VIT_B, seed=5, projection=projection)
    model.save_pretrained(tmp_path / "src")
    module, params = load_clip_vision(tmp_path / "src")
    save_clip_vision(module, params, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    arch = "CLIPVisionModelWithProjection" if projection else "CLIPVisionModel"
    assert cfg["architectures"] == [arch] and cfg["model_type"] == "clip_vision_model"
    # The transformers-4 / full-CLIP layout: every key under vision_model. but the projection.
    keys = set(io.read_safetensors(tmp_path / "out" / WEIGHTS_NAME))
    assert all(k.startswith("vision_model.") or k == "visual_projection.weight" for k in keys)
    assert "vision_model.embeddings.class_embedding" in keys
    assert ("visual_projection.weight" in keys) == projection
    back, info = getattr(transformers, arch).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = model.state_dict()
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), original[k].numpy(), err_msg=k)
    pixels = _pixels(VIT_B, seed=6)
    _check_parity(_apply(module, params, pixels), _torch_forward(back.eval(), pixels), VIT_B["num_hidden_layers"],
                  projection)
    _, again = load_clip_vision(tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_prefixed_layout_with_position_ids_loads(vit_b, tmp_path):
    """transformers 4 / full-CLIP files store ``vision_model.``-prefixed keys and often the position_ids buffer."""
    _, _, params, folder = vit_b
    state = {"vision_model." + k: v for k, v in io.read_state_dict(folder).items()}
    state["vision_model.embeddings.position_ids"] = np.arange(17, dtype=np.int64)[None]
    io.write_config(tmp_path, io.read_config(folder))
    io.write_safetensors(tmp_path / WEIGHTS_NAME, state)
    _, loaded = load_clip_vision(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_strict_loading_names_the_tensor(vit_b, tmp_path):
    _, _, _, folder = vit_b
    state = dict(io.read_state_dict(folder))
    io.write_config(tmp_path, io.read_config(folder))
    io.write_safetensors(tmp_path / WEIGHTS_NAME, {k: v for k, v in state.items() if k != "embeddings.class_embedding"})
    with pytest.raises(convert.CheckpointMismatchError, match=r"missing 1 .*embeddings\.class_embedding"):
        load_clip_vision(tmp_path)
    wrong = dict(state, **{"embeddings.position_embedding.weight": np.zeros((50, 32), np.float32)})
    io.write_safetensors(tmp_path / WEIGHTS_NAME, wrong)
    with pytest.raises(convert.CheckpointMismatchError,
                       match=r"'embeddings\.position_embedding\.weight' has shape \(50, 32\) but the model expects "
                             r"\(17, 32\)"):
        load_clip_vision(tmp_path)


@pytest.mark.parametrize("change,needle", [
    (dict(hidden_act="relu"), "hidden_act='relu'"),
    (dict(model_type="siglip_vision_model"), "model_type='siglip_vision_model'"),
    (dict(architectures=["CLIPForImageClassification"]), "CLIPForImageClassification"),
    (dict(num_attention_heads=5), "num_attention_heads=5"),
    (dict(patch_size=64), "patch_size=64"),
])
def test_unsupported_config_is_named(change, needle):
    with pytest.raises(ValueError, match=needle):
        CLIPVisionConfig.from_transformers({**VIT_B, "model_type": "clip_vision_model", **change})


def test_wrong_image_size_is_an_error(vit_b):
    _, module, params, _ = vit_b
    with pytest.raises(ValueError, match=r"expects NHWC pixels \[B, 32, 32, 3\], got shape \(1, 3, 32, 32\)"):
        module.apply({"params": params}, np.zeros((1, 3, 32, 32), np.float32))


def test_logical_axes_remat_and_bf16(vit_b):
    _, module, params, _ = vit_b
    axes = common.logical_axes(module)
    assert tuple(axes["embeddings"]["patch_embedding"]["kernel"]) == (None, None, None, "embed")
    assert tuple(axes["embeddings"]["class_embedding"]["embedding"]) == ("embed",)
    assert tuple(axes["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]) == ("embed", "mlp")
    pixels = _pixels(VIT_B, seed=7)
    ref = _apply(module, params, pixels)
    remat = _apply(module.clone(remat=True), params, pixels)
    np.testing.assert_allclose(remat.last_hidden_state, ref.last_hidden_state, rtol=0, atol=1e-5)
    y16 = _apply(module.clone(dtype=jnp.bfloat16), params, pixels)
    assert y16.last_hidden_state.dtype == jnp.bfloat16
    assert _rel(y16.last_hidden_state, ref.last_hidden_state) < 5e-2
    # Gradients reach the pixels (a discriminator / perceptual loss differentiates through the encoder).
    g = jax.jit(jax.grad(lambda x: jnp.sum(module.apply({"params": params}, x).pooler_output ** 2)))(pixels)
    assert g.shape == pixels.shape and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


# ------------------------------------------------------------------------------------------------------------------
# Preprocessing

def _photos():
    data = pytest.importorskip("skimage.data")
    return {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee")}  # 512x512, 300x451, 400x600


def _pil_processor():
    # transformers 5's CLIPImageProcessor runs on torchvision; CLIPImageProcessorPil is the PIL pipeline that
    # transformers 4's CLIPImageProcessor was.
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls()


def _processed(processor, image):
    return processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def test_clip_mode_matches_clip_image_processor_after_the_same_resize():
    """Given the image PIL has already resized (shorter side 224), crop + normalise equal the processor's."""
    from PIL import Image

    processor = _pil_processor()
    for name, img in _photos().items():
        h, w = shortest_side_size(img.shape[0], img.shape[1], 224)
        resized = np.asarray(Image.fromarray(img).resize((w, h), Image.BICUBIC))
        ref = _processed(processor, resized)  # its resize to the same size is PIL's identity
        ours = np.asarray(clip_preprocess(resized[None] / 255.0))[0]
        assert ours.shape == ref.shape == (224, 224, 3)
        assert np.abs(ours - ref).max() < 1e-5, name


def test_clip_resize_matches_pil_bicubic_on_float_images():
    """The JAX resize equals PIL's bicubic on float ("F") images; the processor's remaining difference is PIL's
    8-bit path, bounded here (measured: max 0.071 / 0.015 / 0.047, mean ~0.004 after normalisation)."""
    from PIL import Image

    processor = _pil_processor()
    for name, img in _photos().items():
        h, w = shortest_side_size(img.shape[0], img.shape[1], 224)
        x = img.astype(np.float32) / 255.0
        pil_float = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c])).resize((w, h), Image.BICUBIC))
                              for c in range(3)], axis=-1)
        ours = np.asarray(resize_shortest_side(x[None]))[0]
        assert ours.shape == (h, w, 3)
        assert np.abs(ours - np.clip(pil_float, 0, 1)).max() < 1e-4, name
        d = np.abs(np.asarray(clip_preprocess(x[None]))[0] - _processed(processor, img))
        assert d.max() < 0.1 and d.mean() < 0.01, (name, d.max(), d.mean())


def test_clip_mode_crop_and_statistics():
    x = np.random.default_rng(8).random((2, 240, 300, 3)).astype(np.float32)
    crop = np.asarray(center_crop(x, 224))
    np.testing.assert_array_equal(crop, x[:, 8:232, 38:262])
    # A constant image stays constant through the resize and maps to (v - mean) / std.
    flat = np.full((1, 100, 150, 3), 0.25, np.float32)
    np.testing.assert_allclose(clip_preprocess(flat)[0, 0, 0], (0.25 - np.array(CLIP_MEAN)) / np.array(CLIP_STD),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="mode='openclip'"):
        clip_preprocess(flat, mode="openclip")


def test_release_mode_is_rcods_resize():
    """RCOD feeds CLIP ``T.Resize((224, 224))(lq)`` with lq in [-1, 1]: torchvision's tensor resize, i.e. PyTorch's
    antialiased bilinear interpolation, half-pixel centres; no crop, no CLIP normalisation."""
    photos = _photos()
    cases = [photos["astronaut"], photos["chelsea"], photos["coffee"][:100, :150]]  # shrink, squash, enlarge
    for img in cases:
        x = img[None].astype(np.float32) / 255.0
        ours = np.asarray(clip_preprocess(x, mode="release"))
        lq = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) * 2 - 1
        ref = torch.nn.functional.interpolate(lq, size=(224, 224), mode="bilinear", align_corners=False,
                                              antialias=True).numpy().transpose(0, 2, 3, 1)
        assert ours.shape == (1, 224, 224, 3)
        assert np.abs(ours - ref).max() < 1e-5
        try:
            import torchvision.transforms as T
        except ImportError:
            continue
        tv = T.Resize((224, 224))(lq).numpy().transpose(0, 2, 3, 1)
        assert np.abs(ours - tv).max() < 1e-5


def test_preprocess_then_encode(vit_b):
    """The pipeline jits end to end: [0, 1] images of any size -> tokens."""
    _, module, params, _ = vit_b
    images = np.random.default_rng(9).random((2, 50, 70, 3)).astype(np.float32)
    for mode in ("clip", "release"):
        out = jax.jit(lambda x: module.apply({"params": params}, clip_preprocess(x, size=32, mode=mode)))(images)
        assert out.last_hidden_state.shape == (2, 17, 32)


@pytest.mark.slow
def test_full_size_vit_l14(tmp_path):
    """openai/clip-vit-large-patch14's vision tower with random weights: 257 x 1024 tokens at 224 px."""
    model = _torch_model(VIT_L14, seed=10, projection=True)
    model.save_pretrained(tmp_path)
    module, params = load_clip_vision(tmp_path)
    assert sum(v.size for v in jax.tree.leaves(params)) == sum(p.numel() for p in model.parameters())
    pixels = _pixels(VIT_L14, batch=1, seed=11)
    out = _apply(module, params, pixels)
    assert out.last_hidden_state.shape == (1, 257, 1024) and len(out.hidden_states) == 25
    ref = _torch_forward(model, pixels)
    _check_parity(out, ref, 24, projection=True)
    with torch.no_grad():
        pooled = model.vision_model.post_layernorm(ref.last_hidden_state[:, 0]).numpy()
    assert _rel(out.pooler_output, pooled) < 1e-4
