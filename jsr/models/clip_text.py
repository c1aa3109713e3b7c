"""The CLIP text transformer (Hugging Face ``CLIPTextModel``) in Flax linen, and its tokeniser.

    cfg = CLIPTextConfig.from_transformers(json.load(open("text_encoder/config.json")))
    clip = CLIPTextModel(cfg)
    ids = tokenize(["a photo of a cat"], "stable-diffusion-2-1-base/tokenizer")     # [1, 77] int32
    c = clip.apply({"params": params}, ids)                                         # [1, 77, 1024]

Token and position embeddings, ``num_hidden_layers`` pre-LayerNorm blocks (causal self-attention with biased
``q_proj``/``k_proj``/``v_proj``/``out_proj``, an MLP ``fc1``/``fc2`` with ``quick_gelu`` (SD 1.x, OpenAI CLIP)
or exact ``gelu`` (SD 2.x, OpenCLIP-H)), then ``final_layer_norm``: the output is the last hidden state, which SD
feeds to the UNet's cross-attention (no pooling, no projection, no clip-skip). SD-2.1's text encoder is this with
23 layers of width 1024 and 16 heads.

Parameters are named after transformers' attributes without the ``text_model.`` prefix
(``embeddings/token_embedding/embedding``, ``encoder/layers_3/self_attn/q_proj``...), which
``jsr.weights.clip_text`` adds or strips at the checkpoint boundary.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsr.models.attention import dot_product_attention
from jsr.models.layers import Dense, LayerNorm

Dtype = Any

# transformers' ACT2FN names jsr supports. "gelu" is the exact erf GELU; "gelu_new"/"gelu_pytorch_tanh" the
# tanh approximation; "quick_gelu" OpenAI CLIP's x * sigmoid(1.702 x).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# SD pads every prompt to CLIP's context length.
MAX_LENGTH = 77


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The resolved text-transformer architecture (hashable, as Flax module attributes must be).

    ``transformers_json`` is the original ``config.json`` (sorted JSON), written back by
    ``jsr.weights.clip_text.save_text_encoder``.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    transformers_json: str = "{}"

    @classmethod
    def from_transformers(cls, cfg: Mapping[str, Any]) -> "CLIPTextConfig":
        """Build from a transformers ``CLIPTextModel`` ``config.json`` dict (missing keys take transformers'
        ``CLIPTextConfig`` defaults). Keys that do not change the network (token ids, dropout, init ranges,
        ``projection_dim``, transformers' generic config keys) are accepted and kept.

        Raises:
          ValueError naming the option for a config that is not a CLIP text model or that uses an activation
          or shape jsr does not build.
        """
        cfg = dict(cfg)
        model_type = cfg.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            hint = " (a full CLIP config: pass its text_config)" if model_type == "clip" else ""
            raise ValueError(f"text encoder config: model_type={model_type!r}; jsr builds transformers' "
                             f"CLIPTextModel (model_type 'clip_text_model'){hint}")
        archs = cfg.get("architectures") or ["CLIPTextModel"]
        if "CLIPTextModel" not in archs:
            raise ValueError(f"text encoder config: architectures={archs!r}; jsr builds CLIPTextModel only "
                             "(no text projection)")
        act = cfg.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"text encoder config: hidden_act={act!r} is not supported "
                             f"(known: {sorted(ACTIVATIONS)})")
        width, heads = int(cfg.get("hidden_size", 512)), int(cfg.get("num_attention_heads", 8))
        if width % heads:
            raise ValueError(f"text encoder config: hidden_size={width} does not split into "
                             f"num_attention_heads={heads} heads")
        return cls(
            vocab_size=int(cfg.get("vocab_size", 49408)),
            hidden_size=width,
            intermediate_size=int(cfg.get("intermediate_size", 2048)),
            num_hidden_layers=int(cfg.get("num_hidden_layers", 12)),
            num_attention_heads=heads,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 77)),
            hidden_act=act,
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
            transformers_json=json.dumps(cfg, sort_keys=True),
        )

    def to_transformers(self) -> dict:
        """The original transformers config dict this config was built from."""
        return json.loads(self.transformers_json)


class Embed(nn.Module):
    """A lookup table ``embedding`` [num_embeddings, features] (PyTorch ``nn.Embedding``); ids [...] int ->
    [..., features] in ``dtype``."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axes: tuple[str | None, str | None] = ("vocab", "embed")

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.param("embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), self.axes),
                           (self.num_embeddings, self.features), self.param_dtype)
        return jnp.take(table, ids, axis=0).astype(self.dtype)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased ``q_proj``/``k_proj``/``v_proj``/``out_proj``.
    x [B, L, C], mask broadcastable to [B, H, L, L] (True: may attend) -> [B, L, C]."""

    heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, n, c = x.shape
        d = c // self.heads
        proj = lambda name: Dense(c, dtype=self.dtype, kernel_axes=("embed", "heads"), name=name)
        q = proj("q_proj")(x).reshape(b, n, self.heads, d)
        k = proj("k_proj")(x).reshape(b, n, self.heads, d)
        v = proj("v_proj")(x).reshape(b, n, self.heads, d)
        out = dot_product_attention(q, k, v, mask=mask, impl=self.attention_impl).reshape(b, n, c)
        return Dense(c, dtype=self.dtype, kernel_axes=("heads", "embed"), name="out_proj")(out)


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))``: [B, L, C] -> [B, L, C] through ``intermediate_size``."""

    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(self.intermediate_size, dtype=self.dtype, kernel_axes=("embed", "mlp"), name="fc1")(x)
        h = ACTIVATIONS[self.hidden_act](h)
        return Dense(x.shape[-1], dtype=self.dtype, kernel_axes=("mlp", "embed"), name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``. [B, L, C] -> same."""

    config: "CLIPTextConfig"
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        cfg = self.config
        ln = lambda name: LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name=name)
        x = x + CLIPAttention(cfg.num_attention_heads, dtype=self.dtype, attention_impl=self.attention_impl,
                              name="self_attn")(ln("layer_norm1")(x), mask)
        return x + CLIPMLP(cfg.intermediate_size, cfg.hidden_act, dtype=self.dtype, name="mlp")(ln("layer_norm2")(x))


class CLIPEmbeddings(nn.Module):
    """Token plus learned position embeddings: ids [B, L] -> [B, L, C]."""

    config: "CLIPTextConfig"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        cfg = self.config
        tok = Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, axes=("vocab", "embed"),
                    name="token_embedding")(ids)
        pos = Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, axes=(None, "embed"),
                    name="position_embedding")(jnp.arange(ids.shape[1]))
        return tok + pos[None]


class CLIPEncoder(nn.Module):
    """The stack ``layers_0 ... layers_{N-1}``; optional gradient checkpointing per layer."""

    config: "CLIPTextConfig"
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        layer = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        for i in range(self.config.num_hidden_layers):
            x = layer(self.config, dtype=self.dtype, attention_impl=self.attention_impl, name=f"layers_{i}")(x, mask)
        return x


class CLIPTextModel(nn.Module):
    """Hugging Face ``CLIPTextModel``'s last hidden state, as Stable Diffusion uses it.

    Attributes:
      config: the architecture (:class:`CLIPTextConfig`).
      dtype: compute dtype; LayerNorm statistics and the attention softmax are float32 always.
      attention_impl: ``jsr.models.attention`` implementation (77 tokens: ``auto`` takes the plain path).
      remat: recompute each layer in the backward pass.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    attention_impl: str = "auto"
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Encode token ids.

        Args:
          input_ids: [B, L] integer token ids, L <= ``max_position_embeddings`` (SD: 77, padded with the
            tokenizer's pad token; no attention mask, as SD runs it).
        Returns:
          [B, L, hidden_size] last hidden state after ``final_layer_norm``, in ``dtype``.
        """
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"CLIP text encoder expects token ids [B, L], got shape {input_ids.shape}")
        n = input_ids.shape[1]
        if n > cfg.max_position_embeddings:
            raise ValueError(f"CLIP text encoder: {n} tokens exceed max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        x = CLIPEmbeddings(cfg, dtype=self.dtype, name="embeddings")(input_ids)
        causal = jnp.tril(jnp.ones((n, n), jnp.bool_))[None, None]
        x = CLIPEncoder(cfg, dtype=self.dtype, attention_impl=self.attention_impl, remat=self.remat,
                        name="encoder")(x, causal)
        return LayerNorm(cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array]:
        """Token ids [B, max_position_embeddings] (zeros), for shape inference (``jsr.models.common``)."""
        return (jnp.zeros((batch, self.config.max_position_embeddings), jnp.int32),)


class Tokenizer:
    """``transformers.CLIPTokenizer`` from a tokenizer folder (SD's ``tokenizer/``: ``vocab.json``,
    ``merges.txt``, ``tokenizer_config.json``), padding and truncating to a fixed length.

    ``Tokenizer(folder)(prompts) -> np.ndarray`` int32 [B, max_length] (BOS, tokens, EOS, pad tokens).
    """

    def __init__(self, folder: str | os.PathLike, max_length: int | None = None):
        try:
            from transformers import CLIPTokenizer
        except ImportError:
            raise ImportError("tokenising prompts needs transformers (pip install 'jsr[torch]' or "
                              "pip install transformers)") from None
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder}: no such tokenizer folder (want a folder with vocab.json and "
                                    "merges.txt, e.g. <sd-model>/tokenizer)")
        self.tokenizer = CLIPTokenizer.from_pretrained(str(folder))
        model_max = self.tokenizer.model_max_length
        # A folder without tokenizer_config.json leaves transformers' "no limit" sentinel (~1e30).
        self.max_length = int(max_length or (model_max if model_max and model_max < 1_000_000 else MAX_LENGTH))

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Token ids [B, max_length] int32 for ``prompts`` (a string counts as one prompt)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="np")
        return np.asarray(out["input_ids"], np.int32)


def tokenize(prompts: str | Sequence[str], tokenizer_folder: str | os.PathLike,
             max_length: int | None = None) -> np.ndarray:
    """Token ids [B, 77] int32 of ``prompts`` with the CLIP tokenizer in ``tokenizer_folder`` (see
    :class:`Tokenizer`; loads the tokenizer on every call: keep a ``Tokenizer`` for repeated use)."""
    return Tokenizer(tokenizer_folder, max_length)(prompts)
