"""The web demo, ``python -m jsr.demo`` (the ``demo`` extra: Gradio): restore an image with any registered
method, its knobs as controls built from the method's schema, a before/after view, the restore time, a knob sweep
strip and the full-size result to download.

Modules: :mod:`jsr.demo.controls` (knobs -> controls), :mod:`jsr.demo.engine` (checks, estimates, restores; no UI
library), :mod:`jsr.demo.compile_meter` (compile time per request), :mod:`jsr.demo.samples` (sample inputs),
:mod:`jsr.demo.app` (the Gradio page), :mod:`jsr.demo.cli` (the command line). Only ``app`` and ``cli`` need Gradio.
"""
