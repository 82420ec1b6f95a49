"""`sail-data`: dataset preparation commands.

  sail-data prepare --input FILE.jsonl --images DIR --out DIR [--format llava|caption]
                    [--num-shards N --shard-index I]    one part of the input per machine
  sail-data prepare --input FILE.parquet --out DIR [--image-column C] [--text-column C | --caption-column C]
                                 parquet rows with embedded image bytes (columns detected when not given)
  sail-data index SRC [--meta DIR] [--caption txt|json:KEY] [--check N|all] [--valid-fraction F]
                                 WebDataset shards in img2dataset's layout made trainable in place (or with
                                 their metadata in DIR, for read-only data), after checking a sample of records
  sail-data join --parts DIR [DIR ...] --out BLEND.yaml  a blend over the parts, weighted by sample count
  sail-data stats PATH [--samples N] [--json]    measured tokens and tiles per sample of a prepared folder
                                 or blend (prepared with --recipe), e.g. to turn a budget in samples into tokens
  sail-data demo --out DIR       the embedded demo dataset (real photos, captions, conversations)
  sail-data show --input FILE --tokenizer DIR [--images DIR] [--index N|A-B|N,M,...] [--template NAME]
                 [--system-prompt TEXT] [--max-tiles N] [--json]
                                 input records as the trainer tokenizes them, trained spans marked

User errors (bad arguments, unusable paths, unreadable input, a full disk) print a few lines naming the
path and the fix, and exit with code 2.

Nothing waits on input forever: only regular files are read (a FIFO, a device or a socket is refused or
skipped, naming its kind), each within a stated size. Ctrl-C, SIGTERM, SIGHUP and SIGUSR1 stop any command
within a second or two, also while prepare's reader threads are busy: it removes what it was writing, prints
one line saying it was interrupted and exits with 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
"""

import argparse
import json
import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from sail_megatron.config.counts import format_count, parse_count
from sail_megatron.config.data import DEFAULT_MAX_PIXELS, TEMPLATES, DataConfig
from sail_megatron.data.blend import join_parts, write_blend
from sail_megatron.data.out_dir import Interrupted, check_out, layout_matches, staged, stop_on_signals
from sail_megatron.data.prepare import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_TEXT_CHARS,
    FORMATS,
    is_prepared_output,
    prepare,
)
from sail_megatron.data.records import DEFAULT_MAX_RECORD_BYTES
from sail_megatron.data.show import TOKENS_PER_TILE, parse_indexes, report, show_records
from sail_megatron.data.statistics import NO_RECIPE_FIX, TokenStatistics, token_statistics

_DEMO_LAYOUT = ("raw", "captions", "sft", "blend.yaml")
_DEMO_RAW_LAYOUT = ("images", "captions.jsonl", "sft.jsonl", "tokenizer")


def add_split_flags(parser: argparse.ArgumentParser) -> None:
    """--split-ratio and --valid-fraction, as prepare and index both take them."""
    parser.add_argument("--split-ratio", help="train,val,test shares of the shards (default 1,0,0)")
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=None,
        help="hold this share of the shards out as the val split that validation reads (e.g. 0.02); splits are "
        "whole shards, so the share held out is rounded to shards (the summary says how much)",
    )


def _prepare(args) -> int:
    rules = _rules(args)
    flags = (args.image_column, args.text_column, args.caption_column, args.id_column)
    columns = None
    if any(f is not None for f in flags):
        from sail_megatron.data.parquet_input import ParquetColumns

        columns = ParquetColumns(*flags)
    report = prepare(
        Path(args.input),
        Path(args.images) if args.images else None,
        Path(args.out),
        fmt=args.format,
        shard_size=args.shard_size,
        split_ratio=args.split_ratio,
        valid_fraction=args.valid_fraction,
        max_image_bytes=args.max_image_bytes,
        max_record_bytes=args.max_record_bytes,
        max_text_chars=args.max_text_chars,
        max_pixels=args.max_pixels,
        verify_decode=args.verify_decode,
        workers=args.workers,
        overwrite=args.overwrite,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        allow_outside_images=args.allow_outside_images,
        rules=rules,
        columns=columns,
    )
    print(report.summary())
    for s in report.skipped:
        print(f"  skipped {s.source} (id {s.id}): {s.reason}: {s.detail}")
    print(f"report: {Path(args.out) / 'prepare_report.json'}")
    return 0


def _rules(args):
    if args.recipe:
        from sail_megatron.data.trainer_rules import TrainerRules

        return TrainerRules.from_recipe(Path(args.recipe), args.set)
    if args.set:
        raise ValueError("--set changes the --recipe; pass --recipe too")
    return None


def _index(args) -> int:
    from sail_megatron.data.index import INDEX_REPORT, index, parse_check

    report = index(
        Path(args.source),
        meta=Path(args.meta) if args.meta else None,
        caption=args.caption,
        check=parse_check(args.check),
        split_ratio=args.split_ratio,
        valid_fraction=args.valid_fraction,
        max_pixels=args.max_pixels,
        verify_decode=args.verify_decode,
        rules=_rules(args),
        overwrite=args.overwrite,
        workers=args.workers,
        seed=args.seed,
        max_image_bytes=args.max_image_bytes,
        max_text_chars=args.max_text_chars,
    )
    print(report.summary())
    for s in report.skipped[:20]:
        print(f"  skipped {s.source}: {s.reason}: {s.detail}")
    if len(report.skipped) > 20:
        print(f"  ... and {len(report.skipped) - 20} more")
    print(f"report: {Path(report.dataset) / INDEX_REPORT}")
    return 0


def _join(args) -> int:
    counts, warnings = join_parts(
        args.parts, Path(args.out), overwrite=args.overwrite, allow_missing_parts=args.allow_missing_parts
    )
    for w in warnings:
        print(f"sail-data: warning: {w}", file=sys.stderr)
    total = sum(counts.values())
    print(f"blend {args.out}: {len(counts)} parts, {total} train samples")
    for path, n in sorted(counts.items()):
        print(f"  {path}: {n} samples (weight {n / total:.4f})")
    try:
        stats = token_statistics(Path(args.out))
    except (OSError, ValueError) as e:  # the blend is written: a part's unreadable report is worth a warning
        print(f"sail-data: warning: no token statistics for {args.out}: {e}", file=sys.stderr)
        return 0
    if stats is not None:
        print(f"  {_means(stats)}; {stats.coverage()} (sail-data stats {args.out})")
    return 0


def _means(stats: TokenStatistics) -> str:
    return (
        f"{stats.mean_tokens_per_sample:.1f} tokens ({stats.mean_image_tokens_per_sample:.1f} of them image tokens) "
        f"and {stats.mean_tiles_per_sample:.2f} tiles per sample"
    )


def _stats(args) -> int:
    samples = parse_count(args.samples, "--samples") if args.samples is not None else None
    stats = token_statistics(Path(args.path), split=args.split)
    if stats is None:
        why = "it was prepared without" if Path(args.path).is_dir() else "none of its datasets was prepared with"
        raise ValueError(f"{args.path}: no token statistics: {why} --recipe; {NO_RECIPE_FIX}")
    if not stats.complete:
        missing = ", ".join(stats.unmeasured)
        print(f"sail-data: warning: {stats.coverage()}; no statistics for {missing}: {NO_RECIPE_FIX}", file=sys.stderr)
    if args.json:
        doc = {"path": args.path, "split": args.split, **asdict(stats), "complete": stats.complete}
        if samples is not None:
            doc.update(samples=samples, tokens=stats.tokens_for(samples))
        print(json.dumps(doc))
        return 0
    print(f"{args.path} ({args.split} split): {stats.coverage()}")
    print(f"  {_means(stats)}")
    print(f"  over {stats.samples_measured} samples, measured with {stats.source}")
    if samples is not None:
        tokens = stats.tokens_for(samples)
        print(f"  {format_count(samples)} samples ~ {format_count(tokens)} tokens ({tokens})")
    return 0


def is_demo_output(folder: Path) -> bool:
    """A folder `build_demo` wrote, and nothing else in it."""
    if not (folder / "blend.yaml").is_file() or not layout_matches(folder, _DEMO_LAYOUT):
        return False
    raw = folder / "raw"
    if raw.exists() and not (raw.is_dir() and layout_matches(raw, _DEMO_RAW_LAYOUT)):
        return False
    return all(not (folder / name).exists() or is_prepared_output(folder / name) for name in ("captions", "sft"))


def build_demo(out: Path, overwrite: bool = False) -> Path:
    """Raw demo files -> two prepared datasets (captions, sft; each with a val split), a blend of both and
    the tokenizer."""
    from sail_megatron.data.demo_dataset import write_demo_raw

    out = Path(out)
    check_out(out, overwrite, is_demo_output, "a sail-data demo folder")
    with staged(out) as stage:
        raw = write_demo_raw(stage / "raw")
        # 40 records each in shards of 16: the last shard (8 records) is held out for validation.
        for records, name, fmt in ((raw.captions_jsonl, "captions", "caption"), (raw.sft_jsonl, "sft", "llava")):
            prepare(
                records,
                raw.images_dir,
                stage / name,
                fmt=fmt,
                shard_size=16,
                valid_fraction=0.25,
                verify_decode=True,
                progress=False,
            )
        write_blend(stage / "blend.yaml", {"captions": 1.0, "sft": 1.0})
    return out


def _demo(args) -> int:
    out = build_demo(Path(args.out), overwrite=args.overwrite)
    print(
        f"demo dataset: {out}/captions (pretraining), {out}/sft (conversations), blend {out}/blend.yaml, "
        f"tokenizer {out}/raw/tokenizer"
    )
    return 0


def _show(args) -> int:
    tok, shown = show_records(
        Path(args.input),
        Path(args.tokenizer),
        parse_indexes(args.index),
        images_dir=Path(args.images) if args.images else None,
        fmt=args.format,
        template=args.template,
        system_prompt=args.system_prompt,
        max_tiles=args.max_tiles,
        tokens_per_tile=args.tokens_per_tile,
        seq_length=args.seq_length,
        max_image_bytes=args.max_image_bytes,
        max_text_chars=args.max_text_chars,
    )
    color = sys.stdout.isatty()
    for i, one in enumerate(shown):
        if i and not args.json:
            print()
        print(report(one, tok, as_json=args.json, color=color), flush=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sail-data", description="Prepare image-text data for sail-megatron.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="JSON/JSONL + image folder, or parquet with images -> energon WebDataset shards")
    p.add_argument(
        "--input",
        required=True,
        help="LLaVA/OpenAI-style JSON/JSONL or caption JSONL (UTF-8), or a .parquet file whose rows carry the images",
    )
    p.add_argument("--images", help="folder the records' image paths are relative to (JSON input)")
    p.add_argument("--out", required=True, help="folder to write; must not hold or lie inside --images")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="llava (conversations) or caption; default llava, or for parquet what its columns hold",
    )
    p.add_argument("--image-column", help="parquet: the column of image bytes or image structs (none: text only)")
    p.add_argument("--text-column", help="parquet: the column of conversations (a list of turns or JSON of one)")
    p.add_argument("--caption-column", help="parquet: the column of captions (with --format caption)")
    p.add_argument("--id-column", help="parquet: the column of record ids (default: id, when there is one)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    add_split_flags(p)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--verify-decode", action="store_true", help="fully decode every image (slower)")
    p.add_argument("--workers", type=int, default=8, help="threads reading images")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it holds an earlier sail-data prepare output (only once this run succeeded)",
    )
    p.add_argument(
        "--num-shards",
        type=int,
        default=1,
        help="split the input into this many parts, one command (and --out) per part",
    )
    p.add_argument(
        "--shard-index",
        type=int,
        default=0,
        help="the part this command writes: records i with i %% num-shards == shard-index",
    )
    p.add_argument(
        "--allow-outside-images",
        action="store_true",
        help="read image paths that are absolute or climb out of --images with '..'",
    )
    p.add_argument(
        "--recipe",
        help="training recipe whose tokenizer, seq_length and tiling the samples must fit "
        "(skips what that training would always skip)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a --recipe key")
    p.add_argument(
        "--max-image-bytes",
        type=int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        help="skip image files larger than this, unread (image_file_too_big; default 128 MiB)",
    )
    p.add_argument(
        "--max-record-bytes",
        type=int,
        default=DEFAULT_MAX_RECORD_BYTES,
        help="skip JSON Lines records longer than this, unread (record_too_large; default 32 MiB)",
    )
    p.add_argument(
        "--max-text-chars",
        type=int,
        default=DEFAULT_MAX_TEXT_CHARS,
        help="skip records with more characters of text (text_too_long; default 1000000); with --recipe, "
        "also those longer than its seq_length could ever hold",
    )
    p.set_defaults(func=_prepare)
    x = sub.add_parser(
        "index",
        help="make WebDataset shards in img2dataset's layout (KEY.jpg + KEY.txt/KEY.json) trainable where they lie",
    )
    x.add_argument("source", metavar="SRC", help="folder holding the .tar shards (nested folders too)")
    x.add_argument(
        "--meta",
        help="write energon's metadata here (with links to the shards) instead of into SRC, which is then not "
        "touched: for read-only data; this folder is then the dataset path",
    )
    x.add_argument(
        "--caption",
        default="auto",
        help="where the caption is: txt (KEY.txt) or json:KEY (a key of KEY.json); auto (default): txt when the "
        "records have a .txt part, else json:caption (the choice is printed)",
    )
    x.add_argument("--check", help="records to check, spread over all shards (default 300), or all")
    x.add_argument("--seed", type=int, default=0, help="which records --check N picks")
    add_split_flags(x)
    x.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    x.add_argument("--verify-decode", action="store_true", help="fully decode every checked image (slower)")
    x.add_argument("--workers", type=int, default=8, help="threads checking shards")
    x.add_argument("--overwrite", action="store_true", help="index again what sail-data index indexed before")
    x.add_argument("--recipe", help="training recipe whose rules the checked records must meet (as for prepare)")
    x.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a --recipe key")
    x.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES, help="as for prepare")
    x.add_argument("--max-text-chars", type=int, default=DEFAULT_MAX_TEXT_CHARS, help="as for prepare")
    x.set_defaults(func=_index)
    j = sub.add_parser("join", help="blend prepared parts (e.g. --shard-index 0..N-1) into one energon metadataset")
    j.add_argument("--parts", nargs="+", required=True, help="prepared folders")
    j.add_argument("--out", required=True, help="blend YAML to write (use it as data.path)")
    j.add_argument("--overwrite", action="store_true", help="replace an existing blend YAML file")
    j.add_argument(
        "--allow-missing-parts",
        action="store_true",
        help="blend the parts given even if some input shards of their --num-shards are missing",
    )
    j.set_defaults(func=_join)
    t = sub.add_parser(
        "stats", help="measured tokens and tiles per sample of a prepared folder or blend (prepared with --recipe)"
    )
    t.add_argument("path", metavar="PATH", help="a folder sail-data prepare wrote, or a blend YAML of such folders")
    t.add_argument("--split", choices=("train", "val", "test"), default="train", help="the split read (default train)")
    t.add_argument("--samples", help="also give the tokens this many samples hold, e.g. 21M")
    t.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    t.set_defaults(func=_stats)
    d = sub.add_parser("demo", help="build the embedded demo dataset from scikit-image's sample photos")
    d.add_argument("--out", required=True)
    d.add_argument("--overwrite", action="store_true", help="replace an earlier demo folder")
    d.set_defaults(func=_demo)
    defaults = DataConfig()
    s = sub.add_parser("show", help="print one input record as the trainer tokenizes it, trained spans marked")
    s.add_argument("--input", required=True, help="a sail-data prepare input: LLaVA JSON/JSONL or caption JSONL")
    s.add_argument("--tokenizer", required=True, help="local Hugging Face tokenizer folder (with the image tokens)")
    s.add_argument("--images", help="folder the record's image paths are relative to (default: the input's folder)")
    s.add_argument(
        "--index",
        default="0",
        help="which records, counted from 0 (blank lines do not count): N, a range A-B, or a comma list of both",
    )
    s.add_argument(
        "--format", choices=("auto",) + FORMATS, default="auto", help="auto: caption records have no conversations"
    )
    s.add_argument("--template", choices=TEMPLATES, default=defaults.template, help="chat template (data.template)")
    s.add_argument("--system-prompt", help="replaces the template's default system message (data.system_prompt)")
    s.add_argument("--max-tiles", type=int, default=defaults.max_tiles, help="tiles per image at most (data.max_tiles)")
    s.add_argument("--tokens-per-tile", type=int, default=TOKENS_PER_TILE, help="image tokens per tile (SAIL-VL: 256)")
    s.add_argument("--seq-length", type=int, help="apply the trainer's over-length policy for this budget")
    s.add_argument(
        "--json", action="store_true", help='print {"input_ids", "loss_mask", "text"} as JSON, one line per record'
    )
    s.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES, help="as for prepare")
    s.add_argument("--max-text-chars", type=int, default=DEFAULT_MAX_TEXT_CHARS, help="as for prepare")
    s.set_defaults(func=_show)
    return parser


def _interrupted(command: str, e: Interrupted) -> str:
    left = {"prepare": "; --out", "join": "; --out", "demo": "; --out", "index": "; SRC (or --meta)"}.get(command, "")
    left = f"{left} was left as it was" if left else ""
    return f"sail-data {command}: interrupted by {e.name}{left}"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    command_line = argv is None  # not a caller in the same process, whose signals are its own business
    with stop_on_signals() if command_line else nullcontext():
        try:
            return args.func(args)
        except (OSError, ValueError) as e:  # FileExistsError, FileNotFoundError, PermissionError, ENOSPC ...
            print(f"sail-data: error: {e}", file=sys.stderr)
            return 2
        except Interrupted as e:
            print(_interrupted(args.command, e), file=sys.stderr)
            if not command_line:
                return 128 + e.signum
            # Reader threads may still be busy with their last item: do not wait for them at exit.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + e.signum)


if __name__ == "__main__":
    sys.exit(main())
