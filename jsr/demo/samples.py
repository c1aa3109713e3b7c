"""Sample low-quality inputs for the demo page: crops of scikit-image's bundled photos, downscaled by 4.

scikit-image ships a few photographs inside its package (no download); each sample is a centred square crop of one,
reduced 4x with an antialiased bicubic resize (PIL), so that the demo's default x4 restores it to the crop's
size. Without scikit-image the page has no samples (it says so) and uploads still work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# scikit-image's bundled colour photographs (skimage.data functions that read files in the package).
PHOTOS = ("chelsea", "astronaut", "coffee")


def photo(name: str) -> np.ndarray:
    """scikit-image's bundled photo ``name`` as uint8 [H, W, 3]. Raises ImportError without scikit-image."""
    from skimage import data

    return np.asarray(getattr(data, name)())[..., :3]


def make_lq(img: np.ndarray, size: int, factor: int = 4) -> np.ndarray:
    """A centred square crop of ``size * factor`` pixels of uint8 [H, W, 3] ``img`` (smaller when the image is),
    reduced ``factor`` times (PIL's bicubic with its antialiasing): uint8 [size, size, 3]."""
    h, w = img.shape[:2]
    side = min(h, w, size * factor)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(np.ascontiguousarray(img[top:top + side, left:left + side]))
    return np.asarray(crop.resize((size, size), Image.BICUBIC))


def write_samples(folder: str | Path, size: int = 64) -> list[Path]:
    """Write the samples as PNGs (``<photo>_lq.png``, ``size`` x ``size``) into ``folder``; returns their paths, or
    ``[]`` when scikit-image is not installed."""
    try:
        photos = [(name, photo(name)) for name in PHOTOS]
    except ImportError:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, img in photos:
        p = folder / f"{name}_lq.png"
        Image.fromarray(make_lq(img, size)).save(p)
        paths.append(p)
    return paths
