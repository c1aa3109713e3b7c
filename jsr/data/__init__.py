"""Training data: image sources, the Real-ESRGAN second-order degradation, and the Grain input pipeline.

Images are HxWx3 float32 RGB in [0, 1] at every boundary here; batches are NHWC.

* :mod:`jsr.data.sources`: ``FolderSource``, ``PairedFolderSource`` (evaluation pairs), ``TfdsSource``,
  ``SyntheticSource``; ``load_image``.
* :mod:`jsr.data.kernels`: the blur kernels in closed form.
* :mod:`jsr.data.degradation`: ``degrade(hq, seed, config) -> {"lq_small", "lq"}``, ``DegradationConfig``,
  presets ``realesrgan`` (= ``osediff``, the default) and ``pisa``.
* :mod:`jsr.data.pipeline`: ``default_config()`` (the ``data`` config keys), ``make_iterator`` (checkpointable
  iterator of batches), ``shard_batch`` (a batch onto a device mesh).
"""

from jsr.data.degradation import DegradationConfig, degrade, preset
from jsr.data.pipeline import DataIterator, default_config, degradation_config, make_iterator, shard_batch
from jsr.data.sources import FolderSource, PairedFolderSource, SyntheticSource, TfdsSource, load_image

__all__ = [
    "DataIterator", "DegradationConfig", "FolderSource", "PairedFolderSource", "SyntheticSource", "TfdsSource",
    "default_config", "degradation_config", "degrade", "load_image", "make_iterator", "preset", "shard_batch",
]
