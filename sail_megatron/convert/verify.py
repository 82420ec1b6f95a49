"""`sail-convert verify`: the HF model (run by `transformers`) and the megatron checkpoint (run by our model)
on the same inputs, text-only and with images; max |logit diff| and top-1 agreement against tolerances.

The two models run one after the other, so peak memory is the larger of the two, not their sum.
"""

import dataclasses
import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from sail_megatron.config import ModelConfig
from sail_megatron.convert.checks import DTYPE_OPTIONS
from sail_megatron.convert.errors import ConversionError, raise_if
from sail_megatron.convert.hf_config import model_config_from_hf, read_json
from sail_megatron.convert.hf_reference import InternVLChatReference
from sail_megatron.convert.mcore_io import HF_SOURCE_DIR, build_empty_model, checkpoint_root, load_model, single_process
from sail_megatron.convert.to_hf import resolve_export_source
from sail_megatron.convert.tokens import find_token_id
from sail_megatron.training.checkpoint_files import check_checkpoint

logger = logging.getLogger(__name__)

# (max |logit diff|, min top-1 agreement) by compute dtype: fp32 differs only by operation order; bf16
# rounds every activation, so two correct implementations drift apart by a fraction of a logit.
DEFAULT_TOLERANCES = {"fp32": (1e-2, 0.99), "bf16": (1.0, 0.95), "fp16": (0.5, 0.95)}


@dataclass
class CaseResult:
    name: str
    tokens: int
    max_abs_diff: float
    top1_agreement: float


@dataclass
class VerifyReport:
    cases: List[CaseResult]
    atol: float
    min_top1: float

    @property
    def passed(self) -> bool:
        return all(c.max_abs_diff <= self.atol and c.top1_agreement >= self.min_top1 for c in self.cases)

    def format(self) -> str:
        lines = [f"{'case':<10}{'tokens':>8}{'max |logit diff|':>20}{'top-1 agreement':>18}"]
        lines += [f"{c.name:<10}{c.tokens:>8}{c.max_abs_diff:>20.3e}{c.top1_agreement:>17.2%}" for c in self.cases]
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"{verdict}: tolerance max |diff| <= {self.atol:g}, top-1 agreement >= {self.min_top1:.2%}")
        return "\n".join(lines)


def _model_problems(hf: ModelConfig, ours: ModelConfig) -> List[str]:
    """Differences that make the two models compute different things (padding and unused layers do not)."""
    problems = []
    lang_a = dataclasses.replace(hf.language, make_vocab_size_divisible_by=1)
    lang_b = dataclasses.replace(ours.language, make_vocab_size_divisible_by=1)
    for f in dataclasses.fields(lang_a):
        if getattr(lang_a, f.name) != getattr(lang_b, f.name):
            problems.append(f"language {f.name}: HF {getattr(lang_a, f.name)} vs checkpoint {getattr(lang_b, f.name)}")
    for name in (
        "arch",
        "hidden_size",
        "num_attention_heads",
        "ffn_hidden_size",
        "image_size",
        "patch_size",
        "layernorm_epsilon",
        "num_built_layers",
    ):
        a, b = getattr(hf.vision, name), getattr(ours.vision, name)
        if a != b:
            problems.append(f"vision {name}: HF {a} vs checkpoint {b}")
    if hf.projector != ours.projector:
        problems.append(f"projector: HF {hf.projector} vs checkpoint {ours.projector}")
    return problems


def make_inputs(
    cfg: ModelConfig, image_token_id: int, tiles: int, text_tokens: int, seed: int
) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """A text-only case and a case with `tiles` image tiles between text: (token ids [1, s], pixels)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = cfg.language.vocab_size

    def text(n: int) -> torch.Tensor:
        ids = torch.randint(0, vocab, (n,), generator=gen)
        return torch.where(ids == image_token_id, (ids + 1) % vocab, ids)

    image = torch.full((tiles * cfg.tokens_per_tile,), image_token_id)
    size = cfg.vision.image_size
    return {
        "text": (text(2 * text_tokens)[None], None),
        "image": (
            torch.cat([text(text_tokens), image, text(text_tokens)])[None],
            torch.randn(tiles, 3, size, size, generator=gen),
        ),
    }


def input_size_problems(tiles: int, text_tokens: int) -> List[str]:
    """Both cases need at least one image tile and one text token on each side of it."""
    return [
        f"--{name} must be a positive integer, got {value!r}"
        for name, value in (("tiles", tiles), ("text-tokens", text_tokens))
        if isinstance(value, bool) or not isinstance(value, int) or value < 1
    ]


def compare(name: str, expected: torch.Tensor, actual: torch.Tensor) -> CaseResult:
    diff = float((expected.float() - actual.float()).abs().max())
    agree = float((expected.argmax(-1) == actual.argmax(-1)).float().mean())
    return CaseResult(name, expected.shape[1], diff, agree)


def _image_token_id(explicit: Optional[int], cfg: ModelConfig, hf_dir: Path, ckpt: Path) -> int:
    for candidate in (
        explicit,
        cfg.image_context_token_id,
        find_token_id(hf_dir),
        find_token_id(checkpoint_root(ckpt) / HF_SOURCE_DIR),
    ):
        if candidate is not None:
            return int(candidate)
    raise ConversionError(
        "no <IMG_CONTEXT> id", ["neither the checkpoint nor the tokenizer files name it"], "pass --image-token-id"
    )


def verify(
    hf_dir,
    ckpt,
    dtype: str = "fp32",
    atol: Optional[float] = None,
    min_top1: Optional[float] = None,
    tiles: int = 2,
    text_tokens: int = 16,
    seed: int = 0,
    image_token_id: Optional[int] = None,
) -> VerifyReport:
    """Run the HF folder and the megatron checkpoint on the same inputs and compare their logits."""
    hf_dir, ckpt = Path(hf_dir), Path(ckpt)
    raise_if(
        [] if dtype in DTYPE_OPTIONS else [f"unknown dtype {dtype!r}"],
        "bad --dtype",
        f"use one of {', '.join(DTYPE_OPTIONS)}",
    )
    raise_if(input_size_problems(tiles, text_tokens), "bad verify inputs")
    check_checkpoint(ckpt)  # a damaged checkpoint is reported before either model is built
    hf_cfg = model_config_from_hf(read_json(hf_dir / "config.json"), source=str(hf_dir / "config.json"))
    src = resolve_export_source(ckpt, base_hf=hf_dir)
    raise_if(_model_problems(hf_cfg, src.cfg), "the HF folder and the checkpoint describe different models")
    image_id = _image_token_id(image_token_id, src.cfg, hf_dir, ckpt)
    inputs = make_inputs(src.cfg, image_id, tiles, text_tokens, seed)
    torch_dtype = DTYPE_OPTIONS[dtype]

    reference = InternVLChatReference.from_folder(hf_dir, torch_dtype)
    expected = {name: reference(ids, px, image_id).float() for name, (ids, px) in inputs.items()}
    del reference
    gc.collect()

    vocab = src.cfg.language.vocab_size
    actual = {}
    with single_process():
        model = build_empty_model(dataclasses.replace(src.cfg, image_context_token_id=image_id), dtype, src.vocab_rows)
        load_model(model, ckpt)
        with torch.no_grad():
            for name, (ids, px) in inputs.items():
                positions = torch.arange(ids.shape[1])[None]
                actual[name] = model(ids, positions, None, pixel_values=px)[..., :vocab].float()
        del model
    default_atol, default_top1 = DEFAULT_TOLERANCES[dtype]
    return VerifyReport(
        [compare(name, expected[name], actual[name]) for name in inputs],
        atol if atol is not None else default_atol,
        min_top1 if min_top1 is not None else default_top1,
    )
