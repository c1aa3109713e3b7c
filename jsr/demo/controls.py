"""The demo's controls, built from a restorer's knob schema (:class:`jsr.methods.api.Knob`), without any UI library.

Every knob the loaded model honours becomes one control: a bounded float, or a bounded int with at most
:data:`MAX_SLIDER_STEPS` values, is a slider; other numbers (a seed over 2^31 values) a number field; strings with
choices a drop-down. The page (:mod:`jsr.demo.app`) only renders these, so a new method's knobs appear in the
demo with nothing written for it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from jsr.methods import registry
from jsr.methods.api import Knob

# An int knob with more values than this (a seed) gets a number field: a slider over 2^31 values cannot be aimed.
MAX_SLIDER_STEPS = 1000


@dataclasses.dataclass(frozen=True)
class Control:
    """One knob as a page control.

    Attributes:
      knob: the knob's declaration (name, type, range, help).
      value: the initial value (the model's default, or the command line's ``--<knob>``).
      widget: ``slider``, ``number`` or ``choice``.
      step: the slider's or number field's increment (``None`` for choices).
    """

    knob: Knob
    value: Any
    widget: str
    step: float | None

    @property
    def name(self) -> str:
        return self.knob.name

    @property
    def recompiles(self) -> bool:
        """Whether a new value compiles the model's step again (static knobs): such controls are kept apart in
        the page and are not swept."""
        return self.knob.static

    @property
    def sweepable(self) -> bool:
        """A traced number with a range (or a declared sweep): a sweep over it reuses one compiled program."""
        return (self.knob.type is not str and not self.knob.static
                and (self.knob.sweep is not None or (self.knob.min is not None and self.knob.max is not None)))

    def info(self) -> str:
        """The help line shown under the control."""
        return self.knob.describe() + (" — a new value recompiles" if self.recompiles else "")


def slider_step(knob: Knob) -> float:
    """The increment of a bounded numeric knob's slider: 1 for ints, else the power of ten that splits the range
    into 100 to 1000 steps (``[0, 1]`` -> 0.01, ``[0, 4]`` -> 0.01, ``[1, 1000]`` -> 1)."""
    if knob.type is int:
        return 1
    span = float(knob.max) - float(knob.min)
    return 10.0 ** math.floor(math.log10(span / 100)) if span > 0 else 1.0


def make_control(knob: Knob, value: Any) -> Control:
    """The :class:`Control` of ``knob`` starting at ``value`` (checked against the knob's range)."""
    value = knob.parse(value)
    if knob.type is str:
        return Control(knob, value, "choice", None)
    bounded = knob.min is not None and knob.max is not None
    if bounded and (knob.type is float or knob.max - knob.min <= MAX_SLIDER_STEPS):
        return Control(knob, value, "slider", slider_step(knob))
    return Control(knob, value, "number", 1 if knob.type is int else None)


def controls_for(knob_names: Sequence[str], defaults: Mapping[str, Any],
                 overrides: Mapping[str, Any] | None = None) -> list[Control]:
    """The controls of the knobs ``knob_names`` (a restorer's honoured knobs, :attr:`jsr.sr.infer.Restorer.knobs`)
    in that order, starting at ``overrides`` (the command line's knob flags), else ``defaults`` (the restorer's
    ``knob_defaults``: the method's or the export's), else the knob's own default. Traced knobs come first, the
    ones that recompile after them."""
    known = registry.all_knobs()
    overrides = overrides or {}
    out = []
    for name in knob_names:
        knob = known[name]
        out.append(make_control(knob, overrides.get(name, defaults.get(name, knob.default))))
    return sorted(out, key=lambda c: c.recompiles)  # stable: the schema's order within each group


def sweep_values(control: Control, count: int) -> list[Any]:
    """The values a sweep of ``control`` renders: the knob's declared sweep (CTSR's ``t``: 0, 0.2, ... 1) when it
    has one and ``count`` is its length, else ``count`` evenly spaced values over its range (ints rounded,
    duplicates dropped). Raises ValueError for a control that cannot be swept or ``count`` < 2."""
    if not control.sweepable:
        raise ValueError(f"{control.name} cannot be swept (" + (
            "a new value recompiles" if control.recompiles else "it has no range") + ")")
    if count < 2:
        raise ValueError(f"a sweep needs at least 2 values, got {count}")
    k = control.knob
    if k.sweep is not None and (len(k.sweep) == count or k.min is None or k.max is None):
        return [k.check(k.type(v)) for v in k.sweep]
    values = np.linspace(float(k.min), float(k.max), count)
    if k.type is int:
        return list(dict.fromkeys(int(round(v)) for v in values))
    digits = max(0, -math.floor(math.log10(slider_step(k))))  # on the slider's grid, so captions read as typed
    return [k.check(round(float(v), digits)) for v in values]
