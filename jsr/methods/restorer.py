"""A :class:`jsr.sr.infer.Restorer` from a base model and the files a user names, for any registered method.

    r = load_restorer("sd21-base", ["ctsr2/export"])                       # manifest: method, roles, t_scale
    r = load_restorer("sd21-base", ["osediff.pkl"])                        # a release file
    r = load_restorer("sd21-base", ["export/student", "control=export/control"])   # ROLE=PATH
    sr = r(x_up, RestoreOptions(knobs={"t": 0.3}))

Which method runs: ``method=`` when given; else the one the files' manifests or release formats name; else
(plain LoRAs) the registered method with the fewest roles that covers the roles given (``unet``/``vae`` ->
OSEDiff, ``+ control`` -> CTSR, ``pix``/``sem`` -> PiSA-SR). Trees a manifest ``requires`` and the user did not
give (CTSR stage 2's stage-1 model) are read from the recorded path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jsr.methods import registry
from jsr.methods.api import Method, split_knobs
from jsr.methods.export import Source, check_base, merge_sources, read_role, read_source
from jsr.sr import generator as gen
from jsr.sr.base import Base, load_base
from jsr.sr.data_parallel import DataParallel
from jsr.sr.infer import Restorer, RestoreOptions
from jsr.sr.staged_tiling import TiledVAE

AUTO = "auto"


def parse_lora_arg(spec: str | os.PathLike) -> tuple[str | None, str]:
    """``"ROLE=PATH"`` -> ``(ROLE, PATH)``; a plain path -> ``(None, path)`` (a path holding ``=`` whose prefix is
    not an identifier stays a path)."""
    spec = str(spec)
    role, sep, rest = spec.partition("=")
    if sep and role.isidentifier() and not Path(spec).exists():
        return role, rest
    return None, spec


def read_sources(specs: Sequence[str | os.PathLike], base: Base) -> Source:
    """Read every ``--lora`` spec (:func:`parse_lora_arg`) and merge them, then the trees their manifests
    require (each path once)."""
    sources = []
    for spec in specs:
        role, path = parse_lora_arg(spec)
        sources.append(read_source(path, base) if role is None else read_role(path, role, base))
    if not sources:
        return Source(Path("."), None, {})
    merged = merge_sources(sources)
    seen: set[str] = set()
    for role, path in list(merged.requires.items()):
        if role in merged.roles or path in seen:
            continue
        seen.add(path)
        if not Path(path).exists():
            logging.warning("%s: the model needs its %s tree from %s, which does not exist; pass it with --lora",
                            merged.path, role, path)
            continue
        logging.info("reading the %s tree from %s (recorded in the export's manifest)", role, path)
        req = read_source(path, base)
        for r, tree in req.roles.items():
            merged.roles.setdefault(r, tree)
    merged.requires = {r: p for r, p in merged.requires.items() if r not in merged.roles}
    return merged


def pick_method(method: str, source: Source) -> Method:
    """The method to run (see the module docstring); its roles must cover the trees given.

    Raises ValueError naming the trees a method does not use, or when no method fits."""
    if method != AUTO:
        m = registry.get(method)
    elif source.method is not None:
        m = registry.get(source.method)
    else:
        given = set(source.roles)
        fits = []
        for name in registry.names():
            cand = registry.get(name)
            try:
                roles = set(cand.normalize_roles(source.roles))
            except ValueError:
                continue
            if roles <= set(cand.roles) and set(cand.required_roles) <= roles:
                fits.append(cand)
        if not fits:
            raise ValueError(f"no method uses the trees given ({', '.join(sorted(given)) or 'none'}); pass --method")
        # Built-in methods first, then the fewest roles (min() keeps registration order on ties): a plugin that
        # fits the trees as well as a built-in must not take over the automatic choice.
        m = min(fits, key=lambda c: (not registry.is_builtin(c), len(c.roles)))
    roles = m.normalize_roles(source.roles)
    extra = set(roles) - set(m.roles)
    if extra:
        raise ValueError(f"method {m.name} does not use the {', '.join(sorted(extra))} tree(s) given "
                         f"(its roles: {', '.join(m.roles)})")
    return m


_FORWARD: dict[str, Callable] = {}
_CONTEXT: dict[str, Callable] = {}
_ENCODE = jax.jit(lambda models, vae_params, lora, x: gen.encode(models, vae_params, x, lora), static_argnums=0)
_DECODE = jax.jit(lambda models, vae_params, z: gen.decode(models, vae_params, z), static_argnums=0)


def jitted_forward(method: Method) -> Callable:
    """``f(models, unet_params, trees, z, c, traced_knobs, static_knobs, x_lq)``: the method's forward, jitted once
    per process (restorers over one base share compilations; knob values other than static ones never
    recompile)."""
    if method.name not in _FORWARD:
        def step(models, unet_params, trees, z, c, traced, static, x_lq):
            knobs = {**traced, **dict(static)}
            if x_lq is None:
                return method.forward(models, unet_params, trees, z, c, knobs)
            return method.forward(models, unet_params, trees, z, c, knobs, x_lq=x_lq)

        _FORWARD[method.name] = jax.jit(step, static_argnums=(0, 6))
    return _FORWARD[method.name]


def jitted_context(method: Method) -> Callable:
    """``f(models, trees, x, c, traced_knobs, static_knobs)``: the method's whole-image context, jitted once."""
    if method.name not in _CONTEXT:
        def ctx(models, trees, x, c, traced, static):
            return method.context(models, trees, x, c, {**traced, **dict(static)})

        _CONTEXT[method.name] = jax.jit(ctx, static_argnums=(0, 5))
    return _CONTEXT[method.name]


def load_restorer(model: str | os.PathLike | Base, lora: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                  *, method: str = AUTO, dtype: Any = None, prompt: str = "",
                  attention_impl: str = "auto", devices: Sequence[jax.Device] | None = None) -> Restorer:
    """A :class:`Restorer` from a base SD folder (or a loaded :class:`jsr.sr.base.Base`) and model files.

    Args:
      model: diffusers-layout SD folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``), ``"tiny"`` for the
        embedded tiny random model (a smoke test), or a ``Base`` (then ``dtype``/``attention_impl`` are unused).
      lora: one or more specs ``PATH`` or ``ROLE=PATH``: jsr exports (``<workdir>/export`` or one group of it),
        release files (OSEDiff/PiSA-SR ``.pkl``, other methods' formats), peft/diffusers LoRA files or folders.
      method: a registered method name or ``auto`` (:func:`pick_method`).
      dtype: compute and parameter dtype (``"bfloat16"``, ``"float32"``); default bf16 on an accelerator, f32 on
        CPU. LoRA factors stay float32.
      prompt: the text condition (OSEDiff/PiSA-SR use tags from a tagging model; without one, ``""``).
      devices: local devices to restore on (:func:`jsr.sr.data_parallel.select_devices`); with more than one,
        every call's images or tiles are split over them and the parameters replicated on each
        (:func:`_data_parallel_maps`). ``None`` or one device: JAX's default device.
    """
    if isinstance(model, Base):
        base = model
    else:
        if dtype is None:
            dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        base = load_base("" if str(model) == "tiny" and not Path(model).exists() else model,
                         dtype=jnp.dtype(dtype), attention=attention_impl)
    specs = [] if lora is None else [lora] if isinstance(lora, (str, os.PathLike)) else list(lora)
    source = read_sources(specs, base)
    check_base(source, base)
    m = pick_method(method, source)
    trees = m.normalize_roles(source.roles)
    missing = [r for r in m.required_roles if r not in trees]
    if missing and not base.random_weights:
        raise ValueError(f"method {m.name} needs the {', '.join(missing)} tree(s); give them with --lora "
                         f"(roles: {', '.join(f'{k} = {v}' for k, v in m.roles.items())})")
    recorded = {k: v for k, v in source.knobs.items() if k in m.knob_names()}
    defaults = m.knob_values(recorded)
    models, up, vp = base.models, base.unet_params, base.vae_params
    c = base.prompts([prompt]) if m.text_prompt else None  # (loads the text encoder on first use)
    vae_lora = m.encoder_lora(trees)
    forward = jitted_forward(m)
    honoured = m.honoured_knobs(tuple(trees))

    def encode(x):
        return _ENCODE(models, vp, vae_lora, x)

    def decode(z):
        return _DECODE(models, vp, z)

    def context(x, opts: RestoreOptions):
        traced, static = split_knobs(m, {**defaults, **opts.knobs})
        return jitted_context(m)(models, trees, jnp.asarray(x), c, traced, static)

    def latent(z, opts: RestoreOptions, ctx=None):
        traced, static = split_knobs(m, {**defaults, **opts.knobs})
        z, cz, x_lq = _latent_inputs(m, z, c, ctx, jnp)
        return forward(models, up, trees, z, cz, traced, static, x_lq)

    factor = 2 ** (len(models.vae.config.block_out_channels) - 1)  # the VAE's downsampling

    def latent_memory(call: tuple[int, int, int], channels: int, opts: RestoreOptions,
                      image_shape: tuple[int, ...]) -> int | None:
        # XLA's temporaries of the latent step on one call, compiled from shapes as latent() would call it (the
        # run then finds the program compiled): what Restorer.plan counts against a device budget.
        traced, static = split_knobs(m, {**defaults, **opts.knobs})
        n, th, tw = call
        sds = jax.ShapeDtypeStruct
        x_lq = sds((n, th * factor, tw * factor, 3), jnp.float32) if channels > 4 else None
        cz = c
        if m.has_context():
            ctx = jax.eval_shape(jitted_context(m), models, trees, sds(image_shape, jnp.float32), c, traced, static)
            cz = sds((n,) + tuple(ctx.shape[1:]), ctx.dtype)
        compiled = forward.lower(models, up, trees, sds((n, th, tw, 4), jnp.float32), cz, traced, static,
                                 x_lq).compile()
        mem = compiled.memory_analysis()
        return None if mem is None else int(mem.temp_size_in_bytes)

    def whole_memory(shape: tuple[int, ...]) -> int | None:
        # XLA's temporaries of the untiled VAE programs on padded images of `shape` (what small images run).
        sds = jax.ShapeDtypeStruct
        b, h, w = shape[:3]
        temps = [_ENCODE.lower(models, vp, vae_lora, sds((b, h, w, 3), jnp.float32)).compile().memory_analysis(),
                 _DECODE.lower(models, vp, sds((b, h // factor, w // factor, 4), jnp.float32)).compile().memory_analysis()]
        return None if None in temps else max(int(t.temp_size_in_bytes) for t in temps)

    dp = DataParallel(devices) if devices is not None and len(devices) > 1 else None
    if dp is not None:
        encode, latent, decode, context = _data_parallel_maps(dp, m, models, up, vp, vae_lora, trees, c, defaults)
    # What the speed log (jsr.sr.speed) keys its timings by: what changes a call's cost, not the weights' values.
    dtype_name = jnp.dtype(jax.tree.leaves(up)[0].dtype).name
    profile = (f"{base.path} | {m.name} [{','.join(sorted(trees))}] | {dtype_name} | {attention_impl} | "
               f"{1 if dp is None else dp.size} device(s)")
    return Restorer(encode=encode, latent=latent, decode=decode, method=m.name, knobs=honoured, factor=factor,
                    tiled_vae=TiledVAE(models, vp, vae_lora, dp), knob_defaults=defaults, uses_image=m.uses_image,
                    label=m.label, context=context if m.has_context() else None, devices=1 if dp is None else dp.size,
                    profile=profile, needs_image=m.needs_image, latent_memory=latent_memory if dp is None else None,
                    whole_memory=whole_memory if dp is None else None)


def _latent_inputs(m: Method, z: Any, c: Any, ctx: Any, xp: Any) -> tuple[Any, Any, Any]:
    """``(z, context, x_lq)`` for a method's forward from the restorer's latent batch ``z`` [B, h, w, 4 (+ 3 f^2
    pixel channels when the method uses the image)]: ``ctx`` (one context per image, or None: the prompt ``c``)
    repeated for each image's tiles in the call, and the pixel channels unpacked to ``x_lq`` [B, h f, w f, 3]
    (None otherwise). ``xp``: ``jnp`` (one device) or ``np`` (host arrays a data-parallel map splits)."""
    z = xp.asarray(z)
    cz = c
    if ctx is not None:  # a batch of tiles stacks the images' tiles tile by tile
        ctx = xp.asarray(ctx)
        cz = xp.tile(ctx, (z.shape[0] // ctx.shape[0], 1, 1)) if ctx.shape[0] != z.shape[0] else ctx
    x_lq = None
    if m.uses_image and z.shape[-1] > 4:  # without them (Method.needs_image said no): x_lq None
        f = int(round(((z.shape[-1] - 4) // 3) ** 0.5))  # 8x8x3 pixel channels per latent
        b, h, w, _ = z.shape
        x_lq = z[..., 4:].reshape(b, h, w, f, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * f, w * f, 3)
        z = z[..., :4]
    return z, cz, x_lq


def _data_parallel_maps(dp: DataParallel, m: Method, models: Any, unet_params: Any, vae_params: Any, vae_lora: Any,
                        trees: Mapping[str, Any], c: Any, defaults: Mapping[str, Any]) -> tuple[Callable, ...]:
    """``(encode, latent, decode, context)`` of :func:`load_restorer` split over ``dp``'s devices: the base, the
    method's trees and the prompt replicated once; each call's batch (images, or a call's tiles) split by rows.
    The latent step and the context compile once per set of static knobs (as the one-device jits do)."""
    up, vp, lora, trees, c = dp.replicate((unet_params, vae_params, vae_lora, dict(trees), c))
    enc = dp.map(lambda p, lo, x: gen.encode(models, p, x, lo), batched=(False, False, True))
    dec = dp.map(lambda p, z: gen.decode(models, p, z), batched=(False, True))
    programs: dict[tuple, Callable] = {}

    def forward_program(static: Any, per_tile_context: bool) -> Callable:
        key = ("forward", static, per_tile_context)
        if key not in programs:
            def step(params, trs, z, cz, traced, x_lq):
                knobs = {**traced, **dict(static)}
                if x_lq is None:
                    return m.forward(models, params, trs, z, cz, knobs)
                return m.forward(models, params, trs, z, cz, knobs, x_lq=x_lq)
            programs[key] = dp.map(step, batched=(False, False, True, per_tile_context, False, True))
        return programs[key]

    def context_program(static: Any) -> Callable:
        key = ("context", static)
        if key not in programs:
            programs[key] = dp.map(lambda trs, x, cc, traced: m.context(models, trs, x, cc,
                                                                        {**traced, **dict(static)}),
                                   batched=(False, True, False, False))
        return programs[key]

    def encode(x):
        return enc(vp, lora, x)

    def decode(z):
        return dec(vp, z)

    def context(x, opts: RestoreOptions):
        traced, static = split_knobs(m, {**defaults, **opts.knobs})
        return context_program(static)(trees, np.asarray(x), c, traced)

    def latent(z, opts: RestoreOptions, ctx=None):
        traced, static = split_knobs(m, {**defaults, **opts.knobs})
        z, cz, x_lq = _latent_inputs(m, z, c, ctx, np)  # on the host: the map splits the rows over the devices
        return forward_program(static, ctx is not None)(up, trees, z, cz, traced, x_lq)

    return encode, latent, decode, context


def check_options(restorer: Restorer, opts: RestoreOptions) -> None:
    """Refuse controls the restorer would ignore (``t`` without a CTSR control LoRA, ``lambda_sem`` without a
    semantic LoRA, a knob of another method...) and values out of range, so a sweep never silently produces
    identical images.

    A knob given at its default value on a restorer that does not have it is accepted (it changes nothing).

    Raises:
      ValueError naming the ignored knobs, the restorer's own knobs, and what each ignored one needs, e.g.
      ``osediff model ignores t (its knobs: none); t needs a CTSR control LoRA (stage 2)``.
    """
    known = registry.all_knobs()
    unknown = sorted(k for k in opts.knobs if k not in known)
    if unknown:
        raise ValueError(f"unknown knob(s) {', '.join(unknown)}; knobs of the registered methods: "
                         f"{', '.join(known) or 'none'}")
    for name, value in opts.knobs.items():
        known[name].check(value)
    ignored = sorted(k for k, v in opts.knobs.items() if k not in restorer.knobs and v != known[k].default)
    if ignored:
        have = ", ".join(restorer.knobs) or "none"
        needs: dict[str, list[str]] = {}
        for knob in ignored:
            text = known[knob].needs_text or f"a {'/'.join(registry.methods_with_knob(knob))} model"
            needs.setdefault(text, []).append(knob)
        why = "; ".join(f"{' and '.join(ks)} need{'s' if len(ks) == 1 else ''} {what}" for what, ks in needs.items())
        raise ValueError(f"{restorer.method} model ignores {', '.join(ignored)} (its knobs: {have}); {why}")


def knob_overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    """The knobs of ``values`` (e.g. parsed CLI flags, ``None`` = not given) that were set, parsed and checked."""
    known = registry.all_knobs()
    return {k: known[k].parse(v) for k, v in values.items() if v is not None and k in known}
