"""jsr: controllable one-step diffusion super-resolution in JAX/Flax.

Layers (imports point down only): train, eval -> methods -> sr -> data/metrics -> weights -> models.
``eval`` (evaluate.py's protocol: datasets, knob sweeps, tables, plots) needs both the restorer and the training
degradation (data, for HQ-only sets degraded on the fly), and sr must not know data files, so it sits beside
train. See ARCHITECTURE.md and README.md.
"""

__version__ = "0.1.0"
