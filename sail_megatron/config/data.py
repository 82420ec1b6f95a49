"""Data pipeline config: where the shards are, how images are tiled, how sequences are built."""

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

from sail_megatron.config.errors import ConfigError

DECODERS = ("auto", "dali", "pil")
TEMPLATES = ("chatml", "sailvl-chat", "univl-chat", "internvl2_5")
"""Chat template names; their definitions are in sail_megatron/data/templates.py (a layer above)."""


SOURCE_NAME = re.compile(r"[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*\Z")
"""A validation source's name, as it appears in metric keys (`valid_loss/<name>`, `loss/valid/<name>`)."""


DEFAULT_MAX_PIXELS = 64_000_000
"""Largest image accepted (width x height), everywhere images are read: larger ones are skipped and
counted. 64 MP keeps a decode well under a second and a few hundred MB."""


@dataclass
class DataConfig:
    path: str = ""
    """A folder prepared by `sail-data prepare`, or an energon metadataset YAML blending several."""
    valid_path: Union[str, List[str], Dict[str, str], None] = None
    """Where validation reads (with `run.eval_interval`), one loss per source plus their total: the `val`
    split of a prepared folder or blend YAML, a list of them, or a mapping name -> folder or blend.
    A folder is one source named by its folder name; a blend's val split gives one source per dataset
    (a list's entries likewise); a mapping's entry is one source of that name, a blend under a name
    scored as a whole. None: the `val` split of `path`, its datasets as the sources
    (`sail-data prepare --valid-fraction` holds one out)."""
    tokenizer: str = ""
    """A local Hugging Face tokenizer folder with <img>, </img> and <IMG_CONTEXT> tokens."""
    seq_length: int = 4096
    micro_batch_size: int = 1
    min_tiles: int = 1
    max_tiles: int = 6
    """SAIL-VL trains with up to 6 tiles per image (10-12 in evaluation, up to 24 for documents)."""
    use_thumbnail: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images whose header claims more pixels are skipped (decompression bombs)."""
    packing: bool = True
    """Pack several samples into each row (THD attention, per-sample RoPE); micro_batch_size must be 1."""
    max_tiles_per_pack: int = 64
    """Vision tiles one packed row may carry: bounds the ViT's memory and balances its work."""
    packing_buffer_size: int = 256
    """Samples planned together; larger buffers fill rows better (the last pack of a buffer is partial)."""
    balance_tiles_across_ranks: bool = True
    """With several data-parallel ranks, each step every rank picks its micro-batches from a look-ahead
    buffer of ready rows so that all ranks carry about the same number of vision tiles (no rows move
    between ranks, nothing is decoded twice; data/rank_balance.py). No effect with one data-parallel rank."""
    balance_lookahead: int = 8
    """Rows each rank keeps ready beyond the step's micro-batches to choose from (held undecoded in memory
    and in checkpoints)."""
    balance_max_delay: int = 8
    """Steps a row may run later than it would without balancing (no row waits longer)."""
    template: str = "chatml"
    """How conversations are rendered: 'chatml' (plain Qwen chatml), 'sailvl-chat' (what SAIL-VL
    checkpoints were trained with: no newline between turns, a default system message) or 'internvl2_5'."""
    system_prompt: Optional[str] = None
    """Replaces the template's default system message (a sample's own system turn still wins); '' drops it."""
    num_workers: int = 2
    shuffle_buffer_size: int = 100
    """Samples mixed across shard streams; 0 disables it (shard order and in-shard order still shuffle)."""
    max_samples_per_sequence: int = 100
    """Samples read from one shard in a row before energon switches shards (shuffle quality)."""
    decoder: str = "auto"
    """Tile decoder: 'dali' (device 'mixed' with CUDA, 'cpu' otherwise), 'pil' (reference), 'auto' (DALI if installed)."""

    def validate(self, needs_path: bool = True) -> None:
        """needs_path: False for runs on synthetic rows, which read no dataset."""
        if needs_path and not self.path:
            raise ConfigError("data.path", "is empty", "point it at a prepared dataset folder or a blend YAML")
        if not self.tokenizer:
            raise ConfigError("data.tokenizer", "is empty", "point it at a local Hugging Face tokenizer folder")
        for name in (
            "seq_length",
            "micro_batch_size",
            "min_tiles",
            "max_tiles",
            "max_pixels",
            "max_tiles_per_pack",
            "packing_buffer_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"data.{name}", f"must be positive, got {getattr(self, name)}", "set a positive value"
                )
        if self.balance_tiles_across_ranks:
            for name in ("balance_lookahead", "balance_max_delay"):
                if getattr(self, name) < 1:
                    raise ConfigError(
                        f"data.{name}",
                        f"must be >= 1 to balance tiles across ranks, got {getattr(self, name)}",
                        "set it >= 1 (8 is the default) or set data.balance_tiles_across_ranks=false",
                    )
        if self.min_tiles > self.max_tiles:
            raise ConfigError(
                "data.min_tiles", f"{self.min_tiles} exceeds max_tiles={self.max_tiles}", "keep min_tiles <= max_tiles"
            )
        if self.packing and self.micro_batch_size != 1:
            raise ConfigError(
                "data.micro_batch_size",
                f"is {self.micro_batch_size} with packing on",
                "use micro_batch_size=1 (a packed row holds many samples) or set data.packing=false",
            )
        if self.num_workers < 0:
            raise ConfigError("data.num_workers", "must be >= 0", "use 0 to load in the training process")
        if self.template not in TEMPLATES:
            raise ConfigError(
                "data.template", f"unknown chat template {self.template!r}", f"use one of {', '.join(TEMPLATES)}"
            )
        if self.decoder not in DECODERS:
            raise ConfigError("data.decoder", f"unknown decoder {self.decoder!r}", f"use one of {DECODERS}")
        self._validate_valid_path()

    def _validate_valid_path(self) -> None:
        """The shape of valid_path; what its paths hold is checked before training (data/valid_sources.py)."""
        paths = self.valid_path
        if isinstance(paths, list):
            if not paths:
                raise ConfigError(
                    "data.valid_path", "is an empty list", "list prepared folders or blends, or leave it unset (null)"
                )
            for i, path in enumerate(paths):
                if not path:
                    raise ConfigError(f"data.valid_path[{i}]", "is empty", "give a prepared folder or a blend YAML")
        elif isinstance(paths, dict):
            if not paths:
                raise ConfigError(
                    "data.valid_path", "is an empty mapping", "map names to prepared folders or blends, or set null"
                )
            for name, path in paths.items():
                if not SOURCE_NAME.match(name):
                    raise ConfigError(
                        f"data.valid_path.{name}",
                        f"{name!r} is not a usable source name (it becomes the metric key valid_loss/{name})",
                        "use letters, digits and _ . + - (a / between parts)",
                    )
                if not path:
                    raise ConfigError(f"data.valid_path.{name}", "is empty", "give a prepared folder or a blend YAML")
