"""Small helpers the parity tests share: the relative error they state tolerances in, and PyTorch models with
every parameter randomised (default inits leave zero biases and unit norms that would hide conversion mistakes)."""
import os

import numpy as np


def rel_error(a, b) -> float:
    """Relative L2 error ``|a - b| / |b|`` in float64 (arrays of any framework that numpy can read)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def randomise_torch(model, seed: int, spread: float = 0.2):
    """Every parameter of a torch ``model`` random, in place (returns it): norms' scales ``1 + spread * n``, biases
    ``spread * n``, weights ``n / sqrt(fan_in)`` so activations stay O(1) through the depth."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + spread * noise)
            elif name.endswith("bias"):
                p.copy_(spread * noise)
            else:
                p.copy_(noise / np.sqrt(p[0].numel()))
    return model


def standin_restorer(seed: int = 0, method: str = "standin"):
    """A ``jsr.sr.infer.Restorer`` made of small local maps shaped like the real ones, with the control ``t``:
    encode = 8x8 mean + 1x1 (pixels [-1, 1] -> 4-channel latents / 8), step = ``z + (1 - t) tanh(conv3x3(z))``,
    decode = 1x1 + tanh + nearest x8. Local, so tiling it is exact up to the blending weights' leak."""
    import jax
    import jax.numpy as jnp

    from jsr.sr import infer

    rng = np.random.default_rng(seed)
    we = jnp.asarray(rng.normal(size=(3, 4)) / 2, jnp.float32)
    wl = jnp.asarray(rng.normal(size=(3, 3, 4, 4)) / 6, jnp.float32)
    wd = jnp.asarray(rng.normal(size=(4, 3)) / 2, jnp.float32)

    @jax.jit
    def encode(x):
        b, h, w, c = x.shape
        return jnp.mean(x.reshape(b, h // 8, 8, w // 8, 8, c), axis=(2, 4)) @ we

    @jax.jit
    def latent_t(z, t):
        y = jax.lax.conv_general_dilated(z, wl, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return z + (1 - t) * jnp.tanh(y)

    @jax.jit
    def decode(z):
        return jnp.repeat(jnp.repeat(jnp.tanh(z @ wd), 8, axis=1), 8, axis=2)

    return infer.Restorer(encode, lambda z, opts: latent_t(z, jnp.float32(opts.knobs.get("t", 0.0))), decode,
                          method=method, label={"ctsr": "CTSR"}.get(method, method),
                          knobs=("t",))


def osediff_unet_groups(names):
    """OSEDiff's UNet target rule (FiDeSR uses the same), written out as an oracle for the LoRA tests: skip names
    with 'bias'/'norm'; a name containing one of the patterns is 'encoder' (down_blocks/conv_in), 'decoder'
    (up_blocks/conv_out) or 'others'. Returns ``{group: [module names]}``."""
    from jsr.models import lora as L

    out = {g: [] for g in ("encoder", "decoder", "others")}
    for n in names:
        if "bias" in n or "norm" in n or not any(p in n for p in L.UNET_PATTERNS):
            continue
        g = ("encoder" if ("down_blocks" in n or "conv_in" in n) else
             "decoder" if ("up_blocks" in n or "conv_out" in n) else "others")
        out[g].append(n.removesuffix(".weight"))
    return out



def one_device_xla_flags() -> str:
    """The session's ``XLA_FLAGS`` (conftest.py: 8 fake CPU devices, the test compile flags) with one device, for
    subprocesses that train on a single device."""
    return device_xla_flags(1)


def device_xla_flags(n: int) -> str:
    """The session's ``XLA_FLAGS`` (the test compile flags) with ``n`` fake CPU devices, for subprocesses (one
    device each for single-device runs, 4 each for the processes of a multi-process job)."""
    import re

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return re.sub(r"--xla_force_host_platform_device_count=\d+", f"--xla_force_host_platform_device_count={n}",
                      flags)
    return (flags + f" --xla_force_host_platform_device_count={n}").strip()


def train_py(config: str, workdir, *flags: str, timeout: int = 3600) -> None:
    """Run ``python train.py --config CONFIG --workdir WORKDIR FLAGS...`` from the repository root on one device
    (the session's compile flags) and fail with its stderr's tail unless it exits 0."""
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, XLA_FLAGS=one_device_xla_flags())
    p = subprocess.run([sys.executable, "train.py", "--config", config, "--workdir", str(workdir), *flags],
                       cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]


def override(config, over: dict):
    """``config`` with dotted-path overrides applied in place (``{"loss.lpips": 0.0}``), returned for chaining."""
    for k, v in over.items():
        node = config
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return config


def upscaled_lq(seed: int = 0, size: int = 16) -> np.ndarray:
    """An upscaled LQ batch [1, 4 size, 4 size, 3] in [0, 1] (what the CLI makes of a random size x size file)."""
    from jsr.sr import infer

    rng = np.random.default_rng(seed)
    return infer.upscale_bicubic(rng.integers(0, 256, (size, size, 3)).astype(np.float32) / 255.0, 4)[None]


def add_osediff_unet_adapters(unet, rank: int, suffix: str = "", activate: bool = True,
                              lists: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """Add OSEDiff's three UNet LoRA adapters ``default_{encoder,decoder,others}{suffix}`` (peft, gaussian init:
    B = 0) to a diffusers UNet, as the releases build them, made active when ``activate``; returns the target
    lists ``{group: [module names]}`` (what the release pickles record). Pass the ``lists`` a first call returned
    when adding a second set: the names read from a UNet that already has adapters are peft's wrapped layers."""
    import peft

    if lists is None:
        lists = osediff_unet_groups([n for n, _ in unet.named_parameters()])
    names = []
    for g in ("encoder", "decoder", "others"):
        unet.add_adapter(peft.LoraConfig(r=rank, init_lora_weights="gaussian", target_modules=lists[g]),
                         adapter_name=f"default_{g}{suffix}")
        names.append(f"default_{g}{suffix}")
    if activate:
        unet.set_adapter(names)
    return lists
