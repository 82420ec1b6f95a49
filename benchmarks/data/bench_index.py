#!/usr/bin/env python
"""Shards indexed where they lie (`sail-data index`) against prepared copies (`sail-data prepare`), side by side in
one run on the CPU: the time each takes per 1,000 samples, and the loader's training reads (samples/s, in this
process: no worker processes) from each.

The same synthetic set both ways: N caption records, each its own photo (scikit-image's, resized and re-encoded
per record so every file differs), as img2dataset writes them (KEY.jpg + KEY.txt + KEY.json in tar shards) and
as prepare's input (caption JSONL + one image file per record). Both runs include energon's own preparation (a
subprocess of a few seconds whatever the size). No figure is asserted.

  python benchmarks/data/bench_index.py [--samples 2000] [--shard-size 500] [--read 600] [--side 320]
"""

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from PIL import Image  # noqa: E402


def _photos(side: int):
    import skimage.data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina"):
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        img.thumbnail((side, side))
        out.append(img)
    return out


def _jpeg(img: Image.Image, i: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80 + i % 15)  # a different file per record
    return buf.getvalue()


def build(root: Path, samples: int, shard_size: int, side: int) -> None:
    photos = _photos(side)
    crawl, images = root / "crawl", root / "images"
    crawl.mkdir()
    images.mkdir()
    records = []
    tar = None
    for i in range(samples):
        if i % shard_size == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(crawl / f"{i // shard_size:05d}.tar", "w")
        data, caption = _jpeg(photos[i % len(photos)], i), f"photo {i % len(photos)}, record {i}"
        key = f"{i:09d}"
        for ext, part in (
            ("jpg", data),
            ("txt", caption.encode()),
            ("json", json.dumps({"caption": caption}).encode()),
        ):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(part)
            tar.addfile(info, io.BytesIO(part))
        (images / f"{key}.jpg").write_bytes(data)
        records.append(json.dumps({"id": key, "image": f"{key}.jpg", "caption": caption}))
    tar.close()
    (root / "captions.jsonl").write_text("\n".join(records) + "\n")


_ENERGON = {"s": 0.0}


def _count_energon_time() -> None:
    """Add the time of energon's own preparation (a subprocess: a few seconds whatever the size) to _ENERGON."""
    from sail_megatron.data import index as index_module
    from sail_megatron.data import prepare as prepare_module

    run = prepare_module.run_energon_prepare

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return run(*args, **kwargs)
        finally:
            _ENERGON["s"] += time.perf_counter() - start

    prepare_module.run_energon_prepare = index_module.run_energon_prepare = timed


def _timed(fn):
    """(seconds, of which energon's preparation)."""
    _ENERGON["s"] = 0.0
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, _ENERGON["s"]


def read_rate(path: Path, tokenizer_dir: Path, batches: int) -> float:
    """Samples/s of training reads (packed rows, the trainer's defaults but no worker processes)."""
    from sail_megatron.config.data import DataConfig
    from sail_megatron.data.loader import build_train_loader
    from sail_megatron.data.tokenizer import load_tokenizer

    cfg = DataConfig(
        path=str(path), tokenizer=str(tokenizer_dir), seq_length=4096, num_workers=0, packing_buffer_size=64
    )
    it = iter(build_train_loader(cfg, load_tokenizer(tokenizer_dir), 448, 256))
    next(it)  # opening the dataset and the first buffer
    samples, start = 0, time.perf_counter()
    for _ in range(batches):
        samples += len(next(it).keys)
    return samples / (time.perf_counter() - start)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--read", type=int, default=200, help="packed rows read per loader (after the first)")
    p.add_argument("--side", type=int, default=320, help="longest side of the photos, pixels")
    p.add_argument("--workers", type=int, default=2, help="prepare's reader threads and index's check threads")
    args = p.parse_args(argv)

    from sail_megatron.data.index import index
    from sail_megatron.data.prepare import prepare
    from sail_megatron.data.tokenizer import build_demo_tokenizer

    root = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        build(root, args.samples, args.shard_size, args.side)
        crawl_bytes = sum(f.stat().st_size for f in (root / "crawl").iterdir())
        tok = build_demo_tokenizer([f"photo {i}, record {i}" for i in range(50)], root / "tok", vocab_size=300)
        common = dict(progress=False, workers=args.workers)
        _count_energon_time()
        shutil.copytree(root / "crawl", root / "warm-up", ignore=lambda d, names: sorted(names)[1:])  # one shard
        index(root / "warm-up", check=10, **common)  # imports and first runs, not timed
        rows = []
        t = _timed(
            lambda: prepare(root / "captions.jsonl", root / "images", root / "prepared", fmt="caption",
                            shard_size=args.shard_size, **common)
        )  # fmt: skip
        prepared_bytes = sum(f.stat().st_size for f in (root / "prepared").rglob("*") if f.is_file())
        rows.append(("prepare (copies every image)", *t, prepared_bytes))
        t = _timed(lambda: index(root / "crawl", meta=root / "meta", check=300, **common))
        meta_bytes = sum(f.stat().st_size for f in (root / "meta").rglob("*") if f.is_file() and not f.is_symlink())
        rows.append(("index --meta, --check 300", *t, meta_bytes))
        t = _timed(lambda: index(root / "crawl", meta=root / "meta-all", check="all", **common))
        rows.append(("index --meta, --check all", *t, meta_bytes))
        shutil.copytree(root / "crawl", root / "in-place")
        t = _timed(lambda: index(root / "in-place", check=300, **common))
        rows.append(("index in place, --check 300", *t, meta_bytes))

        n = args.samples
        print(f"{n} caption samples in {n // args.shard_size} shards, {crawl_bytes / n / 1024:.1f} KiB per sample, CPU")
        head = (
            f"{'command':<30}{'seconds':>9}{'energon':>9}{'s per 1,000':>13}{'rest per 1,000':>16}{'bytes written':>15}"
        )
        print(head)
        for name, seconds, energon, written in rows:
            per, rest = seconds * 1000 / n, (seconds - energon) * 1000 / n
            print(f"{name:<30}{seconds:>9.2f}{energon:>9.2f}{per:>13.2f}{rest:>16.2f}{written:>15,}")
        print("(energon: its own preparation, a subprocess, in both commands; rest: reading, checking, writing)")

        print(
            f"\ntraining reads, {args.read} packed rows of 4096 tokens (448 px tiles, 256 tokens per tile), 1 process"
        )
        rates = {"prepared shards": [], "indexed (--meta: links to the shards)": []}
        for _ in range(3):  # alternated, best of three: the page cache is warm for both
            rates["prepared shards"].append(read_rate(root / "prepared", tok, args.read))
            rates["indexed (--meta: links to the shards)"].append(read_rate(root / "meta", tok, args.read))
        base = max(rates["prepared shards"])
        for name, got in rates.items():
            print(f"  {name:<40}{max(got):>9.1f} samples/s  ({max(got) / base:.2f}x)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
