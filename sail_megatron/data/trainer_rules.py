"""The trainer's own sample checks, run by `sail-data prepare` on each entry it is about to write.

A sample that the task encoder would always skip (an image placeholder in an answer, more image tokens
than the sequence budget, more tiles than a pack holds) is better skipped and counted once, when the
shards are written, than on every epoch of every run. The check is the task encoder itself, fed the
entry exactly as the loader will cook it from the shard; only its skip hook is replaced, so that the
reason comes back to prepare instead of going to the training log.

Without a recipe only the rules that hold for every recipe apply: the text is not tokenized and the
budgets are unbounded. With a recipe (`--recipe`), its tokenizer, sequence length and tiling decide.

With a recipe, text longer than `seq_length` tokens could ever cover is known without tokenizing it: no
token of the tokenizer spans more than its longest vocabulary entry (in UTF-8 bytes, each at least one
character), and Unicode normalization merges at most 3 characters into one (Hangul jamo), so a record with
more than `4 * seq_length * longest` characters of text cannot fit (`max_text_chars`). `sail-data prepare`
skips such records before the probe would spend seconds tokenizing them.

The probe's encoding of an entry it accepts is also its measurement (`assess`): with a recipe, its tokens
(image blocks expanded) and tiles are exactly what training will see, and prepare sums them into the
report's token statistics (`statistics.py`). Without a recipe the text is not tokenized and nothing is
measured.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from sail_megatron.config.data import DEFAULT_MAX_PIXELS, DataConfig
from sail_megatron.data.input_files import check_files_in, check_regular
from sail_megatron.data.sample import VLSample, cook_vl_sample
from sail_megatron.data.statistics import SampleMeasure
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


def longest_token_bytes(tokenizer) -> int:
    """UTF-8 bytes of the longest entry of the tokenizer's vocabulary (added tokens included)."""
    return max((len(t.encode("utf-8")) for t in tokenizer.hf.get_vocab()), default=1)


@dataclass(frozen=True)
class Assessment:
    """What the trainer makes of one shard entry: why it would skip it, or (with a recipe) its measure."""

    rejection: Optional[Tuple[str, str]] = None  # (reason, detail)
    measure: Optional[SampleMeasure] = None  # None when rejected, or when the rules do not tokenize text


@dataclass(frozen=True)
class TrainerRules:
    probe: _Probe
    source: str  # what the budgets come from, for the report
    max_text_chars: Optional[int] = None  # more characters of text than this can never fit (module docstring)
    text_bound: str = ""  # what max_text_chars comes from, for skip details
    measures: bool = False  # the probe tokenizes text as training will, so its lengths are worth recording

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
            check_regular(recipe)
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
        check_files_in(tok_dir, "data.tokenizer")
        tokenizer = load_tokenizer(tok_dir)
        probe = _Probe(
            cfg.data, tokenizer, tile_size=cfg.model.vision.image_size, tokens_per_tile=cfg.model.tokens_per_tile
        )
        return cls(
            probe,
            f"recipe {recipe} (seq_length {cfg.data.seq_length}, max_tiles {cfg.data.max_tiles}, "
            f"max_tiles_per_pack {cfg.data.max_tiles_per_pack})",
            max_text_chars=4 * cfg.data.seq_length * longest_token_bytes(tokenizer),
            text_bound=f"more than seq_length {cfg.data.seq_length} tokens of the recipe's tokenizer can hold",
            measures=True,
        )

    def assess(self, meta_json: bytes, images: Sequence[Tuple[bytes, str]]) -> Assessment:
        """The rejection if the trainer would skip this shard entry; else, with a recipe, its measure."""
        raw: Dict[str, object] = {"__key__": "prepare", "__restore_key__": (), "json": meta_json}
        raw.update({f"img{i}.{ext}": data for i, (data, ext) in enumerate(images)})
        return self.assess_sample(cook_vl_sample(raw))

    def assess_sample(self, sample: VLSample) -> Assessment:
        """`assess` for an entry already cooked (by whichever cooker its layout takes)."""
        try:
            encoded = self.probe.encode_sample(sample)
        except Rejected as r:
            return Assessment(rejection=("malformed_sample" if r.reason == "malformed" else r.reason, r.detail))
        if not self.measures:
            return Assessment()
        tiles = encoded.num_tiles
        return Assessment(measure=SampleMeasure(encoded.num_tokens, tiles * self.probe.template.tokens_per_tile, tiles))

    def rejection(self, meta_json: bytes, images: Sequence[Tuple[bytes, str]]) -> Optional[Tuple[str, str]]:
        """(reason, detail) if the trainer would skip this shard entry, else None."""
        return self.assess(meta_json, images).rejection
