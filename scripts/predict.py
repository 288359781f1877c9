"""Segments what a phrase refers to in an image with a trained checkpoint: writes the mask and an overlay PNG.

    python scripts/predict.py --checkpoint runs/toy --image photo.png --text "the left arm of the man in red" \
        --out out.png
    python scripts/predict.py --checkpoint runs/toy --input list.jsonl

`out.png` is the mask (255 on the referred region, 0 elsewhere, at the image's size), `out_overlay.png` the image
with the mask tinted red; the generated answer is printed. An answer without `[SEG]` means "no such target": the
mask is empty. `--input` takes one JSON object per line, `{"image": path, "text": phrase, "out": path}` (optionally
`"boxes"`), run in batches of `--batch_size`.

Boxes: the model reads object and part proposals as tokens. `--boxes '{"object": [[x0, y0, x1, y1], ...], "part":
[...]}'` (pixels of the original image, or a path to such a JSON file) gives them; without it the run's configured
proposal source computes them (the run config's `proposals` section; `none`, every slot masked, when the run has
none or names the ground-truth source, with a printed note). The boxes used are printed and outlined in the overlay
(objects yellow, parts cyan). `unires_jax.eval.predictor.Predictor` does the work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def overlay_path(out: str) -> str:
  """`dir/name.png` → `dir/name_overlay.png`."""
  stem, ext = os.path.splitext(out)
  return f"{stem}_overlay{ext or '.png'}"


def _parse_boxes(value, where: str) -> dict | None:
  if value in (None, ""):
    return None
  if isinstance(value, str):
    text = value
    if not value.lstrip().startswith("{"):
      if not os.path.isfile(value):
        raise FileNotFoundError(f"{where}: boxes file {value!r} does not exist (expected a JSON object or a file)")
      with open(value) as f:
        text = f.read()
    try:
      value = json.loads(text)
    except json.JSONDecodeError as error:
      raise ValueError(f"{where}: boxes are not valid JSON ({error})") from error
  if not isinstance(value, dict) or set(value) - {"object", "part"}:
    raise ValueError(f"{where}: boxes must be an object with keys 'object' and/or 'part', got {value!r}")
  from unires_jax.data import inputs
  for kind, boxes in value.items():
    inputs.check_boxes(boxes, f"{where}: boxes[{kind!r}]")
  return value


def read_requests(args) -> list[dict]:
  """[{image, text, out, boxes}] from the flags or the --input file; every image must exist."""
  if args.input:
    if args.image or args.text or args.out:
      raise ValueError("--input lists the images; do not also pass --image / --text / --out")
    if not os.path.isfile(args.input):
      raise FileNotFoundError(f"--input file {args.input!r} does not exist")
    requests = []
    with open(args.input) as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{args.input} line {number}"
        try:
          entry = json.loads(line)
        except json.JSONDecodeError as error:
          raise ValueError(f"{where}: not valid JSON ({error})") from error
        missing = [k for k in ("image", "text", "out") if not isinstance(entry.get(k), str) or not entry.get(k)]
        if missing:
          raise ValueError(f"{where}: field(s) {missing} missing; expected {{\"image\", \"text\", \"out\"}}")
        unknown = set(entry) - {"image", "text", "out", "boxes"}
        if unknown:
          raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
        requests.append(dict(image=entry["image"], text=entry["text"], out=entry["out"],
                             boxes=_parse_boxes(entry.get("boxes"), where), where=where))
  else:
    missing = [name for name in ("image", "text", "out") if not getattr(args, name)]
    if missing:
      raise ValueError(f"missing --{', --'.join(missing)} (or pass --input list.jsonl)")
    requests = [dict(image=args.image, text=args.text, out=args.out, boxes=_parse_boxes(args.boxes, "--boxes"),
                     where="--image")]
  if not requests:
    raise ValueError(f"--input file {args.input!r} lists no images")
  from unires_jax.data import inputs
  for request in requests:
    inputs.clean_phrase(request["text"], "--text" if request["where"] == "--image" else request["where"])
    if not os.path.isfile(request["image"]):
      raise FileNotFoundError(f"{request['where']}: image {request['image']!r} does not exist")
  return requests


def _load_image(path: str) -> np.ndarray:
  from unires_jax.data import images
  return images.load_image(path)  # [h, w, 3] uint8, upright (EXIF), any mode


def _format_boxes(boxes: dict) -> str:
  shown = {kind: [[round(v, 1) for v in box] for box in boxes[kind]] for kind in ("object", "part")}
  return (f"{len(shown['object'])} object and {len(shown['part'])} part boxes from {boxes['source']}: "
          f"object {shown['object']}, part {shown['part']}")


def predict(requests: list[dict], checkpoint: str, step: int | None = None, batch_size: int = 8,
            max_new_tokens: int | None = None) -> list[dict]:
  """Runs the checkpoint on every request; writes the PNGs and returns [{image, text, answer, no_target, invalid,
  boxes, mask_pixels, out, overlay}]."""
  from unires_jax.eval import inference, predictor as predictor_lib

  predictor = predictor_lib.Predictor(checkpoint, step=step, batch_size=batch_size, max_new_tokens=max_new_tokens)
  if any(request["boxes"] is None for request in requests):
    print(f"predict.py: boxes not given: {predictor.source_note}")
  images = [_load_image(r["image"]) for r in requests]
  outputs = predictor.predict(images, [r["text"] for r in requests], [r["boxes"] for r in requests],
                              ["--text" if r["where"] == "--image" else r["where"] for r in requests])
  results = []
  for request, image, output in zip(requests, images, outputs):
    os.makedirs(os.path.dirname(os.path.abspath(request["out"])), exist_ok=True)
    Image.fromarray(output.mask.astype(np.uint8) * 255).save(request["out"])
    overlay = overlay_path(request["out"])
    Image.fromarray(inference.overlay(image, output.mask, boxes=output.proposals)).save(overlay)
    results.append(dict(image=request["image"], text=request["text"], answer=output.answer,
                        no_target=output.no_target, invalid=output.invalid, boxes=output.proposals,
                        mask_pixels=int(output.mask.sum()), out=request["out"], overlay=overlay))
  return results


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="training workdir, its checkpoints/ or checkpoints/<step>")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--image", default="", help="image file")
  parser.add_argument("--text", default="", help="referring expression")
  parser.add_argument("--out", default="", help="mask PNG to write; the overlay goes to <out>_overlay.png")
  parser.add_argument("--boxes", default="", help="JSON {'object': [[x0,y0,x1,y1],...], 'part': [...]} or a file")
  parser.add_argument("--input", default="", help="JSONL of {image, text, out[, boxes]} to run in batches")
  parser.add_argument("--batch_size", type=int, default=8, help="images per batch (rounded up to the mesh)")
  parser.add_argument("--max_new_tokens", type=int, default=None, help="default: the run's generation.max_new_tokens")
  args = parser.parse_args(argv)
  requests = read_requests(args)
  if not os.path.exists(args.checkpoint):
    raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist (expected a training workdir)")
  results = predict(requests, args.checkpoint, args.step, args.batch_size, args.max_new_tokens)
  for result in results:
    outcome = ("invalid answer, no mask" if result["invalid"] else "no target" if result["no_target"]
               else f"mask of {result['mask_pixels']} pixels")
    print(f"{result['image']}: {result['text']!r} -> {result['answer']!r} ({outcome}); wrote {result['out']} and "
          f"{result['overlay']}")
    print(f"  boxes: {_format_boxes(result['boxes'])}")
  return results


if __name__ == "__main__":
  from unires_jax import cli
  cli.run_main(main, "predict.py")
