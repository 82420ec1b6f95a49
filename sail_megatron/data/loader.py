"""Builds the energon training and validation loaders for one data-parallel rank."""

import warnings
from typing import Optional

from megatron.energon import (
    SavableDataLoader,
    WorkerConfig,
    get_loader,
    get_savable_loader,
    get_train_dataset,
    get_val_dataset,
)

from sail_megatron.config.data import DataConfig
from sail_megatron.data.object_store import is_store_url, read_error, store_errors
from sail_megatron.data.task_encoder import build_task_encoder
from sail_megatron.data.tokenizer import Tokenizer

# energon's loader always asks for pinned memory; on a machine without a GPU torch warns once per loader
# that pinning does nothing there, which is true and harmless.
warnings.filterwarnings(
    "ignore", message="'pin_memory' argument is set as true but no accelerator is found", category=UserWarning
)


def build_train_loader(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    tile_size: int,
    tokens_per_tile: int,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    seed: int = 0,
    state: Optional[dict] = None,
) -> SavableDataLoader:
    """An endless, shuffled, savable loader of RawBatch. Ranks of one data-parallel replica (its TP
    and PP peers) build the same loader and so read the same micro-batches.
    `state` (from `loader.save_state_rank()`) resumes exactly where that loader stood."""
    cfg.validate()
    worker_config = WorkerConfig(
        rank=data_parallel_rank, world_size=data_parallel_size, num_workers=cfg.num_workers, seed_offset=seed
    )
    dataset = get_train_dataset(
        cfg.path,
        worker_config=worker_config,
        batch_size=cfg.micro_batch_size,
        shuffle_buffer_size=cfg.shuffle_buffer_size or None,
        max_samples_per_sequence=cfg.max_samples_per_sequence,
        packing_buffer_size=cfg.packing_buffer_size if cfg.packing else None,
        task_encoder=build_task_encoder(cfg, tokenizer, tile_size, tokens_per_tile, seed=seed),
    )
    loader = get_savable_loader(dataset)
    if state is not None:
        loader.restore_state_rank(state)
    return StoreErrorsNamed(loader, cfg.path) if is_store_url(cfg.path) else loader


class StoreErrorsNamed:
    """The training loader of an object-store dataset (`msc://`), unchanged but for its iteration: a read
    that fails for good, after MSC's retries, raises DataReadError naming the URL (energon raises it too,
    not skipping the shard, but from deep inside a worker's traceback). Everything else (state saving and
    restoring) is the wrapped loader's."""

    def __init__(self, loader: SavableDataLoader, store_url: str):
        self.loader, self.store_url = loader, store_url

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        inner = iter(self.loader)
        while True:
            try:
                batch = next(inner)
            except StopIteration:
                return
            except store_errors() as e:
                raise read_error(self.store_url, "data.path", e) from e
            yield batch


def build_valid_loader(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    tile_size: int,
    tokens_per_tile: int,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    seed: int = 0,
    limit: Optional[int] = None,
    path: Optional[str] = None,
):
    """This rank's share of the `val` split of `path` (a prepared folder or blend: one validation source,
    see data/valid_sources.py; None: `data.path`): read once, in order, packed like training; at most
    `limit` rows."""
    cfg.validate()
    # Read in this process: the rows are read once, and worker processes would outlive the read (energon's
    # are persistent), holding memory for the whole run. It also keeps the split's cut among ranks
    # independent of data.num_workers.
    worker_config = WorkerConfig(
        rank=data_parallel_rank, world_size=data_parallel_size, num_workers=0, seed_offset=seed
    )
    dataset = get_val_dataset(
        path or cfg.path,
        split_part="val",
        worker_config=worker_config,
        batch_size=cfg.micro_batch_size,
        packing_buffer_size=cfg.packing_buffer_size if cfg.packing else None,
        limit=limit,
        task_encoder=build_task_encoder(cfg, tokenizer, tile_size, tokens_per_tile, seed=seed),
    )
    return get_loader(dataset)
