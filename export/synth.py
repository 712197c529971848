"""`edgemoe synth`: random-weight Hugging Face checkpoints with the layer sizes of real MoE models.

They make expert I/O as large as on a device, for speed benchmarks only: routing on random
weights is not realistic, so prediction quality is measured on trained models. The vocabulary
is the demo model's (2048 tokens) because the embedding size does not matter for expert I/O.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
from tqdm import tqdm

DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "runtime" / "demo" / "tinystories-moe-8x"

# Layer sizes from each model's config.json on the Hugging Face Hub (allenai/OLMoE-1B-7B-0924,
# Qwen/Qwen3-30B-A3B, mistralai/Mixtral-8x7B-v0.1).
SHAPES: dict[str, dict] = {
    "olmoe-1b-7b": {"model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
                    "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
                    "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
                    "rope_theta": 10000.0, "rms_norm_eps": 1e-5},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768,
                      "intermediate_size": 6144, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                      "norm_topk_prob": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6},
    "mixtral-8x7b": {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6,
                     "rms_norm_eps": 1e-5},
}


def _tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    hidden = config["hidden_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim", hidden // heads)
    model_type = config["model_type"]
    experts = config.get("num_experts", config.get("num_local_experts"))
    inner = config.get("moe_intermediate_size", config.get("intermediate_size"))
    shapes = [("model.embed_tokens.weight", (config["vocab_size"], hidden)), ("model.norm.weight", (hidden,)),
              ("lm_head.weight", (config["vocab_size"], hidden))]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        shapes += [(f"{prefix}.input_layernorm.weight", (hidden,)),
                   (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
                   (f"{prefix}.self_attn.q_proj.weight", (heads * head_dim, hidden)),
                   (f"{prefix}.self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
                   (f"{prefix}.self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
                   (f"{prefix}.self_attn.o_proj.weight", (hidden, heads * head_dim))]
        if model_type == "qwen3_moe":
            shapes += [(f"{prefix}.self_attn.q_norm.weight", (head_dim,)),
                       (f"{prefix}.self_attn.k_norm.weight", (head_dim,))]
        if model_type == "olmoe":
            shapes += [(f"{prefix}.self_attn.q_norm.weight", (heads * head_dim,)),
                       (f"{prefix}.self_attn.k_norm.weight", (kv_heads * head_dim,))]
        if model_type == "mixtral":
            moe = f"{prefix}.block_sparse_moe"
            shapes.append((f"{moe}.gate.weight", (experts, hidden)))
            for e in range(experts):
                shapes += [(f"{moe}.experts.{e}.w1.weight", (inner, hidden)),
                           (f"{moe}.experts.{e}.w3.weight", (inner, hidden)),
                           (f"{moe}.experts.{e}.w2.weight", (hidden, inner))]
        else:
            moe = f"{prefix}.mlp"
            shapes.append((f"{moe}.gate.weight", (experts, hidden)))
            for e in range(experts):
                shapes += [(f"{moe}.experts.{e}.gate_proj.weight", (inner, hidden)),
                           (f"{moe}.experts.{e}.up_proj.weight", (inner, hidden)),
                           (f"{moe}.experts.{e}.down_proj.weight", (hidden, inner))]
    return shapes


def synthesize(shape: str, out: str | Path, layers: int | None = 2, seed: int = 0,
               progress: bool = True) -> Path:
    """Write a random-weight checkpoint (float16 safetensors) with the sizes of `shape`.

    Raises:
        ValueError: unknown shape (the message lists them) or layers < 1.
        FileExistsError: `out` exists and is not empty.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output directory {out} exists and is not empty; choose another path")
    config = dict(SHAPES[shape])
    if layers is not None:
        if layers < 1:
            raise ValueError(f"--layers must be >= 1, got {layers}")
        config["num_hidden_layers"] = layers
    architecture = {"olmoe": "OlmoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                    "mixtral": "MixtralForCausalLM"}[config["model_type"]]
    config.update(vocab_size=2048, max_position_embeddings=4096, tie_word_embeddings=False,
                  hidden_act="silu", bos_token_id=0, eos_token_id=0, architectures=[architecture])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(DEMO_CHECKPOINT / name, out / name)
    _write_random_safetensors(out / "model.safetensors", _tensor_shapes(config), seed, progress)
    return out


def _write_random_safetensors(path: Path, shapes: list[tuple[str, tuple[int, ...]]], seed: int,
                              progress: bool) -> None:
    """Stream tensors to disk one at a time, so memory stays at the largest tensor."""
    header, offset = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f, tqdm(total=offset, unit="B", unit_scale=True, desc="synth",
                                     disable=not progress) as bar:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name, shape in shapes:
            if name.endswith("norm.weight"):
                tensor = np.ones(shape, np.float16)
            else:
                # std 1/sqrt(fan_in) keeps activations of the right scale through the layers
                tensor = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(np.float16)
            f.write(tensor.tobytes())
            bar.update(tensor.nbytes)
