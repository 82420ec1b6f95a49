"""`sail-chat`: ask a trained model about images, exactly as training fed it (greedy answer on stdout).

    sail-chat --ckpt runs/sft --image cat.jpg --prompt "What is in the picture?"
    sail-chat --ckpt runs/sft/iter_00002000 --image a.jpg --image b.jpg --prompt "Compare the two images."
    sail-chat --ckpt export/sail-vl-2b-sft --image page.png --prompt "Read the text." --max-tiles 12

--ckpt: a training run folder (its config.yaml and `latest`), one of its iter_* folders, a checkpoint
written by sail-convert, or a Hugging Face InternVL-chat folder (sail-convert mcore-to-hf). The tokenizer,
chat template, system message and tiling are the ones the model was trained with (the run's data config,
or config.json's `template`, `max_dynamic_patch`, `use_thumbnail`); the options below override them.
Without `<image>` in the prompt, one `<image>` line per image goes before it.

Exit status: 0 answered, 2 bad input (one line on stderr says what). Progress goes to stderr.
"""

import argparse
import logging
import os
import sys
import warnings
from typing import List, Optional

from sail_megatron.config.data import TEMPLATES
from sail_megatron.convert.cli import positive_int

DTYPES = ("fp32", "bf16", "fp16")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sail-chat",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    p.add_argument("--ckpt", required=True, help="run folder, iter_* folder, sail-convert checkpoint or HF folder")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat for several)")
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--max-tiles", type=positive_int, default=None, help="tiles per image (default: as trained)")
    p.add_argument("--system", default=None, help="system message (default: as trained; '' for none)")
    p.add_argument("--template", default=None, choices=TEMPLATES, help="chat template (default: as trained)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one it was trained with)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="compute dtype (bf16/fp16 need CUDA)")
    return p


def _device(name: str, dtype: str):
    import torch

    from sail_megatron.chat.errors import ChatError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise ChatError("--device cuda: no CUDA device here")
    if name == "cpu" and dtype != "fp32":
        raise ChatError(f"--dtype {dtype} needs CUDA: on the CPU sail-chat computes in fp32")
    return torch.device(name)


def _quiet() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("megatron", "sail_megatron.platform", "sail_megatron.model"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # transformers reads config.json beside the tokenizer and notes that it is no transformers model.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch DCP deprecations inside megatron-core
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed", category=UserWarning)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    _quiet()
    if args.device == "cpu":  # before torch is imported: megatron's CPU layer needs CUDA hidden
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from sail_megatron.chat.errors import ChatError
    from sail_megatron.chat.session import answer, prepare
    from sail_megatron.config import ConfigError
    from sail_megatron.convert.errors import ConversionError
    from sail_megatron.training.checkpoint_files import CheckpointError

    try:
        device = _device(args.device, args.dtype)
        prepared = prepare(
            args.ckpt,
            args.image,
            args.prompt,
            tokenizer=args.tokenizer,
            template=args.template,
            system=args.system,
            max_tiles=args.max_tiles,
        )
        reply = answer(prepared, args.max_new_tokens, device, args.dtype)
    except (ChatError, ConversionError, ConfigError, CheckpointError) as e:
        print(f"sail-chat: {e}", file=sys.stderr, flush=True)
        return 2
    _print_answer(prepared.tokenizer.decode(reply.ids))
    return 0


def _print_answer(text: str) -> None:
    try:
        print(text, flush=True)
    except UnicodeEncodeError:  # a terminal that cannot show some character of the answer
        encoding = sys.stdout.encoding or "ascii"
        print(text.encode(encoding, "backslashreplace").decode(encoding), flush=True)


if __name__ == "__main__":
    sys.exit(main())
