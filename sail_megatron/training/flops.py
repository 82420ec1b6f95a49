"""Model FLOPs per micro-batch for MFU (docs/design.md, Counting FLOPs). Shared by the trainer's logs and the benchmark.

Conventions (what is counted and what is not):
- A multiply-add is 2 FLOPs. Only matrix multiplies are counted; norms, activations, softmax,
  RoPE, the embedding lookup and the loss are left out (each well under 1% of the total).
- Linear FLOPs come from the real token count (sum of the packed samples' lengths), never from
  the padded micro-batch; attention from the sum over samples of L_i^2, since packed attention
  never looks across samples.
- Causal attention counts L^2/2 score/value products per head dimension (not L(L+1)/2): the
  usual convention, and the difference is a relative 1/L.
- The output layer counts the padded vocabulary: Megatron computes logits for the padding rows
  too, so that is real work. For the SAIL-VL presets at TP=1 the padding is zero.
- Training multiplier per part, in data-flow order vision -> projector -> language:
  3x forward when the part trains (forward, gradient wrt inputs, gradient wrt weights);
  2x when it is frozen but something upstream trains (activation gradients still flow through it);
  1x when it is frozen and nothing upstream trains (forward only).
  The ViT's patch embedding is counted 3x when the ViT trains although pixels need no gradient
  (an overcount of about 0.2% of the ViT).
- Activation recompute is not counted: this is model FLOPs (MFU), not hardware FLOPs (HFU).
"""

from dataclasses import dataclass, fields
from typing import Dict, NamedTuple, Optional, Sequence, Union

from sail_megatron.config import FreezeConfig, LanguageConfig, ModelConfig, VisionConfig


class Trains(NamedTuple):
    """Which parts receive gradients."""

    vision: bool
    projector: bool
    language: bool

    @classmethod
    def from_freeze(cls, freeze: FreezeConfig) -> "Trains":
        return cls("vision" in freeze.trainable, "projector" in freeze.trainable, "language" in freeze.trainable)


def training_multipliers(trains: Sequence[bool]) -> Trains:
    """(vision, projector, language) multipliers of the forward FLOPs: 3, 2 or 1 (see module doc)."""
    out, upstream = [], False
    for t in trains:
        out.append(3 if t else (2 if upstream else 1))
        upstream = upstream or bool(t)
    return Trains(*out)  # type: ignore[arg-type]


# --- forward FLOPs per part -------------------------------------------------------------------------


def vit_tokens_per_tile(v: VisionConfig) -> int:
    """Patches plus the CLS token where the encoder has one (InternViT; AIMv2 has none)."""
    return v.num_positions


def vit_mlp_matrices(v: VisionConfig) -> int:
    """h x f matrices in one MLP: 3 for SwiGLU (gate, up, down), 2 otherwise (fc1, fc2)."""
    return 3 if v.spec.gated_mlp else 2


def vit_forward_flops_per_tile(v: VisionConfig) -> int:
    """One tile through the built ViT layers (up to select_layer), plus the patch-embedding conv."""
    h, t = v.hidden_size, vit_tokens_per_tile(v)
    linear = 2 * t * (4 * h * h + vit_mlp_matrices(v) * h * v.ffn_hidden_size)  # qkv 3h^2 + proj h^2; MLP
    attention = 4 * t * t * h  # QK^T and AV, bidirectional
    patch_embed = 2 * v.num_patches * (3 * v.patch_size**2 * h)  # a CLS token is not convolved
    return v.num_built_layers * (linear + attention) + patch_embed


def projector_forward_flops_per_tile(model: ModelConfig) -> int:
    """Linear(h_vit * k^2 -> H) -> Linear(H -> H) over one tile's pixel-shuffled tokens."""
    width_in = model.vision.hidden_size * model.projector.merge_factor**2
    h = model.language.hidden_size
    return 2 * model.tokens_per_tile * (width_in * h + h * h)


def llm_mlp_forward_flops_per_token(lang: LanguageConfig) -> int:
    """One decoder layer's MLP for one token: the dense SwiGLU (gate, up, down), or for a mixture of experts
    the router GEMM (hidden x experts) and the SwiGLU of the top-k experts the token is routed to (the
    active parameters: the other experts do no work for it; dropless routing, no padding)."""
    h = lang.hidden_size
    if not lang.is_moe:
        return 2 * 3 * h * lang.ffn_hidden_size
    return 2 * h * lang.num_experts + lang.moe_router_topk * 2 * 3 * h * lang.moe_ffn_hidden_size


def llm_linear_forward_flops_per_token(lang: LanguageConfig, tensor_parallel_size: int = 1) -> int:
    """All decoder layers' projections plus the output layer, for one token."""
    h = lang.hidden_size
    q = lang.num_attention_heads * lang.kv_channels  # = h unless head_dim is stated (Qwen3)
    kv = lang.num_query_groups * lang.kv_channels  # GQA: k and v are narrower than q
    per_layer = 2 * (h * q + 2 * h * kv + q * h) + llm_mlp_forward_flops_per_token(lang)  # q, k+v, o; MLP
    return lang.num_layers * per_layer + 2 * h * lang.padded_vocab_size(tensor_parallel_size)


def llm_attention_forward_flops(lang: LanguageConfig, sample_lengths: Sequence[int]) -> int:
    """Causal QK^T + AV over packed samples: per layer 2 matmuls * 2 FLOPs * L^2 * h / 2 per sample."""
    h = lang.num_attention_heads * lang.kv_channels
    return lang.num_layers * sum(2 * n * n * h for n in sample_lengths)


# --- per micro-batch ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs of one micro-batch (or a sum of them: breakdowns add). Training fields include the
    backward multipliers; `*_forward` fields are the forward pass alone."""

    vision: int = 0
    projector: int = 0
    language_linear: int = 0
    language_attention: int = 0
    vision_forward: int = 0
    projector_forward: int = 0
    language_linear_forward: int = 0
    language_attention_forward: int = 0

    @property
    def language(self) -> int:
        return self.language_linear + self.language_attention

    @property
    def total(self) -> int:
        """Training FLOPs: what MFU divides by step time."""
        return self.vision + self.projector + self.language

    @property
    def forward_total(self) -> int:
        return (
            self.vision_forward
            + self.projector_forward
            + self.language_linear_forward
            + self.language_attention_forward
        )

    def __add__(self, other: "FlopBreakdown") -> "FlopBreakdown":
        return FlopBreakdown(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


def training_flops(
    model: ModelConfig,
    sample_lengths: Sequence[int],
    num_tiles: int,
    trains: Union[Trains, Sequence[bool], FreezeConfig],
    tensor_parallel_size: int = 1,
) -> FlopBreakdown:
    """Model FLOPs of one micro-batch of the whole model (all TP/PP ranks together).

    sample_lengths: real token count of each packed sample (image tokens included, padding excluded).
    num_tiles: vision tiles the micro-batch runs through the ViT.
    trains: (vision, projector, language) flags, or a FreezeConfig.
    tensor_parallel_size: only for the vocabulary padding of the output layer.
    """
    if isinstance(trains, FreezeConfig):
        trains = Trains.from_freeze(trains)
    if len(trains) != 3:
        raise ValueError(f"trains must be (vision, projector, language) flags, got {trains!r}")
    if num_tiles < 0 or any(n < 0 for n in sample_lengths):
        raise ValueError(f"negative count: num_tiles={num_tiles}, sample_lengths={list(sample_lengths)}")
    m = training_multipliers(trains)
    vis = num_tiles * vit_forward_flops_per_tile(model.vision)
    proj = num_tiles * projector_forward_flops_per_tile(model)
    lin = sum(sample_lengths) * llm_linear_forward_flops_per_token(model.language, tensor_parallel_size)
    att = llm_attention_forward_flops(model.language, sample_lengths)
    return FlopBreakdown(
        vision=m.vision * vis,
        projector=m.projector * proj,
        language_linear=m.language * lin,
        language_attention=m.language * att,
        vision_forward=vis,
        projector_forward=proj,
        language_linear_forward=lin,
        language_attention_forward=att,
    )


# --- peak throughput and MFU ---------------------------------------------------------------------------

# Dense (no sparsity) tensor-core peaks in TFLOP/s per GPU from NVIDIA datasheets, as (bf16, fp8).
# Matched as substrings of torch.cuda.get_device_name(), first match wins: specific names first
# (an "H100 PCIe" must not fall into the SXM entry; "GH200" matches "H200", same compute).
PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 1513.0)),
    ("H100 NVL", (835.0, 1671.0)),  # datasheet lists 1671 / 3341 with sparsity
    ("H100", (989.0, 1979.0)),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", (989.0, 1979.0)),
    ("B200", (2250.0, 4500.0)),
    ("A100", (312.0, None)),  # no FP8 tensor cores
)

_DTYPE_COLUMN = {"bf16": 0, "bfloat16": 0, "fp16": 0, "float16": 0, "fp8": 1, "float8": 1}


def peak_flops(device_name: str, dtype: str = "bf16", override: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s (not TFLOP/s) of one device for `dtype` ('bf16', 'fp16' or 'fp8').

    `override` (FLOP/s) wins when given, for devices the table lacks or clocks it misstates.
    None when unknown (a CPU, an unlisted GPU, FP8 on an A100): report throughput without MFU then.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak FLOP/s override must be positive, got {override}")
        return float(override)
    column = _DTYPE_COLUMN.get(dtype.lower())
    if column is None:
        raise ValueError(f"unknown dtype {dtype!r} for peak FLOP/s; use one of {sorted(_DTYPE_COLUMN)}")
    name = device_name.lower()
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in name:
            tflops = peaks[column]
            return None if tflops is None else tflops * 1e12
    return None


def mfu(flops_per_s: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilization in [0, 1], or None without a known peak."""
    if peak is None or peak <= 0:
        return None
    return flops_per_s / peak


class PeakFlops(NamedTuple):
    """Per-device dense peaks in FLOP/s that MFU is quoted against; None where unknown."""

    bf16: Optional[float] = None
    """The 16-bit (bf16 or fp16) peak."""
    fp8: Optional[float] = None
    """FP8 runs only: the FP8 peak."""


def mfu_figures(flops_per_s: float, peaks: PeakFlops) -> Dict[str, Optional[float]]:
    """The MFU figures the trainer's logs and the benchmark report: `mfu` against the bf16 peak and,
    under FP8, `mfu_fp8` against the FP8 peak. Both, because FP8 covers only the language model's linear
    layers (and the ViT's with precision.fp8_vision); attention, the output layer and by default the ViT
    and projector stay bf16, so neither peak alone is the model's ceiling."""
    return {"mfu": mfu(flops_per_s, peaks.bf16), "mfu_fp8": mfu(flops_per_s, peaks.fp8)}
