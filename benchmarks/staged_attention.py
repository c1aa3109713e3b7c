"""The staged VAE's mid-block attention on a large image: once per window (the overlaps repeat its queries) against
once per latent pixel (jsr's default: the stage is pointwise and runs on the mosaic of the windows' cores).

Decodes random latents with a model's ``TiledVAE`` both ways, times the attention stage's calls and the whole
decode (second run of each: the first compiles), and reports the relative difference of the two outputs.

    python benchmarks/staged_attention.py                       # tiny model, 2048x2048 output, 128-latent windows
    python benchmarks/staged_attention.py --model /models/sd21-base --size 4096

Prints one line per mode and writes JSON (``--out``, default benchmarks/results/staged_attention-<backend>.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from _common import environment, write_result  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="SD folder, or tiny")
    p.add_argument("--size", type=int, default=2048, help="output side in pixels (latents: size / 8)")
    p.add_argument("--tile", type=int, default=128, help="decoder window in latents")
    p.add_argument("--overlap", type=int, default=22, help="window overlap in latents")
    p.add_argument("--out", default="")
    return p.parse_args()


def _run(tv, z, tile: int, overlap: int, per_window: bool) -> dict:
    import jax
    import numpy as np

    from jsr.sr import staged_tiling

    dec = tv._decoder
    i = next(k for k, s in enumerate(dec.stages) if s.pointwise)
    call, times = dec.calls[i], []

    def timed(*a):
        t = time.perf_counter()
        out = jax.block_until_ready(call(*a))
        times.append(time.perf_counter() - t)
        return out

    timed.next_groups, timed.fn, timed.jitted = call.next_groups, call.fn, call.jitted
    dec.calls[i] = timed
    chunking = staged_tiling.StagedTiler._chunking
    if per_window:
        staged_tiling.StagedTiler._chunking = lambda self, *a: None
    try:
        for _ in range(2):  # the first run compiles
            times.clear()
            t0 = time.perf_counter()
            y = tv.decode(z, tile, overlap)
            total = time.perf_counter() - t0
    finally:
        staged_tiling.StagedTiler._chunking = chunking
        dec.calls[i] = call
    return {"mode": "per window" if per_window else "once per pixel", "decode_s": round(total, 2),
            "attention_calls": len(times), "attention_s": round(sum(times), 2), "y": np.asarray(y)}


def main() -> None:
    args = _args()
    from jsr.cli import cpu_compile_defaults

    cpu_compile_defaults()
    import numpy as np

    from jsr.methods.restorer import load_restorer

    r = load_restorer(args.model)
    n = args.size // 8
    z = np.random.default_rng(0).normal(size=(1, n, n, 4)).astype(np.float32)
    rows = [_run(r.tiled_vae, z, args.tile, args.overlap, per_window) for per_window in (True, False)]
    a, b = rows[0].pop("y"), rows[1].pop("y")
    diff = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    for row in rows:
        print(f"{row['mode']:>14}: decode {row['decode_s']:.1f} s, attention {row['attention_calls']} calls "
              f"{row['attention_s']:.1f} s")
    print(f"relative L2 difference of the outputs: {diff:.4f} (overlap pixels take their core owner's values)")
    result = {**environment(), "model": args.model, "size": args.size, "tile": args.tile, "overlap": args.overlap,
              "rows": rows, "relative_difference": diff}
    write_result(result, args.out or f"benchmarks/results/staged_attention-{result['jax_backend']}.json")


if __name__ == "__main__":
    main()
