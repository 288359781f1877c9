"""Overlays for a reader: image | phrase | predicted mask and ground truth, from a predictions file."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from unires_jax.data import pipeline, records as records_lib
from unires_jax.eval import predictions as predictions_lib


def write_overlays(split_dir: str, predictions_path: str, out_dir: str, count: int = 6) -> list[str]:
  """PNGs of image | phrase | predicted mask (red) and ground truth (green outline) for the first samples."""
  os.makedirs(out_dir, exist_ok=True)
  source = records_lib.SplitSource(split_dir)
  by_key = {prediction.key: prediction for _, prediction in predictions_lib.iter_predictions(predictions_path)}
  written = []
  step = max(1, len(source) // count)
  for index in range(0, len(source), step):
    sample = source.sample(index)
    ids = sample["ids"]
    prediction = by_key.get((ids["ref_id"], ids["sent_id"]))
    if prediction is None:
      continue
    image = np.asarray(pipeline.decode_image(sample["record"]), np.float32)
    pred = prediction.predicted_mask()
    gt = records_lib.ground_truth_mask(sample["record"], sample["ref"])
    overlay = image.copy()
    overlay[pred] = 0.5 * overlay[pred] + 0.5 * np.array([255, 0, 0])
    edge = gt & ~(np.roll(gt, 1, 0) & np.roll(gt, -1, 0) & np.roll(gt, 1, 1) & np.roll(gt, -1, 1))
    overlay[edge] = [0, 255, 0]
    # Small images (the synthetic set) are enlarged so the overlay is readable.
    zoom = max(1, 384 // max(image.shape[:2]))
    height, width = image.shape[0] * zoom, image.shape[1] * zoom
    enlarge = lambda a: Image.fromarray(a.astype(np.uint8)).resize((width, height), Image.NEAREST)
    canvas = Image.new("RGB", (width * 2, height + 28), (255, 255, 255))
    canvas.paste(enlarge(image), (0, 28))
    canvas.paste(enlarge(overlay), (width, 28))
    answer = "no target" if prediction.no_target else "mask"
    ImageDraw.Draw(canvas).text((4, 8), f"{sample['sentence']['sent']}  -> {answer}", fill=(0, 0, 0))
    path = os.path.join(out_dir, f"overlay_{ids['ref_id']}_{ids['sent_id']}.png")
    canvas.save(path)
    written.append(path)
    if len(written) >= count:
      break
  return written
