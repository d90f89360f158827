"""`standin app` for real: the app is served on 127.0.0.1 (a free port) on the embedded mini model, driven
through gradio_client and through headless Chromium (Debian's chromium and chromium-driver, selenium from
PyPI; no browser download). Bad input gets a readable message in the page and the app keeps serving."""

import os
import shutil
import socket
from pathlib import Path

import pytest

gradio = pytest.importorskip("gradio", reason="the app needs gradio (pip install -e '.[app]')")

from standin import app as standin_app  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REFERENCE = EXAMPLES / "woman_34.png"
PROMPT = "A woman waves on a beach at noon."


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("app_outputs")
    model = standin_app.load_model()  # the installed default: the mini model
    blocks = standin_app.build_app(model, output_dir)
    port = free_port()
    standin_app.launch(blocks, "127.0.0.1", port, output_dir=output_dir, block=False)
    yield f"http://127.0.0.1:{port}/", output_dir
    blocks.close()


def test_size_presets_follow_the_base_config():
    class Config:
        default_width, default_height, default_num_frames = 832, 480, 81

    presets = standin_app.size_presets(Config)
    assert list(presets.values()) == [(832, 480, 81), (480, 832, 81), (832, 480, 41)]
    assert standin_app.size_problem(832, 480, 81) is None
    assert "multiple of 16" in standin_app.size_problem(65, 64, 17)
    assert "4k+1" in standin_app.size_problem(64, 64, 16)


def test_the_module_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, standin.app; "
            "print(sorted(m for m in ('torch', 'gradio', 'diffusers', 'cv2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_gradio_client_generates_and_refuses_impossible_sizes(served):
    from gradio_client import Client, handle_file

    from standin.provenance import read_metadata

    url, output_dir = served
    client = Client(url, verbose=False)
    with pytest.raises(Exception, match="impossible size"):
        client.predict(handle_file(str(REFERENCE)), PROMPT, "", 2, 1.0, False, 3, 65, 64, 17,
                       api_name="/generate")
    video, download, info, seed, gallery, table, summary = client.predict(
        handle_file(str(REFERENCE)), PROMPT, "", 2, 1.0, False, 3, 64, 64, 17, api_name="/generate")
    assert seed == 3 and "seed 3" in info and "FaceSim" in info
    written = sorted(output_dir.glob("*_seed3.mp4"))
    assert written, list(output_dir.iterdir())
    tags = read_metadata(written[-1])
    assert tags["generator"] == "standin" and tags["seed"] == "3" and tags["watermark"].startswith("on")
    assert tags["adapter_sha256"] and tags["prompt"] == PROMPT
    assert Path(video).stat().st_size == written[-1].stat().st_size
    assert table["data"][0][2] == 3


def browser():
    """Headless Chromium through Debian's chromedriver; skipped (failed under CI) when missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, found in (("chromium", chromium), ("chromium-driver", driver)) if not found]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        reason = f"the browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1500", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@pytest.mark.slow
def test_browser_upload_generate_and_bad_input(served, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, output_dir = served
    before = set(output_dir.glob("*.mp4"))
    driver = browser()
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 180)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#reference input[type=file]"))

        def set_number(elem_id, value):
            field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(str(value), Keys.TAB)

        def shown(text):
            return wait.until(lambda d: text in d.find_element(By.TAG_NAME, "body").text)

        # a file that is not an image: a readable message, nothing generated
        bogus = tmp_path / "not_an_image.png"
        bogus.write_text("this is not a picture")
        driver.find_element(By.CSS_SELECTOR, "#reference input[type=file]").send_keys(str(bogus))
        shown("This file cannot be used as a reference")
        driver.save_screenshot(str(tmp_path / "bad_image.png"))
        driver.find_element(By.CSS_SELECTOR, "#reference button[aria-label='Clear']").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#reference input[type=file]"))

        driver.find_element(By.CSS_SELECTOR, "#reference input[type=file]").send_keys(str(REFERENCE))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prepared img"))
        driver.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(PROMPT)
        set_number("steps", 3)
        set_number("guidance", 1)

        # cancel: the progress bar moves per step, Cancel stops at the next step and nothing is written
        set_number("steps", 100)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        shown("denoising")
        driver.save_screenshot(str(tmp_path / "progress.png"))
        driver.find_element(By.CSS_SELECTOR, "#cancel").click()
        shown("Cancelling")
        set_number("steps", 3)

        # an impossible size: the reason in the page, and the app keeps serving
        set_number("width", 65)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        shown("impossible size")
        driver.save_screenshot(str(tmp_path / "impossible_size.png"))
        set_number("width", 64)

        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result video[src]"))
        shown("FaceSim")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery video, #gallery img"))
        # nothing was fetched from anywhere but the app itself (no CDN fonts, no analytics)
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        outside = [name for name in fetched if not name.startswith(("data:", "blob:", url.rstrip("/")))]
        assert not outside, outside
        for close in driver.find_elements(By.CSS_SELECTOR, ".toast-close"):  # the earlier error's toast
            close.click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".toast-body"))
        screenshot = tmp_path / "app.png"
        driver.save_screenshot(str(screenshot))
        if os.environ.get("STANDIN_APP_SCREENSHOT"):
            shutil.copy(screenshot, os.environ["STANDIN_APP_SCREENSHOT"])
    finally:
        driver.quit()
    written = set(output_dir.glob("*.mp4")) - before
    assert len(written) == 1, written
    from standin.video import read_video

    frames = read_video(written.pop())
    assert frames.shape == (17, 64, 64, 3)
    assert screenshot.stat().st_size > 10_000


def test_the_reference_preview_says_why_preprocessing_fell_back(tmp_path):
    """A real base preprocesses references (face crop); with no face in the photo the page says so."""
    pytest.importorskip("dlib", reason="the default face backend needs dlib (pip install -e '.[face]')")
    from types import SimpleNamespace

    from PIL import Image
    from skimage import data

    photo = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(photo)
    config = SimpleNamespace(reference_size=128, preprocess_reference=True)
    image, note = standin_app.prepare_reference(SimpleNamespace(config=config, pipe=None), str(photo))
    assert image.size == (128, 128)
    assert note.startswith("Face preprocessing fell back to the whole image:"), note


def test_the_default_model_comes_from_the_entry_point(monkeypatch):
    import standin.plugins
    from standin.commands import default_model

    class Entry:
        name = "mini"

        def load(self):
            return lambda: {"base": "/models/mini", "adapter": "/models/mini.safetensors"}

    monkeypatch.setattr(standin.plugins, "entry_points", lambda group: [Entry()] if group == "standin.models" else [])
    assert default_model() == {"base": "/models/mini", "adapter": "/models/mini.safetensors"}
    monkeypatch.setattr(standin.plugins, "entry_points", lambda group: [])
    with pytest.raises(FileNotFoundError, match="no default model is installed"):
        standin_app.load_model()
