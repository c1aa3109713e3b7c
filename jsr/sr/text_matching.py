"""CODSR's text-matching guidance: the cross-attention maps of a caption's nouns should cover the nouns' masks.

Released code (``train_codsr_stage2_offline.py``, ``attn_utils/tc_loss_utils.py``: ``get_grounding_loss_by_list``,
after TokenCompose), per image and noun ``k`` with a mask ``M_k`` (binary, the image's size)::

    A_k     = mean over the noun's token positions of the head-averaged attn2 probabilities of one UNet layer
              (``down_blocks.0.attentions.0.transformer_blocks.0.attn2``, the first one: 64 x 64 at 512 px),
              reshaped to its grid and bilinearly upsampled to the image size (half-pixel, ``align_corners=False``)
    act_k   = sum(A_k M_k) / sum(A_k)
    token   = mean_k (1 - act_k)^2                          "token/area" loss, weight 0.5
    pixel   = mean_k BCE(A_k, M_k)  (torch's BCELoss: logs clamped at -100, mean over pixels)    weight 0.025

over the nouns whose mask is not empty (``sum > 0.1``). A noun's token positions are every position where its
token ids occur as a run in the tokenised prompt (all occurrences, as the release's ``build_token_heatmaps``).

Differences from the release, on purpose: the release uses only the first image of each batch; here every image
counts and the means run over all (image, noun) pairs with a mask. A noun absent from the prompt (or a dropped
prompt) has no term here; the release falls back to attending over all 77 positions. Several layers may be
named: their upsampled maps are averaged.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

BCE_LOG_FLOOR = -100.0  # torch.nn.BCELoss clamps its logs here


def token_positions(ids: Sequence[int], word_ids: Sequence[int], max_tokens: int) -> list[int]:
    """Positions in the prompt's token ids ``ids`` where the run ``word_ids`` occurs (every occurrence, in order),
    at most ``max_tokens`` of them; ``[]`` when absent."""
    ids, word_ids = list(ids), list(word_ids)
    n = len(word_ids)
    pos: list[int] = []
    if n == 0:
        return pos
    for i in range(len(ids) - n + 1):
        if ids[i:i + n] == word_ids:
            pos.extend(range(i, i + n))
    return pos[:max_tokens]


def noun_token_table(tokenizer: Any, prompts: Sequence[str], nouns: np.ndarray,
                     max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Token positions of each image's nouns in its tokenised prompt.

    Args:
      tokenizer: a :class:`jsr.models.clip_text.Tokenizer` (its ``__call__`` pads to the model's length, its
        ``.tokenizer`` is transformers' CLIPTokenizer).
      prompts: [B] the prompts the step trains on (after any null-prompt drop).
      nouns: [B, K] strings ("" = an empty slot).
      max_tokens: ``T``, positions kept per noun.
    Returns:
      ``(tokens [B, K, T] int32, weights [B, K, T] float32)``: positions (0 where unused) and ``1 / n`` on the
      ``n`` positions found (0 elsewhere), so ``sum(weights * probs[tokens])`` is the mean over the noun's tokens.
      A noun with no position has all-zero weights.
    """
    nouns = np.asarray(nouns)
    b, k = nouns.shape
    tokens = np.zeros((b, k, max_tokens), np.int32)
    weights = np.zeros((b, k, max_tokens), np.float32)
    ids = tokenizer(list(prompts))
    for i in range(b):
        for j in range(k):
            word = str(nouns[i, j]).strip()
            if not word or not str(prompts[i]).strip():
                continue
            word_ids = tokenizer.tokenizer(word, add_special_tokens=False)["input_ids"]
            pos = token_positions(ids[i], word_ids, max_tokens)
            if pos:
                tokens[i, j, :len(pos)] = pos
                weights[i, j, :len(pos)] = 1.0 / len(pos)
    return tokens, weights


def noun_maps(probs: jax.Array, tokens: jax.Array, weights: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Each noun's attention map at image size.

    Args:
      probs: [B, h*w, L] head-averaged cross-attention probabilities of one layer (``jsr.models.unet.
        attention_maps``) on a square-ish ``h x w`` grid whose aspect is the image's.
      tokens, weights: [B, K, T] from :func:`noun_token_table`.
      size: ``(H, W)`` of the image (= the masks').
    Returns:
      [B, K, H, W] float32: the weighted token mean, bilinearly upsampled (half-pixel centres).
    """
    b, q, _ = probs.shape
    hh, ww = size
    h = int(round((q * hh / ww) ** 0.5))
    w = q // h
    if h * w != q:
        raise ValueError(f"noun_maps: {q} attention positions do not form a grid of the image's aspect {hh}x{ww}")
    picked = jnp.take_along_axis(probs.astype(jnp.float32)[:, None, :, :],
                                 jnp.asarray(tokens)[:, :, None, :].astype(jnp.int32), axis=-1)  # [B, K, q, T]
    m = jnp.sum(picked * jnp.asarray(weights, jnp.float32)[:, :, None, :], axis=-1).reshape(b, -1, h, w)
    return jax.image.resize(m, (b, m.shape[1], hh, ww), "bilinear", antialias=False)


def _clamped_log(x: jax.Array) -> jax.Array:
    """``max(log x, -100)`` with a zero (not NaN) gradient where ``x <= 0``: torch's BCELoss forward."""
    pos = x > 0
    return jnp.where(pos, jnp.maximum(jnp.log(jnp.where(pos, x, 1.0)), BCE_LOG_FLOOR), BCE_LOG_FLOOR)


def matching_losses(maps: jax.Array, masks: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array,
                                                                                      jax.Array]:
    """``(token/area loss, pixel BCE, count)`` of noun maps ``maps`` [B, K, H, W] against ``masks`` [B, H, W, K]
    (values in {0, 1}, any dtype); a (image, noun) pair counts when its token ``weights`` [B, K, T] are not all zero
    and its mask sums to more than 0.1. Both losses are means over the counted pairs (0 when none); ``count`` is
    their number (float32)."""
    m = jnp.moveaxis(jnp.asarray(masks, jnp.float32), -1, 1)  # [B, K, H, W]
    a = maps.astype(jnp.float32)
    valid = (jnp.sum(jnp.asarray(weights, jnp.float32), axis=-1) > 0) & (jnp.sum(m, axis=(2, 3)) > 0.1)
    total = jnp.sum(a, axis=(2, 3))
    act = jnp.sum(a * m, axis=(2, 3)) / jnp.where(total > 0, total, 1.0)
    token = jnp.square(1.0 - act)
    log_a, log_1a = _clamped_log(a), _clamped_log(1.0 - a)
    bce = -jnp.mean(m * log_a + (1.0 - m) * log_1a, axis=(2, 3))
    vf = valid.astype(jnp.float32)
    n = jnp.sum(vf)
    denom = jnp.maximum(n, 1.0)
    # where() keeps an invalid pair's NaN/inf (an all-zero map) out of the sums and their gradients.
    return (jnp.sum(jnp.where(valid, token, 0.0)) / denom, jnp.sum(jnp.where(valid, bce, 0.0)) / denom, n)
