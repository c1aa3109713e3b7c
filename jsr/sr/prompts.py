"""Prompt embeddings for the restorers: CLIP text encoder output, cached per distinct prompt.

SD conditions its UNet on the text encoder's last hidden state of the prompt padded to 77 tokens
(``[77, D]`` per prompt, D = 1024 for SD 2.1). Training prompts repeat a lot (tag prompts, the empty prompt, the
one negative prompt), so :class:`PromptEncoder` encodes each distinct prompt once and keeps the result on the
host (LRU-bounded: an SD-2.1 embedding is 77 x 1024 floats, ~300 KB in float32).

Negative / empty prompts: the VSD/CSD real score uses classifier-free guidance with the *negative prompt* as the
unconditional branch (OSEDiff and PiSA-SR; :data:`DEFAULT_NEGATIVE_PROMPT` is their default string). PiSA-SR
also trains with the prompt replaced by the empty string ``""`` with probability ``null_text_ratio``
(:func:`drop_prompts`).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# OSEDiff's and PiSA-SR's default negative prompt (their training scripts' --neg_prompt).
DEFAULT_NEGATIVE_PROMPT = ("painting, oil painting, illustration, drawing, art, sketch, cartoon, CG Style, "
                           "3D render, unreal engine, blurring, dirty, messy, worst quality, low quality, frames, "
                           "watermark, signature, jpeg artifacts, deformed, lowres, over-smooth")
EMPTY_PROMPT = ""

TokenizeFn = Callable[[Sequence[str]], np.ndarray]


class PromptEncoder:
    """Prompts -> embeddings ``[B, L, D]`` with a per-prompt cache.

    Args:
      text_encoder: ``jsr.models.clip_text.CLIPTextModel`` (or any module mapping ids [B, L] -> [B, L, D]).
      params: its parameters.
      tokenizer: ``prompts -> int32 ids [B, L]`` (``jsr.models.clip_text.Tokenizer``).
      chunk: prompts encoded per encoder call; new prompts are padded to a multiple of it with ``""`` so the
        jitted encoder compiles once.
      max_cache: most embeddings kept (least recently used dropped first).
    Call: ``encoder(prompts) -> jax.Array [len(prompts), L, D]`` in the encoder's output dtype.
    """

    def __init__(self, text_encoder: nn.Module, params: Any, tokenizer: TokenizeFn, *, chunk: int = 8,
                 max_cache: int = 512):
        if chunk < 1 or max_cache < 1:
            raise ValueError("PromptEncoder: chunk and max_cache must be >= 1")
        self._params = params
        self._tokenize = tokenizer
        self._apply = jax.jit(lambda p, ids: text_encoder.apply({"params": p}, ids))
        self._chunk = chunk
        self._max = max_cache
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.calls = 0  # encoder invocations, for tests and logging

    @classmethod
    def from_folder(cls, model_dir: str | os.PathLike, dtype: Any = None, **kw) -> "PromptEncoder":
        """Load ``<model_dir>/text_encoder`` and ``<model_dir>/tokenizer`` (a diffusers SD folder)."""
        from jsr.models.clip_text import Tokenizer
        from jsr.weights import load_text_encoder

        module, params = load_text_encoder(Path(model_dir) / "text_encoder", dtype=dtype)
        return cls(module, params, Tokenizer(Path(model_dir) / "tokenizer"), **kw)

    def __len__(self) -> int:
        return len(self._cache)

    def _encode_new(self, prompts: list[str]) -> None:
        pad = (-len(prompts)) % self._chunk
        padded = prompts + [EMPTY_PROMPT] * pad
        ids = np.asarray(self._tokenize(padded), np.int32)
        for i in range(0, len(padded), self._chunk):
            out = np.asarray(self._apply(self._params, jnp.asarray(ids[i:i + self._chunk])))
            self.calls += 1
            for j, p in enumerate(padded[i:i + self._chunk]):
                if i + j < len(prompts):
                    self._cache[p] = out[j]

    def __call__(self, prompts: str | Sequence[str]) -> jax.Array:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("PromptEncoder: no prompts")
        new = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if new:
            self._encode_new(new)
        out = []
        for p in prompts:
            self._cache.move_to_end(p)
            out.append(self._cache[p])
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return jnp.asarray(np.stack(out))

    def negative(self, prompt: str = DEFAULT_NEGATIVE_PROMPT) -> jax.Array:
        """The negative-prompt embedding ``[1, L, D]`` (broadcast over the batch by the losses)."""
        return self([prompt])


def drop_prompts(prompts: Sequence[str], ratio: float, rng: np.random.Generator) -> list[str]:
    """Replace each prompt by ``""`` with probability ``ratio`` (PiSA-SR's ``null_text_ratio``), host-side.

    Drawn per sample; PiSA-SR draws once per batch (identical for one-sample batches)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"drop_prompts: ratio {ratio} is not in [0, 1]")
    keep = rng.random(len(prompts)) >= ratio
    return [p if k else EMPTY_PROMPT for p, k in zip(prompts, keep)]
