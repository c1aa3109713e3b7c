"""The method registry: ``get(name)``, ``names()``, ``register(method)``, plus plugins.

Built-in methods register when the registry is first used. A method defined outside jsr registers itself by
calling :func:`register` when its module is imported; to make the command-line tools (``train.py``,
``python -m jsr.infer``, ``evaluate.py``) import it, name its module in the environment variable
``JSR_METHODS`` (comma-separated module names) or declare a ``jsr.methods`` entry point in its package.
"""

from __future__ import annotations

import importlib
import os
import threading
from typing import Iterable

from jsr.methods.api import Knob, Method

BUILTIN_MODULES = ("jsr.methods.osediff", "jsr.methods.pisasr", "jsr.methods.ctsr", "jsr.methods.fidesr",
                   "jsr.methods.rcod", "jsr.methods.codsr")
# Old names kept working: the same method was `pisa` in training configs before the registry.
ALIASES = {"pisa": "pisasr"}

_METHODS: dict[str, Method] = {}
_LOCK = threading.RLock()
_LOADED = False


def register(method: Method | type[Method], *, replace: bool = False) -> Method:
    """Register a method (an instance, or a class that is instantiated) under its ``name``; returns it.

    Raises ValueError for an empty or taken name (unless ``replace``), or for a knob whose name another method
    uses with a different meaning (every CLI has one flag per knob name).
    """
    _load()  # built-ins first, so registration order (and names()) starts with them
    if isinstance(method, type):
        method = method()
    name = method.name
    if not name or not name.isidentifier():
        raise ValueError(f"method name {name!r} must be a non-empty identifier")
    with _LOCK:
        if name in _METHODS and not replace and _qualname(_METHODS[name]) != _qualname(method):
            raise ValueError(f"a method named {name!r} is already registered ({type(_METHODS[name]).__name__})")
        for other in _METHODS.values():
            if other.name == name:
                continue
            for k in method.knobs:
                for o in other.knobs:
                    if k.name == o.name and _signature(k) != _signature(o):
                        raise ValueError(f"method {name}: knob {k.name!r} is already declared by method "
                                         f"{other.name} with another type/range/default; rename it")
        _METHODS[name] = method
    return method


def is_builtin(method: Method) -> bool:
    """Whether ``method`` comes with jsr (its class is defined in one of :data:`BUILTIN_MODULES`)."""
    return type(method).__module__ in BUILTIN_MODULES


def unregister(name: str) -> None:
    """Remove the method ``name`` (a no-op when it is not registered): for tests and notebooks that register a
    throw-away method, which would otherwise stay a candidate of ``pick_method``'s automatic choice."""
    with _LOCK:
        _METHODS.pop(name, None)


def _qualname(m: Method) -> str:
    return f"{type(m).__module__.rsplit('.', 1)[-1]}.{type(m).__qualname__}"


def _signature(k: Knob) -> tuple:
    return (k.type, k.default, k.min, k.max, k.choices, k.static)


def _load() -> None:
    global _LOADED
    with _LOCK:
        if _LOADED:
            return
        _LOADED = True
        for mod in BUILTIN_MODULES:
            importlib.import_module(mod)
        for mod in _plugin_modules():
            importlib.import_module(mod)


def _plugin_modules() -> Iterable[str]:
    mods = [m.strip() for m in os.environ.get("JSR_METHODS", "").split(",") if m.strip()]
    try:
        from importlib.metadata import entry_points

        mods += [ep.value.split(":")[0] for ep in entry_points(group="jsr.methods")]
    except Exception:  # noqa: BLE001 - broken package metadata must not stop jsr
        pass
    return mods


def get(name: str) -> Method:
    """The registered method ``name`` (aliases: ``pisa`` -> ``pisasr``).

    Raises KeyError listing the known names."""
    _load()
    key = ALIASES.get(name, name)
    if key not in _METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(names())}")
    return _METHODS[key]


def names() -> tuple[str, ...]:
    """Registered method names: the built-ins in :data:`BUILTIN_MODULES` order (within a module, as registered),
    then the others in registration order. Not plain registration order: a built-in module imported directly
    first (``import jsr.methods.pisasr``) registers before the ones it loads."""
    _load()
    with _LOCK:
        order = {n: i for i, n in enumerate(_METHODS)}
        rank = {mod: i for i, mod in enumerate(BUILTIN_MODULES)}
        return tuple(sorted(_METHODS, key=lambda n: (rank.get(type(_METHODS[n]).__module__, len(rank)),
                                                       order[n])))


def all_knobs() -> dict[str, Knob]:
    """Every knob name of every registered method (one definition per name), in registration order."""
    out: dict[str, Knob] = {}
    for name in names():
        for k in _METHODS[name].knobs:
            out.setdefault(k.name, k)
    return out


def methods_with_knob(knob: str) -> tuple[str, ...]:
    return tuple(n for n in names() if knob in _METHODS[n].knob_names())
