"""GPU memory of one training rank from the recipe alone: no model is built, nothing is allocated.

Two halves, with different standing:

* **Model state (exact).** Weights, gradients and optimizer state, byte for byte as megatron-core 0.16
  allocates them for our model: `stage_parameters` lists the parameters a (TP rank, pipeline stage)
  builds, in the order the modules register them, and `state_bytes` lays them out as megatron's DDP
  and (distributed) optimizer do. The rules it follows:
  - every weight is in the training dtype (`model/build.py` casts the whole stage);
  - frozen parameters (`freeze.trainable`) have `requires_grad=False`: DDP gives them no gradient
    buffer and the optimizer no state; they keep only their weights;
  - DDP keeps the trainable parameters' gradients in one fp32 buffer (`grad_reduce_in_fp32=True`);
    with the distributed optimizer it also moves their weights into a parameter buffer of the same
    layout, where each parameter starts at a multiple of 64 elements and each bucket ends at a
    multiple of lcm(DP, 128) (megatron's `_ParamAndGradBuffer`);
  - buckets: with `overlap_grad_reduce` on the first pipeline stage a bucket closes once it holds
    max(40M, 1M x DP) elements; otherwise one bucket; a tied embedding split over pipeline stages gets
    a bucket of its own under the distributed optimizer;
  - Adam keeps exp_avg and exp_avg_sq in fp32 for each trained element; bf16/fp16 weights also get
    an fp32 main copy. Without the distributed optimizer every rank holds all of it; with it, a rank
    holds the elements of its 1/DP slice of every bucket (padding excluded), so ranks differ slightly.
  Not counted: the optimizer's step counters (4 bytes per tensor at most), the fp16 loss scaler's
  scalars, Transformer Engine's FP8 scaling state. `tests/bench/test_plan_memory.py` checks these
  figures against built models and optimizers, to the byte.

* **Activations (estimated).** What autograd keeps for the backward pass of one micro-batch,
  counted tensor by tensor per layer in the manner of Korthikanti et al., "Reducing Activation
  Recomputation in Large Transformer Models" (2022), adapted: packed (THD) rows with flash-style
  attention (nothing of size sequence^2 is kept, so `selective` recomputation saves almost nothing
  here and is counted like none), no dropout, SwiGLU MLPs, GQA, and the ViT's activations over the
  micro-batch's tiles; plus the output layer's logits and their fp32 copy in the cross entropy, one
  layer's worth of working memory for the backward pass, and the micro-batches a 1F1B pipeline keeps
  in flight. It is an estimate: allocator rounding and kernel workspaces are not in it. `make
  gpu-check` (part `memory-model`) measures it on a GPU.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from sail_megatron.config import ModelConfig

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GRAD_BYTES = 4  # megatron DDP with grad_reduce_in_fp32=True (training/optimizer.py)
ADAM_MOMENT_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MAIN_PARAM_BYTES = 4  # the fp32 main copy of a bf16/fp16 weight
GIB = 2**30


# --- the parameters a rank builds ------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamShape:
    """One parameter as a rank holds it (its TP shard)."""

    name: str
    """megatron's name, as `named_parameters()` gives it on that rank."""
    numel: int
    part: str
    """'vision', 'projector' or 'language' (freeze.trainable's names)."""
    shared_embedding: bool = False
    """A tied embedding split over pipeline stages (megatron gives it a bucket of its own)."""
    expert_parallel: bool = False
    """An expert's weight: megatron's DDP keeps it in buffers of their own, reduced and (with the
    distributed optimizer) sharded over the expert-data-parallel ranks, those that hold the same experts.
    The trainer marks experts so at every EP size (training/optimizer.py `keep_experts_apart`)."""


def _vision_parameters(model: ModelConfig, tp: int) -> List[ParamShape]:
    v = model.vision
    arch, h, f = v.spec, v.hidden_size, v.ffn_hidden_size
    norm = ("weight", "bias") if arch.normalization == "LayerNorm" else ("weight",)
    out: List[Tuple[str, int]] = []
    if arch.cls_token:
        out.append(("class_embedding", h))
    out += [
        ("position_embedding", v.num_positions * h),
        ("patch_embedding.weight", h * 3 * v.patch_size**2),
        ("patch_embedding.bias", h),
    ]
    if arch.patch_norm:
        out += [(f"patch_norm.{n}", h) for n in norm]
    fc1_rows = (2 if arch.gated_mlp else 1) * f // tp
    for i in range(v.num_built_layers):
        p = f"decoder.layers.{i}."
        if arch.layer_scale:
            out += [(p + "ls1", h), (p + "ls2", h)]
        out += [(p + f"input_layernorm.{n}", h) for n in norm]
        out.append((p + "self_attention.linear_proj.weight", h * h // tp))
        if arch.bias:
            out.append((p + "self_attention.linear_proj.bias", h))
        out.append((p + "self_attention.linear_qkv.weight", 3 * h // tp * h))
        if arch.bias:
            out.append((p + "self_attention.linear_qkv.bias", 3 * h // tp))
        out += [(p + f"pre_mlp_layernorm.{n}", h) for n in norm]
        out.append((p + "mlp.linear_fc1.weight", fc1_rows * h))
        if arch.bias:
            out.append((p + "mlp.linear_fc1.bias", fc1_rows))
        out.append((p + "mlp.linear_fc2.weight", h * (f // tp)))
        if arch.bias:
            out.append((p + "mlp.linear_fc2.bias", h))
    if v.applies_final_norm:
        out += [(f"final_layernorm.{n}", h) for n in norm]
    return [ParamShape(f"vision_model.{name}", n, "vision") for name, n in out]


def _projector_parameters(model: ModelConfig, tp: int) -> List[ParamShape]:
    width = model.vision.hidden_size * model.projector.merge_factor**2
    h = model.language.hidden_size
    out = [
        ("layer_norm.weight", width),
        ("layer_norm.bias", width),
        ("mlp.encoder.linear_fc1.weight", h // tp * width),
        ("mlp.encoder.linear_fc1.bias", h // tp),
        ("mlp.encoder.linear_fc2.weight", h * (h // tp)),
        ("mlp.encoder.linear_fc2.bias", h),
    ]
    return [ParamShape(f"projector.{name}", n, "projector") for name, n in out]


def _mlp_parameters(model: ModelConfig, prefix: str, tp: int, ep: int, etp: int) -> List[ParamShape]:
    """A decoder layer's MLP: SwiGLU split over TP, or a router (replicated) and this rank's num_experts / EP
    SwiGLU experts split over ETP (megatron-core's local experts; TE's grouped experts hold the same
    tensors under other names)."""
    lang, h = model.language, model.language.hidden_size

    def shape(name: str, n: int, expert: bool = False) -> ParamShape:
        return ParamShape(f"language_model.{prefix}mlp.{name}", n, "language", expert_parallel=expert)

    if not lang.is_moe:
        f = lang.ffn_hidden_size // tp
        return [shape("linear_fc1.weight", 2 * f * h), shape("linear_fc2.weight", h * f)]
    f = lang.moe_ffn_hidden_size // etp
    out = [shape("router.weight", lang.num_experts * h)]
    for j in range(lang.num_experts // ep):  # numbered from 0 on every expert rank
        out += [
            shape(f"experts.local_experts.{j}.linear_fc1.weight", 2 * f * h, True),
            shape(f"experts.local_experts.{j}.linear_fc2.weight", h * f, True),
        ]
    return out


def _language_parameters(
    model: ModelConfig, tp: int, pp: int, stage: int, ep: int = 1, etp: Optional[int] = None
) -> List[ParamShape]:
    lang = model.language
    h, d = lang.hidden_size, lang.kv_channels
    q, kv = lang.num_attention_heads * d, lang.num_query_groups * d
    vocab_rows = lang.padded_vocab_size(tp) // tp
    first, last = stage == 0, stage == pp - 1
    tied_across_stages = lang.tie_word_embeddings and pp > 1
    out: List[ParamShape] = []

    def add(name: str, n: int, shared: bool = False) -> None:
        out.append(ParamShape(f"language_model.{name}", n, "language", shared))

    if first:
        add("embedding.word_embeddings.weight", vocab_rows * h, tied_across_stages)
    for i in range(lang.num_layers // pp):  # numbered from 0 on every stage
        p = f"decoder.layers.{i}."
        add(p + "input_layernorm.weight", h)
        add(p + "self_attention.linear_proj.weight", h * (q // tp))
        add(p + "self_attention.linear_qkv.weight", (q + 2 * kv) // tp * h)
        if lang.spec.qkv_bias:
            add(p + "self_attention.linear_qkv.bias", (q + 2 * kv) // tp)
        if lang.spec.qk_layernorm:
            add(p + "self_attention.q_layernorm.weight", d)
            add(p + "self_attention.k_layernorm.weight", d)
        add(p + "pre_mlp_layernorm.weight", h)
        out += _mlp_parameters(model, p, tp, ep, tp if etp is None else etp)
    if last:
        add("decoder.final_layernorm.weight", h)
        if not lang.tie_word_embeddings:
            add("output_layer.weight", vocab_rows * h)
        elif not first:  # a tied output layer on its own stage holds a copy of the embedding
            add("output_layer.weight", vocab_rows * h, True)
    return out


def stage_parameters(
    model: ModelConfig,
    tp: int = 1,
    pp: int = 1,
    stage: int = 0,
    ep: int = 1,
    etp: Optional[int] = None,
    vision_tp: Optional[int] = None,
) -> List[ParamShape]:
    """The parameters of pipeline stage `stage` on one (TP, expert) rank, in registration order
    (megatron-core's local layer spec; Transformer Engine layers hold the same tensors, their norms fused
    into the next linear, which changes only where bucket boundaries fall). The vision encoder and
    projector live on the first stage, split over `vision_tp` ranks (TP, or 1 when
    `parallel.vision_parallel` is 'data'); the language layers split evenly over the stages; ETP defaults
    to TP, as in megatron-core."""
    out: List[ParamShape] = []
    if stage == 0:
        v = tp if vision_tp is None else vision_tp
        out += _vision_parameters(model, v) + _projector_parameters(model, v)
    return out + _language_parameters(model, tp, pp, stage, ep, etp)


# --- megatron's buffers ----------------------------------------------------------------------------------


def ddp_bucket_size(overlap_grad_reduce: bool, data_parallel_size: int, stage: int) -> Optional[int]:
    """megatron DDP's bucket size in elements (None: one bucket for everything)."""
    if not overlap_grad_reduce or stage > 0:
        return None
    return max(40_000_000, 1_000_000 * data_parallel_size)


@dataclass(frozen=True)
class BufferLayout:
    """Where DDP puts each trainable parameter in its (param and) grad buffer."""

    numel: int
    """Elements of the buffer, padding included."""
    param_ranges: Tuple[Tuple[int, int], ...]
    """[start, end) of each parameter, in the order given."""
    buckets: Tuple[Tuple[int, int], ...]
    """[start, end) of each bucket, padding included."""


def buffer_layout(
    params: Sequence[ParamShape], distributed_optimizer: bool, data_parallel_size: int, bucket_size: Optional[int]
) -> BufferLayout:
    """megatron-core 0.16's `_ParamAndGradBuffer` layout of these (trainable, same-dtype) parameters:
    they go in reverse order (roughly the order backward produces gradients)."""

    def pad(n: int, divisor: int) -> int:
        return -(-n // divisor) * divisor

    def pad_bucket_end(end: int) -> int:
        return pad(end, math.lcm(data_parallel_size, 128)) if distributed_optimizer else end

    ranges: Dict[int, Tuple[int, int]] = {}
    buckets: List[Tuple[int, int]] = []
    start = bucket_start = 0
    in_bucket = 0
    end = 0

    def close(end_index: int) -> int:
        nonlocal bucket_start, in_bucket
        bucket_end = pad_bucket_end(end_index)
        buckets.append((bucket_start, bucket_end))
        bucket_start, in_bucket = bucket_end, 0
        return bucket_end

    for i in reversed(range(len(params))):
        p = params[i]
        if distributed_optimizer:
            start = pad(start, 64)
        own_bucket = p.shared_embedding and distributed_optimizer
        if own_bucket and in_bucket:
            start = close(start)
        end = start + p.numel
        ranges[i] = (start, end)
        in_bucket += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or own_bucket:
            start = close(end)
        else:
            start = end
    if in_bucket:
        close(end)
    numel = buckets[-1][1] if buckets else 0
    return BufferLayout(numel, tuple(ranges[i] for i in range(len(params))), tuple(buckets))


def shard_elements(layout: BufferLayout, data_parallel_size: int) -> List[int]:
    """Parameter elements (padding excluded) in each data-parallel rank's slice of the buffer: what the
    distributed optimizer keeps state for on that rank. Rank r owns the r-th of DP equal parts of every
    bucket."""
    starts = sorted(layout.param_ranges)
    begins = [s for s, _ in starts]
    covered = [0]  # parameter elements before each range's start
    for s, e in starts:
        covered.append(covered[-1] + e - s)

    def elements_below(x: int) -> int:
        """Parameter elements in [0, x)."""
        i = bisect.bisect_right(begins, x) - 1
        if i < 0:
            return 0
        s, e = starts[i]
        return covered[i] + min(x, e) - s

    out = [0] * data_parallel_size
    for b0, b1 in layout.buckets:
        part = (b1 - b0) // data_parallel_size
        for r in range(data_parallel_size):
            out[r] += elements_below(b0 + (r + 1) * part) - elements_below(b0 + r * part)
    return out


@dataclass(frozen=True)
class StateBytes:
    """Model state of one rank, in bytes."""

    weights: int
    grads: int
    optimizer: int
    """Adam's moments, plus the fp32 main weights of bf16/fp16 models."""

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def _buffer_state(
    trained: Sequence[ParamShape], dtype: str, distributed_optimizer: bool, group_size: int, bucket_size: Optional[int]
) -> List[StateBytes]:
    """One DDP buffer of trained parameters, reduced over `group_size` ranks: each rank's weights in it
    (with the distributed optimizer; none otherwise: they are counted with the model), gradients and
    optimizer state."""
    width = DTYPE_BYTES[dtype]
    layout = buffer_layout(trained, distributed_optimizer, group_size, bucket_size)
    per_element = ADAM_MOMENT_BYTES + (MAIN_PARAM_BYTES if dtype != "fp32" else 0)
    if distributed_optimizer:
        shards = shard_elements(layout, group_size)
    else:
        shards = [sum(p.numel for p in trained)] * group_size
    weights = layout.numel * width if distributed_optimizer else 0
    return [StateBytes(weights, layout.numel * GRAD_BYTES, n * per_element) for n in shards]


def _rank_states(
    params: Sequence[ParamShape],
    trainable: Sequence[str],
    dtype: str,
    distributed_optimizer: bool,
    data_parallel_size: int,
    bucket_size: Optional[int],
    expert_data_parallel_size: int,
) -> Tuple[List[StateBytes], List[StateBytes], int]:
    """(each DP rank's dense buffer, each expert-DP rank's expert buffer (none without experts), the frozen
    elements). Both kinds of buffer get the same bucket size: megatron's DDP sizes buckets by the DP group."""
    trained = [p for p in params if p.part in trainable]
    frozen = sum(p.numel for p in params if p.part not in trainable)
    dense = [p for p in trained if not p.expert_parallel]
    expert = [p for p in trained if p.expert_parallel]
    dense_states = _buffer_state(dense, dtype, distributed_optimizer, data_parallel_size, bucket_size)
    expert_states = (
        _buffer_state(expert, dtype, distributed_optimizer, expert_data_parallel_size, bucket_size) if expert else []
    )
    return dense_states, expert_states, frozen


def _combine(params, frozen: int, dtype: str, distributed_optimizer: bool, parts: Sequence[StateBytes]) -> StateBytes:
    if distributed_optimizer:  # trained weights live in the padded parameter buffers
        weights = sum(s.weights for s in parts) + frozen * DTYPE_BYTES[dtype]
    else:
        weights = sum(p.numel for p in params) * DTYPE_BYTES[dtype]
    return StateBytes(weights, sum(s.grads for s in parts), sum(s.optimizer for s in parts))


def state_bytes_of_rank(
    params: Sequence[ParamShape],
    trainable: Sequence[str],
    dtype: str,
    distributed_optimizer: bool,
    data_parallel_size: int = 1,
    bucket_size: Optional[int] = None,
    data_parallel_rank: int = 0,
    expert_data_parallel_size: int = 1,
    expert_data_parallel_rank: int = 0,
) -> StateBytes:
    """Weights, gradients and optimizer state of one rank of a (TP rank, expert rank, stage): its slice of
    the dense buffer over the DP ranks and of the expert buffer over the expert-DP ranks."""
    dense, expert, frozen = _rank_states(
        params, trainable, dtype, distributed_optimizer, data_parallel_size, bucket_size, expert_data_parallel_size
    )
    parts = [dense[data_parallel_rank]] + ([expert[expert_data_parallel_rank]] if expert else [])
    return _combine(params, frozen, dtype, distributed_optimizer, parts)


def state_bytes_per_rank(
    params: Sequence[ParamShape],
    trainable: Sequence[str],
    dtype: str,
    distributed_optimizer: bool,
    data_parallel_size: int = 1,
    bucket_size: Optional[int] = None,
) -> List[StateBytes]:
    """`state_bytes_of_rank` of each data-parallel rank of one (TP rank, stage) without expert parallelism."""
    dense, expert, frozen = _rank_states(
        params, trainable, dtype, distributed_optimizer, data_parallel_size, bucket_size, 1
    )
    assert not expert, "expert-parallel parameters: use state_bytes_of_rank"
    return [_combine(params, frozen, dtype, distributed_optimizer, [r]) for r in dense]


def state_bytes(
    params: Sequence[ParamShape],
    trainable: Sequence[str],
    dtype: str,
    distributed_optimizer: bool,
    data_parallel_size: int = 1,
    bucket_size: Optional[int] = None,
    expert_data_parallel_size: int = 1,
) -> StateBytes:
    """The fullest rank (ranks differ only by the distributed optimizer's slices). With expert buffers, the
    fullest dense slice plus the fullest expert slice: an upper bound by a few alignment paddings, since
    a rank's dense and expert slices need not both be the fullest."""
    dense, expert, frozen = _rank_states(
        params, trainable, dtype, distributed_optimizer, data_parallel_size, bucket_size, expert_data_parallel_size
    )
    parts = [max(states, key=lambda s: s.total) for states in (dense, expert) if states]
    return _combine(params, frozen, dtype, distributed_optimizer, parts)


# --- activations (estimate) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationSettings:
    """What decides the activation estimate of one micro-batch on one stage."""

    tp: int = 1
    pp: int = 1
    etp: int = 1
    vision_parallel: str = "tensor"
    stage: int = 0
    sequence_parallel: bool = False
    recompute_granularity: Optional[str] = None
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    recompute_vision: bool = False
    dtype: str = "bf16"
    trainable: Tuple[str, ...] = ("vision", "projector", "language")


@dataclass(frozen=True)
class ActivationBytes:
    """Estimated activation memory of one stage, in bytes (in-flight micro-batches included)."""

    vision: int
    projector: int
    language: int
    logits: int
    working: int
    """One layer's worth of temporaries while the backward pass runs through it."""
    in_flight: int
    """Micro-batches whose activations the stage holds at once (1F1B: pp - stage, at most the count)."""

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.language + self.logits + self.working


def language_layer_bytes_per_token(model: ModelConfig, s: ActivationSettings) -> float:
    """Kept for backward by one decoder layer, per token: the residual and normed inputs of both
    blocks (sharded only under sequence parallelism), q, k and v after RoPE (and before the q/k norms
    where there are some), the attention output, SwiGLU's input and output. A mixture of experts keeps,
    instead of the one SwiGLU, the router's fp32 logits and probabilities and, for each of the top-k
    copies of a token, the permuted input, its expert's SwiGLU input and output (split over ETP) and the
    expert's output before the weighted sum (balanced routing: a rank's experts receive as many token
    copies as its own tokens send)."""
    lang, b = model.language, DTYPE_BYTES[s.dtype]
    h, d = lang.hidden_size, lang.kv_channels
    q, kv = lang.num_attention_heads * d, lang.num_query_groups * d
    seq_shard = s.tp if s.sequence_parallel else 1
    sharded = 2 * q + 2 * kv + ((q + kv) if lang.spec.qk_layernorm else 0)
    if not lang.is_moe:
        return b * (4 * h / seq_shard + (sharded + 3 * lang.ffn_hidden_size) / s.tp)
    k, f = lang.moe_router_topk, lang.moe_ffn_hidden_size
    router = 2 * 4 * lang.num_experts / seq_shard
    experts = b * k * (2 * h / seq_shard + 3 * f / s.etp)
    return b * (4 * h / seq_shard + sharded / s.tp) + router + experts


def vision_layer_bytes_per_token(model: ModelConfig, s: ActivationSettings) -> float:
    """Kept for backward by one ViT layer, per token of a tile: both norms' inputs and outputs (plus the
    branch outputs that layer scale multiplies), q, k, v, the attention output and the MLP's
    activation input and output (split over TP, unless the ViT runs whole on each TP rank)."""
    v, b = model.vision, DTYPE_BYTES[s.dtype]
    h, f = v.hidden_size, v.ffn_hidden_size
    replicated = (6 if v.spec.layer_scale else 4) * h
    mlp = 3 * f if v.spec.gated_mlp else 2 * f
    return b * (replicated + (4 * h + mlp) / vision_tensor_parallel(s))


def vision_tensor_parallel(s: ActivationSettings) -> int:
    return s.tp if s.vision_parallel == "tensor" else 1


def vision_tiles_of_rank(tiles: int, s: ActivationSettings) -> int:
    """The micro-batch's tiles a rank encodes: all of them, or its share (whole images, balanced) when
    the ViT runs data-parallel across the TP ranks."""
    return tiles if s.vision_parallel == "tensor" else math.ceil(tiles / s.tp)


def activation_bytes(
    model: ModelConfig, s: ActivationSettings, tokens: int, tiles: int, num_microbatches: int
) -> ActivationBytes:
    """The estimate for one stage: `tokens` per micro-batch (micro_batch_size x seq_length, padding
    included: activations are as long as the row) and `tiles` vision tiles per micro-batch."""
    b = DTYPE_BYTES[s.dtype]
    trains = {part: part in s.trainable for part in ("vision", "projector", "language")}
    vision_backward = trains["vision"]
    projector_backward = trains["projector"] or vision_backward
    language_backward = any(trains.values())
    first, last = s.stage == 0, s.stage == s.pp - 1
    in_flight = max(1, min(s.pp - s.stage, num_microbatches))

    vision = projector = 0.0
    vit_layer = 0.0
    if first:
        v = model.vision
        tiles = vision_tiles_of_rank(tiles, s)
        vit_tokens = tiles * v.num_positions
        vit_layer = vision_layer_bytes_per_token(model, s) * vit_tokens
        if vision_backward:
            pixels = tiles * 3 * v.image_size**2 * b  # the patch convolution keeps its input
            if s.recompute_vision:  # each layer keeps only its input
                vision = pixels + v.num_built_layers * v.hidden_size * b * vit_tokens
            else:
                vision = pixels + v.num_built_layers * vit_layer
        if projector_backward:
            width = v.hidden_size * model.projector.merge_factor**2
            h = model.language.hidden_size
            per_token = b * (2 * width + 2 * h / vision_tensor_parallel(s))  # norm in and out; GELU in and out
            projector = tiles * model.tokens_per_tile * per_token

    lang = model.language
    layers = lang.num_layers // s.pp
    seq_shard = s.tp if s.sequence_parallel else 1
    llm_layer = language_layer_bytes_per_token(model, s) * tokens
    language = logits = 0.0
    if language_backward:
        layer_input = lang.hidden_size * b / seq_shard * tokens
        if s.recompute_granularity == "full":
            n = s.recompute_num_layers
            if s.recompute_method == "block":
                recomputed = min(n, layers)
                language = recomputed * layer_input + (layers - recomputed) * llm_layer
            else:  # uniform: the input of every group of n layers
                language = math.ceil(layers / n) * layer_input + (n - 1) * llm_layer
        else:  # none or selective: flash-style attention keeps nothing of size sequence^2 to drop
            language = layers * llm_layer
        if last:
            vocab = lang.padded_vocab_size(s.tp) // s.tp
            final_norm = 2 * lang.hidden_size * b / seq_shard * tokens
            logits = final_norm + tokens * vocab * (b + 4)  # logits, and the cross entropy's fp32 copy
    working = max(vit_layer if (first and vision_backward) else 0.0, llm_layer)
    return ActivationBytes(
        vision=round(in_flight * vision),
        projector=round(in_flight * projector),
        language=round(in_flight * language),
        logits=round(in_flight * logits),
        working=round(working),
        in_flight=in_flight,
    )


def loader_device_bytes(seq_tokens: int, tiles: int, image_size: int, first_stage: bool) -> int:
    """The micro-batch being trained on, on the device: tokens, labels and position ids (int64), the loss
    mask (fp32) and, on the first stage, its decoded tiles (fp32, 3 x image_size^2 each). Loader rows
    waiting their turn stay in (pinned) host memory."""
    text = seq_tokens * (8 + 8 + 8 + 4)
    return text + (tiles * 3 * image_size**2 * 4 if first_stage else 0)
