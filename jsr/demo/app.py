"""The demo page (Gradio Blocks) over a :class:`jsr.demo.engine.DemoEngine`.

Layout: the input (upload, or a sample) with the cost estimate under it; the model's knobs as controls built from
its schema (:mod:`jsr.demo.controls`; knobs that recompile in a closed section); the upscale and the colour fix;
Restore. On the right a before/after slider (the bicubic-upscaled input against the result), the restore time and
the full-size PNG to download; below, a knob sweep rendering a strip of results over one knob's range.

Releasing a knob's slider restores again when an input is there (the last release wins: requests do not pile up);
a knob that recompiles waits for Restore.
Every error a person can cause is a message in the page (``gr.Error``), never a traceback.

API (also what ``gradio_client`` calls; parameters by name, knobs by their own names):

* ``/restore(image, upscale, color_fix, <knob>...) -> (before/after pair, summary, PNG file)``
* ``/sweep(image, upscale, color_fix, sweep_knob, sweep_count, <knob>...) -> (strip, summary)``
* ``/estimate(image, upscale) -> markdown``
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Sequence

import gradio as gr

from jsr.demo.controls import Control
from jsr.demo.engine import MAX_UPSCALE, MIN_UPSCALE, DemoEngine, DemoInputError, preview
from jsr.sr import colorfix

# Element ids the browser test (and any page automation) finds things by.
IDS = dict(input="jsr-input", estimate="jsr-estimate", upscale="jsr-upscale", color_fix="jsr-color-fix",
           restore="jsr-restore", compare="jsr-compare", status="jsr-status", download="jsr-download",
           sweep_knob="jsr-sweep-knob", sweep_count="jsr-sweep-count", sweep="jsr-sweep", strip="jsr-strip")
CONTROL_ID = "knob-{}"
# One restore at a time across every event: they share the device and the engine's timing.
CONCURRENCY_ID = "jsr-model"
NO_IMAGE = "Upload an image first (or pick a sample)."


def _checked(component: gr.components.Component, check: Callable[[Any], Any]) -> None:
    """Run ``check(payload)`` before ``component``'s own preprocessing: a DemoInputError (or ValueError) becomes a
    one-line ``gr.Error`` in the page instead of Gradio's generic failure. Set on the instance: the component,
    its page widget and its API schema stay Gradio's own."""
    original = component.preprocess

    def preprocess(payload):
        try:
            check(payload)
        except ValueError as e:
            raise gr.Error(" ".join(str(e).split()), print_exception=False) from None
        return original(payload)

    component.preprocess = preprocess


def _image_check(engine: DemoEngine) -> Callable[[Any], None]:
    def check(payload) -> None:
        if payload is None or getattr(payload, "path", None) is None:
            return
        name = getattr(payload, "orig_name", None) or Path(payload.path).name
        engine.output_size(payload.path, 1.0, name)  # not an image -> DemoInputError; the size limit comes later

    return check


def _knob_check(control: Control) -> Callable[[Any], None]:
    def check(value) -> None:
        if value is None:
            raise DemoInputError(f"{control.name}: no value given")
        control.knob.parse(value)

    return check


def _control_widget(c: Control) -> gr.components.Component:
    label, elem_id = c.name, CONTROL_ID.format(c.name)
    if c.widget == "slider":
        return gr.Slider(float(c.knob.min), float(c.knob.max), value=c.value, step=c.step, label=label,
                         info=c.info(), elem_id=elem_id)
    if c.widget == "number":
        return gr.Number(value=c.value, label=label, info=c.info(), elem_id=elem_id,
                         minimum=c.knob.min, maximum=c.knob.max, step=c.step or 0.01,
                         precision=0 if c.knob.type is int else None)
    return gr.Dropdown(list(c.knob.choices), value=c.value, label=label, info=c.info(), elem_id=elem_id)


def _signed(fn: Callable, names: Sequence[str]) -> Callable:
    """``fn(*values)`` with a signature naming its parameters (Gradio's API and ``gradio_client`` keywords)."""
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
    return fn


def build_app(engine: DemoEngine, *, samples: Sequence[str | Path] = (), upscale: float = 4.0,
              title: str = "") -> gr.Blocks:
    """The demo page for ``engine`` (not launched). ``samples``: image files offered as examples."""
    r = engine.restorer
    sweepable = [c.name for c in engine.controls if c.sweepable]
    title = title or f"jsr — {r.label or r.method} one-step super-resolution"

    with gr.Blocks(title=title, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {title}\nModel: `{engine.model_name or 'given'}`, method `{r.method}`. "
                    "Upload a low-resolution image, set the knobs, restore; drag the divider to compare.")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", image_mode=None, label="Input (low resolution)",
                                 sources=["upload", "clipboard"], elem_id=IDS["input"], height=260)
                _checked(image, _image_check(engine))
                if samples:
                    gr.Examples([[str(s)] for s in samples], inputs=[image], label="Samples (scikit-image photos, "
                                "downscaled x4)")
                estimate = gr.Markdown(NO_IMAGE, elem_id=IDS["estimate"])
                widgets = []
                traced = [c for c in engine.controls if not c.recompiles]
                static = [c for c in engine.controls if c.recompiles]
                with gr.Accordion(f"Knobs of {r.label or r.method}", open=True):
                    if not traced:
                        gr.Markdown("This model has no knob that moves without recompiling.")
                    for c in traced:
                        widgets.append(_control_widget(c))
                if static:
                    with gr.Accordion("Knobs that recompile (shape the computation)", open=False):
                        for c in static:
                            widgets.append(_control_widget(c))
                for c, w in zip(traced + static, widgets):
                    _checked(w, _knob_check(c))
                up = gr.Slider(MIN_UPSCALE, MAX_UPSCALE, value=upscale, step=0.5, label="upscale",
                               info="output size / input size (bicubic before the model)", elem_id=IDS["upscale"])
                _checked(up, DemoEngine.check_upscale)
                fix = gr.Radio(list(colorfix.METHODS), value=engine.options.color_fix, label="colour fix",
                               elem_id=IDS["color_fix"])
                go = gr.Button("Restore", variant="primary", elem_id=IDS["restore"])
            with gr.Column(scale=2):
                # PNG, not Gradio's default lossy WebP: the comparison is about fine detail.
                compare = gr.ImageSlider(label="before (bicubic) / after", elem_id=IDS["compare"], max_height=640,
                                         interactive=False, format="png")
                status = gr.Markdown("", label="summary", elem_id=IDS["status"])
                download = gr.DownloadButton("Download the full-size result (PNG)", elem_id=IDS["download"])
        with gr.Row():
            s_knob = gr.Dropdown(sweepable, value=sweepable[0] if sweepable else None, label="sweep knob",
                                 elem_id=IDS["sweep_knob"], interactive=bool(sweepable),
                                 info="renders the image once per value over the knob's range")
            s_count = gr.Slider(2, 8, value=5, step=1, label="values", elem_id=IDS["sweep_count"])
            s_go = gr.Button("Sweep", elem_id=IDS["sweep"], interactive=bool(sweepable))
        strip = gr.Gallery(label="sweep", columns=5, rows=1, height=260, elem_id=IDS["strip"], object_fit="contain",
                           format="png")
        ordered = traced + static  # the widgets' order

        def knob_values(values: Sequence[Any]) -> dict[str, Any]:
            return {c.name: v for c, v in zip(ordered, values)}

        def run_restore(img, upscale_, color_fix, *values):
            if img is None:
                raise gr.Error(NO_IMAGE, print_exception=False)
            try:
                res = engine.restore(img, upscale_, color_fix, knob_values(values))
            except DemoInputError as e:
                raise gr.Error(str(e), print_exception=False) from None
            return (preview(res.lq_up), preview(res.sr)), res.summary, str(res.path)

        def run_live(img, upscale_, color_fix, *values):
            if img is None:  # nothing to restore yet: moving a knob alone is fine
                return gr.skip(), gr.skip(), gr.skip()
            return run_restore(img, upscale_, color_fix, *values)

        def run_sweep(img, upscale_, color_fix, knob, count, *values):
            if img is None:
                raise gr.Error(NO_IMAGE, print_exception=False)
            try:
                results, summary = engine.sweep(img, upscale_, knob, count, color_fix, knob_values(values))
            except DemoInputError as e:
                raise gr.Error(str(e), print_exception=False) from None
            return [(preview(sr), f"{knob} = {v:g}" if not isinstance(v, str) else f"{knob} = {v}")
                    for v, sr in results], summary

        def run_estimate(img, upscale_):
            if img is None:
                return NO_IMAGE
            try:
                return engine.estimate(img, upscale_)
            except DemoInputError as e:
                return f"**Cannot restore this image**: {e}"

        inputs = [image, up, fix] + widgets
        names = ["image", "upscale", "color_fix"] + [c.name for c in ordered]
        outputs = [compare, status, download]
        common = dict(concurrency_id=CONCURRENCY_ID, concurrency_limit=1)
        go.click(_signed(run_restore, names), inputs, outputs, api_name="restore", **common)
        live = _signed(run_live, names)
        for c, w in zip(ordered, widgets):
            if isinstance(w, gr.Slider) and not c.recompiles:  # a recompiling knob waits for Restore
                w.release(live, inputs, outputs, api_visibility="private", trigger_mode="always_last",
                          show_progress="minimal", **common)
        s_go.click(_signed(run_sweep, ["image", "upscale", "color_fix", "sweep_knob", "sweep_count"] + names[3:]),
                   [image, up, fix, s_knob, s_count] + widgets, [strip, status], api_name="sweep", **common)
        est = _signed(run_estimate, ["image", "upscale"])
        image.change(est, [image, up], estimate, api_name="estimate")
        up.change(est, [image, up], estimate, api_visibility="private")
    return app
