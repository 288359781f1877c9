"""Segments what a phrase refers to in an image with a trained checkpoint: writes the mask and an overlay PNG.

    python scripts/predict.py --checkpoint runs/toy --image photo.png --text "the left arm of the man in red" \
        --out out.png
    python scripts/predict.py --checkpoint runs/toy --input list.jsonl

`out.png` is the mask (255 on the referred region, 0 elsewhere, at the image's size), `out_overlay.png` the image
with the mask tinted red; the generated answer is printed. An answer without `[SEG]` means "no such target": the
mask is empty. `--input` takes one JSON object per line, `{"image": path, "text": phrase, "out": path}` (optionally
`"boxes"`), run in batches of `--batch_size`.

Boxes: the model reads object and part proposals as tokens. A single image has none, so by default every box slot
is empty (masked); `--boxes '{"object": [[x0, y0, x1, y1], ...], "part": [...]}'` (pixels of the original image, or
a path to such a JSON file) gives detector boxes, as the training records had.
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
  for kind, boxes in value.items():
    array = np.asarray(boxes, np.float32)
    if array.size and (array.ndim != 2 or array.shape[1] != 4):
      raise ValueError(f"{where}: boxes[{kind!r}] must be a list of [x0, y0, x1, y1], got {boxes!r}")
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
  for request in requests:
    if not os.path.isfile(request["image"]):
      raise FileNotFoundError(f"{request['where']}: image {request['image']!r} does not exist")
  return requests


def _load_image(path: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert("RGB"), np.uint8)  # [h, w, 3]
  except OSError as error:
    raise ValueError(f"image {path!r} cannot be read ({error})") from error


def predict(requests: list[dict], checkpoint: str, step: int | None = None, batch_size: int = 8,
            max_new_tokens: int | None = None) -> list[dict]:
  """Runs the checkpoint on every request; writes the PNGs and returns [{image, text, answer, no_target, out,
  overlay}]."""
  from unires_jax import sharding
  from unires_jax.data import tokenizer as tokenizer_lib
  from unires_jax.eval import checkpoint_io, inference, loop
  from unires_jax.train import state as state_lib

  loaded = checkpoint_io.load_checkpoint(checkpoint, step)
  config = loaded.config
  if max_new_tokens is not None:
    config.eval = dict(config.eval.to_dict() if "eval" in config else {}, max_new_tokens=int(max_new_tokens))
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  shards = sharding.batch_size_per_data_shard(mesh)
  padded_size = -(-max(1, int(batch_size)) // shards) * shards  # rounded up to fill the mesh's batch axes
  model = state_lib.build_model(config.model)
  params = inference.place_params(model, config.model, loaded.params, mesh, rules)
  tokenizer = tokenizer_lib.Tokenizer(config.data.tokenizer_path)
  predict_fn = loop.make_predict_fn(model, config, mesh, rules)

  results = []
  for start in range(0, len(requests), padded_size):
    chunk = requests[start:start + padded_size]
    images = [_load_image(r["image"]) for r in chunk]
    batch = inference.make_prompt_batch(config, tokenizer, images, [r["text"] for r in chunk],
                                        [r["boxes"] for r in chunk])
    outputs = predict_fn(params, inference.pad_batch(batch, padded_size))
    masks = inference.masks_to_original(outputs, [image.shape[:2] for image in images])
    answers = inference.decode_answers(outputs["tokens"][:len(chunk)], tokenizer)
    for request, image, mask, answer, has_seg in zip(chunk, images, masks, answers, outputs["has_seg"]):
      os.makedirs(os.path.dirname(os.path.abspath(request["out"])), exist_ok=True)
      Image.fromarray(mask.astype(np.uint8) * 255).save(request["out"])
      overlay = overlay_path(request["out"])
      Image.fromarray(inference.overlay(image, mask)).save(overlay)
      results.append(dict(image=request["image"], text=request["text"], answer=answer, no_target=not bool(has_seg),
                          mask_pixels=int(mask.sum()), out=request["out"], overlay=overlay))
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
  parser.add_argument("--max_new_tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")
  args = parser.parse_args(argv)
  requests = read_requests(args)
  if not os.path.exists(args.checkpoint):
    raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist (expected a training workdir)")
  results = predict(requests, args.checkpoint, args.step, args.batch_size, args.max_new_tokens)
  for result in results:
    outcome = "no target" if result["no_target"] else f"mask of {result['mask_pixels']} pixels"
    print(f"{result['image']}: {result['text']!r} -> {result['answer']!r} ({outcome}); wrote {result['out']} and "
          f"{result['overlay']}")
  return results


if __name__ == "__main__":
  try:
    main()
  except (FileNotFoundError, ValueError) as error:
    print(f"predict.py: error: {error}", file=sys.stderr)
    sys.exit(2)
