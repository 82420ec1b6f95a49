"""A training recipe: model preset, parallel layout, precision, freezing, data, optimizer and run.

Recipes are YAML files (examples/configs/); a recipe may `inherit:` another (path relative to itself)
and command-line overrides use dotted keys (`optim.lr=2e-5`). `python -m sail_megatron.config.train
--config RECIPE.yaml [key=value ...]` prints the resolved config.
"""

import argparse
import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from sail_megatron.config.budget import Budget, budget_of, scale_points
from sail_megatron.config.counts import Count
from sail_megatron.config.data import DataConfig
from sail_megatron.config.errors import ConfigError
from sail_megatron.config.freezing import FreezeConfig
from sail_megatron.config.loading import apply_overrides, from_dict, load_yaml, merge
from sail_megatron.config.lr_schedule import LrSchedule, resolve_lr_schedule
from sail_megatron.config.model import ModelConfig
from sail_megatron.config.optim import OptimConfig
from sail_megatron.config.parallel import ParallelConfig
from sail_megatron.config.precision import PrecisionConfig
from sail_megatron.config.presets import PRESETS, get_preset

RESUME_MODES = ("auto", "required", "never")
OPTIMIZER_CHECKPOINTS = ("dp_reshardable", "fully_reshardable")  # megatron-core's names (training/checkpoint.py)
FAULT_KINDS = ("hang", "kill", "exit")


@dataclass(frozen=True)
class Fault:
    """A fault to inject (run.inject_fault): what, at which step (0: during start-up, before the process
    group exists), on which global rank."""

    kind: str
    step: int
    rank: int = 0


def parse_fault(text: str) -> Fault:
    """'KIND@STEP[:RANK]' -> Fault; a ConfigError naming run.inject_fault otherwise."""
    try:
        kind, rest = text.split("@", 1)
        step, _, rank = rest.partition(":")
        fault = Fault(kind.strip(), int(step), int(rank) if rank else 0)
    except ValueError:
        fault = None
    if fault is None or fault.kind not in FAULT_KINDS or fault.step < 0 or fault.rank < 0:
        raise ConfigError(
            "run.inject_fault",
            f"cannot read {text!r}",
            f"use KIND@STEP[:RANK] with KIND one of {', '.join(FAULT_KINDS)} and STEP >= 0 (0: during start-up), "
            "e.g. 'kill@5:1'",
        )
    return fault


def parse_faults(text: str) -> List[Fault]:
    """'KIND@STEP[:RANK],KIND@STEP[:RANK],...' -> the faults of a drill, in the order given."""
    return [parse_fault(part.strip()) for part in text.split(",")]


@dataclass
class RunConfig:
    """The run itself: length, batch, where it writes, what it starts from."""

    train_steps: Optional[Count] = None
    """The stage's length in optimizer steps. A stage has exactly one budget: train_steps, train_tokens or
    train_samples (the others null); it stops at the first step that reaches it."""
    train_tokens: Optional[Count] = None
    """The stage's length in tokens the language model trains on (non-padding text and image tokens,
    over all data-parallel ranks), e.g. 131B. The lr schedule then runs in tokens."""
    train_samples: Optional[Count] = None
    """The stage's length in samples (original records, however packing grouped them), e.g. 21M. The lr
    schedule then runs in samples."""
    save_at_tokens: Union[List[Count], str, None] = None
    """Extra checkpoints kept for good (keep_last never prunes them) at the first step reaching each of
    these token counts: a list ([1B, 10B, 100B]), 'log2' (1B, 2B, 4B, ...) or 'log2:START' (doubling from
    START): the checkpoints a scaling curve is read from."""
    global_batch_size: int = 8
    """Rows (packed micro-batches of seq_length tokens) per optimizer step, over all data-parallel ranks."""
    seed: int = 1234
    log_interval: int = 1
    save_dir: str = "runs/default"
    save_interval: int = 1000
    keep_last: int = 3
    """Checkpoints kept (older ones are deleted once a newer one is complete)."""
    init_from: Optional[str] = None
    """Checkpoint of the previous stage (or a converted Hugging Face model) to start from."""
    eval_interval: int = 0
    """Validate every this many steps, at the end of the run and, on a run's first start, before the first
    step (0: never). What it reads: data.valid_path (one loss per source and their total)."""
    eval_steps: int = 10
    """Validation batches per validation source (data.valid_path), each of global_batch_size rows like a
    training step; the same rows every time. 0: the whole validation split of every source."""
    max_nonfinite_steps: int = 5
    """A step whose loss or gradients are NaN/Inf is skipped and counted; this many in a row stop the run."""
    peak_tflops: Optional[float] = None
    """Per-device dense bf16/fp16 peak for MFU; None: looked up from the GPU's name (FP8 runs then also
    report MFU against the FP8 peak)."""
    tensorboard: bool = True
    plot: bool = True
    """Draw `curves.png` (loss, throughput, lr) from metrics.jsonl when the run ends."""
    resume: str = "auto"
    """'auto': continue from the newest good checkpoint in save_dir when there is one (a damaged newer one
    is reported and passed over), else start from init_from; 'required': refuse to start without one;
    'never': refuse a save_dir that already holds checkpoints."""
    optimizer_checkpoint: str = "dp_reshardable"
    """How the optimizer state is saved: 'dp_reshardable' (every rank writes its own shard, no gather: fast;
    resumes under another data-parallel size) or 'fully_reshardable' (gathered per parameter: slower; also
    resumes under another TP/PP). Weights alone (`init_from`) load under any layout either way."""
    async_save: bool = False
    """Write checkpoints in a background process: the step loop pays only for staging the state in host
    memory; `latest` moves once every rank's write is complete."""
    process_group_timeout_s: int = 1800
    """How long a collective may wait before the process group gives up (torch's default is 30 minutes)."""
    step_timeout_s: Optional[float] = None
    """A step (or a checkpoint save) taking longer than this dumps every thread's stack into RUN/hangs/ and
    exits with code 3, so the launcher restarts the job. None: off."""
    step_timeout_factor: float = 0.0
    """Also treat a step as hung past this many times the median of the recent steps (0: off)."""
    inject_fault: Optional[str] = None
    """Testing and drills only: 'hang@STEP', 'kill@STEP' or 'exit@STEP', optionally ':RANK' (default rank
    0), e.g. 'kill@5:1' SIGKILLs rank 1 at step 5; several, comma-separated, make a drill ('kill@3:1,hang@5:0').
    Step 0 fires during start-up, before the process group exists ('exit@0:1': a rank lost while the job
    starts). Each fires once per run folder. Off by default."""

    def validate(self) -> None:
        self.budget()
        scale_points(self.save_at_tokens)
        for name in (
            "global_batch_size",
            "log_interval",
            "save_interval",
            "keep_last",
            "max_nonfinite_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name}", f"must be >= 1, got {getattr(self, name)}", "set a positive value")
        if self.optimizer_checkpoint not in OPTIMIZER_CHECKPOINTS:
            raise ConfigError(
                "run.optimizer_checkpoint",
                f"unknown format {self.optimizer_checkpoint!r}",
                f"use one of {', '.join(OPTIMIZER_CHECKPOINTS)}",
            )
        if self.resume not in RESUME_MODES:
            raise ConfigError("run.resume", f"unknown mode {self.resume!r}", f"use one of {', '.join(RESUME_MODES)}")
        for name in ("eval_interval", "eval_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"run.{name}", f"must be >= 0, got {getattr(self, name)}", "use 0 or a positive count"
                )
        if self.process_group_timeout_s < 1:
            raise ConfigError("run.process_group_timeout_s", "must be >= 1", "use seconds, e.g. 1800")
        if self.step_timeout_s is not None and not self.step_timeout_s > 0:
            raise ConfigError("run.step_timeout_s", f"must be > 0, got {self.step_timeout_s}", "use seconds or null")
        if self.step_timeout_s is not None and self.step_timeout_s >= self.process_group_timeout_s:
            raise ConfigError(
                "run.step_timeout_s",
                f"is {self.step_timeout_s} s, not below run.process_group_timeout_s ({self.process_group_timeout_s} s): "
                "a hung collective would end the process first, without the per-rank stack dumps",
                "set run.step_timeout_s below run.process_group_timeout_s",
            )
        if not self.step_timeout_factor >= 0 or 0 < self.step_timeout_factor <= 1:
            raise ConfigError(
                "run.step_timeout_factor",
                f"is {self.step_timeout_factor}",
                "use 0 (off) or a factor above 1, e.g. 10",
            )
        if self.inject_fault is not None:
            parse_faults(self.inject_fault)

    def budget(self) -> Budget:
        """The stage's one budget (a ConfigError when none or several are set)."""
        return budget_of(self.train_steps, self.train_tokens, self.train_samples)


@dataclass
class TrainConfig:
    model_preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def num_microbatches(self, world_size: int) -> int:
        per_step = self.data.micro_batch_size * self.parallel.data_parallel_size(world_size)
        if self.run.global_batch_size % per_step:
            raise ConfigError(
                "run.global_batch_size",
                f"{self.run.global_batch_size} is not a multiple of micro_batch_size x data-parallel size = {per_step}",
                f"use a multiple of {per_step} or change the layout",
            )
        return self.run.global_batch_size // per_step

    def lr_schedule(self) -> LrSchedule:
        """The lr schedule's lengths in the unit of the stage's budget."""
        return resolve_lr_schedule(self.optim, self.run.budget())

    def validate(
        self,
        world_size: int,
        has_cuda: bool,
        has_te: bool,
        cuda_capability: Optional[Tuple[int, int]] = None,
        needs_data: bool = True,
    ) -> None:
        """Every check, before any process group exists. cuda_capability: Backends.cuda_capability;
        needs_data: False for runs on synthetic rows."""
        self.model.validate()
        self.parallel.validate(self.model, world_size)
        self.precision.validate(has_cuda=has_cuda, has_te=has_te, cuda_capability=cuda_capability)
        self.parallel.check_layer_backend(self.precision.resolve_layers(has_cuda, has_te))
        self.freeze.validate()
        self.data.validate(needs_path=needs_data)
        # The ViT's tile buckets and CUDA graphs against the data, the parallel layout and the freezing.
        self.precision.check_vision_layout(self.parallel, self.vision_max_tiles(), "vision" in self.freeze.trainable)
        self.optim.validate()
        self.run.validate()
        self.lr_schedule()
        self.num_microbatches(world_size)

    def vision_max_tiles(self) -> int:
        """The most tiles one ViT call gets: a micro-batch's rows, each with up to data.max_tiles_per_pack."""
        return self.data.micro_batch_size * self.data.max_tiles_per_pack


def _read_recipe(path: Path, seen: tuple = ()) -> Dict[str, Any]:
    path = Path(path).resolve()
    if path in seen:
        raise ConfigError("inherit", f"{path} inherits itself", "break the inheritance cycle")
    data = load_yaml(path)
    parent = data.pop("inherit", None)
    return merge(_read_recipe(path.parent / parent, seen + (path,)), data) if parent else data


def resolve(data: Dict[str, Any]) -> TrainConfig:
    """A resolved dict -> TrainConfig; `model` starts from the named preset and takes overrides."""

    data = copy.deepcopy(data)
    preset = data.pop("model_preset", "tiny")
    if preset not in PRESETS:
        raise ConfigError("model_preset", f"unknown preset {preset!r}", f"use one of {sorted(PRESETS)}")
    model = merge(dataclasses.asdict(get_preset(preset)), data.pop("model", {}) or {})
    cfg = from_dict(TrainConfig, {**data, "model": {}})
    cfg.model = from_dict(ModelConfig, model, "model")
    cfg.model_preset = preset
    return cfg


def load_train_config(path, overrides: Sequence[str] = ()) -> TrainConfig:
    return resolve(apply_overrides(_read_recipe(Path(path)), overrides))


def dump(cfg: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def flat_config(cfg: TrainConfig) -> Dict[str, Any]:
    """dotted.key -> value of every leaf of a resolved config."""
    out: Dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = node

    walk(dataclasses.asdict(cfg), "")
    return out


def config_differences(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    """'key: A -> B' for every leaf where two flat configs differ."""
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def override_changes(path, overrides: Sequence[str]) -> List[str]:
    """What the overrides change in the recipe at `path`, leaf by leaf."""
    if not overrides:
        return []
    return config_differences(flat_config(load_train_config(path)), flat_config(load_train_config(path, overrides)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="Print a recipe resolved with its overrides, after checking it as for a GPU machine with "
        "Transformer Engine (`sail-train --check` checks it for this machine, its data and checkpoints)."
    )
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.add_argument("--world-size", type=int, default=None, help="processes to check the layout for (default TP x PP)")
    args = p.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        world = args.world_size or cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
        cfg.validate(world, has_cuda=True, has_te=True, needs_data=False)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(dump(cfg), end="")
    print(f"# budget: {cfg.run.budget().describe()}; lr schedule: {cfg.lr_schedule().describe(cfg.optim.schedule)}")


if __name__ == "__main__":
    main()
