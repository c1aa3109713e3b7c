"""Train steps as abstract programs: built like the training loop's, exported for platforms and meshes this host
does not have.

A step here is the loop's step (:mod:`jsr.train.loop`): the registered method's ``setup``, ``make_train_step``
over one phase's updates, jitted with the loop's shardings of the state (replicated), the frozen tree (the base
sharded by ``config.mesh.rules``, the method's ``frozen_axes`` alike, the rest replicated) and the batch (split over
``data`` x ``fsdp``). What differs is that nothing is materialised:

- the base (:func:`abstract_base`) is a preset's modules with ``jax.ShapeDtypeStruct`` parameters; prompt
  embeddings have the text encoder's output shape and are never computed (:class:`ShapePrompts`);
- everything the method's setup makes (LoRAs, optimizer states, LPIPS, stand-in teachers, frozen extras) comes
  out of ``jax.eval_shape`` of the setup itself, so a loss that closed over one of those arrays instead of taking
  it as an argument fails here (a leaked tracer) where a real run would bake it into the program as a constant;
- CLIP vision encoders (RCOD's visual prompt, CODSR's discriminator trunk) are read from config-only folders with
  abstract parameters (:func:`stand_in_files`), at the size of the checkpoints the configs name;
- the mesh is a ``jax.sharding.AbstractMesh``, so ``jax.export`` lowers for a 16-chip TPU slice or one GPU from a
  CPU host (:func:`export_program`).

``attention="auto"`` resolves per call from ``jax.default_backend()`` (:mod:`jsr.models.attention`); an export
resolves it as the *target* would (:func:`target_backend`), and records which implementations the trace took.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import re
import resource
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh

from jsr.models import common
from jsr.sr.base import Base
from jsr.sr.generator import SDModels
from jsr.sr.schedule import DDPMSchedule
from jsr.train import sharding
from jsr.train.step import init_state, make_train_step

# Custom-call targets of hand-written kernels (Pallas/Mosaic on TPU and GPU, cuDNN fused attention): XLA's cost
# analysis counts no FLOPs in them.
KERNEL_CALLS = ("tpu_custom_call", "__cudnn$", "mosaic_gpu")
# The attention implementations that run such kernels.
KERNEL_IMPLEMENTATIONS = ("splash", "cudnn")

# The backend name ``jax.default_backend()`` reports on each export platform.
BACKEND_OF_PLATFORM = {"tpu": "tpu", "cuda": "gpu", "rocm": "gpu", "cpu": "cpu"}

# CODSR's discriminator trunk (openai/clip-vit-base-patch16) as changes to RCOD's ViT-L/14 ``config.json``
# (``jsr.methods.rcod.VIT_L14``, openai/clip-vit-large-patch14); architecture only.
VIT_B16_CHANGES = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       patch_size=16, projection_dim=512)


class ShapePrompts:
    """Stands in for :class:`jsr.sr.prompts.PromptEncoder` in abstract programs: ``prompts -> [n, L, D]`` zeros of
    the text encoder's output shape and dtype. The values are never read (every array of an abstract setup is
    reduced to its shape); only ``length``, ``width`` and ``dtype`` matter."""

    def __init__(self, length: int, width: int, dtype: Any):
        self.length, self.width, self.dtype = length, width, jnp.dtype(dtype)

    def __call__(self, prompts: str | list[str]) -> jax.Array:
        n = 1 if isinstance(prompts, str) else len(prompts)
        return jnp.zeros((n, self.length, self.width), self.dtype)

    def negative(self, prompt: str = "") -> jax.Array:  # noqa: ARG002 - the encoder's interface
        """``[1, L, D]``, as ``PromptEncoder.negative``."""
        return self([prompt])

    def spec(self, batch: int) -> jax.ShapeDtypeStruct:
        """The batch's ``c`` entry: ``[batch, L, D]``."""
        return jax.ShapeDtypeStruct((batch, self.length, self.width), self.dtype)


def _abstract(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype)), tree)


def abstract_base(preset_name: str = "sd21-base", *, dtype: Any = jnp.bfloat16, param_dtype: Any = None,
                  attention: str = "auto", remat: bool = False, folder: str | Path | None = None) -> Base:
    """A :class:`jsr.sr.base.Base` of the preset's architecture with abstract parameters, as ``load_base`` would
    build it from a folder of that model (parameters stored in ``param_dtype``, computing in ``dtype``).

    ``folder``: where the base "lives": a byte-level tokenizer is written there (CODSR's host-side noun lookup
    reads ``<folder>/tokenizer``); default: none is written and ``path`` is a label. ``random_weights`` is True,
    so the methods' stand-ins (teachers, LPIPS trunk) take the place of files, at their real sizes.
    """
    from jsr.models.presets import preset
    from jsr.weights.clip_text import text_encoder_from_config
    from jsr.weights.unet import unet_from_config
    from jsr.weights.vae import vae_from_config

    cfg = preset(preset_name)
    param_dtype = param_dtype or dtype
    unet = unet_from_config(cfg["unet"], param_dtype, attention, remat)
    vae = vae_from_config(cfg["vae"], param_dtype, attention, remat)
    unet_params = _abstract(common.abstract_params(unet), param_dtype)
    vae_params = _abstract(common.abstract_params(vae), param_dtype)
    text = text_encoder_from_config(cfg["text_encoder"], dtype, attention)
    length = int(cfg["text_encoder"]["max_position_embeddings"])
    out = jax.eval_shape(lambda p, ids: text.apply({"params": p}, ids),
                         _abstract(common.abstract_params(text), param_dtype),
                         jax.ShapeDtypeStruct((1, length), jnp.int32))
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
    models = SDModels(unet=unet.clone(dtype=dtype), vae=vae.clone(dtype=dtype),
                      schedule=DDPMSchedule.from_config(cfg["scheduler"]),
                      scaling_factor=float(cfg["vae"]["scaling_factor"]))
    path = Path(folder) if folder else Path(f"<abstract {preset_name}>")
    if folder:
        from jsr.weights.tiny import write_tokenizer

        write_tokenizer(path / "tokenizer", length)
    return Base(models=models, unet_params=unet_params, vae_params=vae_params,
                prompts=ShapePrompts(out.shape[1], out.shape[2], out.dtype), path=path, random_weights=True)


def abstract_clip_vision(folder: str | Path, dtype: Any = None, attention_impl: str = "auto", remat: bool = False,
                         with_projection: bool | None = None) -> tuple[Any, Any]:
    """``jsr.weights.load_clip_vision``'s result for the folder's ``config.json`` with abstract parameters (no
    weight file is read)."""
    from jsr.weights import io
    from jsr.weights.clip_vision import clip_vision_from_config

    module = clip_vision_from_config(io.read_config(folder), dtype, attention_impl, remat, with_projection)
    return module, _abstract(common.abstract_params(module), dtype or jnp.float32)


@contextlib.contextmanager
def stand_in_files(folder: str | Path) -> Iterator[dict[str, str]]:
    """Config-only CLIP vision folders (ViT-L/14 and ViT-B/16) under ``folder`` and, while the context is open,
    ``load_clip_vision`` reading any folder's architecture with abstract parameters. Yields
    ``{"vit_l14": path, "vit_b16": path}`` for ``config.rcod.vision`` / ``config.codsr.disc_backbone``."""
    import jsr.weights
    import jsr.weights.clip_vision
    from jsr.methods.rcod import VIT_L14

    paths = {}
    for name, cfg in (("vit_l14", VIT_L14), ("vit_b16", dict(VIT_L14, **VIT_B16_CHANGES))):
        p = Path(folder) / name
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text(json.dumps(cfg))
        paths[name] = str(p)
    # Both spellings are looked up at call time (RCOD imports the module's function, CODSR the package's).
    saved = (jsr.weights.load_clip_vision, jsr.weights.clip_vision.load_clip_vision)
    jsr.weights.load_clip_vision = jsr.weights.clip_vision.load_clip_vision = abstract_clip_vision
    try:
        yield paths
    finally:
        jsr.weights.load_clip_vision, jsr.weights.clip_vision.load_clip_vision = saved


def write_stage1_standin(base: Base, folder: str | Path) -> Path:
    """A stage-1 model in the legacy export layout (``unet/``, ``vae/`` peft folders) fitting ``base``: random
    OSEDiff-layout LoRAs (small; the base itself stays abstract), zero overrides. What CTSR stage 2 reads as its
    frozen stage-1 model (``config.ctsr.stage1``)."""
    from jsr.methods.common import random_lora
    from jsr.models import lora as L
    from jsr.weights.peft import save_peft_lora

    folder = Path(folder)
    rng = jax.random.key(5)
    for i, (name, params, spec) in enumerate((("unet", base.unet_params, L.OSEDIFF_UNET),
                                              ("vae", base.vae_params, L.OSEDIFF_VAE))):
        lo = random_lora(jax.random.fold_in(rng, i), params, spec)
        lo = dataclasses.replace(lo, overrides=jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), lo.overrides))
        save_peft_lora(lo, folder / name)
    return folder


@contextlib.contextmanager
def target_backend(platform: str, avoid: tuple[str, ...] = ()) -> Iterator[collections.Counter]:
    """While open, ``jax.default_backend()`` answers as on ``platform`` (so ``attention="auto"`` resolves as
    there), every attention implementation the trace resolves is counted in the yielded Counter, and one in
    ``avoid`` (``cudnn``: cannot be traced without a GPU; ``splash``: a Pallas TPU kernel) is replaced by the
    ``xla`` path, counted as ``"xla (for cudnn)"``."""
    from jsr.models import attention

    name = BACKEND_OF_PLATFORM[platform]
    picks: collections.Counter = collections.Counter()
    resolve = getattr(attention, "resolve_implementation", None)
    saved_backend = jax.default_backend

    def counting(*args, **kwargs):
        which = resolve(*args, **kwargs)
        if which in avoid:
            picks[f"xla (for {which})"] += 1
            return "xla"
        picks[which] += 1
        return which

    jax.default_backend = lambda: name
    if resolve is not None:
        attention.resolve_implementation = counting
    try:
        yield picks
    finally:
        jax.default_backend = saved_backend
        if resolve is not None:
            attention.resolve_implementation = resolve


@dataclasses.dataclass
class Program:
    """One train step as a jitted function over abstract, sharded arguments.

    Attributes:
      make_fn: ``() -> jax.jit(step, in_shardings=..., out_shardings=..., donate_argnums=0)``, as the loop jits
        it; a fresh jit per call, so each export traces anew (the attention path is chosen while tracing).
      args: ``(state, frozen, batch)`` of ``jax.ShapeDtypeStruct`` with their shardings.
      mesh: the ``AbstractMesh``.
      groups: the trainable groups this phase updates.
      batch: global batch size (images per step).
    """

    make_fn: Callable[[], Any]
    args: tuple
    mesh: AbstractMesh
    groups: list[str]
    batch: int

    def device_bytes(self) -> dict[str, int]:
        """Bytes one device holds of each argument part: ``trainable`` (all groups' params), ``optimizer``,
        ``frozen`` (base and frozen extras), ``batch``, and ``total``."""
        state, frozen, batch = self.args
        out = {"trainable": tree_device_bytes(state.params), "optimizer": tree_device_bytes(state.opt_state),
               "frozen": tree_device_bytes(frozen), "batch": tree_device_bytes(batch)}
        out["total"] = sum(out.values()) + tree_device_bytes((state.step, state.rng, state.nonfinite))
        return out

    def global_bytes(self) -> dict[str, int]:
        """The same parts unsharded (the whole arrays)."""
        state, frozen, batch = self.args
        return {"trainable": tree_bytes(state.params), "optimizer": tree_bytes(state.opt_state),
                "frozen": tree_bytes(frozen), "batch": tree_bytes(batch)}


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def tree_device_bytes(tree: Any) -> int:
    """Bytes one device holds of ``tree``'s ShapeDtypeStruct leaves under their shardings (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def abstract_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1) -> AbstractMesh:
    """A ``(data, fsdp, tensor)`` mesh of that many devices that need not exist (``jsr.train.sharding`` axes)."""
    return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


def _with(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _host_batch_spec(setup: Any, config: Any, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of the method's own per-example arrays (``TrainSetup.host_batch``) for a data batch of ``batch``
    images, from one call on a blank host batch of the data pipeline's layout."""
    if setup.host_batch is None:
        return {}
    size = int(config.data.crop_size)
    host: dict[str, Any] = {}
    if config.data.get("noun_masks", False):
        k = int(config.data.max_nouns)
        host = {"masks": np.zeros((batch, size, size, k), np.uint8), "nouns": np.full((batch, k), "", object)}
    arrays = setup.host_batch(host, ["a photo"] * batch)
    return {key: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for key, v in arrays.items()}


def build_program(config: Any, base: Base, mesh: AbstractMesh, phase: int = 0,
                  batch: int | None = None) -> Program:
    """The train step of ``config``'s method (phase index ``phase``; negative counts from the last) on ``base``
    over ``mesh``, as :func:`jsr.train.loop.train` jits it, with every argument abstract.

    ``batch``: global images per step (default ``config.data.batch_size``); it must split over ``data`` x
    ``fsdp`` (ValueError otherwise, as the loop's batch placement fails).
    """
    from jsr.train.loop import _frozen_shardings, build

    batch = int(batch or config.data.batch_size)
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % ways:
        raise ValueError(f"batch {batch} does not split over data x fsdp = {ways} devices")
    rules = sharding.parse_rules(config.mesh.rules)
    kept: dict[str, Any] = {}

    def make(unet_params, vae_params):
        b = dataclasses.replace(base, unet_params=unet_params, vae_params=vae_params)
        _, setup = build(config, b, jax.random.fold_in(jax.random.key(config.seed), 1))
        kept["setup"] = setup  # its loss closures and axis trees; its arrays leave as shapes below
        return init_state(setup.params, setup.all_updates, config.seed), setup.frozen

    state, frozen = jax.eval_shape(make, base.unet_params, base.vae_params)
    setup = kept.pop("setup")
    updates = setup.phases[phase][1]
    rep = sharding.replicated(mesh)
    state_sh = jax.tree.map(lambda _: rep, state)
    frozen_sh = _frozen_shardings(frozen, base, mesh, config.shard_frozen, rules, setup.frozen_axes)
    size = int(config.data.crop_size)
    image = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    data = {"hq": image, "lq": image, "c": base.prompts.spec(batch),
            **_host_batch_spec(setup, config, batch)}
    batch_sh = {k: sharding.batch_sharding(mesh, len(v.shape)) for k, v in data.items()}
    step = make_train_step(updates, config.optim.accum_steps, mesh, rules)  # the mesh in context, as the loop's

    def make_fn():
        return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, rep),
                       donate_argnums=0)

    args = (_with(state, state_sh), _with(frozen, frozen_sh), _with(data, batch_sh))
    return Program(make_fn=make_fn, args=args, mesh=mesh, groups=[u.group for u in updates], batch=batch)


def _flops(cost: Any) -> float:
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def export_program(program: Program, platform: str, *, cost: bool = True, avoid: tuple[str, ...] = (),
                   xla_flops: float | None = None, disabled_checks: tuple = ()) -> dict[str, Any]:
    """``jax.export`` of ``program`` for ``platform`` (``tpu``, ``cuda``...) on its mesh and, with ``cost``, XLA's
    cost analysis of the same program lowered for that platform: the unpartitioned module, so the FLOPs of the
    whole step over every device, without compiling (nothing here can compile for the target).

    The step traces with ``program.mesh`` as the abstract mesh in context (what ``jax.set_mesh`` gives a
    multi-device step: splash attention then runs per shard) and the attention resolved as on ``platform``;
    ``avoid``: implementations exported as the XLA path instead (:func:`target_backend`). A kernel's custom call
    (:data:`KERNEL_CALLS`) has no FLOPs in XLA's count: then ``flops`` is that of the same step with XLA attention
    (``xla_flops`` when the caller has it, else traced here) and ``flops_outside_kernels`` the exported
    module's. XLA counts a loop body once, not per trip: attention resolved to ``chunked`` (a loop over query
    blocks: on TPU/GPU only beyond ``AUTO_CHUNK_BYTES`` of scores, e.g. the VAE mid-block at batch 16) is
    undercounted, by well under 1 % of an SD step. Raises whatever the trace or the export raises.

    Returns ``{"stablehlo_bytes"`` (the serialized StableHLO bytecode), ``"nr_devices"``, ``"flops"`` (NaN
    without ``cost``), ``"flops_source"``, ``"custom_calls"`` ({target: count} in the module),
    ``"kernel_calls"``, ``"attention_calls"`` ({implementation: calls} the trace resolved), ``"constant_bytes"``
    (:func:`constant_bytes`), ``"export_s"``, ``"lower_s"``, ``"peak_rss_bytes"`` (this process so far),
    ``"exported"`` (the ``jax.export.Exported``; drop it before writing JSON)``}``.
    """
    from jax import export

    out: dict[str, Any] = {"flops": float("nan"), "flops_source": None, "lower_s": 0.0}
    fn = program.make_fn()
    with target_backend(platform, avoid) as picks, jax.sharding.use_abstract_mesh(program.mesh):
        t0 = time.perf_counter()
        exp = export.export(fn, platforms=[platform], disabled_checks=disabled_checks)(*program.args)
        out["export_s"] = time.perf_counter() - t0
        exported_picks = dict(picks)  # the cost lowering below may trace again: its picks are not the module's
        if cost:
            t0 = time.perf_counter()
            # jit's trace is cached; this lowers it once more (not for export) for the cost analysis.
            out["flops"] = _flops(fn.trace(*program.args).lower(lowering_platforms=(platform,)).cost_analysis())
            out["flops_source"] = "this program"
            out["lower_s"] = time.perf_counter() - t0
    text = exp.mlir_module()
    calls = collections.Counter(re.findall(r"custom_call @([\w$.\-]+)", text))
    kernels = sum(n for c, n in calls.items() if c.startswith(KERNEL_CALLS))
    if cost and kernels:
        out["flops_outside_kernels"] = out["flops"]
        if xla_flops is None:
            t0 = time.perf_counter()
            xla_fn = program.make_fn()
            with target_backend(platform, KERNEL_IMPLEMENTATIONS), jax.sharding.use_abstract_mesh(program.mesh):
                lowered = xla_fn.trace(*program.args).lower(lowering_platforms=(platform,))
                xla_flops = _flops(lowered.cost_analysis())
            out["lower_s"] += time.perf_counter() - t0
            out["flops_source"] = "this step with XLA attention"
        else:
            out["flops_source"] = "given (the step with XLA attention)"
        out["flops"] = xla_flops
    out.update(stablehlo_bytes=len(exp.mlir_module_serialized), nr_devices=exp.nr_devices, custom_calls=dict(calls),
               kernel_calls=kernels, attention_calls=exported_picks, constant_bytes=constant_bytes(text),
               peak_rss_bytes=_peak_rss(), exported=exp)
    return out


def constant_bytes(module_text: str) -> int:
    """Bytes of the non-uniform constants in a StableHLO module's text (``dense<"0x...">`` blobs): data baked into
    the program rather than passed as arguments (a frozen weight captured by a closure would show here)."""
    return sum((len(m) - 2) // 2 for m in re.findall(r'dense<"(0x[0-9A-Fa-f]+)">', module_text))
