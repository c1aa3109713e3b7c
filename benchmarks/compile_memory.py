"""Host memory and time XLA:CPU needs to compile a method's full-size train step (issue [K] item 5).

Each program is the step ``python train.py`` jits (``jsr.train.programs.build_program``), on one CPU device, over
abstract arguments (no weight is materialised, so the process's memory is the compiler's), at SD-2.1-base size,
f32, batch 1 and a small crop (128 px by default). Every program compiles in its own subprocess so that its
peak resident memory (``ru_maxrss``) is its own; a watchdog stops a child at ``--limit`` GiB and the row says so.

    python benchmarks/compile_memory.py                                  # fidelity and osediff, 128 px, 16 GiB
    python benchmarks/compile_memory.py --programs fidelity --preset default   # XLA's default CPU pipeline
    python benchmarks/compile_memory.py --programs fidelity --preset tiny --size 64   # smoke run

Prints one line per program and writes JSON (``--out``, default ``benchmarks/results/compile_memory.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # configs/ and jsr/ from a checkout
sys.path.insert(0, str(Path(__file__).parent))

from _common import TRAIN_PROGRAMS, environment, write_result  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--programs", default="fidelity,osediff", help=f"comma-separated subset of {list(TRAIN_PROGRAMS)}")
    p.add_argument("--preset", default="sd21-base", help="architecture (jsr.models.presets)")
    p.add_argument("--size", type=int, default=128, help="crop side in pixels")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--xla", default="fast", choices=("fast", "default"),
                   help="XLA:CPU pipeline: jsr's fast-compile preset (what the command lines use) or XLA's default")
    p.add_argument("--limit", type=float, default=16.0, help="GiB of resident memory at which a compile is stopped")
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _watchdog(limit_bytes: int, result_path: Path) -> None:
    """Stop this process when its resident memory passes ``limit_bytes`` (leaving a row that says so)."""
    while True:
        rss = _rss_bytes()
        if rss > limit_bytes:
            result_path.write_text(json.dumps({"error": f"stopped at {rss / 2**30:.1f} GiB resident "
                                                        f"(limit {limit_bytes / 2**30:.1f} GiB)"}))
            os._exit(3)
        time.sleep(0.2)


def child(args: argparse.Namespace) -> None:
    """Build, lower and compile one program; write its row to ``args.out``."""
    import resource

    result_path = Path(args.out)
    threading.Thread(target=_watchdog, args=(int(args.limit * 2**30), result_path), daemon=True).start()
    if args.xla == "fast":
        from jsr.cli import cpu_compile_defaults

        cpu_compile_defaults()
    else:
        os.environ["JSR_XLA_CPU_PRESET"] = "default"
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jsr.train.sharding import MESH_AXES

    jax.config.update("jax_compilation_cache_dir", None)  # measure the compile, not a cache hit
    from export_programs import program_config

    from jsr.train import programs as P
    from jsr.train.loop import remat_setting, with_remat

    row: dict = {"program": args.child, "size": args.size, "dtype": args.dtype, "xla": args.xla,
                 "xla_flags": os.environ.get("XLA_FLAGS", "")}
    with tempfile.TemporaryDirectory() as tmp, P.stand_in_files(tmp) as files:
        files = dict(files, base=str(Path(tmp) / "base"))
        t0 = time.perf_counter()
        config = program_config(args.child, files, args.size, args.preset)
        config.model.dtype = config.model.param_dtype = args.dtype
        base = P.abstract_base(args.preset, dtype=jnp.dtype(args.dtype), attention=config.model.attention,
                               folder=files["base"])
        if args.child == "ctsr2":
            files["stage1"] = str(P.write_stage1_standin(base, Path(tmp) / "stage1"))
            config.ctsr.stage1 = files["stage1"]
        base = with_remat(base, *remat_setting(config))
        # A concrete one-device mesh: this host compiles the program (an AbstractMesh can only be exported).
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)
        program = P.build_program(config, base, mesh, TRAIN_PROGRAMS[args.child][2], batch=1)
        fn = program.make_fn()
        with jax.set_mesh(mesh):
            lowered = fn.trace(*program.args).lower()
        row["trace_lower_s"] = time.perf_counter() - t0
        row["rss_before_compile_bytes"] = _rss_bytes()
        row["hlo_text_bytes"] = len(lowered.as_text())
        t0 = time.perf_counter()
        compiled = lowered.compile()
        row["compile_s"] = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        row.update(temp_bytes=int(mem.temp_size_in_bytes), argument_bytes=int(mem.argument_size_in_bytes),
                   output_bytes=int(mem.output_size_in_bytes),
                   peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result_path.write_text(json.dumps(row))


def main() -> None:
    args = _args()
    if args.child:
        child(args)
        return
    out = args.out or Path(__file__).parent / "results" / "compile_memory.json"
    result = {"benchmark": "compile_memory", **environment(), "preset": args.preset, "limit_gib": args.limit,
              "rows": []}
    for key in [k.strip() for k in args.programs.split(",") if k.strip()]:
        if key not in TRAIN_PROGRAMS:
            raise SystemExit(f"unknown program {key!r}; programs: {list(TRAIN_PROGRAMS)}")
        with tempfile.TemporaryDirectory() as tmp:
            row_path = Path(tmp) / "row.json"
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--child", key, "--preset", args.preset, "--size", str(args.size),
                   "--dtype", args.dtype, "--xla", args.xla, "--limit", str(args.limit), "--out", str(row_path)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            row = json.loads(row_path.read_text()) if row_path.exists() else {}
            if proc.returncode and "error" not in row:
                row["error"] = f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            row.update(program=key, wall_s=time.perf_counter() - t0)
        result["rows"].append(row)
        if "error" in row:
            print(f"{key:9s} FAILED {row['error'][:300]}", flush=True)
        else:
            print(f"{key:9s} peak {row['peak_rss_bytes'] / 2**30:5.2f} GiB  compile {row['compile_s']:6.0f} s  "
                  f"trace+lower {row['trace_lower_s']:5.0f} s  XLA temp {row['temp_bytes'] / 2**30:5.2f} GiB  "
                  f"args {row['argument_bytes'] / 2**30:5.2f} GiB", flush=True)
        write_result(result, out)


if __name__ == "__main__":
    main()
