"""Throughput of the data path for 512x512 crops: the degradation alone, a per-stage profile, and the full Grain
pipeline (JPEG folder -> decode -> crop -> degrade -> batch) in one process and with worker processes.

    python benchmarks/degradation.py                       # table on stdout, JSON in benchmarks/results/
    python benchmarks/degradation.py --workers 0,2,4 --images 96 --out /tmp/deg.json

"Per core" rates: the degradation alone is timed in CPU seconds of this process with OpenCV on one thread, so it
does not depend on other load; pipeline rates are wall-clock images/s divided by the number of processes doing
image work (1 without workers, else the worker count), so they suffer from whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jsr.data import degradation as deg  # noqa: E402
from jsr.data import pipeline  # noqa: E402
from jsr.data.sources import synthetic_image  # noqa: E402

STAGES = {  # profile rows: cumulative time of these functions (they do not call each other)
    "blur (filter2D / sepFilter2D)": ["blur"],
    "resize (incl. final x4 bicubic)": ["resize"],
    "gaussian noise": ["add_gaussian_noise"],
    "poisson noise": ["add_poisson_noise"],
    "jpeg (cv2 encode+decode)": ["jpeg"],
    "kernel generation": ["gaussian_kernel", "generalized_gaussian_kernel", "plateau_kernel", "sinc_kernel"],
    "8-bit quantisation": ["quantize_8bit"],
}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench_degrade(crops: list[np.ndarray], config: deg.DegradationConfig) -> dict:
    cv2.setNumThreads(1)
    deg.degrade(crops[0], 0, config)  # warm the Poisson tables and OpenCV
    cpu, wall = time.process_time(), time.perf_counter()
    for i, crop in enumerate(crops):
        deg.degrade(crop, i, config)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"images": len(crops), "cpu_s": cpu, "wall_s": wall, "images_per_cpu_s": len(crops) / cpu,
            "images_per_wall_s": len(crops) / wall, "ms_per_image_cpu": 1e3 * cpu / len(crops)}


def profile_degrade(crops: list[np.ndarray], config: deg.DegradationConfig) -> dict:
    cv2.setNumThreads(1)
    prof = cProfile.Profile(time.process_time)  # CPU time: shares unaffected by other load on the machine
    prof.enable()
    for i, crop in enumerate(crops):
        deg.degrade(crop, 1000 + i, config)
    prof.disable()
    stats = pstats.Stats(prof).stats
    by_name: dict[str, float] = {}
    total = 0.0
    for (filename, _, name), (_, _, _, cumtime, _) in stats.items():
        if "jsr/data" not in filename.replace(os.sep, "/"):
            continue
        by_name[name] = by_name.get(name, 0.0) + cumtime
        if name == "degrade":
            total = cumtime
    rows = {stage: sum(by_name.get(f, 0.0) for f in funcs) for stage, funcs in STAGES.items()}
    rows["other (clip, casts, draws)"] = max(0.0, total - sum(rows.values()))
    return {"images": len(crops), "total_s": total,
            "stages": {k: {"ms_per_image": 1e3 * v / len(crops), "share": v / total} for k, v in rows.items()}}


def bench_pipeline(folder: str, workers: int, batches: int, batch_size: int, crop: int, config: dict) -> dict:
    cfg = {"source": "folder", "path": folder, "crop_size": crop, "batch_size": batch_size, "num_workers": workers,
           "read_threads": 0, "prefetch_batches": 2, "worker_buffer_size": 2, "cv2_threads": 1,
           "degradation": config}
    it = pipeline.make_iterator(cfg, process_index=0, process_count=1)
    try:
        start = time.perf_counter()
        next(it)  # worker start-up and the first batch
        startup = time.perf_counter() - start
        cpu, t0 = time.process_time(), time.perf_counter()
        for _ in range(batches):
            next(it)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - t0
    finally:
        it.close()
    images = batches * batch_size
    procs = max(1, workers)
    out = {"workers": workers, "images": images, "wall_s": wall, "startup_s": startup,
           "images_per_s": images / wall, "images_per_s_per_process": images / wall / procs,
           # Main-process CPU per image: all the work without workers; receiving + batching with them.
           "main_process_cpu_ms_per_image": 1e3 * cpu / images, "skipped": it.skipped}
    if workers == 0:
        out["images_per_cpu_s"] = images / cpu
    return out


def bench_decode(folder: str) -> float:
    """ms to read + decode one source JPEG (the pipeline does this once per example)."""
    files = sorted(Path(folder).glob("*.jpg"))
    cpu = time.process_time()
    for f in files:
        cv2.imdecode(np.fromfile(f, np.uint8), cv2.IMREAD_UNCHANGED)
    return 1e3 * (time.process_time() - cpu) / len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="images for the degradation-only timing")
    parser.add_argument("--profile-images", type=int, default=24)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--source-size", type=int, default=768, help="side of the JPEG files the pipeline reads")
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts for the pipeline runs")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--preset", default="realesrgan", choices=sorted(deg.PRESETS))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "degradation.json"))
    args = parser.parse_args()

    config = deg.preset(args.preset)
    crops = [synthetic_image(7, i, args.crop, args.crop).astype(np.float32) / 255 for i in range(8)]
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()}-core CPU ({_cpu_name()})",
        "python": platform.python_version(), "numpy": np.__version__, "opencv": cv2.__version__,
        "preset": args.preset, "crop": args.crop,
        "load_average_at_start": os.getloadavg(),
        "degrade": bench_degrade([crops[i % 8] for i in range(args.images)], config),
        "profile": profile_degrade([crops[i % 8] for i in range(args.profile_images)], config),
        "pipeline": [],
    }
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.files):
            img = synthetic_image(11, i, args.source_size, args.source_size)
            cv2.imwrite(os.path.join(folder, f"{i:04d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.setNumThreads(1)
        result["decode_ms_per_source_image"] = bench_decode(folder)
        for w in (int(x) for x in args.workers.split(",")):
            result["pipeline"].append(bench_pipeline(folder, w, args.batches, args.batch_size, args.crop,
                                                     config.to_dict()))

    d, p = result["degrade"], result["profile"]
    print(f"\n{result['machine']}, {result['date']}, preset {args.preset}, {args.crop}x{args.crop} crops, "
          f"load average at start {result['load_average_at_start'][0]:.1f}")
    print(f"\ndegrade() alone, 1 OpenCV thread: {d['images_per_cpu_s']:.1f} images per CPU-second "
          f"({d['ms_per_image_cpu']:.1f} ms/image; wall {d['images_per_wall_s']:.1f} images/s)")
    print(f"\n{'stage':34s} {'ms/image':>9s} {'share':>7s}")
    for name, row in sorted(p["stages"].items(), key=lambda kv: -kv[1]["ms_per_image"]):
        print(f"{name:34s} {row['ms_per_image']:9.2f} {100 * row['share']:6.1f}%")
    print(f"(profiled under cProfile: {1e3 * p['total_s'] / p['images']:.1f} ms/image)")
    print(f"\nfull pipeline ({args.source_size}px JPEG files, decode {result['decode_ms_per_source_image']:.1f} ms "
          f"each -> {args.crop} crops, batch {args.batch_size}):")
    print(f"{'workers':>8s} {'images/s':>9s} {'per process':>12s} {'main CPU ms/img':>16s} {'images/CPU-s':>13s} "
          f"{'startup s':>10s}")
    for r in result["pipeline"]:
        per_cpu = f"{r['images_per_cpu_s']:13.1f}" if "images_per_cpu_s" in r else f"{'':13s}"
        print(f"{r['workers']:8d} {r['images_per_s']:9.1f} {r['images_per_s_per_process']:12.1f} "
              f"{r['main_process_cpu_ms_per_image']:16.1f} {per_cpu} {r['startup_s']:10.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
