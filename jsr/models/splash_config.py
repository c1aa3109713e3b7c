"""Block sizes of jsr's splash attention (``jsr.models.splash_attention``), and how they fit one call's shapes.

Apart from the kernel so that the attention dispatch can check ``"splash:block_q=..."`` specs without importing
Pallas (~0.6 s).
"""

from __future__ import annotations

import dataclasses
import functools
import math

# TPU vector registers are 128 lanes wide: splash blocks and head dims are multiples of it.
LANES = 128


@dataclasses.dataclass(frozen=True)
class SplashConfig:
    """Block sizes of the splash kernels (tokens; multiples of 128).

    Each block is clamped to its sequence length rounded up to 128, so a 512 default does not pad the 64-token
    mid-block attention to 512. ``None`` backward blocks take the forward ones.

    Attributes:
      block_q: query block of the forward kernel.
      block_kv: key/value block of the forward kernel.
      block_kv_compute: keys per inner step of the forward kernel (divides ``block_kv``; default ``block_kv``).
      block_q_bwd, block_kv_bwd: query / key blocks of the dq and dk/dv kernels.
      fused_bwd: one fused dq+dk/dv backward kernel instead of two.
      interpret: run in Pallas interpret mode; ``None``: when the default backend is not TPU.
    """

    block_q: int = 512
    block_kv: int = 512
    block_kv_compute: int | None = None
    block_q_bwd: int | None = None
    block_kv_bwd: int | None = None
    fused_bwd: bool = False
    interpret: bool | None = None

    def __post_init__(self):
        for name in ("block_q", "block_kv", "block_kv_compute", "block_q_bwd", "block_kv_bwd"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0 or value % LANES):
                raise ValueError(f"splash attention: {name}={value!r} must be a positive multiple of {LANES}")
        if self.block_kv_compute is not None and self.block_kv % self.block_kv_compute:
            raise ValueError(f"splash attention: block_kv_compute={self.block_kv_compute} must divide "
                             f"block_kv={self.block_kv}")


@functools.lru_cache(maxsize=64)
def parse_options(text: str) -> SplashConfig:
    """``"block_q=256,block_kv=512,fused_bwd=1"`` -> :class:`SplashConfig` (an empty string: the defaults)."""
    fields = {f.name: f for f in dataclasses.fields(SplashConfig)}
    values: dict = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or name not in fields:
            raise ValueError(f"splash attention option {item!r} is not NAME=VALUE with NAME one of "
                             f"{', '.join(fields)}")
        raw = raw.strip().lower()
        if name in ("fused_bwd", "interpret"):
            if raw not in ("0", "1", "true", "false"):
                raise ValueError(f"splash attention option {name}={raw!r}: expected 0/1/true/false")
            values[name] = raw in ("1", "true")
        else:
            try:
                values[name] = int(raw)
            except ValueError:
                raise ValueError(f"splash attention option {name}={raw!r}: expected an integer") from None
    return SplashConfig(**values)


def config_from_spec(impl: str) -> SplashConfig:
    """The :class:`SplashConfig` of an attention spec: ``"splash:block_q=256"`` -> block_q 256, the rest defaults."""
    return parse_options(impl.partition(":")[2])


def _clamp(block: int, length: int) -> int:
    # A block never exceeds the sequence rounded up to whole lanes: short sequences are not padded to 512.
    return min(block, -(-length // LANES) * LANES)


@dataclasses.dataclass(frozen=True)
class SplashPlan:
    """The kernel block sizes and padded lengths of one call: [.., lq, .., d] queries x [.., lk, .., d] keys."""

    lq: int
    lk: int
    d: int
    block_q: int
    block_kv: int
    block_kv_compute: int
    block_q_bwd: int
    block_kv_bwd: int

    @property
    def d_pad(self) -> int:
        """The head dim rounded up to whole lanes."""
        return -(-self.d // LANES) * LANES

    @property
    def lq_pad(self) -> int:
        """The query length rounded up to a multiple of the forward and backward query blocks."""
        step = math.lcm(self.block_q, self.block_q_bwd)
        return -(-self.lq // step) * step

    @property
    def lk_pad(self) -> int:
        """The key length rounded up to a multiple of the forward and backward key blocks."""
        step = math.lcm(self.block_kv, self.block_kv_bwd)
        return -(-self.lk // step) * step


def plan_blocks(config: SplashConfig, lq: int, lk: int, d: int) -> SplashPlan:
    """The :class:`SplashPlan` of ``config`` for lq queries and lk keys of head dim d."""
    bkv = _clamp(config.block_kv, lk)
    compute = config.block_kv_compute or bkv
    if bkv % compute:  # the clamped block no longer holds whole compute steps
        compute = bkv
    return SplashPlan(lq=lq, lk=lk, d=d, block_q=_clamp(config.block_q, lq), block_kv=bkv,
                      block_kv_compute=compute,
                      block_q_bwd=_clamp(config.block_q_bwd or config.block_q, lq),
                      block_kv_bwd=_clamp(config.block_kv_bwd or config.block_kv, lk))
