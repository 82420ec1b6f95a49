"""Rank functions for the conversion tests (module level: spawned processes import them).

Conversions set up their own single-process group, so they run in a fresh spawned process, never in
pytest's; layout runs (TP2, PP2) use the trainer's own build and checkpoint loader, as `run.init_from` does.
"""

import os
from pathlib import Path
from typing import Dict, List, Optional

import torch

from tests.convert import fixtures as F


def convert_many(jobs: List[Dict]) -> List[Dict]:
    """Run conversion jobs in order in this one process; each job is {'op': name, **kwargs}. A job that
    raises a ConversionError reports its message instead (and whether its output folder exists)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from sail_megatron.convert.errors import ConversionError
    from sail_megatron.convert.init_stage1 import init_stage1
    from sail_megatron.convert.to_hf import mcore_to_hf
    from sail_megatron.convert.to_mcore import hf_to_mcore

    ops = {"hf_to_mcore": hf_to_mcore, "mcore_to_hf": mcore_to_hf, "init": init_stage1}
    results = []
    for job in jobs:
        job = dict(job)
        name = job.pop("op")
        if name == "read_params":
            results.append(mcore_parameters(job["ckpt"]))
            continue
        if name == "verify":
            from sail_megatron.convert.verify import verify

            results.append(verify(**job))
            continue
        if name == "as_trainer_run":
            results.append(as_trainer_run(**job))
            continue
        if name == "layout_logits":
            results.append(layout_logits(**job))
            continue
        out = Path(job["out_dir"])
        try:
            ops[name](**job)
            results.append({"ok": True})
        except ConversionError as e:
            leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]
            results.append({"ok": False, "error": str(e), "out_exists": out.exists(), "leftovers": leftovers})
    return results


def mcore_parameters(ckpt: str) -> Dict[str, torch.Tensor]:
    """World 1: every parameter of a converted checkpoint as the TP1 model holds it (padded vocabulary)."""
    from sail_megatron.convert.mcore_io import build_empty_model, load_model, read_provenance, single_process
    from sail_megatron.convert.to_hf import resolve_export_source

    src = resolve_export_source(Path(ckpt))
    with single_process():
        model = build_empty_model(src.cfg, src.ckpt_dtype, src.vocab_rows)
        load_model(model, Path(ckpt))
        out = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["__record__"] = read_provenance(Path(ckpt))
    return out


def _forward(model, tokens: torch.Tensor, pixels: torch.Tensor) -> Optional[torch.Tensor]:
    """One forward through megatron-core's pipeline schedule; full-vocabulary logits on the last stage."""
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    captured = {}

    def step(data_iterator, m):
        ids, px = next(data_iterator)
        out = m(ids, torch.arange(ids.shape[1])[None], None, pixel_values=px)

        def loss_fn(output):
            captured["logits"] = tensor_parallel.gather_from_tensor_model_parallel_region(output.detach()).clone()
            return output.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

        return out, loss_fn

    get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter([(tokens, pixels)]),
        model=[model],
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=1,
        forward_only=True,
    )
    return captured.get("logits")


def layout_logits(
    ckpt: str, tp: int, pp: int, tokens: torch.Tensor, pixels: torch.Tensor, ep: int = 1
) -> Optional[Dict]:
    """Load a converted checkpoint with the trainer's loader under TP x PP (x EP for a mixture of experts,
    its expert ranks taken from data-parallel ranks); logits (and, on the first stage, the vision encoder's
    output) from the rank that holds them (data-parallel rank 0)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import dataclasses

    from megatron.core import parallel_state

    from sail_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig
    from sail_megatron.config.loading import from_dict
    from sail_megatron.convert.mcore_io import read_provenance
    from sail_megatron.model.build import build_model
    from sail_megatron.platform import destroy_distributed, init_distributed
    from sail_megatron.training.checkpoint import load_checkpoint

    record = read_provenance(Path(ckpt))
    cfg = dataclasses.replace(from_dict(ModelConfig, record["model"]), image_context_token_id=F.IMG_CONTEXT_ID)
    parallel = ParallelConfig(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
    )
    init_distributed(parallel, seed=99)
    try:
        model = build_model(cfg, parallel, PrecisionConfig(dtype="fp32")).eval()
        load_checkpoint(ckpt, [model])  # what `run.init_from` does
        with torch.no_grad():
            logits = _forward(model, tokens, pixels)
            vision = model.vision_model(pixels) if parallel_state.is_pipeline_first_stage() else None
        out = {"vision": vision, "padded_vocab": None}
        if logits is not None:
            out.update(logits=logits[..., : cfg.language.vocab_size], padded_vocab=logits.shape[-1])
        first = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
        return out if first else None
    finally:
        destroy_distributed()


def layout_logits_many(cases: List[Dict]) -> List[Optional[Dict]]:
    """Several `layout_logits` runs one after the other in the same processes (saves process start-ups).
    Each run gets its own rendezvous port, found free by the parent (`with_ports`): the previous store's
    port may linger after destroy, and a neighbouring number may belong to anyone."""
    out = []
    for c in cases:
        c = dict(c)
        os.environ["MASTER_PORT"] = str(c.pop("port"))
        out.append(layout_logits(**c))
    return out


def with_ports(cases: List[Dict]) -> List[Dict]:
    """The cases of `layout_logits_many`, each with a port free now (distinct from each other)."""
    from tests.helpers.multiprocess import free_port

    ports: List[int] = []
    while len(ports) < len(cases):
        port = free_port()
        if port not in ports:
            ports.append(port)
    return [{**c, "port": port} for c, port in zip(cases, ports)]


def as_trainer_run(ckpt: str, run_dir: str) -> Dict:
    """Load a converted checkpoint as `run.init_from` does and save it as the trainer saves (no conversion
    record), with the run's config.yaml: what `mcore-to-hf` meets at the end of training."""
    import dataclasses

    from sail_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig
    from sail_megatron.config.loading import from_dict
    from sail_megatron.config.train import TrainConfig, dump
    from sail_megatron.convert.mcore_io import read_provenance, single_process
    from sail_megatron.model.build import build_model
    from sail_megatron.training.checkpoint import load_checkpoint, save_checkpoint

    record = read_provenance(Path(ckpt))
    cfg = dataclasses.replace(from_dict(ModelConfig, record["model"]), image_context_token_id=F.IMG_CONTEXT_ID)
    with single_process():
        model = build_model(cfg, ParallelConfig(), PrecisionConfig(dtype=record["dtype"]))
        load_checkpoint(ckpt, [model])
        save_checkpoint(run_dir, 5, [model], common={"consumed_rows": 10})
    train = TrainConfig(model=cfg, precision=PrecisionConfig(dtype=record["dtype"]))
    (Path(run_dir) / "config.yaml").write_text(dump(train))
    return {"ok": True}
