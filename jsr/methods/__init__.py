"""SR methods, one module each, behind one interface and a registry.

    import jsr.methods
    jsr.methods.names()                     # ('osediff', 'fidelity', 'pisasr', 'ctsr', ...)
    m = jsr.methods.get("ctsr")
    m.knobs                                 # (Knob('t', float, 0.0, ...), ...)
    z = m.forward(base.models, base.unet_params, trees, z_lq, c, m.knob_values({"t": 0.3}))

:mod:`jsr.methods.api` defines the interface (:class:`Method`, :class:`Knob`, :class:`TrainSetup`,
:class:`Update`); :mod:`jsr.methods.export` reads and writes exported models with their manifest.
"""

from jsr.methods.api import ExportEntry, Knob, Method, TrainSetup, Update
from jsr.methods.registry import all_knobs, get, names, register

__all__ = ["ExportEntry", "Knob", "Method", "TrainSetup", "Update", "all_knobs", "get", "names", "register"]
