"""A synthetic, learnable image-caption source for smoke runs and benchmarks.

Each sample shows one or two images whose tiles carry a class pattern; its caption is a token
sequence fixed by that class. Predicting the caption's first token needs the image, the rest follow
the class's arithmetic rule, so a working model's loss falls within a few dozen steps.
Samples are a pure function of (seed, global sample index): any data-parallel layout that consumes
the same global batch sees the same samples.
"""

from dataclasses import dataclass
from typing import Iterator

import torch

from sail_megatron.data.batch import Batch

# Token ids of the synthetic vocabulary (a real run takes them from its tokenizer).
PAD, IMG_START, IMG_END, IMG_CONTEXT, FIRST_TEXT_ID = 0, 1, 2, 3, 16


@dataclass
class SyntheticConfig:
    seq_length: int = 128
    micro_batch_size: int = 2
    image_size: int = 112
    tokens_per_tile: int = 16
    vocab_size: int = 512
    num_classes: int = 8
    max_images: int = 2
    max_tiles_per_image: int = 2
    seed: int = 0


class SyntheticImageCaptions:
    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed + 7919)
        # One fixed random pattern per class; tiles are pattern + noise.
        self.patterns = torch.randn(cfg.num_classes, 3, cfg.image_size, cfg.image_size, generator=g)
        image_block = cfg.max_images * (2 + cfg.max_tiles_per_image * cfg.tokens_per_tile)
        if image_block + 8 > cfg.seq_length:
            raise ValueError(
                f"seq_length={cfg.seq_length} cannot hold {cfg.max_images} images of "
                f"{cfg.max_tiles_per_image} tiles ({image_block} tokens) plus a caption"
            )

    def sample(self, index: int) -> Batch:
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
        cls = int(torch.randint(cfg.num_classes, (1,), generator=g))
        n_images = int(torch.randint(1, cfg.max_images + 1, (1,), generator=g))
        tokens, tiles = [], []
        for _ in range(n_images):
            n_tiles = int(torch.randint(1, cfg.max_tiles_per_image + 1, (1,), generator=g))
            tiles.append(
                self.patterns[cls] + 0.5 * torch.randn(n_tiles, 3, cfg.image_size, cfg.image_size, generator=g)
            )
            tokens += [IMG_START] + [IMG_CONTEXT] * (n_tiles * cfg.tokens_per_tile) + [IMG_END]
        prompt_len = len(tokens)
        text_vocab = cfg.vocab_size - FIRST_TEXT_ID
        step = 1 + 2 * cls
        start = (97 * cls) % text_vocab
        caption_len = int(torch.randint(4, cfg.seq_length - prompt_len + 1, (1,), generator=g))
        tokens += [FIRST_TEXT_ID + (start + step * j) % text_vocab for j in range(caption_len)]
        tokens = torch.tensor(tokens + [PAD] * (cfg.seq_length + 1 - len(tokens)))
        loss_mask = torch.zeros(cfg.seq_length)
        loss_mask[prompt_len - 1 : prompt_len - 1 + caption_len] = 1.0  # targets are caption tokens
        return Batch(
            tokens=tokens[None, :-1],
            labels=tokens[None, 1:],
            loss_mask=loss_mask[None],
            position_ids=torch.arange(cfg.seq_length)[None],
            pixel_values=torch.cat(tiles),
        )

    def micro_batches(
        self, data_parallel_rank: int, data_parallel_size: int, num_microbatches: int, start_step: int = 0
    ) -> Iterator[Batch]:
        """Endless micro-batches for one data-parallel rank: step k uses global samples
        [k*G, (k+1)*G) with G = micro_batch_size * num_microbatches * data_parallel_size, and this
        rank takes its contiguous share."""
        mbs = self.cfg.micro_batch_size
        per_rank = mbs * num_microbatches
        step = start_step
        while True:
            base = step * per_rank * data_parallel_size + data_parallel_rank * per_rank
            for m in range(num_microbatches):
                yield Batch.collate([self.sample(base + m * mbs + i) for i in range(mbs)])
            step += 1
