"""sail-megatron: a megatron-core trainer for SAIL-VL style vision-language models."""

import warnings

__version__ = "0.1.0"

# megatron-core warns on import when apex or Transformer Engine is absent, once per module and rank;
# our one `backends:` log line (sail_megatron.platform.backends) reports the same fact.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*(not installed|Falling back)")
