"""The Flax ViT (DINO v1's architecture) against transformers' PyTorch ViTModel with the same random weights, its
checkpoint forms and errors, the normalisation read from ``preprocessor_config.json``, and CODSR's discriminator on
a ViT backbone.

Tiny models are built in transformers, every parameter randomised (``helpers.randomise_torch``), saved with
``save_pretrained`` and loaded through ``jsr.weights.vit.load_vit``. Tolerance: relative L2 error < 1e-4 in float32:
the two sides sum in different orders (the attention and LayerNorm reductions, the patch conv as XLA's conv vs
PyTorch's), which leaves ~1e-7 relative per op (measured 2e-7 to 5e-7 here); a wrong weight layout, norm or
activation gives errors of order 1.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.models import common
from jsr.models.vit import IMAGENET_MEAN, IMAGENET_STD, ViTConfig
from jsr.weights import convert, io
from jsr.weights.vit import WEIGHTS_NAME, load_vit, save_vit
from tests.helpers import randomise_torch
from tests.helpers import rel_error as _rel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# DINO ViT-S/16-like in miniature: exact GELU, eps 1e-12, a 4x4 patch grid.
DINO = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8)
# No q/k/v biases, tanh GELU, another eps and an image size the patches do not divide (the grid is floored).
VARIANT = dict(DINO, qkv_bias=False, hidden_act="gelu_new", layer_norm_eps=1e-6, image_size=30, patch_size=7,
               num_hidden_layers=2, num_attention_heads=2)


def _pixels(config, batch=2, seed=0):
    s = config["image_size"]
    return np.random.default_rng(seed).normal(size=(batch, s, s, 3)).astype(np.float32)


def _torch_forward(model, pixels):
    with torch.no_grad():
        return model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)


def _apply(module, params, pixels, hidden=True):
    return jax.jit(module.apply, static_argnums=2)({"params": params}, pixels, hidden)


def _check_parity(out, ref, n_layers):
    assert out.last_hidden_state.shape == tuple(ref.last_hidden_state.shape)
    assert _rel(out.last_hidden_state, ref.last_hidden_state) < 1e-4
    assert len(out.hidden_states) == len(ref.hidden_states) == n_layers + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert _rel(a, b) < 1e-4, f"hidden state {i}"
    # The final layernorm enters last_hidden_state only, not the last hidden state.
    assert _rel(out.hidden_states[-1], out.last_hidden_state) > 1e-2


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    """A DINO-style ``ViTModel`` folder without pooler (DINO's files hold none) and its torch model."""
    folder = tmp_path_factory.mktemp("dino")
    model = randomise_torch(transformers.ViTModel(transformers.ViTConfig(**DINO), add_pooling_layer=False).eval(), 1)
    model.save_pretrained(folder)
    return model, folder


@pytest.mark.parametrize("config", [DINO, VARIANT], ids=["dino-like", "no-qkv-bias-floored-grid"])
def test_parity_with_transformers_vit_model(config, tmp_path):
    model = randomise_torch(transformers.ViTModel(transformers.ViTConfig(**config)).eval(), 2)
    model.save_pretrained(tmp_path)
    module, params = load_vit(tmp_path)
    cfg = module.config
    assert cfg.with_pooler and cfg.qkv_bias == config.get("qkv_bias", True)
    assert cfg.num_positions == (config["image_size"] // config["patch_size"]) ** 2 + 1
    pixels = _pixels(config)
    out = _apply(module, params, pixels)
    ref = _torch_forward(model, pixels)
    _check_parity(out, ref, config["num_hidden_layers"])
    assert _rel(out.pooler_output, ref.pooler_output) < 1e-4
    assert sum(v.size for v in jax.tree.leaves(params)) == sum(p.numel() for p in model.parameters())
    plain = _apply(module, params, pixels, hidden=False)
    assert plain.hidden_states is None
    np.testing.assert_allclose(plain.last_hidden_state, out.last_hidden_state, rtol=0, atol=1e-6)


def test_checkpoint_without_pooler_and_the_classification_layout(dino, tmp_path):
    """DINO's layout (no ``pooler.*``) builds no pooler; ``ViTForImageClassification`` (keys under ``vit.``, a
    ``classifier``) loads its trunk; asking for a pooler the file lacks names the tensor."""
    model, folder = dino
    module, params = load_vit(folder)
    assert not module.config.with_pooler and "pooler" not in params
    pixels = _pixels(DINO, seed=3)
    out = _apply(module, params, pixels)
    assert out.pooler_output is None
    _check_parity(out, _torch_forward(model, pixels), DINO["num_hidden_layers"])
    with pytest.raises(convert.CheckpointMismatchError, match=r"missing 2 .*pooler\.dense\.bias"):
        load_vit(folder, with_pooler=True)

    clf = transformers.ViTForImageClassification(transformers.ViTConfig(**DINO, num_labels=5)).eval()
    randomise_torch(clf, 4)
    clf.save_pretrained(tmp_path)
    assert all(k.startswith(("vit.", "classifier.")) for k in io.read_state_dict(tmp_path))
    module, params = load_vit(tmp_path)
    assert not module.config.with_pooler
    _check_parity(_apply(module, params, pixels), _torch_forward(clf.vit, pixels), DINO["num_hidden_layers"])


def test_round_trip_to_transformers(tmp_path):
    model = randomise_torch(transformers.ViTModel(transformers.ViTConfig(**VARIANT)).eval(), 5)
    model.save_pretrained(tmp_path / "src")
    module, params = load_vit(tmp_path / "src")
    save_vit(module, params, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["ViTModel"] and cfg["model_type"] == "vit" and cfg["qkv_bias"] is False
    keys = set(io.read_safetensors(tmp_path / "out" / WEIGHTS_NAME))
    assert {"embeddings.cls_token", "embeddings.position_embeddings",
            "encoder.layer.1.attention.attention.query.weight", "pooler.dense.weight"} <= keys
    back, info = transformers.ViTModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = model.state_dict()
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), original[k].numpy(), err_msg=k)
    _, again = load_vit(tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_loading_errors_name_the_problem(dino, tmp_path):
    _, folder = dino
    state = dict(io.read_state_dict(folder))
    io.write_config(tmp_path, io.read_config(folder))
    io.write_safetensors(tmp_path / WEIGHTS_NAME,
                         {k: v for k, v in state.items() if k != "encoder.layer.2.attention.attention.key.weight"})
    with pytest.raises(convert.CheckpointMismatchError,
                       match=r"missing 1 .*encoder\.layer\.2\.attention\.attention\.key\.weight"):
        load_vit(tmp_path)
    wrong = dict(state, **{"embeddings.position_embeddings": np.zeros((1, 50, 32), np.float32)})
    io.write_safetensors(tmp_path / WEIGHTS_NAME, wrong)
    with pytest.raises(convert.CheckpointMismatchError, match=r"'embeddings\.position_embeddings\.weight' has shape "
                                                              r"\(1, 50, 32\) but the model expects \(1, 17, 32\)"):
        load_vit(tmp_path)
    # A CLIP vision folder is refused by its config, before any weight is read.
    clip = tmp_path / "clip"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**DINO)).save_pretrained(clip)
    with pytest.raises(ValueError, match=r"model_type='clip_vision_model'; jsr builds transformers' ViTModel"):
        load_vit(clip)


@pytest.mark.parametrize("change,needle", [
    (dict(model_type="dinov2", layerscale_value=1.0), "model_type='dinov2' .DINOv2. is not supported"),
    (dict(hidden_act="relu"), "hidden_act='relu'"),
    (dict(architectures=["ViTMAEModel"]), "ViTMAEModel"),
    (dict(num_attention_heads=5), "num_attention_heads=5"),
    (dict(image_size=[32, 48]), r"image_size=\[32, 48\]"),
    (dict(patch_size=64), "patch_size=64"),
])
def test_unsupported_config_is_named(change, needle):
    with pytest.raises(ValueError, match=needle):
        ViTConfig.from_transformers({**DINO, "model_type": "vit", **change})


def test_wrong_image_size_logical_axes_and_gradients(dino):
    _, folder = dino
    module, params = load_vit(folder)
    with pytest.raises(ValueError, match=r"expects NHWC pixels \[B, 32, 32, 3\], got shape \(1, 3, 32, 32\)"):
        module.apply({"params": params}, np.zeros((1, 3, 32, 32), np.float32))
    axes = common.logical_axes(module)
    assert tuple(axes["embeddings"]["cls_token"]["embedding"]) == (None, None, "embed")
    assert tuple(axes["encoder"]["layer_0"]["attention"]["attention"]["query"]["kernel"]) == ("embed", "heads")
    assert tuple(axes["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"]) == ("embed", "mlp")
    g = jax.jit(jax.grad(lambda x: jnp.sum(module.apply({"params": params}, x).last_hidden_state[:, 0] ** 2)))(
        _pixels(DINO, seed=7))
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0


# ------------------------------------------------------------------------------------------------------------------
# Pixel statistics and the discriminator


def test_normalization_from_preprocessor_config_matches_the_processor(tmp_path):
    """``(x - mean) / std`` on [0, 1] pixels with the statistics read from the folder equals the image processor's
    output on the 8-bit image (rescale 1/255 and 1/127.5 both folded in); no file -> the family default."""
    from jsr.weights.preprocessor import read_normalization

    default = (IMAGENET_MEAN, IMAGENET_STD)
    assert read_normalization(tmp_path, default)[0] == default
    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    for kwargs in (dict(), dict(image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)),
                   dict(rescale_factor=1 / 127.5, image_mean=1.0, image_std=1.0)):
        processor = cls(do_resize=False, **kwargs)
        processor.save_pretrained(tmp_path)
        (mean, std), source = read_normalization(tmp_path, default)
        assert source.endswith("preprocessor_config.json")
        ref = processor(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        ours = (img / 255.0 - np.asarray(mean)) / np.asarray(std)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5, err_msg=str(kwargs))
    (tmp_path / "preprocessor_config.json").write_text('{"image_std": [0.5, 0.0, 0.5]}')
    with pytest.raises(io.CorruptFileError, match="image_std=.* must be positive"):
        read_normalization(tmp_path, default)


def test_codsr_discriminator_on_a_vit_backbone(dino, tmp_path):
    """CODSR's ``_backbone`` picks the ViT from the folder's config (the CLIP path from a CLIP folder), its
    logits are the heads on the ViT's hidden states of ImageNet-normalised pixels, one [B, g, g] map per level,
    and a few AdamW steps of the ``disc`` update lower the hinge loss on a fixed batch."""
    import ml_collections
    import optax

    from jsr.methods.codsr import _backbone, load_disc_backbone
    from jsr.models.clip_vision import CLIP_MEAN, CLIP_STD, CLIPVisionModel
    from jsr.models.vision_disc import HeadsConfig, MultiLevelHeads, discriminator_logits, init_heads_params
    from jsr.models.vit import ViTModel
    from jsr.sr import gan

    _, folder = dino
    cc = ml_collections.ConfigDict(dict(disc_backbone=str(folder), disc_layers=()))
    backbone, bparams, layers, norm = _backbone(cc, None, jax.random.key(0), jnp.float32)
    assert isinstance(backbone, ViTModel) and layers == (1, 2, 3) and norm == (IMAGENET_MEAN, IMAGENET_STD)
    heads = init_heads_params(jax.random.key(1), backbone.config, layers, hidden=16)
    rng = np.random.default_rng(0)
    real = jnp.asarray(np.clip(rng.normal(0.2, 0.3, (4, 64, 64, 3)), -1, 1), jnp.float32)
    fake = jnp.asarray(np.clip(rng.normal(-0.2, 0.6, (4, 64, 64, 3)), -1, 1), jnp.float32)

    def losses(h):
        logits = lambda x: discriminator_logits(backbone, bparams, h, x, layers, 16, norm)  # noqa: E731
        lr, lf = logits(real), logits(fake)
        return gan.discriminator_loss(lr, lf), gan.generator_loss(lf), lr

    def written_out(x):  # [-1, 1] -> [0, 1] -> 32 px -> ImageNet statistics -> ViT -> heads
        x01 = jax.image.resize(x * 0.5 + 0.5, (4, 32, 32, 3), "bilinear", antialias=True)
        states = backbone.apply({"params": bparams}, (x01 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD),
                                output_hidden_states=True).hidden_states
        return MultiLevelHeads(HeadsConfig(32, 4, 3, 16)).apply({"params": heads}, [states[i] for i in layers])

    opt = optax.adamw(1e-3)

    @jax.jit  # one program: compiling is most of this test's time
    def run(h):
        def body(carry, _):
            h, s = carry
            u, s = opt.update(jax.grad(lambda h_: losses(h_)[0])(h), s, h)
            return (optax.apply_updates(h, u), s), None

        trained = jax.lax.scan(body, (h, opt.init(h)), None, length=20)[0][0]
        return losses(h), losses(trained)[:2], written_out(real)

    (d0, g0, logits), (d1, g1), want = run(heads)
    assert [x.shape for x in logits] == [(4, 4, 4)] * 3
    for a, b in zip(logits, want):
        assert _rel(a, b) < 1e-5
    assert float(d1) < 0.8 * float(d0), (float(d0), float(d1))
    assert float(g1) > float(g0)

    clip = tmp_path / "clip"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**DINO)).save_pretrained(clip)
    module, _, norm = load_disc_backbone(str(clip), jnp.float32)
    assert isinstance(module, CLIPVisionModel) and norm == (CLIP_MEAN, CLIP_STD)
    io.write_config(tmp_path / "other", {"model_type": "siglip_vision_model"})
    with pytest.raises(ValueError, match=r"model_type='siglip_vision_model'; the discriminator takes a "
                                         r"transformers CLIP vision folder .* or a ViT folder"):
        load_disc_backbone(str(tmp_path / "other"), jnp.float32)
