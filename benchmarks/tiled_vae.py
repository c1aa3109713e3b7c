"""Device memory of the SD VAE run whole against tiled with whole-image statistics (jsr.sr.staged_tiling), and
optionally the time of both and the tiled output's error.

Memory is XLA's own accounting of the compiled programs (``Compiled.memory_analysis()``: arguments, outputs and
temporaries), so it needs no run and no large device: per output size, the whole-image ``encode``/``decode``
program against the largest of the staged programs for one window (plus, for the attention stage, the gathered
keys and values of the image). The VAE's parameters are listed once, apart. Host memory of the tiled run is the
largest set of carries held between stages (all windows, overlap included).

    python benchmarks/tiled_vae.py                                   # SD-2.1 VAE, 1024/2048/4096 px, f32
    python benchmarks/tiled_vae.py --time 768 --tile 512             # + time and error at 768 px
    python benchmarks/tiled_vae.py --preset tiny --sizes 128,256 --tile 64 --overlap 32 --time 128   # smoke run

Prints a table and writes JSON (``--out``, default benchmarks/results/tiled_vae-<backend>-<preset>.json).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from _common import environment, write_result
from jsr.sr.tiling import tile_starts

MB = 2 ** 20


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd21-base", help="model preset from jsr.models.presets")
    p.add_argument("--sizes", default="1024,2048,4096", help="output image sides in pixels (comma-separated)")
    p.add_argument("--tile", type=int, default=1024, help="VAE tile in output pixels (RestoreOptions.vae_tile)")
    p.add_argument("--overlap", type=int, default=176, help="VAE tile overlap in output pixels")
    p.add_argument("--dtype", default="float32", help="compute and parameter dtype")
    p.add_argument("--time", type=int, default=0, help="also run both at this size and time them (0: no)")
    p.add_argument("--sweep", default="", help="with --time: encoder error of staged and of blended tiles "
                   "(per-tile statistics) for TILE:OVERLAP pairs in pixels, e.g. 200:16,224:64,256:128")
    p.add_argument("--out", default=None, help="JSON output path")
    return p.parse_args()


def _bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _program_bytes(fn, *args, donate: tuple[int, ...] = ()) -> int:
    """Arguments + outputs + temporaries of the compiled program of ``fn`` (XLA's accounting; aliased buffers
    once). Every argument is kept, so the parameters count in full whether or not the program reads them all."""
    with warnings.catch_warnings():  # stages donate their carry; where XLA cannot reuse it, that is expected
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        jitted = jax.jit(fn, keep_unused=True, donate_argnums=donate)
        m = jitted.lower(*args).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _staged_memory(tiler, x_shape, tile, overlap, align, params_bytes):
    """(largest device bytes of one staged call without the parameters, largest host bytes of the carries) for
    an input [1, H, W, C] in windows of ``tile`` (the executor's geometry)."""
    _, h, w, c = x_shape
    th, tw = min(tile, h), min(tile, w)
    n_windows = (len(tile_starts(h, th, max(0, min(overlap, th - align)), align))
                 * len(tile_starts(w, tw, max(0, min(overlap, tw - align)), align)))
    sds = jax.ShapeDtypeStruct
    carry = {"x": sds((1, th, tw, c), jnp.float32)}
    context = None
    device = host = 0
    for stage, call in zip(tiler.stages, tiler.calls):
        mean = var = sds((1, stage.groups), jnp.float32) if stage.groups else None
        mask = sds((1,) + tuple(int(v * stage.scale) for v in (th, tw)), jnp.float32)
        device = max(device, _program_bytes(call.fn, tiler.params, carry, mean, var, context, mask, donate=(1,))
                     - params_bytes)
        out, _ = jax.eval_shape(call, tiler.params, carry, mean, var, context, mask)
        host = max(host, n_windows * _bytes(out))
        context = {k: sds((1, int(h * stage.scale), int(w * stage.scale), out[k].shape[-1]), out[k].dtype)
                   for k in stage.gather} or None
        carry = {k: v for k, v in out.items() if k not in stage.gather}
    return device, host, n_windows


def main() -> None:
    args = _args()
    from jsr.models.presets import preset
    from jsr.models.vae import AutoencoderKL, VAEConfig
    from jsr.models.vae_stages import decoder_stages, encoder_stages
    from jsr.sr.staged_tiling import StagedTiler

    dtype = jnp.dtype(args.dtype)
    vae = AutoencoderKL(VAEConfig.from_diffusers(preset(args.preset)["vae"]), dtype=dtype)
    params = nn.unbox(jax.jit(vae.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))["params"]
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    params_bytes = _bytes(params)
    enc, dec = StagedTiler(encoder_stages(vae), params), StagedTiler(decoder_stages(vae), params)
    f = vae.config.downscale
    enc_fn = lambda p, x: vae.apply({"params": p}, x, method="encode")[0]  # noqa: E731
    dec_fn = lambda p, z: vae.apply({"params": p}, z, method="decode")  # noqa: E731
    whole_enc, whole_dec = jax.jit(enc_fn), jax.jit(dec_fn)
    sds = jax.ShapeDtypeStruct
    result = {"benchmark": "tiled_vae", **environment(), "preset": args.preset, "dtype": args.dtype, "tile": args.tile, "overlap": args.overlap,
              "params_mb": params_bytes / MB, "sizes": []}
    print(f"VAE parameters: {params_bytes / MB:.0f} MB ({args.dtype}); tile {args.tile} px, overlap {args.overlap}")
    print(f"{'size':>6} {'part':>7} {'whole MB':>10} {'tiled MB':>10} {'host MB':>9} {'windows':>8}")
    for size in (int(s) for s in args.sizes.split(",")):
        row = {"size": size}
        for part, tiler, fn, shape, tile, overlap, align in (
                ("encode", enc, enc_fn, (1, size, size, 3), args.tile, args.overlap, f),
                ("decode", dec, dec_fn, (1, size // f, size // f, vae.config.latent_channels), args.tile // f,
                 -(-args.overlap // f), 1)):
            whole = _program_bytes(fn, params, sds(shape, jnp.float32)) - params_bytes
            tiled, host, windows = _staged_memory(tiler, shape, tile, overlap, align, params_bytes)
            row[part] = {"whole_mb": whole / MB, "tiled_mb": tiled / MB, "host_mb": host / MB, "windows": windows}
            print(f"{size:>6} {part:>7} {whole / MB:>10.0f} {tiled / MB:>10.0f} {host / MB:>9.0f} {windows:>8}",
                  flush=True)
        result["sizes"].append(row)

    if args.time:
        s = args.time
        x = np.asarray(jnp.clip(jax.image.resize(jax.random.uniform(jax.random.key(1), (1, s // 8, s // 8, 3),
                                                                      minval=-1, maxval=1), (1, s, s, 3), "bicubic"),
                                -1, 1))
        timing = {"size": s}
        for part, tiler, fn, inp, tile, overlap, align in (
                ("encode", enc, whole_enc, x, args.tile, args.overlap, f),
                ("decode", dec, whole_dec, None, args.tile // f, -(-args.overlap // f), 1)):
            if inp is None:
                inp = np.asarray(timing["latent"])
            ref = np.asarray(jax.block_until_ready(fn(params, inp)))  # compile
            start = time.perf_counter()
            ref = np.asarray(jax.block_until_ready(fn(params, inp)))
            t_whole = time.perf_counter() - start
            tiler(inp, tile, overlap, align=align)  # compile every stage
            start = time.perf_counter()
            got = tiler(inp, tile, overlap, align=align)
            t_tiled = time.perf_counter() - start
            got = got[..., :ref.shape[-1]]
            err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            timing[part] = {"whole_s": t_whole, "tiled_s": t_tiled, "rel_l2_error": err}
            if part == "encode":
                timing["latent"] = ref
            print(f"{s} px {part}: whole {t_whole:.2f} s, tiled {t_tiled:.2f} s, tiled vs whole relative L2 "
                  f"{err:.2e} (random weights)")
        timing.pop("latent")
        result["timing"] = timing
        if args.sweep:
            from jsr.sr.tiling import tiled_encode

            ref = np.asarray(whole_enc(params, x))
            rel = lambda a: float(np.linalg.norm(a - ref) / np.linalg.norm(ref))  # noqa: E731
            result["sweep"] = []
            for pair in args.sweep.split(","):
                tile, overlap = (int(v) for v in pair.split(":"))
                starts = tile_starts(s, min(tile, s), overlap, f)
                real = min(b + tile - a for a, b in zip(starts[1:], starts)) if len(starts) > 1 else 0
                staged = rel(enc(x, tile, overlap, align=f)[..., :ref.shape[-1]])
                blended = rel(tiled_encode(lambda t: whole_enc(params, t), x, tile, overlap))
                result["sweep"].append({"tile": tile, "overlap": real, "staged": staged, "blended": blended})
                print(f"encode {s} px, tile {tile}, overlap {real} (context {real // 2} px): relative L2 staged "
                      f"{staged:.2e}, blended with per-tile statistics {blended:.2e}", flush=True)
    print(f"{result['jax_backend']} ({result['jax_device']}), {os.cpu_count()} cores, {result['date']}")
    write_result(result, args.out or f"benchmarks/results/tiled_vae-{result['jax_backend']}-{args.preset}.json")


if __name__ == "__main__":
    main()
