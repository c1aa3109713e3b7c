"""The Flax CLIP text encoder against transformers' PyTorch CLIPTextModel with the same random weights, and the
tokenizer wrapper.

Tiny SD-2-style (exact ``gelu``, as OpenCLIP-H) and SD-1-style (``quick_gelu``, as OpenAI CLIP) models are built
in transformers, every parameter randomised, saved with ``save_pretrained`` and loaded through
``jsr.weights.load_text_encoder``. Tolerance: relative L2 error < 1e-4 in float32 (summation order differs;
measured ~3e-7).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsr.models import common
from jsr.models.clip_text import CLIPTextConfig, Tokenizer, tokenize
from jsr.weights import convert, io
from jsr.weights.clip_text import CLIP_INDEXED, WEIGHTS_NAME, load_text_encoder, save_text_encoder
from tests.helpers import rel_error as _rel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
SD2_STYLE = dict(BASE, hidden_act="gelu")
SD1_STYLE = dict(BASE, hidden_act="quick_gelu", num_attention_heads=2, layer_norm_eps=1e-6)
# stabilityai/stable-diffusion-2-1-base text_encoder/config.json: OpenCLIP ViT-H/14's text tower minus its last layer.
SD21_BASE = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)


def _torch_clip(config, seed=0):
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias") or "embedding" in name:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / np.sqrt(p.shape[1]))
    return model


def _torch_forward(model, ids):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).last_hidden_state.numpy()


def _ids(vocab, batch=2, length=77, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def _apply(module, params, ids):
    return jax.jit(module.apply)({"params": params}, ids)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2_clip")
    model = _torch_clip(SD2_STYLE, seed=1)
    model.save_pretrained(folder)
    module, params = load_text_encoder(folder)
    return model, module, params, folder


@pytest.mark.parametrize("config", [SD2_STYLE, SD1_STYLE], ids=["sd2-gelu", "sd1-quick_gelu"])
def test_parity_with_transformers(config, tmp_path):
    model = _torch_clip(config, seed=2)
    model.save_pretrained(tmp_path)
    module, params = load_text_encoder(tmp_path)
    assert module.config.hidden_act == config["hidden_act"]
    ids = _ids(config["vocab_size"])
    y = _apply(module, params, ids)
    ref = _torch_forward(model, ids)
    assert y.shape == ref.shape == (2, 77, 32)
    assert _rel(y, ref) < 1e-4
    # Causal: a shorter prompt gives the first positions of the longer one's states.
    short = _apply(module, params, ids[:, :9])
    assert _rel(short, y[:, :9]) < 1e-5
    assert sum(v.size for v in jax.tree.leaves(params)) == sum(p.numel() for p in model.parameters())


def test_causal_mask_matters(sd2):
    """Changing a later token leaves earlier positions alone and changes later ones."""
    _, module, params, _ = sd2
    ids = _ids(120, batch=1, seed=3)
    other = ids.copy()
    other[0, 40] = (other[0, 40] + 1) % 120
    a, b = np.asarray(_apply(module, params, ids)), np.asarray(_apply(module, params, other))
    np.testing.assert_allclose(a[:, :40], b[:, :40], rtol=0, atol=1e-6)
    assert np.linalg.norm(a - b, axis=-1)[0, 40:].min() > 1e-4


def test_round_trip_to_transformers(sd2, tmp_path):
    model, module, params, _ = sd2
    save_text_encoder(module, params, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["CLIPTextModel"] and cfg["model_type"] == "clip_text_model"
    # The SD / transformers-4 layout: every key under text_model.
    assert all(k.startswith("text_model.") for k in io.read_safetensors(tmp_path / WEIGHTS_NAME))
    back = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    original = model.state_dict()
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), original[k].numpy(), err_msg=k)
    ids = _ids(120, seed=4)
    assert _rel(_torch_forward(back, ids), _apply(module, params, ids)) < 1e-4
    _, again = load_text_encoder(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_sd_checkpoint_layout_with_position_ids_loads(sd2, tmp_path):
    """SD folders store ``text_model.``-prefixed keys and often the ``position_ids`` buffer."""
    _, _, params, folder = sd2
    state = {"text_model." + k: v for k, v in io.read_state_dict(folder).items()}
    state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    io.write_config(tmp_path, io.read_config(folder))
    io.write_safetensors(tmp_path / WEIGHTS_NAME, state)
    _, loaded = load_text_encoder(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_strict_loading_names_the_tensor(sd2, tmp_path):
    _, _, _, folder = sd2
    state = dict(io.read_state_dict(folder))
    io.write_config(tmp_path, io.read_config(folder))
    io.write_safetensors(tmp_path / WEIGHTS_NAME,
                         {k: v for k, v in state.items() if k != "encoder.layers.1.mlp.fc2.bias"})
    with pytest.raises(convert.CheckpointMismatchError, match=r"missing 1 .*encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_text_encoder(tmp_path)
    wrong = dict(state, **{"embeddings.token_embedding.weight": np.zeros((99, 32), np.float32),
                           "text_projection.weight": np.zeros((8, 32), np.float32)})
    io.write_safetensors(tmp_path / WEIGHTS_NAME, wrong)
    with pytest.raises(convert.CheckpointMismatchError) as err:
        load_text_encoder(tmp_path)
    msg = str(err.value)
    assert "text_projection.weight" in msg
    assert "'embeddings.token_embedding.weight' has shape (99, 32) but the model expects (120, 32)" in msg


@pytest.mark.parametrize("change,needle", [
    (dict(hidden_act="relu"), "hidden_act='relu'"),
    (dict(model_type="clip"), "text_config"),
    (dict(architectures=["CLIPTextModelWithProjection"]), "CLIPTextModelWithProjection"),
    (dict(num_attention_heads=5), "num_attention_heads=5"),
])
def test_unsupported_config_is_named(change, needle):
    with pytest.raises(ValueError, match=needle):
        CLIPTextConfig.from_transformers(dict(SD2_STYLE, **change))


def test_too_many_tokens_is_an_error(sd2):
    _, module, params, _ = sd2
    with pytest.raises(ValueError, match="78 tokens exceed max_position_embeddings=77"):
        module.apply({"params": params}, np.zeros((1, 78), np.int32))


def test_logical_axes_and_bf16(sd2):
    _, module, params, _ = sd2
    axes = common.logical_axes(module)
    assert tuple(axes["embeddings"]["token_embedding"]["embedding"]) == ("vocab", "embed")
    assert tuple(axes["embeddings"]["position_embedding"]["embedding"]) == (None, "embed")
    assert tuple(axes["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]) == ("embed", "mlp")
    ids = _ids(120, seed=5)
    y16 = _apply(module.clone(dtype=jnp.bfloat16), params, ids)
    assert y16.dtype == jnp.bfloat16 and _rel(y16, _apply(module, params, ids)) < 5e-2
    assert "layers" in CLIP_INDEXED


def _write_tokenizer(folder):
    """A tiny CLIP BPE tokenizer in SD's ``tokenizer/`` layout (vocab.json, merges.txt, tokenizer_config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for suffix in ("", "</w>"):
        for c in letters:
            vocab[c + suffix] = len(vocab)
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))
    return vocab


def test_tokenize_pads_and_truncates(tmp_path):
    vocab = _write_tokenizer(tmp_path / "tokenizer")
    ids = tokenize(["a cat", "Dog  dog"], tmp_path / "tokenizer")
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert ids[0, :4].tolist() == [bos, vocab["a</w>"], vocab["cat</w>"], eos]
    assert ids[1, :4].tolist() == [bos, vocab["dog</w>"], vocab["dog</w>"], eos]
    assert np.all(ids[:, 4:] == eos)  # SD's tokenizer pads with <|endoftext|>
    tok = Tokenizer(tmp_path / "tokenizer")
    long = tok("cat " * 200)
    assert long.shape == (1, 77) and long[0, 0] == bos and long[0, -1] == eos
    assert np.all(long[0, 1:-1] == vocab["cat</w>"])
    with pytest.raises(FileNotFoundError, match="no such tokenizer folder"):
        Tokenizer(tmp_path / "nowhere")


def test_tokens_through_the_encoder(sd2, tmp_path):
    """The wrapper's ids feed the encoder like transformers' own pipeline does."""
    model, module, params, _ = sd2
    _write_tokenizer(tmp_path / "tokenizer")
    ids = tokenize(["a dog", ""], tmp_path / "tokenizer")
    assert _rel(_apply(module, params, ids), _torch_forward(model, ids)) < 1e-4


@pytest.mark.slow
def test_full_size_sd21_base_text_encoder(tmp_path):
    model = _torch_clip(SD21_BASE, seed=6)
    model.save_pretrained(tmp_path)
    module, params = load_text_encoder(tmp_path)
    n = sum(p.numel() for p in model.parameters())
    assert sum(v.size for v in jax.tree.leaves(params)) == n
    assert module.config == CLIPTextConfig.from_transformers(io.read_config(tmp_path))
    assert (module.config.num_hidden_layers, module.config.hidden_size) == (23, 1024)
    ids = _ids(49408, batch=2, seed=7)
    y = _apply(module, params, ids)
    assert y.shape == (2, 77, 1024)
    assert _rel(y, _torch_forward(model, ids)) < 1e-4
