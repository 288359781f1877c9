"""The demo in a real browser: headless Chromium (Debian's `chromium` package) driven by Playwright's Python API
against `scripts/demo.py` serving the toy run the suite trains (`trained_run`, conftest.py).

The page's mask (downloaded through the page's button) must agree with `scripts/predict.py`'s mask for the same
image and phrase on ≥ 99.9% of pixels; a phrase answered without `[SEG]` must read "no such target"; a file that
is not an image must give the page's error message. The newest checkpoint answers with `[SEG]`, the earliest
(step 3) does not yet, so each outcome is shown by a real model. The run also writes `docs/demo.png` and prints
the seconds from the click on Segment to the shown mask.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import sync_playwright

from scripts import predict as predict_script
from unires_jax.data import datasets

pytestmark = pytest.mark.slow

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's package; never a downloaded browser
SCREENSHOT = os.path.join(REPO, "docs", "demo.png")
START_SECONDS = 600   # checkpoint load and compilation on a busy 2-core machine
RESULT_MS = 300_000   # one request, on the same machine
UPLOAD_TRY_MS = 20_000  # one try of an upload; Gradio's upload can stall on a request race, so it is tried again


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


@contextlib.contextmanager
def _demo_server(checkpoint: str, step: int, out_dir: str):
  """`scripts/demo.py` on 127.0.0.1 at a free port, until its 'demo ready' line; yields the page's URL."""
  port = _free_port()
  process = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "scripts", "demo.py"), "--checkpoint", checkpoint, "--step", str(step),
       "--port", str(port), "--out_dir", out_dir], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      cwd=REPO)
  lines: list[str] = []
  ready = threading.Event()

  def read_output():
    for line in process.stdout:
      lines.append(line)
      if line.startswith("demo ready on"):
        ready.set()

  threading.Thread(target=read_output, daemon=True).start()
  try:
    deadline = time.monotonic() + START_SECONDS
    while not ready.wait(1.0):
      if process.poll() is not None or time.monotonic() > deadline:
        pytest.fail(f"demo did not start (exit code {process.poll()}):\n{''.join(lines[-40:])}")
    yield f"http://127.0.0.1:{port}"
  finally:
    process.terminate()
    try:
      process.wait(timeout=30)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()


def _steps(run: str) -> list[int]:
  return sorted(int(name) for name in os.listdir(os.path.join(run, "checkpoints")) if name.isdigit())


@pytest.fixture(scope="module")
def browser():
  with sync_playwright() as playwright:
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def val_phrases(trained_run):
  """(image path, phrase) of the first object and no-target references of the run's synthetic val split."""
  data_dir = os.path.join(trained_run, "synthetic")
  found = {}
  for record in datasets.DATASETS.lookup("synthetic_grefcoco")(data_dir, "val"):
    for ref in record["refs"]:
      found.setdefault(ref["granularity"], (os.path.join(data_dir, "images", record["file_name"]),
                                            ref["sentences"][0]["sent"]))
  return found


def _field(page, name: str) -> str:
  return page.locator(f"#{name} textarea, #{name} input").first.input_value()


def _upload(page, path: str) -> None:
  """Puts `path` into the upload area and waits until the page lists it.

  Gradio's upload (a POST and an upload-progress stream) occasionally stalls on a busy machine without an error;
  such a try is repeated, and reported, until RESULT_MS have passed.
  """
  name = os.path.basename(path)
  deadline = time.monotonic() + RESULT_MS / 1000
  for attempt in itertools.count(1):
    clear = page.locator("#upload button[aria-label='Clear']")
    if clear.count():  # a file is already there: the upload area comes back once it is cleared
      clear.first.click()
    page.locator("#upload input[type=file]").set_input_files(path, timeout=RESULT_MS)
    try:
      page.locator("#upload").get_by_text(name).wait_for(timeout=UPLOAD_TRY_MS)  # the upload finished
      if attempt > 1:
        print(f"\nupload of {name} was listed on try {attempt}")
      return
    except PlaywrightTimeoutError:
      if time.monotonic() > deadline:
        shown = page.locator("#upload").inner_text(timeout=5_000)
        pytest.fail(f"{name} was not listed in the upload area after {attempt} tries; it shows {shown!r}")


def _submit(page, phrase: str) -> float:
  """Types the phrase, clicks Segment, waits until the result is shown; returns the seconds that took."""
  page.locator("#phrase textarea, #phrase input").first.fill(phrase)
  before = _field(page, "timing")
  started = time.perf_counter()
  page.locator("#submit").click()
  page.wait_for_function("before => { const e = document.querySelector('#timing textarea, #timing input');"
                         " return e && e.value.startsWith('request') && e.value !== before; }", arg=before,
                         timeout=RESULT_MS)
  return time.perf_counter() - started


def _download_mask(page, path: str) -> np.ndarray:
  with page.expect_download(timeout=RESULT_MS) as download:
    page.locator("#download").click()
  download.value.save_as(path)
  return np.asarray(Image.open(path))


def _predict(run: str, step: int, image: str, phrase: str, out: str) -> tuple[dict, np.ndarray]:
  result, = predict_script.main(["--checkpoint", run, "--step", str(step), "--image", image, "--text", phrase,
                                 "--out", out])
  return result, np.asarray(Image.open(out))


def test_page_mask_equals_predict_and_bad_input_gives_messages(trained_run, val_phrases, browser, tmp_path):
  step = _steps(trained_run)[-1]
  image, phrase = val_phrases["object"]
  expected, expected_mask = _predict(trained_run, step, image, phrase, str(tmp_path / "predict.png"))
  assert not expected["no_target"] and expected_mask.any(), (
      f"step {step} answered {expected['answer']!r} without [SEG]: the check below would compare empty masks")
  with _demo_server(trained_run, step, str(tmp_path / "demo")) as url:
    page = browser.new_page(viewport={"width": 1280, "height": 960})
    page.goto(url, timeout=RESULT_MS)
    _upload(page, image)
    seconds = _submit(page, phrase)
    page.locator("#overlay img").wait_for(timeout=RESULT_MS)
    shown = _download_mask(page, str(tmp_path / "page.png"))
    assert shown.shape == expected_mask.shape
    agreement = float(np.mean(shown == expected_mask))
    assert agreement >= 0.999, f"page and scripts/predict.py masks agree on {agreement:.4%} of pixels"
    assert _field(page, "answer") == expected["answer"]
    assert _field(page, "granularity") and "no such target" not in page.locator("#status").inner_text()
    assert f"step {step}" in page.locator("#status").inner_text()
    page.screenshot(path=SCREENSHOT, full_page=True)
    print(f"\ndemo: {seconds:.2f} s from the click on Segment to the shown mask (toy model, step {step}; "
          f"server says {_field(page, 'timing')})")

    # A file that is not an image, then an empty phrase: messages in the page, and the page still answers.
    not_image = tmp_path / "notes.txt"
    not_image.write_text("this is not an image\n")
    _upload(page, str(not_image))
    _submit(page, phrase)
    status = page.locator("#status").inner_text()
    assert "Error:" in status and "'notes.txt' is not an image" in status, status
    _upload(page, image)
    _submit(page, "   ")
    assert "No phrase" in page.locator("#status").inner_text()
    again = _submit(page, phrase)
    np.testing.assert_array_equal(_download_mask(page, str(tmp_path / "again.png")), shown)
    print(f"demo: {again:.2f} s for the same request again, after the error messages")


def test_phrase_answered_without_seg_shows_no_such_target(trained_run, val_phrases, browser, tmp_path):
  step = _steps(trained_run)[0]
  image, phrase = val_phrases["no-target"]
  expected, expected_mask = _predict(trained_run, step, image, phrase, str(tmp_path / "predict.png"))
  assert expected["no_target"], f"step {step} answered {expected['answer']!r} with [SEG]; expected none yet"
  with _demo_server(trained_run, step, str(tmp_path / "demo")) as url:
    page = browser.new_page()
    page.goto(url, timeout=RESULT_MS)
    _upload(page, image)
    _submit(page, phrase)
    assert "no such target" in page.locator("#status").inner_text()
    assert _field(page, "granularity").startswith("no-target")
    assert _field(page, "answer") == expected["answer"]
    shown = _download_mask(page, str(tmp_path / "page.png"))
    assert not shown.any() and not expected_mask.any()
