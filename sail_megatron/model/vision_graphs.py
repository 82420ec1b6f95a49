"""The ViT as CUDA graphs, one per tile bucket (`precision.vision_cuda_graphs`).

At the ViT's first call in training mode, every bucket (largest first) is warmed up eagerly on a side stream
and captured: the forward pass, and when the ViT trains the backward pass to its weight gradients, as
`torch.cuda.make_graphed_callables` does. A call then copies its tiles into the bucket's static input (blank
tiles after them), replays the forward graph and hands the static output to the projector; the backward
graph replays inside one autograd node, which returns copies of the weight gradients (autograd may keep a
returned gradient as `param.grad`, and the next replay would overwrite it). Eval mode runs the ViT eagerly at
the bucket shapes. The projector stays eager: two GEMMs and a norm.

Why our own capture rather than `make_graphed_callables`:
- one graph pair per bucket from one module, the ViT's parameters as the graph's inputs either way;
- `capture_error_mode="thread_local"`: the loader's pin-memory thread and the decoder keep running during a
  capture, and under the default "global" mode their CUDA calls would fail or break it;
- megatron's RNG tracker, whose states the graphs must know (make_graphed_callables has no hook for that).
  Every attention layer forks it (for attention dropout, even at rate 0), and its default form reads and
  sets the CUDA RNG state, which torch refuses during capture ("Cannot call
  CUDAGeneratorImpl::current_seed"). For the capture the tracker's states are converted to megatron's
  graph-safe form (generator objects swapped, not state bytes read), registered with the graphs, and
  converted back after.

Drop path draws from torch's default generator, which every replay advances: each replay drops other tiles.

Constraints (refused with a ConfigError by `PrecisionConfig.check_vision_graphs` / `check_vision_layout`):
static tile buckets; a CUDA GPU; no FP8 in the ViT (Transformer Engine updates FP8 scales outside the
captured kernels); the ViT whole on its rank (no tensor-parallel collectives inside a graph); pipeline size 1
and so one micro-batch in flight: all buckets share one memory pool, which is safe because a bucket's backward
replays before any other bucket's forward; no ViT recompute; no `overlap_param_gather` with a trained ViT (a
replay runs no forward hooks). The parameters must keep their storage after the first training call (megatron's
DDP buffers and in-place optimizer updates do), and the ViT's weight gradients come out of the graph as
autograd outputs: `model/transformer_configs.py` turns off fused weight-gradient accumulation in the ViT, which
would write `main_grad` inside the graph and during its warm-up.
"""

import contextlib
from typing import Dict, List, Tuple

import torch
from megatron.core.tensor_parallel.random import (
    CudaRNGStatesTracker,
    convert_cuda_rng_state,
    get_all_rng_states,
    get_cuda_rng_tracker,
)

from sail_megatron.model.vision_buckets import BucketedTiles, vision_trains

WARMUP_ITERATIONS = 3
"""Eager passes before each capture (as make_graphed_callables): lazy initialization, autotuning and
workspaces happen there, not inside the graph."""


@contextlib.contextmanager
def _graph_safe_rng(graphs: List[torch.cuda.CUDAGraph]):
    """megatron's RNG tracker in its graph-safe form, its states registered with `graphs`."""
    tracker = get_cuda_rng_tracker()
    convert = isinstance(tracker, CudaRNGStatesTracker) and not tracker.use_cudagraphable_rng
    if convert:
        tracker.set_states({k: convert_cuda_rng_state(s, to_graphable=True) for k, s in tracker.get_states().items()})
        tracker.use_cudagraphable_rng = True
    try:
        default = torch.cuda.default_generators[torch.cuda.current_device()]
        for state in (default, *get_all_rng_states().values()):
            for graph in graphs:
                graph.register_generator_state(state)
        yield
    finally:
        if convert:
            states = tracker.get_states()
            tracker.set_states({k: convert_cuda_rng_state(s, to_graphable=False) for k, s in states.items()})
            tracker.use_cudagraphable_rng = False


def _capture(graph: torch.cuda.CUDAGraph, pool):
    return torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local")


class BucketGraph:
    """One bucket's captured ViT: static input and output, the forward graph, and when the ViT trains the
    backward graph with its static output gradient and weight gradients."""

    def __init__(self, vision: torch.nn.Module, tiles: int, sample: torch.Tensor, pool):
        self.tiles = tiles
        self.trains = vision_trains(vision)
        self.params: Tuple[torch.nn.Parameter, ...] = tuple(p for p in vision.parameters() if p.requires_grad)
        self.input = sample.new_zeros(tiles, *sample.shape[1:])
        self._warm_up(vision)
        self.forward_graph = torch.cuda.CUDAGraph()
        graphs = [self.forward_graph]
        if self.trains:
            self.backward_graph = torch.cuda.CUDAGraph()
            graphs.append(self.backward_graph)
        with _graph_safe_rng(graphs):
            with torch.set_grad_enabled(self.trains), _capture(self.forward_graph, pool):
                output = vision(self.input)
            if self.trains:
                self.grad_output = torch.zeros_like(output)
                with _capture(self.backward_graph, pool):
                    self.weight_grads = torch.autograd.grad(output, self.params, self.grad_output)
        self.output = output.detach()  # the autograd graph of the capture is gone with `output`

    def _pass(self, vision: torch.nn.Module) -> None:
        with torch.set_grad_enabled(self.trains):
            out = vision(self.input)
            if self.trains:
                torch.autograd.grad(out, self.params, torch.zeros_like(out))

    def _warm_up(self, vision: torch.nn.Module) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERATIONS):
                self._pass(vision)
        torch.cuda.current_stream().wait_stream(side)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT's features of the bucket's tiles, `pixel_values` first and blank tiles after them: the
        static output, valid until the bucket's next replay."""
        count = pixel_values.shape[0]
        self.input[:count].copy_(pixel_values)
        self.input[count:].zero_()
        if self.trains:
            return _Replay.apply(self, *self.params)
        self.forward_graph.replay()
        return self.output


class _Replay(torch.autograd.Function):
    """A trained bucket's forward replay as one autograd node; its backward replays the backward graph."""

    @staticmethod
    def forward(ctx, graph: BucketGraph, *params: torch.Tensor) -> torch.Tensor:
        ctx.graph = graph
        graph.forward_graph.replay()
        return graph.output.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        graph = ctx.graph
        graph.grad_output.copy_(grad)
        graph.backward_graph.replay()
        return (None, *(g.clone() for g in graph.weight_grads))


class GraphedTiles(BucketedTiles):
    """Tile buckets whose ViT passes replay CUDA graphs in training mode (eager in eval mode)."""

    def __init__(self, buckets):
        super().__init__(buckets)
        self.graphs: Dict[int, BucketGraph] = {}

    def capture(self, vision: torch.nn.Module, sample: torch.Tensor) -> None:
        """Every bucket's graphs, largest first (the shared pool is sized by the largest; the others reuse it)."""
        pool = torch.cuda.graph_pool_handle()
        for tiles in reversed(self.buckets):
            self.graphs[tiles] = BucketGraph(vision, tiles, sample, pool)

    def __call__(self, vision: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        if not (vision.training and pixel_values.is_cuda):
            return super().__call__(vision, pixel_values)
        if not self.graphs:
            self.capture(vision, pixel_values)
        tiles = pixel_values.shape[0]
        graph = self.graphs[self.bucket(tiles)]
        if graph.trains != vision_trains(vision):
            raise RuntimeError("the ViT was frozen or unfrozen after its CUDA graphs were captured")
        return graph(pixel_values)[:tiles]
