"""LoRA as its own pytree: target selection, init, runtime trees, merge, exact stacking, logical axes.

How a LoRA reaches the model
----------------------------
Every ``jsr.models.layers.Dense``/``Conv`` reads an optional ``lora`` variable collection at its own scope, so a
LoRA is applied by passing it *beside* the frozen base, never by editing it::

    y = unet.apply(lora.variables(base, my_lora), x, t, ctx)     # base + LoRA
    y = unet.apply({"params": base}, x, t, ctx)                  # the frozen base, same arrays

:class:`LoRA` holds the *trainable* state: ``factors`` (float32, unscaled, as trained and as peft stores them:
dense ``a`` [in, r], ``b`` [r, out]; conv ``a`` [kh, kw, in, r], ``b`` [1, 1, r, out]), ``overrides`` (base
tensors that a method trains in full, e.g. OSEDiff's UNet ``conv_in``: a params-shaped subtree that replaces
the base at apply time) and the static ``rank`` and ``alpha``. :func:`runtime` turns it into the tree the layers
read (``b`` multiplied by ``alpha / rank``), :func:`variables` builds ``{"params", "lora"}`` for ``apply``.
Gradients w.r.t. a ``LoRA`` therefore touch only factors and overrides; the base is a constant. Any number of
LoRAs over one base run in one jitted function (they are just different arguments).

Names and targets
-----------------
Targets are chosen the way OSEDiff (``osediff.py: initialize_unet/initialize_vae``) and PiSA-SR
(``pisasr.py: initialize_unet``) choose them, on the PyTorch parameter name (``down_blocks.0.resnets.1.conv1.weight``)
of each Dense/Conv kernel: skip the name if it contains ``bias`` or ``norm`` anywhere; select it if any pattern is a
*substring* of the name (so ``conv`` alone selects every convolution; the list's other conv names are redundant
but kept as OSEDiff wrote it), and, for the VAE, only inside ``encoder`` plus the module named exactly
``quant_conv`` (never ``post_quant_conv``). OSEDiff's adapter groups for the UNet: ``encoder`` if the name contains
``down_blocks`` or ``conv_in``, else ``decoder`` if it contains ``up_blocks`` or ``conv_out``, else ``others``
(mid block); the VAE has one group, ``encoder``. Flax paths map to those names by turning ``name_N`` into
``name.N`` (``to_out_0`` -> ``to_out.0``, ``net_0`` -> ``net.0``), exactly for the model's list containers when its
``indexed`` set is given, for every ``_N`` suffix otherwise (no default pattern is sensitive to the difference).

Init follows ``peft.LoraConfig(init_lora_weights="gaussian")``, which OSEDiff and PiSA-SR use: ``A ~ N(0, (1/r)^2)``,
``B = 0`` (peft's default init would be Kaiming-uniform A). Neither project sets ``lora_alpha``, so peft's default
8 applies: rank 4, alpha 8, scale 2.

Stacking: ``W + sum_i w_i s_i B_i A_i`` is one LoRA whose ``a`` is the concatenation of the ``a_i`` along the rank
axis and whose ``b`` is the concatenation of ``w_i s_i b_i`` (``rank = sum r_i``, ``alpha = rank``: scale 1). Exact,
not an approximation. Overrides combine as deltas from the base (``base + sum_i w_i (O_i - base)``).

Why not qwix (evaluated: qwix 0.1.8 from PyPI, ``qwix/_src/providers/lora.py``)
-------------------------------------------------------------------------------
``qwix.LoraProvider`` intercepts ``dot_general``/``einsum``/``conv_general_dilated`` and scales by ``alpha/rank``
with a peft-style conv LoRA, but: (1) for linen it creates the factors in the ``params`` collection next to the
kernel (``kernel_lora_a``/``kernel_lora_b``), so base and LoRA are one tree, and running one base with several
LoRAs means splicing parameter trees per call; (2) rank and alpha are static fields of a rule bound to the
transformed model, so LoRAs of different rank/scale (or a stack of them) need differently transformed modules;
(3) the factors take the base parameter's dtype (a bf16 base gives bf16 LoRA weights, while we keep float32
masters); (4) it has no peft/diffusers import or export. Our layers already carry a LoRA hook in their own
collection (``jsr.models.layers``), which gives (1)-(3) directly, so qwix is not used and not a dependency.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util
from jax.sharding import PartitionSpec

from jsr.models.layers import LORA_COLLECTION

Path = tuple[str, ...]
RANK_AXIS = "lora_rank"  # logical axis name of the rank dimension (replicated by jsr.train.sharding's rules)

# OSEDiff's pattern list for the UNet (osediff.py, initialize_unet), in its order.
UNET_PATTERNS = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in", "conv_shortcut",
                 "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
# OSEDiff's pattern list for the VAE (osediff.py, initialize_vae); the UNet-only names would select nothing more.
VAE_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")


class LoRAMismatchError(ValueError):
    """A LoRA does not fit a parameter tree: missing layers, wrong shapes (all named)."""


@dataclasses.dataclass(frozen=True)
class Targets:
    """Which Dense/Conv kernels get LoRA factors, and their adapter group.

    A kernel with PyTorch parameter name ``n`` (see module docstring) is selected when no ``exclude`` string is a
    substring of ``n`` and either (some ``patterns`` entry is a substring of ``n`` and, if ``within`` is
    non-empty, some ``within`` entry is too) or its module name (``n`` without ``.weight``) is in ``exact``.
    Its group is the first ``groups`` entry one of whose markers is a substring of ``n`` (an entry without markers
    takes everything); with no ``groups`` every target is in group ``"default"``.
    """

    patterns: tuple[str, ...]
    within: tuple[str, ...] = ()
    exact: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ("bias", "norm")
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def group_of(self, name: str) -> str | None:
        """The group of the PyTorch parameter name ``name``, or None when it is not a target."""
        if any(x in name for x in self.exclude):
            return None
        hit = any(p in name for p in self.patterns) and (not self.within or any(w in name for w in self.within))
        if not hit and name.removesuffix(".weight") not in self.exact:
            return None
        for group, markers in self.groups:
            if not markers or any(m in name for m in markers):
                return group
        return "default" if not self.groups else None


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """A method's LoRA for one model: targets, rank, alpha, and modules trained in full (PyTorch module names,
    e.g. ``("conv_in",)``), whose parameters become ``LoRA.overrides``."""

    targets: Targets
    rank: int = 4
    alpha: float = 8.0
    full: tuple[str, ...] = ()


OSEDIFF_UNET_TARGETS = Targets(
    patterns=UNET_PATTERNS,
    groups=(("encoder", ("down_blocks", "conv_in")), ("decoder", ("up_blocks", "conv_out")), ("others", ())))
OSEDIFF_VAE_TARGETS = Targets(patterns=VAE_PATTERNS, within=("encoder",), exact=("quant_conv",),
                              groups=(("encoder", ()),))
OSEDIFF_UNET = LoRASpec(OSEDIFF_UNET_TARGETS, rank=4, alpha=8.0, full=("conv_in",))
OSEDIFF_VAE = LoRASpec(OSEDIFF_VAE_TARGETS, rank=4, alpha=8.0)
# PiSA-SR: the same UNet targets for its pixel and its semantic LoRA, no VAE LoRA, nothing trained in full.
PISASR_UNET = LoRASpec(OSEDIFF_UNET_TARGETS, rank=4, alpha=8.0)


@struct.dataclass
class LoRA:
    """The trainable state of one LoRA over one model (a pytree; ``rank`` and ``alpha`` are static).

    Attributes:
      factors: nested dict mirroring the params tree down to each targeted Dense/Conv, holding ``{"a", "b"}``
        (float32, unscaled; shapes in the module docstring).
      overrides: nested dict mirroring params down to fully trained leaves (``kernel``, ``bias``...), whose
        values replace the base's at apply time; ``{}`` for a pure LoRA.
      rank: nominal rank ``r`` (the scale is ``alpha / rank``; factor shapes carry the real per-layer rank).
      alpha: LoRA alpha.
    """

    factors: Any
    overrides: Any = struct.field(default_factory=dict)
    rank: int = struct.field(pytree_node=False, default=4)
    alpha: float = struct.field(pytree_node=False, default=8.0)

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)

    def paths(self) -> list[Path]:
        """Paths (module names in the params tree) of the layers that carry factors, sorted."""
        return sorted(p[:-1] for p in traverse_util.flatten_dict(self.factors) if p[-1] == "a")


# --------------------------------------------------------------------------------------------------------------
# Names and selection


_INDEXED = re.compile(r"^(.+)_(\d+)$")


def module_name(path: Sequence[str], indexed: Iterable[str] | None = None) -> str:
    """PyTorch module name of the Flax module at ``path`` (``('up_blocks_1', 'attentions_0', 'proj_in')`` ->
    ``up_blocks.1.attentions.0.proj_in``). ``indexed``: the model's list-container names (e.g.
    ``jsr.weights.unet.UNET_INDEXED``); None turns every ``name_N`` into ``name.N``."""
    keep = None if indexed is None else set(indexed)
    parts = []
    for p in path:
        m = _INDEXED.match(p)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m and (keep is None or m.group(1) in keep) else p)
    return ".".join(parts)


def flax_path(name: str) -> Path:
    """Flax path of the PyTorch module ``name``: numeric components join the one before (``to_out.0`` ->
    ``to_out_0``). The inverse of :func:`module_name` for jsr models."""
    out: list[str] = []
    for part in name.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _kernels(params: Mapping) -> dict[Path, Any]:
    """Module path -> kernel leaf of every Dense/Conv in ``params``."""
    return {p[:-1]: v for p, v in traverse_util.flatten_dict(_unbox(params)).items() if p[-1] == "kernel"}


def select(params: Mapping, targets: Targets, indexed: Iterable[str] | None = None) -> dict[str, list[Path]]:
    """Group -> sorted module paths of the Dense/Conv layers of ``params`` that ``targets`` selects."""
    out: dict[str, list[Path]] = {}
    for path in _kernels(params):
        group = targets.group_of(module_name(path, indexed) + ".weight")
        if group is not None:
            out.setdefault(group, []).append(path)
    return {g: sorted(v) for g, v in out.items()}


def _full_paths(params: Mapping, full: Sequence[str], indexed) -> dict[Path, Any]:
    """Leaf path -> leaf for every parameter of the modules named in ``full`` (exact PyTorch module names)."""
    flat = traverse_util.flatten_dict(_unbox(params))
    out = {p: v for p, v in flat.items() if module_name(p[:-1], indexed) in set(full)}
    found = {module_name(p[:-1], indexed) for p in out}
    if set(full) - found:
        raise LoRAMismatchError(f"modules to train in full not found in the parameters: {sorted(set(full) - found)}")
    return out


def trainable(spec: LoRASpec, params: Mapping, indexed: Iterable[str] | None = None) -> dict[str, list[str]]:
    """What a method trains on one model, as PyTorch names: ``{"lora/<group>": [module, ...], "full": [param,
    ...]}`` (e.g. for OSEDiff's UNet: LoRA on the encoder/decoder/others groups, ``conv_in.weight`` and
    ``conv_in.bias`` in full)."""
    out = {f"lora/{g}": [module_name(p, indexed) for p in paths]
           for g, paths in select(params, spec.targets, indexed).items()}
    if spec.full:
        out["full"] = sorted(f"{module_name(p[:-1], indexed)}.{_torch_leaf(p[-1])}"
                             for p in _full_paths(params, spec.full, indexed))
    return out


def _torch_leaf(leaf: str) -> str:
    return "bias" if leaf == "bias" else "weight"


# --------------------------------------------------------------------------------------------------------------
# Construction


def factor_shapes(kernel_shape: Sequence[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``a`` and ``b`` for a kernel of ``kernel_shape`` (dense [in, out] or conv HWIO)."""
    if len(kernel_shape) == 2:
        return (kernel_shape[0], rank), (rank, kernel_shape[1])
    if len(kernel_shape) == 4:
        kh, kw, cin, cout = kernel_shape
        return (kh, kw, cin, rank), (1, 1, rank, cout)
    raise ValueError(f"LoRA needs a 2-D dense or 4-D HWIO conv kernel, got shape {tuple(kernel_shape)}")


def init(rng: jax.Array, params: Mapping, spec: LoRASpec, indexed: Iterable[str] | None = None) -> LoRA:
    """A fresh LoRA for ``params`` (concrete or ``jax.ShapeDtypeStruct`` leaves) following ``spec``.

    ``a ~ N(0, (1/rank)^2)``, ``b = 0`` (float32); overrides start as float32 copies of the base tensors
    (abstract when ``params`` is abstract).
    """
    kernels = _kernels(params)
    layers = tuple((path,) + factor_shapes(kernels[path].shape, spec.rank)
                   for paths in select(params, spec.targets, indexed).values() for path in paths)
    factors = _init_factors(rng, layers, spec.rank)
    overrides = {p: _f32(v) for p, v in _full_paths(params, spec.full, indexed).items()} if spec.full else {}
    return LoRA(factors=factors, overrides=traverse_util.unflatten_dict(overrides), rank=spec.rank,
                alpha=float(spec.alpha))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(rng: jax.Array, ids: tuple, size: int) -> jax.Array:
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(ids, jnp.uint32))
    return jax.vmap(lambda k: jax.random.normal(k, (size,), jnp.float32))(keys)


def _init_factors(rng: jax.Array, layers: tuple, rank: int) -> dict:
    """``a`` for every layer from one batched draw (a row per layer, keyed by the layer's name, so a layer's init
    does not depend on which others are targeted), ``b = 0``. The rows are cut on the host: an XLA program with
    one output per layer (or one eager op per shape) costs seconds of compilation on CPU."""
    if not layers:
        return {}
    ids = tuple(zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF for path, _, _ in layers)
    sizes = [math.prod(sa) for _, sa, _ in layers]
    z = _draw(rng, ids, max(sizes))
    xp = jnp if isinstance(z, jax.core.Tracer) else np  # traced (jit/eval_shape): stay in the program
    z = z if xp is jnp else np.asarray(z)
    flat = {}
    for i, (path, sa, sb) in enumerate(layers):
        flat[path + ("a",)] = jnp.asarray(z[i, :sizes[i]].reshape(sa) / np.float32(rank))
        flat[path + ("b",)] = jnp.asarray(xp.zeros(sb, np.float32))
    return traverse_util.unflatten_dict(flat)


def _f32(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, jnp.float32)
    # Always a copy: a trained override must own its buffer. Aliasing the frozen base's f32 array (asarray is a
    # no-op there) made a donated train state free the frozen parameter it shared a buffer with.
    return jnp.array(x, jnp.float32, copy=True)


def _unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


# --------------------------------------------------------------------------------------------------------------
# Application


def runtime(lora: LoRA, dtype: Any = None) -> dict:
    """The tree the layers read from the ``lora`` collection: ``a`` and ``b * alpha / rank`` (cast to ``dtype``
    when given)."""
    scale = lora.scale

    def one(node):
        a, b = node["a"], node["b"] * scale
        return {"a": a if dtype is None else a.astype(dtype), "b": b if dtype is None else b.astype(dtype)}

    return _map_nodes(lora.factors, one)


def _map_nodes(tree: Mapping, fn) -> dict:
    """Apply ``fn`` to every ``{"a", "b"}`` node of a factor tree."""
    if "a" in tree and "b" in tree:
        return fn(tree)
    return {k: _map_nodes(v, fn) for k, v in tree.items()}


def with_overrides(params: Mapping, overrides: Mapping) -> dict:
    """``params`` with the leaves of ``overrides`` substituted (only the dicts on the way are copied)."""
    if not overrides:
        return params

    def rec(base, sub, where):
        out = dict(base)
        for k, v in sub.items():
            if k not in base:
                raise LoRAMismatchError(f"override {'/'.join(where + (k,))} has no counterpart in the parameters")
            out[k] = rec(base[k], v, where + (k,)) if isinstance(v, Mapping) else v
        return out

    return rec(params, overrides, ())


def variables(params: Mapping, lora: LoRA | None = None, dtype: Any = None) -> dict:
    """``{"params": ..., "lora": ...}`` for ``module.apply``: the base with ``lora``'s overrides and its runtime
    factors. ``lora=None`` gives the plain base. Combine several LoRAs with :func:`stack` first."""
    if lora is None:
        return {"params": params}
    return {"params": with_overrides(params, lora.overrides), LORA_COLLECTION: runtime(lora, dtype)}


def delta(node: Mapping, scale: float) -> jax.Array:
    """The weight update ``scale * A B`` of one layer in the kernel's layout ([in, out] or HWIO), float32."""
    a, b = jnp.asarray(node["a"], jnp.float32), jnp.asarray(node["b"], jnp.float32)
    if a.ndim == 2:
        return scale * (a @ b)
    return scale * jnp.einsum("hwir,ro->hwio", a, b.reshape(b.shape[-2], b.shape[-1]))


def merge(params: Mapping, lora: LoRA) -> dict:
    """A copy of ``params`` with ``lora`` folded in: overrides substituted, then ``kernel += (alpha/rank) A B``
    (computed in float32, stored in each kernel's dtype). The input tree is not modified; untouched leaves are
    shared with it, not copied."""
    check(lora, params)
    flat = traverse_util.flatten_dict(with_overrides(_unbox(params), lora.overrides))
    keys = [path + ("kernel",) for path in lora.paths()]
    nodes = [_get(lora.factors, k[:-1]) for k in keys]
    flat.update(zip(keys, _merge_kernels([flat[k] for k in keys], nodes, lora.scale)))
    return traverse_util.unflatten_dict(flat)


@jax.jit
def _merge_kernels(kernels: list, nodes: list, scale) -> list:
    # One compiled program for all layers (eager per-layer ops would compile one small program per shape).
    return [(k.astype(jnp.float32) + delta(n, scale)).astype(k.dtype) for k, n in zip(kernels, nodes)]


def _get(tree: Mapping, path: Path):
    for p in path:
        tree = tree[p]
    return tree


def check(lora: LoRA, params: Mapping) -> None:
    """Raise :class:`LoRAMismatchError` naming every LoRA layer or override that ``params`` lacks or whose shape
    does not fit (``a`` [.., in, r] and ``b`` [.., r, out] against the kernel; overrides equal to the base)."""
    flat = traverse_util.flatten_dict(_unbox(params))
    problems = []
    for path in lora.paths():
        node = _get(lora.factors, path)
        name = "/".join(path)
        kernel = flat.get(path + ("kernel",))
        if kernel is None:
            problems.append(f"{name}: no Dense/Conv kernel at this path")
            continue
        a, b = node["a"], node["b"]
        r = a.shape[-1]
        want_a, want_b = factor_shapes(kernel.shape, r)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(f"{name}: factors a{tuple(a.shape)} b{tuple(b.shape)} do not fit kernel "
                            f"{tuple(kernel.shape)} (want a{want_a} b{want_b})")
    for path, v in traverse_util.flatten_dict(lora.overrides).items():
        base = flat.get(path)
        if base is None:
            problems.append(f"override {'/'.join(path)}: no such parameter")
        elif tuple(base.shape) != tuple(v.shape):
            problems.append(f"override {'/'.join(path)}: shape {tuple(v.shape)}, parameter {tuple(base.shape)}")
    if problems:
        raise LoRAMismatchError(f"LoRA does not fit the parameters ({len(problems)} problem(s)): "
                                + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))


# --------------------------------------------------------------------------------------------------------------
# Combination


def stack(items: Sequence[tuple[LoRA, float]], params: Mapping | None = None) -> LoRA:
    """One LoRA equal to applying ``sum_i w_i * LoRA_i`` at once: ``W + sum_i w_i s_i B_i A_i``.

    Factors are concatenated along the rank axis (``b_i`` pre-multiplied by ``w_i * s_i``), a layer that a LoRA
    lacks gets zero factors of that LoRA's rank so every layer keeps the same total rank; the result has
    ``rank = sum r_i`` and ``alpha = rank`` (scale 1). Overrides combine as ``base + sum_i w_i (O_i - base)``,
    which needs ``params`` unless every LoRA with overrides has weight 1 and they touch disjoint tensors.
    """
    if not items:
        raise ValueError("stack needs at least one (lora, weight) pair")
    coefs = jnp.stack([jnp.asarray(w, jnp.float32) * l.scale for l, w in items])  # weights may be traced
    factors = _stack_factors(tuple(l.factors for l, _ in items), coefs, tuple(l.rank for l, _ in items))
    rank = sum(l.rank for l, _ in items)
    return LoRA(factors=factors, overrides=_stack_overrides(items, params), rank=rank, alpha=float(rank))


@functools.partial(jax.jit, static_argnums=(2,))
def _stack_factors(trees: tuple, coefs: jax.Array, ranks: tuple) -> dict:
    flats = [traverse_util.flatten_dict(t) for t in trees]
    paths = sorted({p[:-1] for f in flats for p in f if p[-1] == "a"})
    out: dict[Path, Any] = {}
    for path in paths:
        sa, sb = next((f[path + ("a",)].shape, f[path + ("b",)].shape) for f in flats if path + ("a",) in f)
        a_parts, b_parts = [], []
        for i, f in enumerate(flats):
            if path + ("a",) in f:
                a_parts.append(f[path + ("a",)].astype(jnp.float32))
                b_parts.append(f[path + ("b",)].astype(jnp.float32) * coefs[i])
            else:  # zero factors of this LoRA's rank keep every layer at the same total rank
                a_parts.append(jnp.zeros(sa[:-1] + (ranks[i],), jnp.float32))
                b_parts.append(jnp.zeros(sb[:-2] + (ranks[i], sb[-1]), jnp.float32))
        out[path + ("a",)] = jnp.concatenate(a_parts, axis=-1)
        out[path + ("b",)] = jnp.concatenate(b_parts, axis=-2)
    return traverse_util.unflatten_dict(out)


def _stack_overrides(items: Sequence[tuple[LoRA, float]], params: Mapping | None) -> dict:
    with_ov = [(traverse_util.flatten_dict(l.overrides), w) for l, w in items if l.overrides]
    if not with_ov:
        return {}
    keys = [set(f) for f, _ in with_ov]
    disjoint = sum(len(k) for k in keys) == len(set().union(*keys))
    if disjoint and all(w == 1 for _, w in with_ov):
        merged: dict = {}
        for f, _ in with_ov:
            merged.update(f)
        return traverse_util.unflatten_dict(merged)
    if params is None:
        raise ValueError("stack: LoRAs with overrides (fully trained tensors) combine as base + sum w_i (O_i - base);"
                         " pass params= (the base) to stack them with weights other than 1 or on shared tensors")
    base = traverse_util.flatten_dict(_unbox(params))
    out = {}
    for p in set().union(*keys):
        b = jnp.asarray(base[p], jnp.float32)
        out[p] = b + sum(w * (jnp.asarray(f[p], jnp.float32) - b) for f, w in with_ov if p in f)
    return traverse_util.unflatten_dict(out)


# --------------------------------------------------------------------------------------------------------------
# Bookkeeping


def logical_axes(lora: LoRA, base_axes: Mapping) -> LoRA:
    """A LoRA-shaped tree of ``PartitionSpec`` s of logical axis names, derived from the base's
    (``jsr.models.common.logical_axes(module)``): ``a`` keeps the kernel's input axes and gets ``lora_rank``, ``b``
    gets ``lora_rank`` and the kernel's output axis; overrides take the base tensor's axes. Map onto a mesh with
    ``flax.linen.logical_to_mesh_sharding`` and ``jsr.train.sharding``'s rules (``lora_rank`` is replicated)."""
    flat_axes = traverse_util.flatten_dict(_unbox(base_axes))
    out = {}
    for path in lora.paths():
        spec = tuple(flat_axes[path + ("kernel",)])
        ndim = 2 if _get(lora.factors, path)["a"].ndim == 2 else 4
        spec = spec + (None,) * (ndim - len(spec))
        if ndim == 2:
            out[path + ("a",)] = PartitionSpec(spec[0], RANK_AXIS)
            out[path + ("b",)] = PartitionSpec(RANK_AXIS, spec[1])
        else:
            out[path + ("a",)] = PartitionSpec(spec[0], spec[1], spec[2], RANK_AXIS)
            out[path + ("b",)] = PartitionSpec(None, None, RANK_AXIS, spec[3])
    ov = {p: flat_axes[p] for p in traverse_util.flatten_dict(lora.overrides)}
    return LoRA(factors=traverse_util.unflatten_dict(out), overrides=traverse_util.unflatten_dict(ov),
                rank=lora.rank, alpha=lora.alpha)
