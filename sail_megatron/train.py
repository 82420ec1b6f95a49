"""The training driver: `torchrun ... -m sail_megatron.train --config RECIPE.yaml [key=value ...]`.

Resolves and validates the recipe before any process group exists, builds this rank's model stage,
freezes by stage, starts from `run.init_from` (the previous stage's weights) or resumes exactly from
the run's own latest checkpoint (model, optimizer, scheduler, RNG and loader state), trains on packed
micro-batches, validates on fixed rows of the validation split (before the first step, every
`run.eval_interval` steps and at the end), logs (console, TensorBoard, metrics.jsonl, curves.png) and
saves every `run.save_interval` steps, on SIGTERM/SIGUSR1 (under torchrun SIGTERM is best-effort: torchrun
kills its ranks 30 s after forwarding it; USR1 sent to the ranks has no such limit), and at the end. Steps
with a NaN/Inf loss or gradient are skipped; `run.max_nonfinite_steps` of them in a row stop the run with
exit code 1 (fp16 loss-scale overflows are skipped too, but count only once the scale cannot back off any
further).
"""

import os

# One progress bar per run (energon's packing-buffer fill), not one per rank: tqdm reads TQDM_* defaults
# when it is first imported, so this must come before the imports below pull it in.
if os.environ.get("RANK", "0") != "0":
    os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from sail_megatron.config import ConfigError
from sail_megatron.config.budget import scale_points
from sail_megatron.config.counts import format_count
from sail_megatron.config.train import TrainConfig, dump, override_changes
from sail_megatron.platform import destroy_distributed, init_distributed, read_dist_env
from sail_megatron.platform.distributed import restart_rendezvous_problem
from sail_megatron.platform.megatron_compat import checkpoint_results_queue_dies_with_rank
from sail_megatron.platform.process_lifetime import rank_dies_with_launcher
from sail_megatron.training.checkpoint import CheckpointWriter, load_checkpoint, restore_rng_state
from sail_megatron.training.checkpoint_files import CheckpointError, checkpoint_read_errors, resolve_checkpoint_folder
from sail_megatron.training.config_agreement import check_ranks_agree
from sail_megatron.training.data_position import COMMON_KEY as DATA_POSITION
from sail_megatron.training.data_position import position_record, resume_data
from sail_megatron.training.disk_errors import write_errors
from sail_megatron.training.faults import FaultInjector
from sail_megatron.training.flops import Trains
from sail_megatron.training.graceful_stop import GracefulStop
from sail_megatron.training.metered_data import MeteredData, build_loader, from_loader
from sail_megatron.training.moe_metrics import moe_routing
from sail_megatron.training.monitor import TrainingMonitor, device_peak_flops
from sail_megatron.training.optimizer import part_learning_rates, schedule_changes
from sail_megatron.training.progress import SCHEDULE_UNIT_KEY, Consumed, Progress, check_schedule_unit
from sail_megatron.training.resume import choose_start
from sail_megatron.training.run_dir import (
    RunLock,
    another_model_error,
    check_writable,
    describe_save_failure,
)
from sail_megatron.training.run_logs import CONFIG_FILE, mark_resume, set_aside_earlier_logs
from sail_megatron.training.startup import build_training, start
from sail_megatron.training.step import train_step
from sail_megatron.training.validation import Validator
from sail_megatron.training.watchdog import StepWatchdog

logger = logging.getLogger("sail_megatron.train")


class NonFiniteStop(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss or gradient."""


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (the previous one and its pointer are intact)."""


def _load(field: str, path, cfg: TrainConfig, chunks, *optimizer_and_scheduler):
    """load_checkpoint of a folder start-up has checked (prepare_config: check_checkpoint); a read error
    or a checkpoint of another model shape is reported as such."""
    directory = resolve_checkpoint_folder(path)
    try:
        with checkpoint_read_errors(directory):
            return load_checkpoint(directory, chunks, *optimizer_and_scheduler)
    except CheckpointError as e:
        if "shape mismatch" not in str(e).lower():
            raise
        saved = dist_checkpointing.load_common_state_dict(str(directory)).get("common", {}).get("model_config")
        fix = (
            "use a new run.save_dir, or run.init_from to start from those weights"
            if field == "run.save_dir"
            else "point run.init_from at a checkpoint of this model, or change the model to match it"
        )
        raise another_model_error(field, directory, saved, cfg.model, fix) from None


def train(cfg: TrainConfig, tokenizer, config_path: str) -> None:
    env, run = read_dist_env(), cfg.run
    save_dir = Path(run.save_dir)
    stop = GracefulStop()  # before the slow setup: a signal during it still saves at the first step
    watchdog = StepWatchdog(save_dir, env.rank, env.world_size, run.step_timeout_s, run.step_timeout_factor)
    faults = FaultInjector(run.inject_fault, env.rank, save_dir)
    begin = choose_start(save_dir, run.resume, run.init_from)
    if env.is_main:
        for line in begin.passed_over:
            logger.warning("passing over a damaged checkpoint: %s", line)
        if begin.pointer_note:
            logger.warning("%s: resuming from %s (%s)", save_dir, begin.resume.name, begin.pointer_note)
    chunks, optimizer, scheduler = build_training(cfg, env.device)
    budget, schedule, points = run.budget(), cfg.lr_schedule(), scale_points(run.save_at_tokens)

    start, loader_state = 0, None
    progress = Progress(budget, points, Consumed())
    if begin.resume is not None:
        loaded = _load("run.save_dir", begin.resume, cfg, chunks, optimizer, scheduler)
        start = loaded["iteration"]
        progress = Progress.resumed(budget, points, start, loaded["common"])
        check_schedule_unit(loaded["common"], schedule, budget)
        for change in schedule_changes(loaded["scheduler"] or {}, scheduler):
            logger.warning("the recipe changes the lr schedule against the checkpoint's: %s", change)
        if loaded["rank_state"] is not None:
            restore_rng_state(loaded["rank_state"]["rng"])
        data_resume = resume_data(loaded, cfg.data.num_workers, env.is_main)
        loader_state = data_resume.state
        if data_resume.num_workers != cfg.data.num_workers:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=data_resume.num_workers))
        logger.info("resumed from %s at step %d: %s consumed", loaded["path"], start, progress.describe())
    elif begin.init_from:
        loaded = _load("run.init_from", begin.init_from, cfg, chunks)  # weights only: a new stage, a new optimizer
        # bf16/fp16 weights have fp32 main copies in the optimizer, taken when it was built: take them anew.
        optimizer.reload_model_params()
        logger.info("initialized from %s (its step %d)", loaded["path"], loaded["iteration"])
    if env.is_main:  # only now: a resume refused above leaves the run's logs and recorded config as they were
        if begin.resume is None:
            set_aside_earlier_logs(save_dir)
        else:
            mark_resume(save_dir, start, loaded["path"].name)
        (save_dir / CONFIG_FILE).write_text(dump(cfg))

    dp_size = parallel_state.get_data_parallel_world_size()
    num_micro = cfg.num_microbatches(env.world_size)
    loader, materialize = build_loader(cfg, tokenizer, env.device, state=loader_state)
    data = MeteredData(
        from_loader(loader, materialize),
        cfg.model,
        Trains.from_freeze(cfg.freeze),
        cfg.parallel.tensor_model_parallel_size,
        cfg.precision.tile_buckets(cfg.vision_max_tiles()),
    )
    validator = Validator(cfg, tokenizer, env.device, num_micro) if run.eval_interval else None
    monitor = TrainingMonitor(
        save_dir,
        progress,
        run.log_interval,
        device_peak_flops(cfg.precision, run.peak_tflops),
        tensorboard=run.tensorboard,
        pipeline_stages=cfg.parallel.pipeline_model_parallel_size,
        moe=moe_routing(chunks, cfg.parallel),
    )
    logger.info(
        "training %s (%s) from step %d to %s: world %d = TP %d x PP %d x DP %d, %d micro-batches per step",
        config_path,
        cfg.model_preset,
        start,
        budget.describe(),
        env.world_size,
        cfg.parallel.tensor_model_parallel_size,
        cfg.parallel.pipeline_model_parallel_size,
        dp_size,
        num_micro,
    )
    logger.info("lr schedule: %s", schedule.describe(cfg.optim.schedule))

    writer = CheckpointWriter(save_dir, run.keep_last, run.async_save, run.optimizer_checkpoint)

    @contextlib.contextmanager
    def reported_as_save_failure():
        """A failed checkpoint write (torch's CheckpointException is a BaseException) as one SaveFailed."""
        try:
            yield
        except write_errors() as e:
            raise SaveFailed(describe_save_failure(save_dir, writer.step_of_failure(step), e)) from e

    def save(step: int, keep_points=()) -> None:
        """keep_points: the scaling-curve points this step reached: the checkpoint is kept for good."""
        reached = ", ".join(format_count(p) for p in keep_points)
        with reported_as_save_failure():
            writer.save(
                step,
                chunks,
                optimizer,
                scheduler,
                common={
                    **progress.checkpoint_state(run.global_batch_size),
                    SCHEDULE_UNIT_KEY: schedule.unit,
                    "model_config": dataclasses.asdict(cfg.model),
                    DATA_POSITION: position_record(cfg.data.num_workers),
                },
                data_state=loader.save_state_rank(),
                keep=f"run.save_at_tokens: reached {reached} tokens at step {step}" if keep_points else None,
            )

    step, in_a_row = start, 0
    watchdog.arm()
    try:
        if validator is not None and start == 0:  # where the stage starts from: the curve's first point
            with watchdog.long_phase():
                monitor.log_validation(0, validator.run(chunks))
        while not progress.done:
            faults.before_step(step + 1)
            began = time.perf_counter()
            result = train_step(
                chunks, optimizer, None, data, num_micro, cfg.data.seq_length, cfg.data.micro_batch_size
            )
            step += 1
            watchdog.beat(step)
            tally = data.take_tally()
            consumed = progress.count_step(tally)  # over the whole job: the same on every rank
            if result.updated:
                scheduler.step(increment=consumed.of(schedule.unit))
            # Finishing a background write (barriers, rename, pruning old checkpoints) is no step's time.
            with reported_as_save_failure(), watchdog.long_phase():
                writer.poll()
            monitor.end_step(
                step,
                result,
                time.perf_counter() - began,
                tally,
                part_learning_rates(scheduler, cfg.optim),
                materialize.skipped,
            )
            in_a_row = in_a_row + 1 if result.skipped else 0
            if result.skipped and env.is_main:
                logger.warning(
                    "step %d: non-finite loss (%s) or gradient: update skipped (%d in a row, limit %d)",
                    step,
                    result.loss,
                    in_a_row,
                    run.max_nonfinite_steps,
                )
            elif result.overflow and env.is_main:
                logger.info(
                    "step %d: fp16 gradients overflowed: update skipped, loss scale now %g", step, result.loss_scale
                )
            if in_a_row >= run.max_nonfinite_steps:
                raise NonFiniteStop(
                    f"{in_a_row} consecutive steps had a non-finite loss or gradient (last at step "
                    f"{step}); stopping without saving: resume from the last checkpoint in {save_dir} "
                    "with a lower optim.lr or check the data"
                )
            stopping, done = stop.agreed(), progress.done
            if validator is not None and not stopping and (step % run.eval_interval == 0 or done):
                with watchdog.long_phase():
                    monitor.log_validation(step, validator.run(chunks))
            if step % run.save_interval == 0 or done or stopping or progress.crossed:
                with watchdog.long_phase():
                    save(step, progress.crossed)
            if stopping:
                with reported_as_save_failure(), watchdog.long_phase():
                    writer.wait()  # the checkpoint is on disk and `latest` names it before the process exits
                logger.warning(
                    "received %s: saved the checkpoint at step %d; exiting",
                    stop.received or "a stop signal on another rank",
                    step,
                )
                break
        with reported_as_save_failure(), watchdog.long_phase():
            writer.close()  # a background write finishes (and the pointer moves) before the run ends
    finally:
        watchdog.close()
        monitor.close()
        stop.close()
    if env.is_main and run.plot:
        from sail_megatron.training.plot_curves import plot_curves

        logger.info("curves: %s", plot_curves(save_dir))
    if env.is_main and progress.done:
        logger.info("reached the budget: %s", progress.describe())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.add_argument(
        "--check",
        action="store_true",
        help="only check the recipe, its data, tokenizer and checkpoints for WORLD_SIZE processes, then exit "
        "(the launch scripts do this once before torchrun, whose restarts would repeat a user error)",
    )
    args = p.parse_args(argv)
    rank_dies_with_launcher()
    env, cfg, tokenizer = start(args)
    if args.check:
        for change in override_changes(args.config, args.overrides):
            print(f"override: {change}")
        print(f"budget: {cfg.run.budget().describe()}; lr schedule: {cfg.lr_schedule().describe(cfg.optim.schedule)}")
        print(f"{args.config}: ready for {env.world_size} processes")
        return
    rendezvous = restart_rendezvous_problem()
    if rendezvous:
        logger.error("%s", rendezvous)
        sys.exit(2)
    lock = _claim_run_dir(cfg) if env.is_main else None
    checkpoint_results_queue_dies_with_rank()  # forked now, while this process holds little memory
    FaultInjector(cfg.run.inject_fault, env.rank, cfg.run.save_dir).at_startup()
    try:
        init_distributed(cfg.parallel, seed=cfg.run.seed, timeout_minutes=cfg.run.process_group_timeout_s / 60)
    except dist.DistNetworkError as e:
        logger.error(
            "cannot start the process group: %s. Fix: if the port is in use (another training on this "
            "host?), set MASTER_PORT to a free port or pass torchrun --master-port",
            str(e).splitlines()[0],
        )
        sys.exit(2)
    try:
        check_ranks_agree(cfg)
        train(cfg, tokenizer, args.config)
        dist.barrier()
    except (ConfigError, CheckpointError, SaveFailed) as e:  # after start-up: a misfit resume, a full disk
        logger.error("%s", e)
        sys.exit(2)
    except NonFiniteStop as e:
        logger.error("%s", e)
        sys.exit(1)
    except KeyboardInterrupt:
        logger.error("aborted by a second Ctrl-C: nothing saved since the last checkpoint")
        sys.exit(130)
    finally:
        destroy_distributed()
        if lock is not None:
            lock.release()


def _claim_run_dir(cfg: TrainConfig) -> RunLock:
    """The main rank makes sure the run folder is writable and nobody else trains into it."""
    save_dir = Path(cfg.run.save_dir)
    try:
        check_writable(save_dir)
        return RunLock(save_dir).acquire()
    except ConfigError as e:
        logger.error("%s", e)
        sys.exit(2)


if __name__ == "__main__":
    main()
