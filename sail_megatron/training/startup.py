"""Start-up shared by the training driver and sail-bench: the recipe resolved and checked before any
process group exists (a bad recipe exits with code 2 and no rank can hang), and a rank's model stage
with its optimizer and schedule."""

import logging
import sys
from pathlib import Path

from sail_megatron.config import ConfigError
from sail_megatron.config.train import TrainConfig, load_train_config
from sail_megatron.data.dataset_path import check_dataset_path
from sail_megatron.data.tokenizer import load_tokenizer
from sail_megatron.data.valid_sources import check_valid_sources
from sail_megatron.model.build import build_model
from sail_megatron.platform import detect_backends, read_dist_env
from sail_megatron.training.checkpoint_files import CheckpointError
from sail_megatron.training.freezing import apply_freezing
from sail_megatron.training.optimizer import setup_training
from sail_megatron.training.resume import choose_start

logger = logging.getLogger("sail_megatron.train")


def prepare_config(args, world_size: int, needs_data: bool = True, loads_checkpoints: bool = True):
    """Everything that can be wrong with the recipe fails here, on every rank, before any collective.
    needs_data: False for runs on synthetic rows, which never read data.path; loads_checkpoints: False
    for runs that start from random weights whatever the recipe says (sail-bench)."""
    cfg = load_train_config(args.config, args.overrides)
    tokenizer = _load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.language.vocab_size:
        raise ConfigError(
            "model.language.vocab_size",
            f"{cfg.model.language.vocab_size} rows cannot embed the tokenizer's {tokenizer.vocab_size} tokens",
            "use the tokenizer the model was trained with",
        )
    cfg.model.image_context_token_id = tokenizer.ids.img_context
    backends = detect_backends()
    cfg.validate(
        world_size,
        has_cuda=backends.cuda,
        has_te=backends.transformer_engine,
        cuda_capability=backends.cuda_capability,
        needs_data=needs_data,
    )
    if needs_data:
        check_dataset_path(cfg.data.path)
        if cfg.run.eval_interval:
            check_valid_sources(cfg.data)
    # The checkpoint this run will load, complete and readable (the run's own newest good one, else
    # init_from); train() takes the same decision again once the process group exists, and logs it.
    if loads_checkpoints:
        choose_start(cfg.run.save_dir, cfg.run.resume, cfg.run.init_from)
    return cfg, tokenizer


def _load_tokenizer(path: str):
    if not Path(path).is_dir():
        raise ConfigError(
            "data.tokenizer",
            f"{path} is not a folder",
            "point it at a local tokenizer folder "
            "(tokenizer.json or vocab files, with <IMG_CONTEXT>, <img>, </img> added)",
        )
    try:
        return load_tokenizer(path)
    except ConfigError:
        raise
    except Exception as e:  # transformers raises many types for an unusable folder
        raise ConfigError(
            "data.tokenizer",
            f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}",
            "point it at a folder saved by a Hugging Face tokenizer (save_pretrained)",
        ) from None


def build_training(cfg: TrainConfig, device):
    """This rank's model stage, frozen by stage and DDP-wrapped, with its optimizer and lr schedule."""
    model = build_model(cfg.model, cfg.parallel, cfg.precision, max_tiles=cfg.vision_max_tiles())
    apply_freezing(model, cfg.freeze)
    model.to(device)
    return setup_training(model, cfg.optim, cfg.parallel, cfg.precision, cfg.lr_schedule())


def start(args, needs_data: bool = True, loads_checkpoints: bool = True):
    """Logging for this rank, then the recipe resolved and validated: (env, cfg, tokenizer). A bad
    recipe exits with code 2 here, before any process group exists, so no rank can hang."""
    env = read_dist_env()
    logging.basicConfig(
        level=logging.INFO if env.is_main else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)
    try:
        cfg, tokenizer = prepare_config(args, env.world_size, needs_data, loads_checkpoints)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        logger.error("%s", e)
        sys.exit(2)
    return env, cfg, tokenizer
