"""The Gradio page: upload an image (or pick an example), type a phrase, see the mask, download it.

`DemoPage` answers the page's events with plain values, so it runs without a browser; `build_blocks` lays the
page out around it and `launch` serves it with a queue in front of the one warm model (one request at a time).
Every failure becomes a message in the page: a request never raises into Gradio and never hangs.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time
from typing import Any, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a demo on a closed network

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from unires_jax.demo import answer as answer_lib  # noqa: E402
from unires_jax.demo import inputs  # noqa: E402
from unires_jax.demo.examples import Example  # noqa: E402

log = logging.getLogger(__name__)

# System fonts only: the default theme's web fonts would be fetched from the internet.
THEME_FONTS = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


@dataclasses.dataclass(frozen=True)
class PageResult:
  """What one request shows: every field is displayed, none is None except the images and the mask file."""
  overlay: np.ndarray | None  # uint8 [h, w, 3]
  answer: str
  granularity: str
  status: str                 # Markdown: the outcome, notes (downscaled, truncated) and how it was made
  timing: str
  mask_path: str | None


class DemoPage:
  """The page's event handlers around a model with `_run_model`, `fit_phrase` and `describe` (session.DemoModel)."""

  def __init__(self, model, out_dir: str, max_image_side: int = inputs.DEFAULT_MAX_IMAGE_SIDE):
    self.model = model
    self.out_dir = out_dir
    self.max_image_side = int(max_image_side)
    self._request_numbers = itertools.count(1)
    self._lock = threading.Lock()  # the queue already serialises requests; this keeps direct callers safe too
    os.makedirs(out_dir, exist_ok=True)

  def preview(self, upload: str | None) -> tuple[np.ndarray | None, str]:
    """The uploaded image as the model will see it, or the reason it cannot be used."""
    if not upload:
      return None, ""
    try:
      image = inputs.load_upload(upload, self.max_image_side)
    except inputs.DemoInputError as error:
      return None, f"**Error:** {error}"
    return answer_lib.enlarge_for_display(image.pixels), image.note

  def segment(self, upload: str | None, phrase: str | None, draw_proposals: bool = False) -> PageResult:
    """One request, start to end; errors become the status message."""
    number = next(self._request_numbers)
    started = time.perf_counter()
    try:
      image = inputs.load_upload(upload, self.max_image_side)
      fitted = self.model.fit_phrase(inputs.check_phrase(phrase))
      with self._lock:
        model_started = time.perf_counter()
        output = self.model._run_model(image.pixels, fitted.text)
        model_seconds = time.perf_counter() - model_started
    except inputs.DemoInputError as error:
      return self._failure(number, started, f"**Error:** {error}")
    except Exception as error:  # noqa: BLE001 (the page must answer whatever went wrong)
      log.exception("request %d failed", number)
      return self._failure(number, started, f"**Internal error** ({type(error).__name__}: {error}). The demo keeps "
                                            f"running; the server log has the traceback.")
    mask_path = answer_lib.save_mask_png(output.mask, os.path.join(self.out_dir, f"mask_{number:06d}.png"))
    overlay = answer_lib.enlarge_for_display(
        answer_lib.overlay_image(image.pixels, output.mask, output.proposals if draw_proposals else None))
    notes = [note for note in (image.note, fitted.note) if note]
    if draw_proposals:
      counts = (len(output.proposals.object_boxes), len(output.proposals.part_boxes))
      notes.append(f"Proposals drawn: {counts[0]} object boxes (cyan), {counts[1]} part boxes (amber)."
                   if any(counts) else "No proposal boxes to draw: the model read none.")
    status = [_outcome(output)] + notes + [f"Made with {self.model.describe()}."]
    seconds = time.perf_counter() - started
    return PageResult(overlay=overlay, answer=output.answer,
                      granularity=answer_lib.implied_granularity(output.has_seg, output.mask, output.proposals),
                      status="\n\n".join(status),
                      timing=f"request {number}: {seconds:.2f} s on the server (model {model_seconds:.2f} s)",
                      mask_path=mask_path)

  def _failure(self, number: int, started: float, message: str) -> PageResult:
    seconds = time.perf_counter() - started
    return PageResult(overlay=None, answer="", granularity="", status=message,
                      timing=f"request {number}: {seconds:.2f} s on the server (no result)", mask_path=None)


def _outcome(output) -> str:
  if not output.has_seg:
    return f"The answer has no [SEG]: **{answer_lib.NO_TARGET}** in this image (the mask is empty)."
  pixels = int(output.mask.sum())
  return f"Mask of {pixels} pixels ({100 * pixels / output.mask.size:.1f}% of the image)."


def build_blocks(page: DemoPage, examples: Sequence[Example]) -> gr.Blocks:
  """The page's layout and events."""
  with gr.Blocks(title="unires_jax: referring segmentation") as blocks:
    gr.Markdown("## unires_jax: segment what a phrase refers to\n"
                f"One object, several, a part of one, or nothing. Model: {page.model.describe()}.")
    with gr.Row():
      with gr.Column():
        upload = gr.File(label="Image file (PNG, JPEG, …)", file_count="single", type="filepath", elem_id="upload")
        preview = gr.Image(label="Image", interactive=False, format="png", height=240, elem_id="preview")
        phrase = gr.Textbox(label="Phrase", placeholder="the roof of the green house", max_lines=3,
                            elem_id="phrase")
        draw_proposals = gr.Checkbox(label="Draw the proposal boxes the model read", value=False,
                                     elem_id="draw-proposals")
        submit = gr.Button("Segment", variant="primary", elem_id="submit")
        gr.Examples(examples=[[e.image, e.phrase] for e in examples], inputs=[upload, phrase],
                    example_labels=[f"{e.granularity}: {e.phrase}" for e in examples], label="Examples")
      with gr.Column():
        overlay = gr.Image(label="Mask (red) over the image", interactive=False, format="png", height=320,
                           elem_id="overlay")
        status = gr.Markdown(elem_id="status")
        answer = gr.Textbox(label="Generated answer", interactive=False, elem_id="answer")
        granularity = gr.Textbox(label="Granularity the answer implies", interactive=False, elem_id="granularity")
        timing = gr.Textbox(label="Time taken", interactive=False, elem_id="timing")
        download = gr.DownloadButton("Download the mask PNG", interactive=False, elem_id="download")

    def on_segment(upload_path, phrase_text, draw):
      result = page.segment(upload_path, phrase_text, bool(draw))
      button = gr.DownloadButton(value=result.mask_path, interactive=result.mask_path is not None)
      return result.overlay, result.status, result.answer, result.granularity, result.timing, button

    outputs = [overlay, status, answer, granularity, timing, download]
    upload.change(page.preview, inputs=upload, outputs=[preview, status])
    for event in (submit.click, phrase.submit):
      event(on_segment, inputs=[upload, phrase, draw_proposals], outputs=outputs, concurrency_limit=1)
  return blocks


def launch(page: DemoPage, examples: Sequence[Example], host: str = "127.0.0.1", port: int = 7860,
           queue_size: int = 32, max_file_size: str = "50mb", block: bool = True) -> Any:
  """Serves the page; requests wait in a queue of at most `queue_size` and run one at a time."""
  blocks = build_blocks(page, examples).queue(default_concurrency_limit=1, max_size=queue_size)
  allowed = sorted({page.out_dir, *(os.path.dirname(e.image) for e in examples)})
  blocks.launch(server_name=host, server_port=port, prevent_thread_lock=not block, ssr_mode=False,
                allowed_paths=allowed, max_file_size=max_file_size, theme=gr.themes.Default(**THEME_FONTS),
                footer_links=[], quiet=True)
  return blocks
