"""The GPUs `sail-bench plan` plans for: their memory, the name their peak FLOP/s is looked up by, and the
bandwidths of the links between them (the defaults of --intra-node-gbytes-per-s and
--inter-node-gbytes-per-s)."""

from dataclasses import dataclass

GB = 1e9
"""Bandwidths are in decimal gigabytes per second (400 Gb/s InfiniBand is 50 GB/s)."""


@dataclass(frozen=True)
class Gpu:
    name: str
    device_name: str
    """What torch.cuda.get_device_name() says (the peak-FLOP/s table is keyed by it)."""
    memory_bytes: int
    """Total memory as nvidia-smi reports it."""
    intra_node_bytes_per_s: float
    """NVLink between two GPUs of a node, one direction: what a ring collective inside a node reaches."""
    inter_node_bytes_per_s: float
    """The network between nodes, per GPU and direction: each GPU has a NIC of its own (rail-optimized
    nodes, as DGX/HGX clusters are built)."""


GPUS = {
    # NVLink 4: 900 GB/s both directions; InfiniBand NDR, 400 Gb/s per GPU.
    "h100": Gpu("H100 SXM 80GB", "NVIDIA H100 80GB HBM3", 81559 * 2**20, 450 * GB, 50 * GB),
    "h200": Gpu("H200 141GB", "NVIDIA H200", 143771 * 2**20, 450 * GB, 50 * GB),
    # NVLink 3: 600 GB/s both directions; InfiniBand HDR, 200 Gb/s per GPU.
    "a100": Gpu("A100 SXM 80GB", "NVIDIA A100-SXM4-80GB", 81920 * 2**20, 300 * GB, 25 * GB),
}
