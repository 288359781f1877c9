"""A web page for a trained checkpoint: upload an image, type a phrase, see and download the mask.

    pip install -e '.[demo]'
    python scripts/demo.py --checkpoint runs/toy [--step N] [--host 127.0.0.1 --port 7860]

The checkpoint is loaded and its predict function compiled once, before the page is served (the first line
printed says when it is ready). Examples are synthetic-set scenes generated into `--out_dir` with phrases of every
granularity; mask PNGs of the requests are written there too (default: a fresh temporary folder).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="training workdir, its checkpoints/ or checkpoints/<step>")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
  parser.add_argument("--port", type=int, default=7860)
  parser.add_argument("--max_new_tokens", type=int, default=None, help="default: the run's generation.max_new_tokens")
  parser.add_argument("--max_image_side", type=int, default=2048, help="longer uploads are downscaled to this")
  parser.add_argument("--max_file_size", default="50mb", help="largest upload the page accepts")
  parser.add_argument("--queue_size", type=int, default=32, help="requests that may wait; more are turned away")
  parser.add_argument("--out_dir", default="", help="examples and mask PNGs (default: a new temporary folder)")
  args = parser.parse_args(argv)
  if not os.path.exists(args.checkpoint):
    raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist (expected a training workdir)")
  if args.max_image_side < 32:
    raise ValueError(f"--max_image_side must be at least 32 pixels, got {args.max_image_side}")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
  logging.getLogger("unires_jax").setLevel(logging.INFO)
  try:
    from unires_jax.demo import app
  except ImportError as error:
    raise ValueError(f"the demo needs the 'demo' extra (pip install -e '.[demo]'): {error}") from error
  from unires_jax.demo import examples, session

  out_dir = args.out_dir or tempfile.mkdtemp(prefix="unires_demo_")
  model = session.DemoModel(args.checkpoint, args.step, args.max_new_tokens)
  page = app.DemoPage(model, os.path.join(out_dir, "masks"), args.max_image_side)
  example_list = examples.make_examples(os.path.join(out_dir, "examples"))
  blocks = app.launch(page, example_list, host=args.host, port=args.port, queue_size=args.queue_size,
                      max_file_size=args.max_file_size, block=False)
  print(f"demo ready on http://{args.host}:{args.port} ({model.describe()}; loaded in {model.load_seconds:.1f} s, "
        f"warm-up {model.warm_up_seconds:.1f} s)", flush=True)
  blocks.block_thread()


if __name__ == "__main__":
  try:
    main()
  except (FileNotFoundError, ValueError) as error:
    print(f"demo.py: error: {error}", file=sys.stderr)
    sys.exit(2)
