"""Blocked integer quantization of expert weights for onnxruntime's MatMulNBits operator.

Each weight W [N, K] (PyTorch's [out, in] layout) is cut along K into blocks of `block_size`
values. A block is quantized symmetrically with one float32 scale, scale = max|w| / qmax, and
q = clip(round(w / scale), -qmax - 1, qmax). The stored value is q + 2**(bits-1), an unsigned
integer, which is MatMulNBits' default zero point when no zero-point input is given, so no
zero points are stored. K is zero-padded to a whole number of blocks.

Packing follows the MatMulNBits contract (com.microsoft domain, onnxruntime 1.17 and newer):
B is uint8 [N, blocks, block_size * bits / 8]; with 4 bits, value 2i of a block goes to the low
nibble of byte i and value 2i+1 to its high nibble. Scales are float32 [N * blocks].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The two widths `--expert-bits auto` chooses between.
HIGH_BITS, LOW_BITS = 8, 4

EXPERT_BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits requires a power of 2 of at least 16
DEFAULT_BLOCK_SIZE = 32


@dataclass
class QuantizedWeight:
    """One weight in MatMulNBits layout."""

    packed: np.ndarray  # uint8 [N, blocks, block_size * bits // 8]
    scales: np.ndarray  # float32 [N * blocks]
    bits: int
    block_size: int
    n: int  # output features
    k: int  # input features, before padding


def check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"invalid block size {block_size}; choose one of "
                         f"{', '.join(map(str, BLOCK_SIZES))} (MatMulNBits needs a power of 2, at least 16)")


def quantize(weight: np.ndarray, bits: int, block_size: int) -> QuantizedWeight:
    """Quantize W [N, K] to `bits` per value with one scale per block of `block_size` along K."""
    if bits not in EXPERT_BITS:
        raise ValueError(f"invalid bits {bits}; choose one of {', '.join(map(str, EXPERT_BITS))}")
    check_block_size(block_size)
    w = np.asarray(weight, dtype=np.float32)
    n, k = w.shape
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), np.float32)
    padded[:, :k] = w
    grouped = padded.reshape(n, blocks, block_size)

    qmax = 2 ** (bits - 1) - 1
    absmax = np.abs(grouped).max(axis=-1)                                          # [N, blocks]
    scales = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(grouped / scales[..., None]), -qmax - 1, qmax).astype(np.int32)
    unsigned = (q + 2 ** (bits - 1)).astype(np.uint8)                              # [N, blocks, bs]
    if bits == 4:
        packed = unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)
    else:
        packed = unsigned
    return QuantizedWeight(packed=np.ascontiguousarray(packed, np.uint8), scales=scales.reshape(-1),
                           bits=bits, block_size=block_size, n=n, k=k)


def unpack(qw: QuantizedWeight) -> np.ndarray:
    """Stored unsigned values [N, blocks, block_size] from the packed bytes."""
    if qw.bits == 4:
        low, high = qw.packed & 0x0F, qw.packed >> 4
        values = np.empty(qw.packed.shape[:2] + (qw.block_size,), np.uint8)
        values[..., 0::2], values[..., 1::2] = low, high
        return values
    return qw.packed


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """W' [N, K] float32: what MatMulNBits multiplies by."""
    signed = unpack(qw).astype(np.float32) - 2 ** (qw.bits - 1)
    blocks = qw.packed.shape[1]
    w = signed * qw.scales.reshape(qw.n, blocks, 1)
    return w.reshape(qw.n, -1)[:, :qw.k]
