"""sail-megatron: a megatron-core trainer for SAIL-VL style vision-language models."""

import warnings

__version__ = "0.1.0"

# megatron-core warns on import when apex or Transformer Engine is absent, once per module and rank;
# our one `backends:` log line (sail_megatron.platform.backends) reports the same fact.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*(not installed|Falling back)")

# megatron-core's distributed optimizer zeroes grads by checking `.grad` of its fp32 shard views (views of
# the parameters, so not leaves): torch warns once per rank, and the answer (None) is right.
warnings.filterwarnings(
    "ignore",
    message=r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
    module=r"(megatron\.core\.optimizer|sail_megatron\.platform\.cpu_emulation)",
)
