"""A synthetic multi-granularity RES set written in the real dataset layouts, small enough to learn in minutes.

Scenes hold one to three coloured objects (house: roof/door/window, robot: head/arm/leg, tree: trunk/crown) drawn
as PIL polygons on a plain background. Expressions cover one object ("the red house on the left"), several
("all blue robots"), a part ("the roof of the green house") and nothing ("the yellow tree" when none is there).
The same scenes are written as the refer layout, gRefCOCO, CRIS (RefCOCOm-like) and MRES-32M, so every reader
runs on them. Deterministic for a seed.

    python -m unires_jax.data.synthetic --out /tmp/synthetic --num-images 64 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from unires_jax.data import readers

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (235, 205, 40)}
CATEGORIES = ("house", "robot", "tree")
PARTS = {"house": ("roof", "door", "window"), "robot": ("head", "arm", "leg"), "tree": ("trunk", "crown")}
COLUMNS = ("left", "middle", "right")
# Split of image i is SPLIT_CYCLE[i % 10]: every split has an image once there are six.
SPLIT_CYCLE = ("train", "val", "train", "testA", "train", "testB", "train", "train", "train", "train")
BACKGROUND = (200, 200, 200)
CRIS_NAME = "synthetic_m"
GROUP_REF_ID_START = 1_000_000  # multi-object and no-target refs; object/part refs use their ann_id as ref_id
MARKER = "synthetic_done.json"
NO_TARGET_REFS_PER_IMAGE = 3  # a near miss and two other absent colour-category pairs


def _rect(x0, y0, x1, y1) -> list[float]:
  return [x0, y0, x1, y0, x1, y1, x0, y1]


def _shade(colour, factor) -> tuple[int, int, int]:
  return tuple(int(c * factor) for c in colour)


def _components(category: str, x0: float, y0: float, s: float, colour) -> list[tuple[str | None, list, tuple]]:
  """(part name or None for the unnamed body, [flat polygons], fill colour) in drawing order."""
  dark = _shade(colour, 0.55)
  if category == "house":
    return [
        (None, [_rect(x0, y0 + 0.4 * s, x0 + s, y0 + s)], colour),
        ("roof", [[x0, y0 + 0.4 * s, x0 + 0.5 * s, y0, x0 + s, y0 + 0.4 * s]], dark),
        ("door", [_rect(x0 + 0.4 * s, y0 + 0.68 * s, x0 + 0.6 * s, y0 + s)], (60, 40, 20)),
        ("window", [_rect(x0 + 0.1 * s, y0 + 0.5 * s, x0 + 0.3 * s, y0 + 0.68 * s)], (245, 245, 245)),
    ]
  if category == "robot":
    return [
        (None, [_rect(x0 + 0.3 * s, y0 + 0.3 * s, x0 + 0.7 * s, y0 + 0.68 * s)], colour),
        ("head", [_rect(x0 + 0.35 * s, y0, x0 + 0.65 * s, y0 + 0.28 * s)], dark),
        ("arm", [_rect(x0 + 0.08 * s, y0 + 0.32 * s, x0 + 0.28 * s, y0 + 0.42 * s),
                 _rect(x0 + 0.72 * s, y0 + 0.32 * s, x0 + 0.92 * s, y0 + 0.42 * s)], (90, 90, 90)),
        ("leg", [_rect(x0 + 0.33 * s, y0 + 0.7 * s, x0 + 0.45 * s, y0 + s),
                 _rect(x0 + 0.55 * s, y0 + 0.7 * s, x0 + 0.67 * s, y0 + s)], (40, 40, 40)),
    ]
  if category == "tree":
    cx, cy, r = x0 + 0.5 * s, y0 + 0.33 * s, 0.33 * s
    crown = []
    for k in range(10):
      angle = 2 * np.pi * k / 10
      crown += [cx + r * np.cos(angle), cy + r * np.sin(angle)]
    return [
        ("trunk", [_rect(x0 + 0.42 * s, y0 + 0.64 * s, x0 + 0.58 * s, y0 + s)], (110, 70, 30)),
        ("crown", [crown], colour),
    ]
  raise ValueError(f"unknown synthetic category {category!r}; expected one of {CATEGORIES}")


def _polygon_rle(polygons: Sequence[Sequence[float]], height: int, width: int) -> dict:
  rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
  return mask_utils.merge(rles)


def _bbox_xywh(polygons) -> list[float]:
  xs = np.concatenate([np.asarray(p[0::2]) for p in polygons])
  ys = np.concatenate([np.asarray(p[1::2]) for p in polygons])
  return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())]


def _round_polygons(polygons) -> list[list[float]]:
  return [[round(float(v), 2) for v in p] for p in polygons]


def make_scene(rng: random.Random, height: int, width: int) -> list[dict]:
  """Objects of one image: category, colour, column, and components with polygons."""
  num_objects = rng.choice((1, 2, 2, 3, 3))
  columns = sorted(rng.sample(range(3), num_objects))
  same_category = rng.random() < 0.4
  shared = rng.choice(CATEGORIES)
  cell = width / 3
  size = min(cell, height) * 0.8
  objects = []
  for column in columns:
    category = shared if same_category else rng.choice(CATEGORIES)
    colour = rng.choice(list(COLOURS))
    x0 = column * cell + (cell - size) / 2 + rng.uniform(-0.05, 0.05) * size
    y0 = rng.uniform(0.05 * height, height - size - 0.05 * height) if height > size * 1.1 else (height - size) / 2
    components = [(part, _round_polygons(polys), fill)
                  for part, polys, fill in _components(category, x0, y0, size, COLOURS[colour])]
    objects.append({"category": category, "colour": colour, "column": COLUMNS[column], "components": components})
  return objects


def _where(column: str) -> str:
  return "in the middle" if column == "middle" else f"on the {column}"


def describe_scene(objects: list[dict], rng: random.Random) -> list[dict]:
  """Refs over the scene: {kind, targets: [(object index, part or None)], sentences: [str]}."""
  refs = []
  counts = {}
  for obj in objects:
    key = (obj["colour"], obj["category"])
    counts[key] = counts.get(key, 0) + 1
  names = []
  for obj in objects:
    base = f"{obj['colour']} {obj['category']}"
    unique = counts[(obj["colour"], obj["category"])] == 1
    names.append((f"the {base}", unique))
  for i, obj in enumerate(objects):
    name, unique = names[i]
    located = f"{name} {_where(obj['column'])}"
    sentences = [name, located] if unique else [located]
    refs.append({"kind": "object", "targets": [(i, None)], "sentences": sentences})
    for part in PARTS[obj["category"]]:
      refs.append({"kind": "part", "targets": [(i, part)], "sentences": [f"the {part} of {name if unique else located}"]})
  for (colour, category), count in sorted(counts.items()):
    if count >= 2:
      members = [(i, None) for i, o in enumerate(objects) if (o["colour"], o["category"]) == (colour, category)]
      refs.append({"kind": "multi-object", "targets": members, "sentences": [f"all {colour} {category}s"]})
  for category in CATEGORIES:
    members = [(i, None) for i, o in enumerate(objects) if o["category"] == category]
    if len(members) >= 2 and len({objects[i]["colour"] for i, _ in members}) > 1:
      refs.append({"kind": "multi-object", "targets": members, "sentences": [f"all {category}s"]})
  # No target: a near miss first (a category in the scene in a colour it does not have there), then other absent
  # colours and categories, so that "the <colour> <category>" must be checked against the image.
  absent = [(c, k) for c in COLOURS for k in CATEGORIES if (c, k) not in counts]
  present_categories = {k for _, k in counts}
  near_misses = [pair for pair in absent if pair[1] in present_categories]
  chosen = [rng.choice(near_misses)]
  chosen += rng.sample([pair for pair in absent if pair != chosen[0]], NO_TARGET_REFS_PER_IMAGE - 1)
  for colour, category in chosen:
    refs.append({"kind": "no-target", "targets": [], "sentences": [f"the {colour} {category}"]})
  return refs


def _draw(objects: list[dict], height: int, width: int) -> Image.Image:
  image = Image.new("RGB", (width, height), BACKGROUND)
  draw = ImageDraw.Draw(image)
  for obj in objects:
    for _, polygons, fill in obj["components"]:
      for polygon in polygons:
        draw.polygon(list(zip(polygon[0::2], polygon[1::2])), fill=fill)
  return image


def generate(out_dir: str, num_images: int = 32, seed: int = 0, image_size: tuple[int, int] = (96, 128)) -> str:
  """Writes the synthetic set under `out_dir` in all four layouts (see data/README.md); returns `out_dir`."""
  height, width = image_size
  rng = random.Random(seed)
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  categories = [{"id": k + 1, "name": name, "supercategory": "thing"} for k, name in enumerate(CATEGORIES)]
  category_id = {c["name"]: c["id"] for c in categories}
  images, instances, refer_refs, grefs = [], [], [], []
  cris: dict[str, list] = {}
  mres: dict[str, list] = {}
  next_ann, next_group_ref, next_sent = 1, GROUP_REF_ID_START, 1
  for i in range(num_images):
    image_id = i + 1
    split = SPLIT_CYCLE[i % len(SPLIT_CYCLE)]
    file_name = f"synthetic_{image_id:06d}.png"
    objects = make_scene(rng, height, width)
    _draw(objects, height, width).save(os.path.join(out_dir, "images", file_name))
    images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    # Annotations: each object (union of its components) and each named part.
    object_ann, part_ann, mres_anns = {}, {}, []
    for o, obj in enumerate(objects):
      polygons = [p for _, polys, _ in obj["components"] for p in polys]
      object_ann[o] = {"id": next_ann, "polygons": polygons}
      instances.append({"id": next_ann, "image_id": image_id, "category_id": category_id[obj["category"]],
                        "segmentation": polygons, "bbox": _bbox_xywh(polygons), "iscrowd": 0,
                        "area": float(mask_utils.area(_polygon_rle(polygons, height, width)))})
      mres_anns.append({"id": next_ann, "category": obj["category"], "granularity": "object", "parent_id": None,
                        "polygons": polygons})
      object_id = next_ann
      next_ann += 1
      for part, polys, _ in obj["components"]:
        if part is not None:
          part_ann[(o, part)] = {"id": next_ann, "polygons": polys}
          mres_anns.append({"id": next_ann, "category": f"{obj['category']} {part}", "granularity": "part",
                            "parent_id": object_id, "polygons": polys})
          next_ann += 1
    captions: dict[int, list] = {}
    for ref in describe_scene(objects, rng):
      sentences = []
      for text in ref["sentences"]:
        sentences.append({"sent_id": next_sent, "sent": text, "raw": text, "tokens": text.split()})
        next_sent += 1
      sent_ids = [s["sent_id"] for s in sentences]
      kind = ref["kind"]
      if kind in ("object", "part"):
        (o, part), = ref["targets"]
        ann = object_ann[o] if kind == "object" else part_ann[(o, part)]
        ref_id = ann["id"]
        captions.setdefault(ann["id"], []).extend({"caption_id": s["sent_id"], "text": s["sent"]} for s in sentences)
        mask = mask_utils.decode(_polygon_rle(ann["polygons"], height, width))
        Image.fromarray(mask * 255).save(_cris_mask_path(out_dir, ref_id))
        x, y, w, h = _bbox_xywh(ann["polygons"])
        cris.setdefault(split, []).append({
            "bbox": [x, y, x + w, y + h], "cat": objects[o]["category"] if kind == "object" else part,
            "segment_id": ref_id, "img_name": file_name, "sentences_num": len(sentences),
            "sentences": [{"idx": k, "sent_id": s["sent_id"], "sent": s["sent"]} for k, s in enumerate(sentences)]})
      else:
        ref_id = next_group_ref
        next_group_ref += 1
      if kind == "part":
        continue
      ann_ids = [object_ann[o]["id"] for o, _ in ref["targets"]] or [-1]
      cat_ids = [category_id[objects[o]["category"]] for o, _ in ref["targets"]] or [-1]
      grefs.append({"ref_id": ref_id, "image_id": image_id, "ann_id": ann_ids, "category_id": cat_ids,
                    "split": split, "no_target": kind == "no-target", "sentences": sentences, "sent_ids": sent_ids,
                    "file_name": file_name})
      if kind == "object":
        refer_refs.append({"ref_id": ref_id, "ann_id": ann_ids[0], "image_id": image_id,
                           "category_id": cat_ids[0], "split": split, "sentences": sentences,
                           "sent_ids": sent_ids, "file_name": file_name})
    mres.setdefault(split, []).append({
        "image": {"image_id": image_id, "file_name": file_name, "height": height, "width": width},
        "annotations": [{"id": a["id"], "category": a["category"], "granularity": a["granularity"],
                         "parent_id": a["parent_id"], "bbox": _bbox_xywh(a["polygons"]),
                         "segmentation": _rle_json(_polygon_rle(a["polygons"], height, width)),
                         "captions": captions.get(a["id"], [])} for a in mres_anns]})
  instances_json = {"images": images, "annotations": instances, "categories": categories}
  _write_json(os.path.join(out_dir, "refer", "instances.json"), instances_json)
  with open(os.path.join(out_dir, "refer", "refs(unc).p"), "wb") as f:
    pickle.dump(refer_refs, f, protocol=2)
  _write_json(os.path.join(out_dir, "grefcoco", "instances.json"), instances_json)
  _write_json(os.path.join(out_dir, "grefcoco", "grefs(unc).json"), grefs)
  for split, entries in cris.items():
    _write_json(os.path.join(out_dir, "cris", "anns", CRIS_NAME, f"{split}.json"), entries)
  for split, files in mres.items():
    for content in files:
      _write_json(os.path.join(out_dir, "mres32m", "annotations", split, f"{content['image']['image_id']}.json"),
                  content)
  _write_json(os.path.join(out_dir, MARKER), {"num_images": num_images, "seed": seed,
                                              "image_size": [height, width]})
  return out_dir


def _rle_json(rle: dict) -> dict:
  return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _cris_mask_path(out_dir: str, segment_id: int) -> str:
  folder = os.path.join(out_dir, "cris", "masks", CRIS_NAME)
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, f"{segment_id}.png")


def _write_json(path: str, content) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  temp = f"{path}.tmp-{os.getpid()}"
  with open(temp, "w") as f:
    json.dump(content, f)
  os.replace(temp, path)


def ensure_synthetic(out_dir: str, num_images: int = 32, seed: int = 0,
                     image_size: tuple[int, int] = (96, 128)) -> str:
  """Generates the set into `out_dir` unless a finished set with the same settings is already there."""
  marker = os.path.join(out_dir, MARKER)
  wanted = {"num_images": num_images, "seed": seed, "image_size": list(image_size)}
  if os.path.exists(marker):
    with open(marker) as f:
      if json.load(f) == wanted:
        return out_dir
  return generate(out_dir, num_images=num_images, seed=seed, image_size=tuple(image_size))


def _register_layouts() -> None:
  """The set's four layouts as readers (`synthetic_refer`, `synthetic_grefcoco`, `synthetic_cris`, `synthetic_mres`)
  over one root, the folder `generate` wrote."""
  parts = tuple(sorted({p for names in PARTS.values() for p in names}))
  layouts = {"synthetic_refer": (readers.read_refer, readers._refer_sources, "refer", dict(split_by="unc")),
             "synthetic_grefcoco": (readers.read_grefcoco, readers._grefcoco_sources, "grefcoco", dict(split_by="unc")),
             "synthetic_cris": (readers.read_cris, readers._cris_sources, "cris",
                                dict(name=CRIS_NAME, part_categories=parts)),
             "synthetic_mres": (readers.read_mres, readers._mres_sources, "mres32m", {})}
  for name, (read, sources, subdir, options) in layouts.items():
    readers.DATASETS.register(name)(readers.in_subfolder(read, sources, subdir, dataset="synthetic", **options))


_register_layouts()


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--num-images", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--image-size", type=int, nargs=2, default=(96, 128), metavar=("HEIGHT", "WIDTH"))
  args = parser.parse_args(argv)
  generate(args.out, num_images=args.num_images, seed=args.seed, image_size=tuple(args.image_size))
  print(f"synthetic set ({args.num_images} images, seed {args.seed}) written to {args.out}")


if __name__ == "__main__":
  main()
