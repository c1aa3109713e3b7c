"""Real-ESRGAN second-order degradation in NumPy/OpenCV: HQ crop -> (LQ at 1/4 size, LQ upsampled back).

The pipeline (Wang et al. 2021, as OSEDiff and PiSA-SR train), each step its own function below:

    pass 1:  blur (random kernel)  -> random resize (up/down/keep, area/bilinear/bicubic, relative to the input)
             -> gaussian or poisson noise (colour or gray) -> JPEG
    pass 2:  blur with probability ``second.blur.prob`` -> random resize (relative to the final LQ size)
             -> noise
    final:   with probability ``final_resize_first_prob``: resize to HQ/scale + sinc filter, then JPEG;
             otherwise JPEG, then resize + sinc.  (The sinc is applied with ``final_sinc_prob``, else identity;
             the JPEG quality is ``second.jpeg_quality``: pass 2's JPEG is this one.)
    then:    quantise to 8 bits (``lq_small``); bicubic x``scale`` back to the HQ size (``lq``, the model input).

Choices that differ from the PyTorch reference implementations, on purpose:

* JPEG is the real codec (``cv2.imencode``, 4:2:0, integer quality ``U{lo..hi}``), not a differentiable
  approximation.
* Blur runs through ``cv2.filter2D`` (reflect-101 borders, as the reference's reflect padding); the all-zero
  border of a padded kernel is trimmed first and rank-1 kernels (isotropic Gaussians) run as two 1-D passes.
  Both compute the same correlation (equal up to float32 rounding).
* Poisson noise follows the reference's definition (image rounded to 8 bits; ``vals = 2^ceil(log2(#levels))``;
  ``noise = Poisson(img * vals) / vals - img``) but samples by inversion with a guide table per 8-bit level
  (``sample_poisson_levels``), exact up to float64 rounding of the CDF, and counts levels with a bincount
  instead of a sort.

Every random draw comes from one ``np.random.Generator`` built from the example's seed, so the same seed gives a
bit-identical result in any process.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from jsr.data.images import quantize_8bit  # noqa: F401 - one 8-bit grid for LQ, outputs and saved files
from jsr.data.kernels import KERNEL_TYPES, random_kernel, sinc_kernel

RESIZE_MODES = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
ODD_SIZES_7_21 = (7, 9, 11, 13, 15, 17, 19, 21)


# --------------------------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class BlurConfig:
    """Blur of one pass. ``prob``: chance the pass blurs at all; kernel sizes, family probabilities (order of
    ``types``), sinc probability, sigma range (pixels), rotation range (radians), beta ranges."""

    prob: float = 1.0
    sizes: tuple[int, ...] = ODD_SIZES_7_21
    types: tuple[str, ...] = KERNEL_TYPES
    probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    sigma: tuple[float, float] = (0.2, 3.0)
    rotation: tuple[float, float] = (-math.pi, math.pi)
    beta_gaussian: tuple[float, float] = (0.5, 4.0)
    beta_plateau: tuple[float, float] = (1.0, 2.0)

    def __post_init__(self):
        _check_prob("blur.prob", self.prob)
        _check_prob("blur.sinc_prob", self.sinc_prob)
        if not self.sizes or any(k < 1 or k % 2 == 0 for k in self.sizes):
            raise ValueError(f"blur.sizes={self.sizes}: kernel sizes must be positive odd integers")
        unknown = [t for t in self.types if t not in KERNEL_TYPES]
        if unknown or len(self.types) != len(self.probs):
            raise ValueError(f"blur.types={self.types} / blur.probs={self.probs}: types must come from "
                             f"{KERNEL_TYPES}, one probability each")
        _check_weights("blur.probs", self.probs)
        for name in ("sigma", "rotation", "beta_gaussian", "beta_plateau"):
            _check_range(f"blur.{name}", getattr(self, name), positive=name != "rotation")


def _check_prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"degradation {name}={p}: a probability must lie in [0, 1]")


def _check_weights(name: str, weights: Sequence[float]) -> None:
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"degradation {name}={tuple(weights)}: weights must be >= 0 with a positive sum")


def _check_range(name: str, rng: Sequence[float], positive: bool = False, limits: tuple | None = None) -> None:
    if len(rng) != 2 or rng[0] > rng[1] or (positive and rng[0] <= 0):
        raise ValueError(f"degradation {name}={tuple(rng)}: expected (low, high) with low <= high"
                         + (", low > 0" if positive else ""))
    if limits and (rng[0] < limits[0] or rng[1] > limits[1]):
        raise ValueError(f"degradation {name}={tuple(rng)}: must lie within {limits}")


def _check_modes(name: str, modes: Sequence[str]) -> None:
    if not modes or any(m not in RESIZE_MODES for m in modes):
        raise ValueError(f"degradation {name}={tuple(modes)}: expected a non-empty subset of {tuple(RESIZE_MODES)}")


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """One degradation pass. ``resize_probs`` is (up, down, keep); ``noise_sigma`` is in 8-bit levels."""

    blur: BlurConfig = BlurConfig()
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")
    gaussian_noise_prob: float = 0.5
    noise_sigma: tuple[float, float] = (1.0, 30.0)
    poisson_scale: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_quality: tuple[int, int] = (30, 95)

    def __post_init__(self):
        if len(self.resize_probs) != 3:
            raise ValueError(f"degradation resize_probs={self.resize_probs}: expected (up, down, keep)")
        _check_weights("resize_probs", self.resize_probs)
        _check_range("resize_range", self.resize_range, positive=True)
        if not self.resize_range[0] <= 1.0 <= self.resize_range[1]:
            raise ValueError(f"degradation resize_range={self.resize_range}: must contain 1 (down below, up above)")
        _check_modes("resize_modes", self.resize_modes)
        _check_prob("gaussian_noise_prob", self.gaussian_noise_prob)
        _check_prob("gray_noise_prob", self.gray_noise_prob)
        _check_range("noise_sigma", self.noise_sigma, limits=(0, 255))
        _check_range("poisson_scale", self.poisson_scale, limits=(0, float("inf")))
        _check_range("jpeg_quality", self.jpeg_quality, limits=(0, 100))


@dataclasses.dataclass(frozen=True)
class DegradationConfig:
    """The whole degradation. Defaults are DESIGN.md's (Real-ESRGAN as OSEDiff trains); see ``PRESETS``."""

    scale: int = 4
    kernel_pad: int = 21
    first: PassConfig = PassConfig()
    second: PassConfig = PassConfig(
        blur=BlurConfig(prob=0.8, sigma=(0.2, 1.5)), resize_probs=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
        noise_sigma=(1.0, 25.0), poisson_scale=(0.05, 2.5))
    final_resize_first_prob: float = 0.5
    final_sinc_prob: float = 0.8
    final_sinc_sizes: tuple[int, ...] = ODD_SIZES_7_21
    final_sinc_omega: tuple[float, float] = (math.pi / 3, math.pi)
    final_resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")

    def __post_init__(self):
        if self.scale < 1:
            raise ValueError(f"degradation scale={self.scale} must be a positive integer")
        largest = max(max(self.first.blur.sizes), max(self.second.blur.sizes), max(self.final_sinc_sizes))
        if self.kernel_pad < largest or self.kernel_pad % 2 == 0:
            raise ValueError(f"degradation kernel_pad={self.kernel_pad} must be odd and >= the largest kernel "
                             f"size {largest}")
        _check_prob("final_resize_first_prob", self.final_resize_first_prob)
        _check_prob("final_sinc_prob", self.final_sinc_prob)
        _check_range("final_sinc_omega", self.final_sinc_omega, positive=True, limits=(0, math.pi + 1e-9))
        _check_modes("final_resize_modes", self.final_resize_modes)

    def to_dict(self) -> dict:
        """Nested plain dict (tuples kept), ready for ``ml_collections.ConfigDict``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> "DegradationConfig":
        """Build from a (possibly partial) nested mapping such as a ConfigDict; missing keys take the defaults.
        Unknown keys raise, naming the key."""
        return _from_mapping(cls, mapping, "degradation")


def _from_mapping(cls: type, mapping: Mapping[str, Any], where: str) -> Any:
    if isinstance(mapping, cls):
        return mapping
    if hasattr(mapping, "to_dict"):
        mapping = mapping.to_dict()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise KeyError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(fields)}")
    defaults = cls()
    kwargs = {}
    for name, value in mapping.items():
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_mapping(type(default), value, f"{where}.{name}")
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = type(default)(value)
    return cls(**kwargs)


def _pisa_preset() -> DegradationConfig:
    # PiSA-SR's released src/datasets/params.yml (csslc/PiSA-SR): the same kernels, weaker everything else.
    base = DegradationConfig()
    first = dataclasses.replace(base.first, resize_range=(0.3, 1.5), noise_sigma=(1.0, 15.0),
                                poisson_scale=(0.05, 2.0), jpeg_quality=(60, 95))
    second = dataclasses.replace(base.second, blur=dataclasses.replace(base.second.blur, prob=0.5),
                                 resize_range=(0.6, 1.2), noise_sigma=(1.0, 12.0), poisson_scale=(0.05, 1.0),
                                 jpeg_quality=(60, 100))
    return dataclasses.replace(base, first=first, second=second)


PRESETS: dict[str, DegradationConfig] = {
    "realesrgan": DegradationConfig(),  # DESIGN.md / OSEDiff's params_realesrgan.yml
    "osediff": DegradationConfig(),
    "pisa": _pisa_preset(),
}


def preset(name: str) -> DegradationConfig:
    """A named degradation: ``realesrgan`` (= ``osediff``, the default) or ``pisa`` (milder)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown degradation preset {name!r}; expected one of {sorted(PRESETS)}") from None


def resolve_config(config: DegradationConfig | Mapping[str, Any] | str | None) -> DegradationConfig:
    """None -> defaults; a preset name; a ``DegradationConfig``; or a nested mapping / ConfigDict. A mapping may
    carry ``preset`` (the base) plus overrides."""
    if config is None:
        return DegradationConfig()
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, DegradationConfig):
        return config
    mapping = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    base = preset(mapping.pop("preset")) if "preset" in mapping else DegradationConfig()
    return _merge(base, mapping)


def _merge(base: Any, overrides: Mapping[str, Any]) -> Any:
    merged = dataclasses.asdict(base)

    def deep(dst: dict, src: Mapping[str, Any]) -> None:
        for k, v in src.items():
            if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
                deep(dst[k], v)
            else:
                dst[k] = v

    deep(merged, overrides)
    return _from_mapping(type(base), merged, "degradation")


# --------------------------------------------------------------------------------------------- single steps


def _trim_zero_border(kernel: np.ndarray) -> np.ndarray:
    k = kernel
    while k.shape[0] > 1 and not (k[0].any() or k[-1].any() or k[:, 0].any() or k[:, -1].any()):
        k = k[1:-1, 1:-1]
    return k


def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate an HxWxC float32 image with a centred odd kernel, reflect-101 borders. Zero borders are trimmed
    and rank-1 kernels separated only to save time: the result is the same correlation up to float32 rounding."""
    k = _trim_zero_border(np.asarray(kernel, dtype=np.float64))
    if k.shape[0] == 1:
        return (img * np.float32(k[0, 0])).astype(np.float32)
    u, s, vt = np.linalg.svd(k)
    if s[1] <= 1e-7 * s[0]:
        root = math.sqrt(s[0])
        return cv2.sepFilter2D(img, -1, (vt[0] * root).astype(np.float32), (u[:, 0] * root).astype(np.float32),
                               borderType=cv2.BORDER_REFLECT_101)
    return cv2.filter2D(img, -1, k.astype(np.float32), borderType=cv2.BORDER_REFLECT_101)


def resize(img: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Resize an HxWxC float32 image to ``height x width`` with ``area``, ``bilinear`` or ``bicubic``."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {sorted(RESIZE_MODES)}")
    height, width = max(1, int(height)), max(1, int(width))
    if img.shape[:2] == (height, width):
        return img
    out = cv2.resize(img, (width, height), interpolation=RESIZE_MODES[mode])
    return out if out.ndim == 3 else out[..., None]


def add_gaussian_noise(img: np.ndarray, rng: np.random.Generator, sigma: float, gray: bool) -> np.ndarray:
    """``clip(img + N(0, sigma^2))``; ``sigma`` in [0, 1] units; ``gray``: one noise field for all channels."""
    shape = img.shape[:2] + (1,) if gray else img.shape
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(img + noise, 0.0, 1.0)


_GUIDE_BITS = 12  # 4096 guide buckets per level: ~1-3 % of draws land in a bucket spanning two outcomes


@functools.lru_cache(maxsize=16)
def _poisson_tables(vals: int) -> tuple[np.ndarray, np.ndarray, int]:
    """CDF rows of Poisson(level / 255 * vals) for the 256 8-bit levels, and their guide tables.

    ``guide[level, j]`` is the smallest outcome any ``u`` in ``[j/M, (j+1)/M)`` maps to, stored as ``-1 - x``
    when the bucket also reaches larger outcomes (the draw then finishes with a short search).
    """
    lam = np.arange(256, dtype=np.float64) / 255.0 * vals
    support = int(math.ceil(lam[-1] + 12.0 * math.sqrt(lam[-1]) + 24.0))  # tail beyond: < 1e-30
    x = np.arange(support, dtype=np.float64)
    log_fact = np.array([math.lgamma(v + 1.0) for v in x])
    with np.errstate(divide="ignore", invalid="ignore"):
        log_pmf = x[None, :] * np.log(lam)[:, None] - lam[:, None] - log_fact[None, :]
    log_pmf[0] = -np.inf
    log_pmf[0, 0] = 0.0  # level 0: lambda = 0, a point mass at 0
    cdf = np.cumsum(np.exp(log_pmf), axis=1)
    cdf /= cdf[:, -1:]
    cdf[:, -1] = np.inf  # every u in [0, 1) stops here at the latest
    buckets = 1 << _GUIDE_BITS
    edges = np.arange(buckets + 1, dtype=np.float64) / buckets
    guide = np.empty((256, buckets), np.int16)  # 2 MB: the lookups stay mostly in cache
    for level, row in enumerate(cdf):
        first = np.searchsorted(row, edges[:-1], side="right")  # min{x : cdf[x] > j / M}
        exact = row[first] >= edges[1:]  # the whole bucket lies below cdf[first]
        guide[level] = np.where(exact, first, -1 - first)
    return cdf.ravel(), guide.ravel(), support


def sample_poisson_levels(levels: np.ndarray, vals: int, rng: np.random.Generator) -> np.ndarray:
    """Exact Poisson draws with mean ``levels / 255 * vals`` for a uint8 array of levels (same shape, int16).

    Inversion ``x = min{k : CDF(k) > u}`` with a guide table (Chen & Asau): one 64-bit random word per draw;
    its top bits pick the bucket, its top 53 bits are ``u``. Most buckets hold a single outcome (a lookup);
    the rest search upwards from the bucket's first outcome. Exact up to the float64 rounding of the CDF.
    """
    cdf, guide, support = _poisson_tables(int(vals))
    lev = levels.ravel()
    raw = rng.bit_generator.random_raw(lev.size)
    bucket = (raw >> np.uint64(64 - _GUIDE_BITS)).astype(np.int32)
    x = guide[(lev.astype(np.int32) << _GUIDE_BITS) | bucket]
    pending = np.flatnonzero(x < 0)
    if pending.size:
        u = (raw[pending] >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
        row = lev[pending].astype(np.int64) * support
        k = -1 - x[pending].astype(np.int64)
        active = np.arange(pending.size)
        while active.size:  # the extreme buckets span many outcomes: keep only the draws still climbing
            active = active[cdf[row[active] + k[active]] <= u[active]]
            k[active] += 1
        x[pending] = k
    return x.reshape(levels.shape)


def add_poisson_noise(img: np.ndarray, rng: np.random.Generator, scale: float, gray: bool) -> np.ndarray:
    """Real-ESRGAN's Poisson noise: the image (or its luma, ``gray``) rounded to 8 bits; ``vals`` the number of
    distinct levels rounded up to a power of two; ``noise = Poisson(img8 * vals) / vals - img8``; returns
    ``clip(img + scale * noise)``."""
    src = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None] if gray else img
    levels = np.rint(np.clip(src, 0.0, 1.0) * 255.0).astype(np.uint8)
    distinct = int(np.count_nonzero(np.bincount(levels.ravel(), minlength=256)))
    vals = 1 << (distinct - 1).bit_length()
    counts = sample_poisson_levels(levels, vals, rng)
    noise = (counts.astype(np.float32) * np.float32(1.0 / vals) - levels.astype(np.float32) * np.float32(1 / 255))
    return np.clip(img + noise * np.float32(scale), 0.0, 1.0)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """Real JPEG round trip (OpenCV/libjpeg, YCbCr 4:2:0) of an HxWx3 RGB float image in [0, 1]; the result
    is 8-bit valued float32."""
    u8 = np.rint(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(u8, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode an image of shape {img.shape} at quality {quality}")
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) * np.float32(1 / 255)


def upsample(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize back to ``height x width``, clipped to [0, 1] (bicubic overshoots at edges)."""
    return np.clip(resize(img, height, width, "bicubic"), 0.0, 1.0)


# --------------------------------------------------------------------------------------------- random steps


def _choice(rng: np.random.Generator, options: Sequence[Any], probs: Sequence[float] | None = None) -> Any:
    if probs is None:
        return options[int(rng.integers(len(options)))]
    p = np.asarray(probs, dtype=np.float64)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def random_blur(img: np.ndarray, rng: np.random.Generator, cfg: BlurConfig, pad: int) -> np.ndarray:
    """With probability ``cfg.prob``, blur with a random kernel (``kernels.random_kernel``)."""
    if rng.random() >= cfg.prob:
        return img
    kernel, _ = random_kernel(rng, sizes=cfg.sizes, types=cfg.types, probs=cfg.probs, sinc_prob=cfg.sinc_prob,
                              sigma=cfg.sigma, rotation=cfg.rotation, beta_gaussian=cfg.beta_gaussian,
                              beta_plateau=cfg.beta_plateau, pad_to=pad)
    return blur(img, kernel)


def random_resize(img: np.ndarray, rng: np.random.Generator, cfg: PassConfig, ref_hw: tuple[int, int]) -> np.ndarray:
    """Scale ``ref_hw`` by ``U[1, hi]`` (up), ``U[lo, 1]`` (down) or 1 (keep), random mode."""
    direction = _choice(rng, ("up", "down", "keep"), cfg.resize_probs)
    lo, hi = cfg.resize_range
    factor = rng.uniform(1.0, hi) if direction == "up" else rng.uniform(lo, 1.0) if direction == "down" else 1.0
    mode = _choice(rng, cfg.resize_modes)
    return resize(img, int(ref_hw[0] * factor), int(ref_hw[1] * factor), mode)


def random_noise(img: np.ndarray, rng: np.random.Generator, cfg: PassConfig) -> np.ndarray:
    """Gaussian noise (``sigma ~ U[noise_sigma] / 255``) with ``gaussian_noise_prob``, else Poisson
    (``scale ~ U[poisson_scale]``); gray with ``gray_noise_prob``."""
    if rng.random() < cfg.gaussian_noise_prob:
        sigma = rng.uniform(*cfg.noise_sigma) / 255.0
        return add_gaussian_noise(img, rng, sigma, gray=bool(rng.random() < cfg.gray_noise_prob))
    scale = rng.uniform(*cfg.poisson_scale)
    return add_poisson_noise(img, rng, scale, gray=bool(rng.random() < cfg.gray_noise_prob))


def random_jpeg(img: np.ndarray, rng: np.random.Generator, quality: tuple[int, int]) -> np.ndarray:
    """JPEG at an integer quality uniform in ``[quality[0], quality[1]]``."""
    return jpeg(img, int(rng.integers(int(quality[0]), int(quality[1]) + 1)))


def _final_resize_sinc(img: np.ndarray, rng: np.random.Generator, cfg: DegradationConfig,
                       hw: tuple[int, int]) -> np.ndarray:
    img = resize(img, hw[0], hw[1], _choice(rng, cfg.final_resize_modes))
    if rng.random() < cfg.final_sinc_prob:
        size = int(_choice(rng, cfg.final_sinc_sizes))
        img = blur(img, sinc_kernel(size, float(rng.uniform(*cfg.final_sinc_omega))))
    return img


def degradation_pass(img: np.ndarray, rng: np.random.Generator, cfg: PassConfig, ref_hw: tuple[int, int],
                     pad: int) -> np.ndarray:
    """Blur -> resize (relative to ``ref_hw``) -> noise -> JPEG (the first pass; the second pass's JPEG is the
    final stage's, see ``degrade``)."""
    img = random_blur(img, rng, cfg.blur, pad)
    img = random_resize(img, rng, cfg, ref_hw)
    img = random_noise(img, rng, cfg)
    return random_jpeg(img, rng, cfg.jpeg_quality)


# --------------------------------------------------------------------------------------------- entry point


def _check_hq(hq: np.ndarray, scale: int) -> np.ndarray:
    hq = np.asarray(hq)
    if hq.ndim != 3 or hq.shape[-1] != 3:
        raise ValueError(f"degrade: expected an HxWx3 RGB image, got shape {hq.shape}")
    if hq.shape[0] % scale or hq.shape[1] % scale:
        raise ValueError(f"degrade: image size {hq.shape[:2]} must be divisible by the scale {scale}")
    if not np.issubdtype(hq.dtype, np.floating):
        raise ValueError(f"degrade: expected a float image in [0, 1], got dtype {hq.dtype}")
    return np.ascontiguousarray(hq, dtype=np.float32)


def degrade(hq: np.ndarray, seed: int | np.random.Generator,
            config: DegradationConfig | Mapping[str, Any] | str | None = None) -> dict[str, np.ndarray]:
    """Second-order Real-ESRGAN degradation of one HQ image.

    Args:
      hq: HxWx3 float RGB in [0, 1], H and W divisible by ``config.scale`` (4).
      seed: the example's seed (or a Generator); every random choice comes from it.
      config: ``DegradationConfig``, a nested mapping/ConfigDict (optionally with ``preset``), a preset name, or
        None for the DESIGN defaults.

    Returns:
      ``{"lq_small": (H/4)x(W/4)x3, "lq": HxWx3}``, float32 in [0, 1]; ``lq_small`` is 8-bit valued and ``lq`` is
      its bicubic upsampling (the one-step models' input).
    """
    cfg = resolve_config(config)
    img = _check_hq(hq, cfg.scale)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    h, w = img.shape[:2]
    small = (h // cfg.scale, w // cfg.scale)

    img = degradation_pass(img, rng, cfg.first, (h, w), cfg.kernel_pad)
    img = random_blur(img, rng, cfg.second.blur, cfg.kernel_pad)
    img = random_resize(img, rng, cfg.second, small)
    img = random_noise(img, rng, cfg.second)
    if rng.random() < cfg.final_resize_first_prob:
        img = _final_resize_sinc(img, rng, cfg, small)
        img = random_jpeg(img, rng, cfg.second.jpeg_quality)
    else:
        img = random_jpeg(img, rng, cfg.second.jpeg_quality)
        img = _final_resize_sinc(img, rng, cfg, small)
    lq_small = quantize_8bit(img)
    return {"lq_small": lq_small, "lq": upsample(lq_small, h, w)}
