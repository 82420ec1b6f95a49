"""`sail-convert`: Hugging Face (SAIL-VL / InternVL-chat) <-> megatron checkpoints, stage-1 init, verify.

Families: InternViT or AIMv2 / SAILViT vision encoders with Qwen2 / Qwen2.5, dense Qwen3 or Qwen3-MoE language
models (SAIL-VL, SAIL-VL-1.5/1.6, SAIL-VL2 dense and MoE; InternVL-chat models of those parts).

    sail-convert hf-to-mcore --hf SAIL-VL-2B --out ckpt/sail-vl-2b --tp 2 --pp 1
    sail-convert mcore-to-hf --ckpt runs/sft --out export/sail-vl-2b-sft [--tokenizer DIR] [--base-hf DIR]
    sail-convert mcore-to-hf --ckpt runs/sft --out export/sft-hf --format transformers [--template NAME]
    sail-convert init --llm Qwen2.5-1.5B-Instruct --vision InternViT-300M-448px --out ckpt/stage1 --tp 2
    sail-convert init --llm Qwen3-1.7B --vision aimv2-huge-patch14-448 --tokenizer TOK --out ckpt/stage1-vl2
    sail-convert verify --hf SAIL-VL-2B --ckpt ckpt/sail-vl-2b

Exit status: 0 done (verify: passed), 1 verify failed, 2 bad input or a damaged checkpoint (the message
lists every problem).
Conversion runs as one CPU process; the checkpoint it writes loads under any TP/PP/EP.
"""

import argparse
import logging
import os
import sys
import time
import warnings
from typing import List, Optional

from sail_megatron.data.templates import TEMPLATES  # the chat templates themselves (no torch: --help stays fast)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (shared by the command-line tools)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _shard_size(text: str) -> str:
    """Checked here so a bad size fails before the checkpoint is loaded; passed on as given."""
    from sail_megatron.convert.hf_io import parse_size

    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sail-convert",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("hf-to-mcore", help="Hugging Face InternVL-chat folder -> megatron checkpoint")
    a.add_argument("--hf", required=True, help="folder with config.json and *.safetensors")
    a.add_argument("--out", required=True, help="new folder for the checkpoint (must not exist or be empty)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size it will train at (checks, vocab padding)")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size it will train at (checks)")
    a.add_argument("--ep", type=int, default=1, help="expert-parallel size it will train at (MoE models; checks)")
    a.add_argument("--dtype", default="auto", help="auto (as stored), bf16, fp32 or fp16")
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    a.add_argument("--image-token-id", type=int, default=None, help="<IMG_CONTEXT> id (default: from the tokenizer)")

    b = sub.add_parser("mcore-to-hf", help="megatron checkpoint -> Hugging Face folder (InternVL-chat or transformers)")
    b.add_argument("--ckpt", required=True, help="checkpoint folder or run folder (its `latest`)")
    b.add_argument("--out", required=True, help="new folder for the Hugging Face model")
    b.add_argument(
        "--tokenizer",
        default=None,
        help="copy these tokenizer files (default: the training run's "
        "data.tokenizer, else the checkpoint's or --base-hf's)",
    )
    b.add_argument(
        "--base-hf",
        default=None,
        help="HF folder (or converted checkpoint) the run started from: "
        "config template and the ViT layers after select_layer for trainer checkpoints",
    )
    b.add_argument("--dtype", default=None, help="bf16, fp32 or fp16 (default: the checkpoint's)")
    b.add_argument(
        "--max-shard-size",
        default="5GB",
        type=_shard_size,
        help="largest safetensors file: bytes, or a number with KB, MB, GB, KiB, MiB, GiB (default 5GB)",
    )
    b.add_argument(
        "--format",
        default="internvl-chat",
        choices=["internvl-chat", "transformers"],
        help="internvl-chat: the SAIL-VL / InternVL-chat layout (trust_remote_code); transformers: "
        "InternVLForConditionalGeneration + processor, no remote code (InternViT models only)",
    )
    b.add_argument(
        "--template",
        default=None,
        choices=list(TEMPLATES),
        help="--format transformers: the chat template the model was trained with (default: the run's "
        "data.template, else config.json's template)",
    )

    c = sub.add_parser("init", help="fresh stage-1 checkpoint: Qwen2/Qwen3 + InternViT/AIMv2 + a new projector")
    c.add_argument("--llm", required=True, help="Qwen2 / Qwen2.5, dense Qwen3 or Qwen3-MoE Hugging Face folder")
    c.add_argument(
        "--vision",
        required=True,
        help="InternViT (InternVisionModel) or AIMv2 / SAILViT folder (ml-aim or transformers Aimv2VisionModel names)",
    )
    c.add_argument("--out", required=True)
    c.add_argument("--tp", type=int, default=1)
    c.add_argument("--pp", type=int, default=1)
    c.add_argument(
        "--select-layer",
        type=int,
        default=None,
        help="ViT hidden state fed to the projector (default: SAIL-VL's, -4 for InternViT, -1 for AIMv2)",
    )
    c.add_argument("--downsample-ratio", type=float, default=0.5)
    c.add_argument("--ps-version", default="v2", choices=["v1", "v2"])
    c.add_argument("--template", default="internvl2_5", help="chat template name recorded in config.json")
    c.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder with <img>, </img>, <IMG_CONTEXT> (default: the --llm folder's)",
    )
    c.add_argument("--dtype", default="auto")
    c.add_argument("--seed", type=int, default=1234, help="projector initialization seed")
    c.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    c.add_argument("--image-token-id", type=int, default=None)

    d = sub.add_parser("verify", help="compare HF and megatron logits on the same inputs")
    d.add_argument("--hf", required=True)
    d.add_argument("--ckpt", required=True)
    d.add_argument("--dtype", default="fp32", help="compute dtype of both models (fp32, bf16, fp16)")
    d.add_argument("--atol", type=float, default=None, help="max |logit diff| allowed (default by dtype)")
    d.add_argument("--min-top1", type=float, default=None, help="min top-1 agreement (default by dtype)")
    d.add_argument("--tiles", type=positive_int, default=2, help="image tiles in the image case")
    d.add_argument("--text-tokens", type=positive_int, default=16, help="text tokens before and after the image")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--image-token-id", type=int, default=None)
    return p


def _run(args) -> int:
    # Imported here so `--help` is instant and CUDA is hidden before torch is touched.
    if args.command == "hf-to-mcore":
        from sail_megatron.convert.to_mcore import hf_to_mcore

        out = hf_to_mcore(
            args.hf,
            args.out,
            tp=args.tp,
            pp=args.pp,
            ep=args.ep,
            dtype=args.dtype,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            image_token_id=args.image_token_id,
        )
    elif args.command == "mcore-to-hf":
        common = dict(
            tokenizer=args.tokenizer, base_hf=args.base_hf, dtype=args.dtype, max_shard_size=args.max_shard_size
        )
        if args.format == "transformers":
            from sail_megatron.convert.to_transformers import mcore_to_transformers

            out = mcore_to_transformers(args.ckpt, args.out, template=args.template, **common)
        else:
            from sail_megatron.convert.to_hf import mcore_to_hf

            out = mcore_to_hf(args.ckpt, args.out, **common)
    elif args.command == "init":
        from sail_megatron.convert.init_stage1 import init_stage1

        out = init_stage1(
            args.llm,
            args.vision,
            args.out,
            tp=args.tp,
            pp=args.pp,
            select_layer=args.select_layer,
            downsample_ratio=args.downsample_ratio,
            ps_version=args.ps_version,
            template=args.template,
            tokenizer=args.tokenizer,
            dtype=args.dtype,
            seed=args.seed,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            image_token_id=args.image_token_id,
        )
    else:
        from sail_megatron.convert.verify import verify

        report = verify(
            args.hf,
            args.ckpt,
            dtype=args.dtype,
            atol=args.atol,
            min_top1=args.min_top1,
            tiles=args.tiles,
            text_tokens=args.text_tokens,
            seed=args.seed,
            image_token_id=args.image_token_id,
        )
        print(report.format(), flush=True)
        return 0 if report.passed else 1
    print(f"wrote {out}", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "mcore-to-hf" and args.template is not None and args.format != "transformers":
        parser.error("--template applies to --format transformers (the InternVL-chat layout brings its own)")
    # Conversion builds CPU (local) layers; hide GPUs before anything imports torch and asks for CUDA.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    logging.getLogger("sail_megatron.training.checkpoint").setLevel(logging.WARNING)  # names the temp folder
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch DCP deprecations inside megatron-core
    from sail_megatron.config import ConfigError
    from sail_megatron.convert.errors import ConversionError
    from sail_megatron.training.checkpoint_files import CheckpointError

    began = time.perf_counter()
    try:
        code = _run(args)
    except (ConversionError, ConfigError, CheckpointError) as e:
        print(f"sail-convert {args.command}: {e}", file=sys.stderr, flush=True)
        return 2
    logging.getLogger("sail_megatron.convert").info("%s took %.1f s", args.command, time.perf_counter() - began)
    return code


if __name__ == "__main__":
    sys.exit(main())
