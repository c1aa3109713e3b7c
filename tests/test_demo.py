"""The web demo served for real (``python -m jsr.demo``'s own start-up, in this process, on a free 127.0.0.1 port,
the embedded tiny random model), driven through Gradio's Python client and a headless Chromium.

One server for the whole module (the tiny model's load and compile are most of the cost); 64x64 inputs, the
size the server warms up on, so no request compiles. Needs the ``demo`` extra (Gradio); the browser test also
needs Debian's ``chromium`` and ``chromium-driver`` and Selenium, and skips, saying which is missing, without them.
``JSR_DEMO_SCREENSHOT=docs/demo.png`` makes the browser test also write the README's screenshot there.
"""
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

NO_EXTRA = "the demo extra is not installed (pip install -e '.[demo]')"
gradio_client = pytest.importorskip("gradio_client", reason=NO_EXTRA)
pytest.importorskip("gradio", reason=NO_EXTRA)
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from jsr.demo import cli  # noqa: E402
from jsr.demo.samples import make_lq, photo  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    served = cli.start(["--model", "tiny", "--port", "0", "--warmup", "64",
                        "--workdir", str(tmp_path_factory.mktemp("demo"))])
    yield served
    served.close()


@pytest.fixture(scope="module")
def client(demo):
    return gradio_client.Client(demo.url, verbose=False)


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory):
    """scikit-image's astronaut photo, a 256 px crop reduced to a 64x64 LQ."""
    path = tmp_path_factory.mktemp("photos") / "astronaut_lq.png"
    Image.fromarray(make_lq(photo("astronaut"), 64)).save(path)
    return path


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im, np.float32)


def test_served_on_localhost_only_by_default(demo):
    assert demo.url.startswith("http://127.0.0.1:")
    args = cli.build_parser().parse_args([])
    assert (args.host, args.share, args.model) == ("127.0.0.1", False, "tiny")


def test_client_restores_and_the_knob_moves_the_result(client, astronaut):
    pair, summary, png = client.predict(image=handle_file(astronaut), api_name="/restore")
    base = _png(png)
    assert base.shape == (256, 256, 3) and base.std() > 1  # full size, not a blank image
    assert all(_png(p).shape == (256, 256, 3) for p in pair)  # the before/after pair
    assert "Restored 64x64 → 256x256 with OSEDiff" in summary and "no compiling" in summary
    # LFIM's high-frequency gain edits the output latent of any residual-form method: it must change the image.
    _, summary, png = client.predict(image=handle_file(astronaut), lfim_high=2.0, api_name="/restore")
    moved = _png(png)
    assert "lfim_high=2" in summary and "no compiling" in summary  # a traced knob: the same compiled program
    assert np.abs(moved - base).mean() > 0.5  # 8-bit levels


def test_client_sweep_strip(client, astronaut):
    strip, summary = client.predict(image=handle_file(astronaut), sweep_knob="lfim_high", sweep_count=3,
                                    api_name="/sweep")
    assert [s["caption"] for s in strip] == ["lfim_high = 0", "lfim_high = 2", "lfim_high = 4"]
    imgs = [_png(s["image"]) for s in strip]
    assert all(i.shape == (256, 256, 3) for i in imgs) and "no compiling" in summary
    assert np.abs(imgs[0] - imgs[2]).mean() > 0.5


def test_bad_input_is_a_message(client, astronaut, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(AppError, match="notes.png: not a readable image"):
        client.predict(image=handle_file(tmp_path / "notes.png"), api_name="/restore")
    with pytest.raises(AppError, match=r"lfim_high must be in \[0, 4\], got 9"):
        client.predict(image=handle_file(astronaut), lfim_high=9, api_name="/restore")
    with pytest.raises(AppError, match=r"upscale must be in \[1, 16\]"):
        client.predict(image=handle_file(astronaut), upscale=0.5, api_name="/restore")
    Image.fromarray(np.zeros((1100, 1100, 3), np.uint8)).save(tmp_path / "huge.png")  # x4: 19.4 MP > 16.8
    text = client.predict(image=handle_file(tmp_path / "huge.png"), upscale=4, api_name="/estimate")
    assert text.startswith("**Cannot restore this image**") and "over this demo's limit" in text
    with pytest.raises(AppError, match="huge.png: 1100x1100 x4 would be a 4400x4400 output"):
        client.predict(image=handle_file(tmp_path / "huge.png"), api_name="/restore")
    # Large but allowed: the tiling plan and a time estimate (scaled from the measured warm-up) before any work.
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(tmp_path / "large.png")
    text = client.predict(image=handle_file(tmp_path / "large.png"), upscale=8, api_name="/estimate")
    assert "**1600x1600** output" in text and "VAE encode staged" in text
    assert "Estimated time" in text and "plus compiling for this size first" in text


def test_cli_flags_and_errors(tmp_path, capsys):
    from jsr import infer

    def options(parser, title):
        group = next(g for g in parser._action_groups if g.title.startswith(title))
        return {s for a in group._group_actions for s in a.option_strings}

    # The model flags are python -m jsr.infer's, and so are the knob flags.
    assert options(infer.build_parser(), "model") == options(cli.build_parser(), "model")
    knob_flags = {s for a in infer.build_parser()._actions for s in a.option_strings if a.dest.startswith("knob_")}
    assert knob_flags <= {s for a in cli.build_parser()._actions for s in a.option_strings}
    assert cli.main(["--model", str(tmp_path / "nowhere"), "--warmup", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nowhere" in err[0]
    assert cli.main(["--t", "3"]) == 2
    assert "t must be in [0, 1]" in capsys.readouterr().err
    with socket.socket() as busy:  # a taken port is refused before the model loads
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert cli.main(["--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def _browser():
    """A headless Chromium through Selenium, or pytest.skip naming what is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"no {' / '.join(missing)}: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the demo extra)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--hide-scrollbars"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _small_png(src: Path, dst: Path) -> None:
    """A copy of a screenshot as a 128-colour palette PNG (the README's image stays well under 200 KB)."""
    with Image.open(src) as im:
        im.convert("RGB").quantize(128, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)


def test_browser_upload_slider_output(demo, astronaut, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(demo.url)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#jsr-input input[type=file]"))
        upload.send_keys(str(astronaut))
        wait.until(lambda d: "**256x256**" in d.find_element(By.ID, "jsr-estimate").get_attribute("innerHTML")
                   .replace("<strong>", "**").replace("</strong>", "**"))
        # Drag lfim_high's slider with the mouse, from 0 to about a third of its track: releasing it restores
        # again (no Restore click), and the page says with which value.
        slider = driver.find_element(By.CSS_SELECTOR, "#knob-lfim_high input[type=range]")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", slider)
        width = slider.size["width"]
        ActionChains(driver).move_to_element_with_offset(slider, -width // 2 + 2, 0).click_and_hold() \
            .move_by_offset(width // 3, 0).release().perform()
        value = float(slider.get_attribute("value"))
        assert 0.5 < value < 2.5
        wait.until(lambda d: f"lfim_high={value:g}" in d.find_element(By.ID, "jsr-status").text)
        images = wait.until(lambda d: [i for i in d.find_elements(By.CSS_SELECTOR, "#jsr-compare img")
                                       if i.get_attribute("complete") == "true"
                                       and int(i.get_attribute("naturalWidth") or 0) == 256])
        assert len(images) == 2  # before and after, at the output's full size
        assert "no compiling" in driver.find_element(By.ID, "jsr-status").text
        driver.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "demo.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    with Image.open(shot) as im:
        assert im.size[0] == 1280
    if os.environ.get("JSR_DEMO_SCREENSHOT"):
        _small_png(shot, Path(os.environ["JSR_DEMO_SCREENSHOT"]))
