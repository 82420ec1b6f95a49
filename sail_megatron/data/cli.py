"""`sail-data`: dataset preparation commands.

  sail-data prepare --input FILE.jsonl --images DIR --out DIR [--format llava|caption]
  sail-data demo --out DIR       the embedded demo dataset (real photos, captions, conversations)
"""

import argparse
import logging
import shutil
import sys
from pathlib import Path

from sail_megatron.data.blend import write_blend
from sail_megatron.data.prepare import FORMATS, prepare


def _prepare(args) -> int:
    report = prepare(Path(args.input), Path(args.images), Path(args.out), fmt=args.format,
                     shard_size=args.shard_size, split_ratio=args.split_ratio, max_pixels=args.max_pixels,
                     verify_decode=args.verify_decode, workers=args.workers, overwrite=args.overwrite)
    print(report.summary())
    for s in report.skipped:
        print(f"  skipped {s.source} (id {s.id}): {s.reason}: {s.detail}")
    print(f"report: {Path(args.out) / 'prepare_report.json'}")
    return 0


def build_demo(out: Path, overwrite: bool = False) -> Path:
    """Raw demo files -> two prepared datasets (captions, sft), a blend of both and the tokenizer."""
    from sail_megatron.data.demo_dataset import write_demo_raw

    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to rebuild it")
        shutil.rmtree(out)
    raw = write_demo_raw(out / "raw")
    prepare(raw.captions_jsonl, raw.images_dir, out / "captions", fmt="caption", shard_size=16,
            verify_decode=True, progress=False)
    prepare(raw.sft_jsonl, raw.images_dir, out / "sft", fmt="llava", shard_size=16, verify_decode=True,
            progress=False)
    write_blend(out / "blend.yaml", {"captions": 1.0, "sft": 1.0})
    return out


def _demo(args) -> int:
    out = build_demo(Path(args.out), overwrite=args.overwrite)
    print(f"demo dataset: {out}/captions (pretraining), {out}/sft (conversations), blend {out}/blend.yaml, "
          f"tokenizer {out}/raw/tokenizer")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="sail-data", description="Prepare image-text data for sail-megatron.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="JSON/JSONL + image folder -> energon WebDataset shards")
    p.add_argument("--input", required=True, help="LLaVA JSON/JSONL or caption JSONL")
    p.add_argument("--images", required=True, help="folder the records' image paths are relative to")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=FORMATS, default="llava")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    p.add_argument("--split-ratio", default="1,0,0", help="train,val,test shares of the shards")
    p.add_argument("--max-pixels", type=int, default=64_000_000)
    p.add_argument("--verify-decode", action="store_true", help="fully decode every image (slower)")
    p.add_argument("--workers", type=int, default=8, help="threads reading images")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_prepare)
    d = sub.add_parser("demo", help="build the embedded demo dataset from scikit-image's sample photos")
    d.add_argument("--out", required=True)
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"sail-data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
