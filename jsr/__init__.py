"""jsr: controllable one-step diffusion super-resolution in JAX/Flax.

Layers (imports point down only): train, eval -> sr -> data/metrics -> models -> weights helpers.
``eval`` (evaluate.py's protocol: datasets, the t sweep, tables, plots) is a layer DESIGN.md does not list: it
needs both the restorer (sr) and the training degradation (data, for HQ-only sets degraded on the fly), and sr
must not know data files, so it sits beside train. See ../shared/DESIGN.md and README.md.
"""

__version__ = "0.1.0"
