"""jsr: controllable one-step diffusion super-resolution in JAX/Flax.

Layers (imports point down only): train -> sr -> data/metrics -> models -> weights helpers.
See ../shared/DESIGN.md and README.md.
"""

__version__ = "0.1.0"
