"""``python -m jsr.demo``: the web demo's command line (needs the ``demo`` extra: ``pip install -e '.[demo]'``).

    python -m jsr.demo                                             # the embedded tiny random model (a smoke test)
    python -m jsr.demo --model /models/sd21-base --lora /ckpt/ctsr2/export --t 0.3
    python -m jsr.demo --model /models/sd21-base --lora pisa_sr.pkl --port 8080

The model flags are ``python -m jsr.infer``'s (``--model``, ``--lora``, ``--method``, ``--prompt``, ``--dtype``,
``--attention``), as are the processing flags and every knob flag (``--t 0.3`` starts the ``t`` slider there).
The server listens on 127.0.0.1 (this machine only) unless ``--host`` says otherwise; ``--share`` asks Gradio for a
public link and is off by default. Before serving, the demo restores a small image twice (``--warmup``): the
first compiles, the second measures the speed that the page's time estimates scale from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from jsr.cli import guard, report_user_error, start_jax
from jsr.infer import add_model_flags, add_tiling_flags, knob_flags
from jsr.sr import colorfix
from jsr.sr.infer import RestoreOptions

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def parse_pixels(text: str) -> int:
    """``"16.8M"``, ``"4096x4096"``, ``"2000000"`` -> a pixel count."""
    t = str(text).strip().lower()
    try:
        if "x" in t:
            w, h = t.split("x")
            return int(w) * int(h)
        scale = {"k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}.get(t[-1:], 1)
        return int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a pixel count: {text!r} (e.g. 16M, 4096x4096)") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m jsr.demo`` argument parser."""
    import jsr.methods

    p = argparse.ArgumentParser(prog="python -m jsr.demo",
                                description="A web page to restore images with a one-step SR model, its knobs as "
                                            f"sliders (any registered method: {', '.join(jsr.methods.names())}).")
    add_model_flags(p, p.add_argument_group("model (as python -m jsr.infer)"), model_default="tiny")
    g = p.add_argument_group("processing (as python -m jsr.infer; the upscale and colour fix are page controls)")
    g.add_argument("--upscale", type=float, default=4.0, help="the page's initial upscale")
    g.add_argument("--color_fix", "--color-fix", choices=colorfix.METHODS, default="adain",
                   help="the page's initial colour fix")
    add_tiling_flags(g)
    g = p.add_argument_group("server")
    g.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: a free one)")
    g.add_argument("--share", action="store_true", help="ask Gradio for a public share link (off by default)")
    g.add_argument("--max_pixels", "--max-pixels", type=parse_pixels, default=4096 * 4096, metavar="N",
                   help="the largest output the page restores, e.g. 16M or 4096x4096 (default 4096x4096)")
    g.add_argument("--warmup", type=int, default=64, metavar="PX",
                   help="restore a PX x PX image twice before serving (compile, then measure the speed the time "
                        "estimates use); 0: no warm-up (default 64, the samples' size)")
    g.add_argument("--no_samples", "--no-samples", action="store_true", help="no sample images in the page")
    g.add_argument("--workdir", default="", help="where result PNGs and samples go (default: a temporary folder)")
    return p


def _bind(host: str, port: int) -> int:
    """Check that ``host:port`` can be listened on (port 0: pick a free one) and return the port, before the model
    loads (minutes for a real model) rather than after. Raises DemoSetupError naming the address."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as s:
            s.bind((host, port))
            return s.getsockname()[1]
    except OSError as e:
        raise DemoSetupError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port "
                             "(0: a free one) or --host") from None


@dataclasses.dataclass
class Served:
    """A running demo (:func:`start`): the Gradio app, its address, the engine behind it and its work folder."""

    app: Any
    url: str
    engine: Any
    workdir: Path
    share_url: str | None = None

    def close(self) -> None:
        """Stop the server."""
        self.app.close()


class DemoSetupError(ValueError):
    """A flag value, a missing extra or a model that cannot be loaded: one ``error:`` line, exit status 2."""


def start(argv: Sequence[str] | None = None) -> Served:
    """Everything ``python -m jsr.demo`` does before it blocks: parse ``argv``, load the model, warm up, build the
    page and start serving it in background threads. Raises DemoSetupError for the user's mistakes."""
    args = build_parser().parse_args(argv)
    try:
        opts = RestoreOptions(knobs=knob_flags(args), color_fix=args.color_fix, latent_tile=args.latent_tile,
                              latent_overlap=args.latent_overlap, vae_tile=args.vae_tile,
                              vae_overlap=args.vae_overlap, tiles_per_call=args.tiles_per_call,
                              max_memory=args.max_memory, spill_dir=args.spill_dir,
                              max_device_memory=args.max_device_memory)
        if not 1 <= args.upscale <= 16:
            raise ValueError(f"--upscale must be in [1, 16], got {args.upscale}")
        if args.max_pixels <= 0 or args.warmup < 0 or not 0 <= args.port < 65536:
            raise ValueError("--max_pixels must be positive, --warmup >= 0 and --port in [0, 65535]")
    except ValueError as e:
        raise DemoSetupError(str(e)) from None
    port = _bind(args.host, args.port)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    try:
        import gradio  # noqa: F401 - checked first: the model load takes a while
    except ImportError:
        raise DemoSetupError("the demo needs Gradio: pip install -c .ci/constraints.txt -e '.[demo]'") from None
    start_jax()
    from jsr.console import notice
    from jsr.demo.app import build_app
    from jsr.demo.engine import DemoEngine
    from jsr.demo.samples import write_samples
    from jsr.methods.restorer import check_options, load_restorer

    try:
        restorer = load_restorer(args.model, args.lora, method=args.method, dtype=args.dtype, prompt=args.prompt,
                                 attention_impl=args.attention)
        check_options(restorer, opts)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise DemoSetupError(" ".join(str(e).split())) from None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="jsr-demo-"))
    engine = DemoEngine(restorer, opts, out_dir=workdir / "results", knob_overrides=opts.knobs,
                        max_pixels=args.max_pixels, model_name=str(args.model))
    samples = [] if args.no_samples else write_samples(workdir / "samples", size=args.warmup or 64)
    if args.warmup:
        notice(f"warming up: restoring a {args.warmup}x{args.warmup} image twice (compile, then measure)...")
        notice(f"warm: {engine.warm_up(args.warmup, args.upscale).summary}")
    app = build_app(engine, samples=samples, upscale=args.upscale)
    app.queue(default_concurrency_limit=1)
    _, _, share_url = app.launch(server_name=args.host, server_port=port, share=args.share, inbrowser=False,
                                 prevent_thread_lock=True, quiet=True, allowed_paths=[str(workdir)],
                                 footer_links=["api"], ssr_mode=False)
    host = f"[{args.host}]" if ":" in args.host else args.host
    return Served(app, f"http://{host}:{port}/", engine, workdir, share_url)


@guard
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m jsr.demo``: :func:`start`, then serve until interrupted. Exit status 2 after one ``error:``
    line for a bad flag value, a missing demo extra or a model that cannot be loaded."""
    try:
        served = start(argv)
    except DemoSetupError as e:
        return report_user_error(e)
    # The line scripts wait for.
    print(f"jsr.demo: serving {served.engine.restorer.method} on {served.url}"
          + (f" and {served.share_url}" if served.share_url else ""), flush=True)
    try:
        served.app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        served.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
