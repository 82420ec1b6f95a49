"""Checkpoint conversion between Hugging Face SAIL-VL (InternVL-chat) folders and megatron-core checkpoints.

Families: InternViT or AIMv2 / SAILViT vision encoders with Qwen2 / Qwen2.5, dense Qwen3 or Qwen3-MoE
language models (SAIL-VL, SAIL-VL-1.5/1.6, SAIL-VL2 dense and mixture-of-experts).

One job per module: `layouts` (tensor layout changes), `mapping` (names), `hf_config` (config.json),
`hf_io` (streaming safetensors), `mcore_io` (the megatron side), `to_mcore` / `to_hf` / `init_stage1` /
`verify` (the four commands), `hf_reference` (the transformers-based reference), `cli` (`sail-convert`).
"""
