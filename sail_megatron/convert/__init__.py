"""Checkpoint conversion between Hugging Face SAIL-VL (InternVL-chat) folders and megatron-core checkpoints.

One job per module: `layouts` (tensor layout changes), `mapping` (names), `hf_config` (config.json),
`hf_io` (streaming safetensors), `mcore_io` (the megatron side), `to_mcore` / `to_hf` / `init_stage1` /
`verify` (the four commands), `hf_reference` (the transformers-based reference), `cli` (`sail-convert`).
"""
