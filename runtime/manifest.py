"""Bundle manifest: the schema shared by the exporter (writer) and the runtime (reader).

A bundle is a directory holding `manifest.json`, the dense ONNX graphs, one ONNX graph per
expert with its weights in an external-data file, and the tokenizer files. The manifest lists
every file with its size and sha256, so a truncated or altered file is detected before use.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgemoe.runtime.routing import ROUTING_METHODS

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
# Metadata keys of an expert graph, which the runtime checks against its manifest entry.
EXPERT_DTYPE_KEY = "edgemoe.expert_dtype"
EXPERT_BLOCK_SIZE_KEY = "edgemoe.block_size"


class BundleError(Exception):
    """A bundle is missing, malformed, or does not match its manifest."""


@dataclass
class ModelConfig:
    """Config values the runtime needs, with Hugging Face field names where one exists."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    vocab_size: int
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None = None
    # Per layer, whether it is an MoE layer; a dense layer has no router and no experts. None
    # (bundles written before dense layers were supported) means every layer is an MoE layer.
    moe_layers: list[bool] | None = None
    routing: str = "softmax_topk"  # a key of edgemoe.runtime.routing.ROUTING_METHODS
    residual_multiplier: float = 1.0  # factor on the MLP block's output before the residual add
    # Cache tensors of every layer graph, as {"name": str, "shape": [...]} with "S" at the token
    # axis; a graph reads past_NAME and writes present_NAME. None (bundles written before this
    # field) means key and value [num_key_value_heads, S, head_dim].
    kv_cache: list[dict[str, Any]] | None = None
    # Keyword arguments of the routing method shared by all layers, such as DeepSeek's n_group
    # or sparsemixer's jitter_eps.
    routing_params: dict[str, Any] | None = None
    # Per layer, the e_score_correction_bias [E] of the routing method, or None for a dense layer.
    router_bias: list[list[float] | None] | None = None

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_layers is None or self.moe_layers[layer]

    def cache_tensors(self) -> list[tuple[str, list[int | str]]]:
        """Return (name, shape) of each per-layer cache tensor, "S" marking the token axis."""
        if self.kv_cache is None:
            shape = [self.num_key_value_heads, "S", self.head_dim]
            return [("key", shape), ("value", shape)]
        return [(entry["name"], list(entry["shape"])) for entry in self.kv_cache]

    def routing_arguments(self, layer: int) -> dict[str, Any]:
        """Return the keyword arguments of the routing method for one MoE layer."""
        arguments = dict(self.routing_params or {})
        if self.router_bias is not None and self.router_bias[layer] is not None:
            arguments["e_score_correction_bias"] = np.asarray(self.router_bias[layer], np.float32)
        return arguments


@dataclass
class ExpertEntry:
    """One expert graph: where it lives, its precision and what it costs to hold."""

    layer: int
    index: int
    file: str  # ONNX graph, relative to the bundle
    data_file: str  # external weights of that graph, relative to the bundle
    dtype: str  # storage precision of the weights: "fp32", "fp16", "int8", "int4" or "int2"
    bytes: int  # bytes read from storage to load the expert (graph + weights)
    resident_bytes: int  # memory of a loaded session: mapped weights, widened or prepacked copies
    bits: int | None = None  # 8, 4 or 2 for quantized experts; None for float experts
    block_size: int | None = None  # values per quantization scale along the input axis
    # With --expert-bits auto: calibration perplexity increase when only this expert is at the
    # lower of the two widths chosen between.
    importance: float | None = None
    # 2-bit experts: a graph over the same data file that widens the weights to 4 bits when the
    # session is created, for onnxruntime versions without a 2-bit kernel, and what that holds.
    widened_file: str | None = None
    widened_resident_bytes: int | None = None

    @property
    def quantized(self) -> bool:
        return self.bits is not None


@dataclass
class FileEntry:
    bytes: int
    sha256: str


@dataclass
class Manifest:
    format_version: int
    architecture: str
    dtype: str
    config: ModelConfig
    graphs: dict[str, Any]  # {"embed": path, "layers": [path per layer], "head": path}
    experts: list[ExpertEntry]
    files: dict[str, FileEntry]
    tokenizer: dict[str, str | None]  # tokenizer, tokenizer_config, generation_config paths
    routing_profile: dict[str, Any] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    # With --expert-bits auto: budget, calibration text and the measured perplexities.
    quantization: dict[str, Any] | None = None
    # Precision of the resident linear weights: "fp32", "fp16" or "int8". Bundles written before
    # this field existed stored them at `dtype`, which None stands for until __post_init__.
    dense_dtype: str | None = None

    def __post_init__(self):
        if self.dense_dtype is None:
            self.dense_dtype = self.dtype
        # Not a dataclass field, so to_json leaves it out.
        self._experts_by_key = {(e.layer, e.index): e for e in self.experts}

    # Derived values

    def expert(self, layer: int, index: int) -> ExpertEntry:
        """Return the entry of expert `index` of MoE layer `layer`.

        Raises:
            BundleError: the bundle has no such expert (a dense layer, or an index >= num_experts).
        """
        entry = self._experts_by_key.get((layer, index))
        if entry is None:
            raise BundleError(f"the bundle has no expert {index} in layer {layer}: MoE layers have experts "
                              f"0..{self.config.num_experts - 1}, and dense layers have none")
        return entry

    @property
    def expert_bytes(self) -> int:
        """Sum of the resident bytes of all experts: what 100 % of the budget means."""
        return sum(e.resident_bytes for e in self.experts)

    @property
    def dense_bytes(self) -> int:
        """Bytes of every graph and weight file outside the expert list: embedding, attention,
        routers, norms, LM head, shared experts and the MLPs of dense layers."""
        expert_files = {name for e in self.experts for name in (e.file, e.data_file, e.widened_file) if name}
        return sum(f.bytes for name, f in self.files.items()
                   if name not in expert_files and name.endswith((".onnx", ".bin")))

    @property
    def min_expert_budget(self) -> int:
        """Smallest budget that holds the top-k experts one token needs in one MoE layer."""
        k = self.config.num_experts_per_tok
        sizes_by_layer: dict[int, list[int]] = defaultdict(list)
        for entry in self.experts:
            sizes_by_layer[entry.layer].append(entry.resident_bytes)
        return max((sum(sorted(sizes, reverse=True)[:k]) for sizes in sizes_by_layer.values()), default=0)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(bundle_dir: str | os.PathLike) -> Manifest:
    """Read and validate `manifest.json` of a bundle.

    Raises:
        BundleError: the directory or manifest is missing, the format version is unknown, or a
            listed file is missing or has the wrong size (contents are checked later, on first
            use, by `verify_file`).
    """
    bundle = Path(bundle_dir)
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(
            f"{bundle} is not an edgemoe bundle: {MANIFEST_NAME} not found. "
            "Create one with `edgemoe export CHECKPOINT_DIR OUT_DIR`.")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"invalid {path}: {exc}") from exc

    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {version!r}; this edgemoe reads version {FORMAT_VERSION}. "
            "Re-export the checkpoint with this version of edgemoe.")
    try:
        manifest = Manifest(
            format_version=version,
            architecture=raw["architecture"],
            dtype=raw["dtype"],
            config=ModelConfig(**raw["config"]),
            graphs=raw["graphs"],
            experts=[ExpertEntry(**e) for e in raw["experts"]],
            files={name: FileEntry(**f) for name, f in raw["files"].items()},
            tokenizer=raw["tokenizer"],
            routing_profile=raw.get("routing_profile"),
            source=raw.get("source", {}),
            quantization=raw.get("quantization"),
            dense_dtype=raw.get("dense_dtype"),
        )
    except (KeyError, TypeError) as exc:
        raise BundleError(f"invalid {path}: missing or unexpected field {exc}") from exc

    _check_experts(path, manifest)
    for name, entry in manifest.files.items():
        file_path = bundle / name
        if not file_path.is_file():
            raise BundleError(f"bundle file {file_path} is missing; re-export or copy the bundle again")
        size = file_path.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"bundle file {file_path} has {size} bytes, manifest says {entry.bytes}: "
                              "the file is truncated or altered; re-export or copy the bundle again")
    return manifest


def _check_experts(path: Path, manifest: Manifest) -> None:
    """Check the routing method, the per-layer flags and that each MoE layer lists every expert once."""
    cfg = manifest.config
    if cfg.routing not in ROUTING_METHODS:
        raise BundleError(f"invalid {path}: routing {cfg.routing!r} is not one of "
                          f"{', '.join(ROUTING_METHODS)}; update edgemoe or re-export the checkpoint")
    if cfg.moe_layers is not None and len(cfg.moe_layers) != cfg.num_hidden_layers:
        raise BundleError(f"invalid {path}: moe_layers has {len(cfg.moe_layers)} entries, expected "
                          f"{cfg.num_hidden_layers} (num_hidden_layers)")
    _check_routing_and_cache(path, cfg)
    moe_layers = [layer for layer in range(cfg.num_hidden_layers) if cfg.is_moe_layer(layer)]
    expected = {(layer, index) for layer in moe_layers for index in range(cfg.num_experts)}
    listed = [(e.layer, e.index) for e in manifest.experts]
    if len(listed) != len(expected) or set(listed) != expected:
        raise BundleError(f"invalid {path}: {len(listed)} experts listed, expected {len(expected)} "
                          f"(experts 0..{cfg.num_experts - 1} of each of the {len(moe_layers)} MoE layers, once)")


def _check_routing_and_cache(path: Path, cfg: ModelConfig) -> None:
    """Check routing_params against the routing method, router_bias and kv_cache shapes."""
    accepted = set(inspect.signature(ROUTING_METHODS[cfg.routing]).parameters) - {"router_logits", "top_k",
                                                                                   "normalize"}
    unknown = sorted(set(cfg.routing_params or {}) - accepted)
    if unknown:
        raise BundleError(f"invalid {path}: routing_params {', '.join(unknown)} are not parameters of routing "
                          f"{cfg.routing!r} (it takes {', '.join(sorted(accepted)) or 'none'}); re-export the checkpoint")
    if cfg.router_bias is not None:
        if "e_score_correction_bias" not in accepted:
            raise BundleError(f"invalid {path}: routing {cfg.routing!r} takes no router_bias; re-export the checkpoint")
        lengths = [None if b is None else len(b) for b in cfg.router_bias]
        expected = [cfg.num_experts if cfg.is_moe_layer(layer) else None for layer in range(cfg.num_hidden_layers)]
        if lengths != expected:
            raise BundleError(f"invalid {path}: router_bias has lengths {lengths}, expected {expected} "
                              "(num_experts for each MoE layer, null for each dense layer)")
    try:
        tensors = cfg.cache_tensors()
    except (KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"invalid {path}: kv_cache entries need a name and a shape ({exc!r})") from exc
    for name, shape in tensors:
        if shape.count("S") != 1 or not all(d == "S" or (isinstance(d, int) and d > 0) for d in shape):
            raise BundleError(f"invalid {path}: kv_cache tensor {name!r} has shape {shape}; expected positive "
                              "sizes and one \"S\" for the token axis")


def verify_file(bundle_dir: str | os.PathLike, manifest: Manifest, name: str) -> None:
    """Check a bundle file's sha256 against the manifest.

    Raises:
        BundleError: naming the file, when it is not listed or its contents differ.
    """
    entry = manifest.files.get(name)
    if entry is None:
        raise BundleError(f"bundle file {name} is not listed in {MANIFEST_NAME}")
    path = Path(bundle_dir) / name
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise BundleError(f"bundle file {path} is corrupt: sha256 {actual} does not match the "
                          f"manifest's {entry.sha256}; re-export or copy the bundle again")


def check_expert_format(path: str | os.PathLike, entry: ExpertEntry, metadata: dict[str, str]) -> None:
    """Check that an expert graph's metadata states the precision its manifest entry claims.

    Graphs written before the metadata existed carry none; they are accepted when the entry is
    a float expert, as such bundles had only float experts.

    Raises:
        BundleError: naming the file, the stored and the expected format.
    """
    stored_dtype = metadata.get(EXPERT_DTYPE_KEY)
    if stored_dtype is None and not entry.quantized:
        return
    expected_block = str(entry.block_size) if entry.quantized else ""
    stored_block = metadata.get(EXPERT_BLOCK_SIZE_KEY, "")
    if stored_dtype != entry.dtype or stored_block != expected_block:
        stored = f"{stored_dtype or 'no recorded format'}" + (f", block size {stored_block}" if stored_block else "")
        expected = entry.dtype + (f", block size {expected_block}" if expected_block else "")
        raise BundleError(f"expert graph {path} stores {stored} but {MANIFEST_NAME} lists {expected} for "
                          f"expert {entry.index} of layer {entry.layer}; re-export the bundle")
