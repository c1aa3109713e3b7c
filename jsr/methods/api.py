"""The method interface: what one SR method (OSEDiff, PiSA-SR, CTSR, ...) declares, in one module.

A method is a subclass of :class:`Method` registered by name (:mod:`jsr.methods`). The training loop, the
restorer, ``python -m jsr.infer``, ``evaluate.py`` and ``jsr.eval`` call only this interface:

==========================  ======================================================================================
``name``, ``label``         registry key (``pisasr``) and the name in tables (``PiSA-SR``)
``config()``                the method's config section (``config.<name>``) with its defaults
``setup(config, base, rng)``  training: the trainable trees (LoRAs *and* any other module's params, in ``{group:
                            {name: tree}}``), ordered phases of :class:`Update` lists, the frozen extras and what
                            is exported (:class:`TrainSetup`)
``forward(...)``            the one-step forward in latent space, LQ latent -> output latent: the single function
                            used by inference, the training previews, and other methods that use this one as a
                            teacher (CTSR stage 2 calls stage 1's)
``knobs``                   the inference controls (:class:`Knob`: name, type, range, default, help): every CLI
                            takes its flags and checks from here
``roles``                   the trees inference needs, by role (``unet``, ``vae``, ``control``, ``pix``...)
``import_release(path, base)``  the method's public release file (e.g. a ``.pkl``), when it has one
``module_template(...)``    the abstract parameter tree of a non-LoRA module, to load an exported one
==========================  ======================================================================================

Trees. A *LoRA* tree is a :class:`jsr.models.lora.LoRA` over the UNet or the VAE; it is exported as a peft
folder. Any other trainable tree (a refinement network, a modulation module, a projection, a discriminator head)
is a plain dict of arrays exported as ``model.safetensors`` (PyTorch names and layouts) plus a ``config.json``
that the method writes (it must hold what ``module_template`` needs to rebuild the tree's shapes).

Layers: methods use ``jsr.sr`` (generator steps, losses, teachers), ``jsr.models`` and ``jsr.weights``; the
training loop and the CLIs sit above them and know no method by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

# loss(params_by_group, frozen, batch, rng, carry) -> (loss, (parts, carry))
LossFn = Callable[[Mapping[str, Any], Any, Mapping[str, jax.Array], jax.Array, Any],
                  tuple[jax.Array, tuple[dict[str, jax.Array], Any]]]


@dataclasses.dataclass(frozen=True)
class Update:
    """One optimisation of ``group`` on ``loss`` with ``optimizer`` inside a train step
    (:func:`jsr.train.step.make_train_step` runs a step's updates in order)."""

    group: str
    loss: LossFn
    optimizer: optax.GradientTransformation


# Flag names the CLIs already use for their own options: a knob may not take one.
RESERVED_NAMES = frozenset({
    "model", "lora", "method", "prompt", "dtype", "attention", "upscale", "color_fix", "latent_tile",
    "latent_overlap", "vae_tile", "vae_overlap", "tiles_per_call", "batch_size", "output", "suffix", "ext",
    "skip_existing", "no_progress", "dataset", "compare", "max_images", "out", "label", "no_model", "config",
    "workdir", "help"})


@dataclasses.dataclass(frozen=True)
class Knob:
    """One inference control of a method, declared once; every CLI spells its flag ``--<name>``.

    Attributes:
      name: the flag and option name, lower_snake_case (``t``, ``lambda_pix``).
      type: ``float``, ``int`` or ``str``.
      default: the value when nobody sets it (an export's manifest may record another default).
      help: one line for ``--help``.
      min, max: inclusive bounds for numbers (``None``: unbounded).
      choices: allowed values for strings.
      static: the value shapes the computation (a loop count...): changing it recompiles. Other knobs are traced
        arguments, so a slider or a sweep never recompiles.
      needs: the tree role the knob acts through (``control`` for CTSR's ``t``): setting the knob away from its
        default without that role is an error, never a silent no-op.
      needs_text: what to tell the user that role is (``"a CTSR control LoRA (stage 2)"``).
      sweep: values ``evaluate.py`` sweeps by default when the model honours this knob (CTSR's ``t``).
    """

    name: str
    type: type
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple = ()
    static: bool = False
    needs: str | None = None
    needs_text: str = ""
    sweep: tuple | None = None

    def __post_init__(self):
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"knob name {self.name!r} must be a lower_snake_case identifier")
        if self.name in RESERVED_NAMES:
            raise ValueError(f"knob name {self.name!r} is taken by a command-line option of jsr")
        if self.type not in (float, int, str):
            raise ValueError(f"knob {self.name}: type must be float, int or str, got {self.type}")
        self.check(self.default)

    def parse(self, text: str | Any) -> Any:
        """The value of a command-line string (or a value already typed), checked (:meth:`check`)."""
        try:
            value = self.type(text)
        except (TypeError, ValueError):
            raise ValueError(f"--{self.name}: want a {self.type.__name__}, got {text!r}") from None
        if self.type is int and isinstance(text, float) and text != int(text):
            raise ValueError(f"--{self.name}: want an integer, got {text!r}")
        return self.check(value)

    def check(self, value: Any) -> Any:
        """``value`` if it is in range, else a ValueError naming the knob and its range."""
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {list(self.choices)}, got {value!r}")
        if self.type is not str:
            lo = -float("inf") if self.min is None else self.min
            hi = float("inf") if self.max is None else self.max
            if not lo <= value <= hi:
                raise ValueError(f"{self.name} must be in [{_num(self.min)}, {_num(self.max)}], got {value}")
        return value

    def describe(self) -> str:
        """``help`` plus range and default, for ``--help`` texts."""
        rng = (f" in [{_num(self.min)}, {_num(self.max)}]" if self.min is not None or self.max is not None
               else f" one of {list(self.choices)}" if self.choices else "")
        return f"{self.help}{rng} (default {self.default})"


def _num(x: float | None) -> str:
    return "-inf" if x is None else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class ExportEntry:
    """How a trained tree is written at the end of training: under ``export/<group>/<name>/`` with its inference
    ``role``; ``config`` (JSON-able) is the module's ``config.json`` for non-LoRA trees (``None`` for LoRAs)."""

    role: str
    config: Mapping[str, Any] | None = None


@dataclasses.dataclass
class TrainSetup:
    """What the training loop needs from a method.

    Attributes:
      params: ``{group: {name: tree}}`` initial trainable trees (LoRAs or plain module param dicts, float32).
      phases: ``[(first_step, updates)]`` in step order; steps from ``first_step`` on run ``updates``.
      frozen: the frozen (non-trained) tree of arrays handed to the jitted step: ``unet``/``vae`` (the base),
        ``c_neg``, LPIPS, teachers, frozen models the method builds on.
      export: ``{group: {name: ExportEntry}}``: what is written at the end and its inference role.
      requires: ``{role: path}`` trees the exported model needs at inference and did not train (CTSR stage 2's
        stage-1 model), recorded in the export manifest.
      knob_defaults: knob values the trained model implies (CTSR's ``t_scale``), recorded in the manifest.
      host_batch: ``f(batch, prompts) -> {key: array}``, optional: per-example arrays (batch axis first) the
        method's losses read beside ``hq``/``lq``/``c``, made on the host from the data batch and the step's
        prompts (CODSR's noun masks and their token positions); the loop puts them on the mesh with the batch.
      frozen_axes: ``{key: tree}`` logical axis names (``jsr.models.common.logical_axes``, same structure as
        ``frozen[key]``) of frozen entries other than the base ``unet``/``vae`` that should be sharded like the
        base (a frozen CLIP vision encoder); entries not named here are replicated.
    """

    params: dict[str, dict[str, Any]]
    phases: list[tuple[int, list[Update]]]
    frozen: dict[str, Any]
    export: dict[str, dict[str, ExportEntry]]
    requires: dict[str, str] = dataclasses.field(default_factory=dict)
    knob_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    host_batch: Callable[[Mapping[str, Any], list[str]], dict[str, Any]] | None = None
    frozen_axes: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def all_updates(self) -> list[Update]:
        """Every update of every phase, first occurrence of each group, in order (the optimizer states)."""
        seen, out = set(), []
        for _, ups in self.phases:
            for u in ups:
                if u.group not in seen:
                    seen.add(u.group)
                    out.append(u)
        return out

    def updates_at(self, step: int) -> tuple[int, list[Update]]:
        """Index and updates of the phase that step ``step`` (0-based) belongs to."""
        idx = 0
        for i, (first, _) in enumerate(self.phases):
            if step >= first:
                idx = i
        return idx, self.phases[idx][1]


class Method:
    """Base class of a registered method; subclasses set the class attributes and implement what they use.

    Class attributes:
      name: registry key (``jsr.methods.get(name)``), also ``config.method``.
      label: name in evaluation tables (``OSEDiff``).
      knobs: inference controls (:class:`Knob`).
      roles: ``{role: description}`` of the trees inference uses (``{"unet": "generator UNet LoRA"}``).
      required_roles: roles inference cannot run without.
      preview_knobs: knob values used for training previews (defaults otherwise).
      uses_image: :meth:`forward` also takes ``x_lq``, the LQ pixels under ``z_lq`` (CODSR's modulation reads
        them); the restorer tiles them with the latent.
      text_prompt: inference conditions on the text prompt's embedding (``c``); False for a method whose
        cross-attention context comes from the image (:meth:`context`, RCOD): its restorer then never loads
        the base's text encoder (``c`` is None) and the SD folder needs no ``text_encoder/`` or ``tokenizer/``.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    knobs: ClassVar[tuple[Knob, ...]] = ()
    roles: ClassVar[Mapping[str, str]] = {}
    required_roles: ClassVar[tuple[str, ...]] = ()
    preview_knobs: ClassVar[Mapping[str, Any]] = {}
    uses_image: ClassVar[bool] = False
    text_prompt: ClassVar[bool] = True

    # -- configuration -------------------------------------------------------------------------------------------

    def config(self) -> Any:
        """The ``config.<name>`` section with its defaults (an ``ml_collections.ConfigDict``)."""
        import ml_collections

        return ml_collections.ConfigDict()

    # -- training ------------------------------------------------------------------------------------------------

    def setup(self, config: Any, base: Any, rng: jax.Array) -> TrainSetup:
        """The training state of this method for ``config`` on the loaded ``base`` (:class:`jsr.sr.base.Base`)."""
        raise TypeError(f"method {self.name} cannot be trained by jsr (it has no setup)")

    def inference_trees(self, params: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
        """The ``{role: tree}`` that :meth:`forward` takes, from a training state (for previews)."""
        raise TypeError(f"method {self.name} has no training state")

    # -- inference -----------------------------------------------------------------------------------------------

    def forward(self, models: Any, unet_params: Any, trees: Mapping[str, Any], z_lq: jax.Array, c: jax.Array,
                knobs: Mapping[str, Any]) -> jax.Array:
        """The one step: scaled LQ latents ``z_lq`` [B, h, w, 4] NHWC, prompt embeddings ``c`` [1 or B, L, D]
        -> output latents [B, h, w, 4] float32. ``trees`` by role (missing optional roles absent); ``knobs``
        holds every knob (static ones as Python values, others as float32/int32 scalars). A method with
        ``uses_image`` also gets ``x_lq=`` [B, 8h, 8w, 3] in [-1, 1], the upscaled LQ pixels under ``z_lq``."""
        raise TypeError(f"method {self.name or type(self).__name__} defines no forward (every method must)")

    def context(self, models: Any, trees: Mapping[str, Any], x_lq: jax.Array, c: jax.Array,
                knobs: Mapping[str, Any]) -> jax.Array:
        """The cross-attention context of a batch of *whole* LQ images ``x_lq`` [B, H, W, 3] in [-1, 1] (upscaled
        to the output size), given the prompt embeddings ``c`` [1 or B, L, D]: run once per image before the
        latent step is tiled, and handed to :meth:`forward` as its ``c`` (tiles of one image share it). Default:
        ``c``, the text prompt. A method that conditions on the image itself (visual prompt tokens, [B, L', D])
        overrides it."""
        return c

    def needs_image(self, knobs: Mapping[str, Any]) -> bool:
        """Whether :meth:`forward` reads ``x_lq`` at these knob values (concrete, on the host): a method whose
        image input only serves an optional stage (LFIM's spatial gate) says False when the stage is off, and
        the restorer then leaves the pixels out of the tiled latent (a quarter of the image's host memory at
        large sizes) and calls :meth:`forward` with ``x_lq=None``. Default: :attr:`uses_image`."""
        return self.uses_image

    def has_context(self) -> bool:
        """Whether this method overrides :meth:`context`."""
        return type(self).context is not Method.context

    def encoder_lora(self, trees: Mapping[str, Any]) -> Any:
        """The VAE-encoder LoRA inference encodes with (default: the ``vae`` role, if present)."""
        return trees.get("vae")

    def normalize_roles(self, roles: Mapping[str, Any]) -> dict[str, Any]:
        """Map the roles a user's files give (e.g. a plain ``unet`` LoRA) onto this method's roles."""
        return dict(roles)

    def import_release(self, path: Any, base: Any) -> Any:
        """``{role: tree}`` from this method's public release file at ``path``, or ``None`` if the file is not
        one (it is then tried as another method's release or a peft LoRA). A method whose release implies knob
        defaults (RCOD's preprocessing) returns a :class:`jsr.methods.export.Source` carrying them instead."""
        return None

    def module_template(self, role: str, config: Mapping[str, Any], base: Any) -> Any:
        """Abstract parameters (``jax.ShapeDtypeStruct`` leaves) of the non-LoRA module exported under ``role``
        with ``config`` (its ``config.json``), so an export can be read back."""
        raise TypeError(f"method {self.name} exports no module for role {role!r}")

    # -- helpers -------------------------------------------------------------------------------------------------

    def knob(self, name: str) -> Knob:
        for k in self.knobs:
            if k.name == name:
                return k
        raise KeyError(f"method {self.name} has no knob {name!r} (its knobs: {self.knob_names() or 'none'})")

    def knob_names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.knobs)

    def knob_values(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every knob's value: defaults, then ``overrides`` (checked)."""
        values = {k.name: k.default for k in self.knobs}
        for name, v in (overrides or {}).items():
            values[name] = self.knob(name).check(v)
        return values

    def honoured_knobs(self, roles: Sequence[str]) -> tuple[str, ...]:
        """The knobs that act with the trees ``roles`` at hand (a knob that ``needs`` an absent role does not)."""
        return tuple(k.name for k in self.knobs if k.needs is None or k.needs in roles)

    def __repr__(self) -> str:
        return f"<jsr method {self.name}>"


def split_knobs(method: Method, values: Mapping[str, Any]) -> tuple[dict[str, jax.Array], tuple]:
    """``(traced, static)``: the knob values as jit arguments: numbers as float32/int32 scalars, static knobs as
    a hashable ``((name, value), ...)`` tuple."""
    traced, static = {}, []
    for k in method.knobs:
        v = values[k.name]
        if k.static or k.type is str:
            static.append((k.name, v))
        else:
            traced[k.name] = jnp.asarray(v, jnp.float32 if k.type is float else jnp.int32)
    return traced, tuple(static)
