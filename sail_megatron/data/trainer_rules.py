"""The trainer's own sample checks, run by `sail-data prepare` on each entry it is about to write.

A sample that the task encoder would always skip (an image placeholder in an answer, more image tokens
than the sequence budget, more tiles than a pack holds) is better skipped and counted once, when the
shards are written, than on every epoch of every run. The check is the task encoder itself, fed the
entry exactly as the loader will cook it from the shard; only its skip hook is replaced, so that the
reason comes back to prepare instead of going to the training log.

Without a recipe only the rules that hold for every recipe apply: the text is not tokenized and the
budgets are unbounded. With a recipe (`--recipe`), its tokenizer, sequence length and tiling decide.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from sail_megatron.config.data import DEFAULT_MAX_PIXELS, DataConfig
from sail_megatron.data.sample import cook_vl_sample
from sail_megatron.data.task_encoder import PaddedTaskEncoder
from sail_megatron.data.tokenizer import TokenIds

_UNBOUNDED = 2**31 - 1


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class _Probe(PaddedTaskEncoder):
    """The task encoder with its skip hook raising the reason instead of logging and counting it."""

    def _skip(self, sample, reason: str, detail: str):
        raise Rejected(reason, detail)


class _UntokenizedText:
    """Stands in for a tokenizer when no recipe is given: text costs no tokens, so only the rules that
    do not depend on lengths can reject a sample."""

    ids = TokenIds(pad=0, eos=1, im_start=2, im_end=3, img_start=4, img_end=5, img_context=6)

    def encode(self, text: str) -> List[int]:
        return []

    def encode_text(self, text: str) -> List[int]:
        return []


@dataclass(frozen=True)
class TrainerRules:
    probe: _Probe
    source: str  # what the budgets come from, for the report

    @classmethod
    def structural(cls, max_pixels: int = DEFAULT_MAX_PIXELS) -> "TrainerRules":
        cfg = DataConfig(
            path="-",
            tokenizer="-",
            seq_length=_UNBOUNDED,
            max_tiles_per_pack=_UNBOUNDED,
            max_pixels=max_pixels,
            packing=False,
        )
        return cls(_Probe(cfg, _UntokenizedText(), tile_size=448, tokens_per_tile=1), "no recipe")

    @classmethod
    def from_recipe(cls, recipe: Path, overrides: Sequence[str] = ()) -> "TrainerRules":
        """The data settings, tokenizer and tokens per tile of a training recipe (as `sail-train` resolves it)."""
        import yaml

        from sail_megatron.config.errors import ConfigError
        from sail_megatron.config.train import load_train_config
        from sail_megatron.data.tokenizer import load_tokenizer

        try:
            cfg = load_train_config(Path(recipe), list(overrides))
        except (ConfigError, OSError, ValueError, yaml.YAMLError) as e:
            reason = str(e).strip() or type(e).__name__
            raise ValueError(f"--recipe {recipe}: {reason}") from None
        tok_dir = Path(cfg.data.tokenizer)
        if not cfg.data.tokenizer or not tok_dir.is_dir():
            raise ValueError(
                f"--recipe {recipe}: data.tokenizer {cfg.data.tokenizer!r} is not a folder; the budget "
                "check tokenizes the text: build the tokenizer first or pass --set data.tokenizer=DIR"
            )
        tokenizer = load_tokenizer(tok_dir)
        probe = _Probe(
            cfg.data, tokenizer, tile_size=cfg.model.vision.image_size, tokens_per_tile=cfg.model.tokens_per_tile
        )
        return cls(
            probe,
            f"recipe {recipe} (seq_length {cfg.data.seq_length}, max_tiles {cfg.data.max_tiles}, "
            f"max_tiles_per_pack {cfg.data.max_tiles_per_pack})",
        )

    def rejection(self, meta_json: bytes, images: Sequence[Tuple[bytes, str]]) -> Optional[Tuple[str, str]]:
        """(reason, detail) if the trainer would skip this shard entry, else None."""
        raw: Dict[str, object] = {"__key__": "prepare", "__restore_key__": (), "json": meta_json}
        raw.update({f"img{i}.{ext}": data for i, (data, ext) in enumerate(images)})
        try:
            self.probe.encode_sample(cook_vl_sample(raw))
        except Rejected as r:
            return ("malformed_sample" if r.reason == "malformed" else r.reason), r.detail
        return None
