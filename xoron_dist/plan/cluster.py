"""The machines a layout is planned for: nodes, GPUs per node, memory, interconnect, compute.

    cluster = load_cluster("h100x8", nodes=4)              # a preset, 4 nodes of 8 GPUs
    cluster = load_cluster("my_cluster.yaml")              # the same fields in a YAML mapping

Bandwidths are per GPU and per direction, in GB/s (1e9 bytes/s): what one GPU can push to a peer
inside its node (NVLink) and across nodes (its share of the node's network cards). Peak TFLOPs is
the dense bf16 matmul rate; ``mfu`` the fraction of it a step reaches (an assumption the user
sets: 0.4 is a common figure for well-tuned dense training, MoE usually reaches less).
``reserved_gib`` is memory the planner never gives to tensors: the CUDA context, NCCL's buffers,
allocator fragmentation.

Preset figures are vendor data-sheet numbers (SXM parts: H100 989 dense bf16 TFLOPs, NVLink4 900
GB/s both directions; A100 312 TFLOPs, NVLink3 600 GB/s), with one 400 Gb/s (H100, NDR) or
200 Gb/s (A100, HDR) InfiniBand card per GPU. ``cpu`` describes this kind of test machine (fp32,
no accelerator) so that plans can be checked against measured runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from xoron_dist.config.loading import read_yaml_mapping
from xoron_dist.utils.typed_config import ConfigError, field_error

GIB = 1024**3


@dataclass(frozen=True)
class ClusterSpec:
    """A homogeneous cluster. ``device``: ``cuda`` plans bf16 mixed precision, ``cpu`` plans fp32."""

    name: str = "custom"
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0
    peak_tflops: float = 989.0
    mfu: float = 0.4
    reserved_gib: float = 4.0
    device: Literal["cuda", "cpu"] = "cuda"

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "gpu_memory_gib", "intra_node_gbps", "inter_node_gbps",
                     "peak_tflops", "mfu"):
            if not getattr(self, name) > 0:
                raise field_error(f"cluster.{name}", getattr(self, name), "must be > 0")
        if self.mfu > 1:
            raise field_error("cluster.mfu", self.mfu, "a fraction of peak: 0 < mfu <= 1")
        if not 0 <= self.reserved_gib < self.gpu_memory_gib:
            raise field_error("cluster.reserved_gib", self.reserved_gib,
                              f"must be >= 0 and below gpu_memory_gib ({self.gpu_memory_gib})")
        if self.device not in ("cuda", "cpu"):
            raise field_error("cluster.device", self.device, "allowed values are cuda, cpu")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> int:
        """Bytes per GPU the planner may fill with tensors."""
        return int((self.gpu_memory_gib - self.reserved_gib) * GIB)

    def bandwidth(self, group_size: int, stride: int) -> float:
        """Bytes/s per GPU for a collective over ``group_size`` ranks spaced ``stride`` ranks apart
        (ranks are numbered node by node): NVLink while the group stays inside one node, else the
        network (a ring spanning nodes runs at its slowest link)."""
        inside = group_size * stride <= self.gpus_per_node or group_size == 1
        return (self.intra_node_gbps if inside else self.inter_node_gbps) * 1e9

    def describe(self) -> str:
        return (f"{self.name}: {self.nodes} node(s) x {self.gpus_per_node} GPU(s), {self.gpu_memory_gib:g} GiB each "
                f"({self.reserved_gib:g} reserved), {self.peak_tflops:g} TFLOPs peak at {self.mfu:.0%} MFU, "
                f"{self.intra_node_gbps:g} GB/s in-node, {self.inter_node_gbps:g} GB/s between nodes")


PRESETS: dict[str, ClusterSpec] = {
    "h100x8": ClusterSpec("h100x8", gpus_per_node=8, gpu_memory_gib=80, intra_node_gbps=450, inter_node_gbps=50,
                          peak_tflops=989),
    "h200x8": ClusterSpec("h200x8", gpus_per_node=8, gpu_memory_gib=141, intra_node_gbps=450, inter_node_gbps=50,
                          peak_tflops=989),
    "a100-80gx8": ClusterSpec("a100-80gx8", gpus_per_node=8, gpu_memory_gib=80, intra_node_gbps=300,
                              inter_node_gbps=25, peak_tflops=312),
    "a100-40gx8": ClusterSpec("a100-40gx8", gpus_per_node=8, gpu_memory_gib=40, intra_node_gbps=300,
                              inter_node_gbps=25, peak_tflops=312),
    "cpu": ClusterSpec("cpu", gpus_per_node=2, gpu_memory_gib=8, intra_node_gbps=5, inter_node_gbps=1,
                       peak_tflops=0.1, mfu=0.5, reserved_gib=0, device="cpu"),
}

_FIELDS = {f.name for f in dataclasses.fields(ClusterSpec)}


def load_cluster(spec: str | Path, **overrides: Any) -> ClusterSpec:
    """A preset name or a YAML file of ``ClusterSpec`` fields (``preset: NAME`` starts from a preset);
    ``overrides`` (e.g. ``nodes=4``; None values are ignored) replace fields last."""
    text = str(spec)
    if text in PRESETS:
        data: dict[str, Any] = dataclasses.asdict(PRESETS[text])
    elif Path(text).exists() or text.endswith((".yaml", ".yml")):
        loaded = read_yaml_mapping(Path(text), "cluster file", "the cluster's", "'preset: h100x8' and 'nodes: 4'",
                                   "preset: ..., nodes: ..., gpu_memory_gib: ...")
        base = loaded.pop("preset", None)
        if base is not None and base not in PRESETS:
            raise field_error("cluster.preset", base, f"one of {', '.join(PRESETS)}")
        data = {**(dataclasses.asdict(PRESETS[base]) if base else {"name": Path(text).stem}), **loaded}
    else:
        raise ConfigError(f"cluster '{text}': neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ConfigError(f"cluster: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_FIELDS))}")
    return ClusterSpec(**data)


__all__ = ["GIB", "PRESETS", "ClusterSpec", "load_cluster"]
