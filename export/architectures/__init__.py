"""Registry of exportable architectures, keyed by the checkpoint's `model_type`."""

from __future__ import annotations

from edgemoe.export.architectures.base import Architecture, ArchConfig, UnsupportedConfigError
from edgemoe.export.architectures.deepseek import DeepseekV2, DeepseekV3
from edgemoe.export.architectures.gpt_oss import GptOss
from edgemoe.export.architectures.granitemoe import GraniteMoe
from edgemoe.export.architectures.mixtral import Mixtral
from edgemoe.export.architectures.olmoe import Olmoe
from edgemoe.export.architectures.phimoe import Phimoe
from edgemoe.export.architectures.qwen2_moe import Qwen2Moe
from edgemoe.export.architectures.qwen3_moe import Qwen3Moe
from edgemoe.export.checkpoint import Checkpoint

REGISTRY: dict[str, type[Architecture]] = {
    cls.model_type: cls for cls in (Mixtral, Qwen2Moe, Qwen3Moe, Olmoe, GraniteMoe, Phimoe,
                                    DeepseekV2, DeepseekV3, GptOss)}


def architecture_for(checkpoint: Checkpoint) -> Architecture:
    """Return the exporter for the checkpoint's `model_type`.

    Raises:
        UnsupportedConfigError: the model_type is not registered; the message lists the supported ones.
    """
    model_type = checkpoint.config.get("model_type")
    cls = REGISTRY.get(model_type)
    if cls is None:
        raise UnsupportedConfigError(
            f"model_type {model_type!r} in {checkpoint.directory / 'config.json'} is not supported; "
            f"supported: {', '.join(sorted(REGISTRY))}")
    return cls(checkpoint)


__all__ = ["REGISTRY", "ArchConfig", "Architecture", "UnsupportedConfigError", "architecture_for"]
