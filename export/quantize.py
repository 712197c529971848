"""Blocked integer quantization of expert weights for onnxruntime's MatMulNBits operator.

Each weight W [N, K] (PyTorch's [out, in] layout) is cut along K into blocks of `block_size`
values, and each block gets one float32 scale. K is zero-padded to a whole number of blocks.
MatMulNBits computes w = (q - z) * scale from the stored unsigned value q and zero point z.

- 8 and 4 bits: symmetric round-to-nearest, scale = max|w| / qmax, q = clip(round(w / scale),
  -qmax - 1, qmax) + 2**(bits-1). No zero points are stored: 2**(bits-1) is MatMulNBits'
  default.
- 2 bits: four levels are too few for round-to-nearest (it loses most of a block's small
  values), so each block gets the scale and integer zero point (0..3) with the least squared
  error, found by `_fit_2bit`. Zero points are stored packed, as MatMulNBits expects. Integer
  zero points, not float ones: onnxruntime 1.32 runs MatMulNBits with float zero points about
  10x slower on one token (0.80 ms vs 0.09 ms for a 1024x2048 weight, one thread, x86_64).

Packing follows the MatMulNBits contract (com.microsoft domain): B is uint8 [N, blocks,
block_size * bits / 8], value i of a block in bits [bits*(i % m), bits*(i % m + bits)) of byte
i // m, m = 8 / bits (for 4 bits: value 2i in the low nibble of byte i, 2i+1 in the high one).
Scales are float32 [N * blocks]. Zero points are uint8 [N * ceil(blocks / m)], packed the same
way along each row's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXPERT_BITS = (2, 4, 8)
# Widths `--expert-bits auto` chooses from, widest first; 16 means fp16.
AUTO_CANDIDATE_BITS = (16, 8, 4, 2)
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
    zero_points: np.ndarray | None = None  # uint8 [N * ceil(blocks * bits / 8)]; None: 2**(bits-1)

    @property
    def blocks(self) -> int:
        return self.packed.shape[1]


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

    zero_points = None
    if bits == 2:
        q, scales, zeros = _fit_2bit(grouped)
        # Zero points are packed along each row's blocks.
        zero_points = pack(zeros, bits).reshape(-1)
        unsigned = q
    else:
        qmax = 2 ** (bits - 1) - 1
        absmax = np.abs(grouped).max(axis=-1)                                      # [N, blocks]
        scales = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
        signed = np.clip(np.rint(grouped / scales[..., None]), -qmax - 1, qmax)
        unsigned = (signed + 2 ** (bits - 1)).astype(np.uint8)                     # [N, blocks, bs]
    return QuantizedWeight(packed=pack(unsigned, bits), scales=scales.reshape(-1).astype(np.float32),
                           bits=bits, block_size=block_size, n=n, k=k, zero_points=zero_points)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned `bits`-bit values along the last axis into bytes, lowest bits first.

    A last axis that is not a whole number of bytes is padded with zeros.
    """
    per_byte = 8 // bits
    values = np.asarray(values, np.uint8)
    pad = (-values.shape[-1]) % per_byte
    if pad:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (pad,), np.uint8)], axis=-1)
    grouped = values.reshape(values.shape[:-1] + (-1, per_byte)).astype(np.uint8)
    packed = np.zeros(grouped.shape[:-1], np.uint8)
    for slot in range(per_byte):
        packed |= grouped[..., slot] << (bits * slot)
    return np.ascontiguousarray(packed)


def unpack_values(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack`: the first `count` values along the last axis."""
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    slots = [(packed >> (bits * slot)) & mask for slot in range(per_byte)]
    values = np.stack(slots, axis=-1).reshape(packed.shape[:-1] + (-1,))
    return values[..., :count].astype(np.uint8)


def unpack(qw: QuantizedWeight) -> np.ndarray:
    """Stored unsigned values [N, blocks, block_size] from the packed bytes."""
    return unpack_values(qw.packed, qw.bits, qw.block_size)


def zero_point_values(qw: QuantizedWeight) -> np.ndarray:
    """Zero point of every block, float32 [N, blocks]."""
    if qw.zero_points is None:
        return np.full((qw.n, qw.blocks), 2 ** (qw.bits - 1), np.float32)
    rows = qw.zero_points.reshape(qw.n, -1)
    return unpack_values(rows, qw.bits, qw.blocks).astype(np.float32)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """W' [N, K] float32: what MatMulNBits multiplies by."""
    centred = unpack(qw).astype(np.float32) - zero_point_values(qw)[..., None]
    w = centred * qw.scales.reshape(qw.n, qw.blocks, 1)
    return w.reshape(qw.n, -1)[:, :qw.k]


def widen_2bit(packed: np.ndarray, count: int) -> np.ndarray:
    """Repack 2-bit values [..., ceil(count / 4)] bytes as 4-bit values [..., ceil(count / 2)].

    This is what a 2-bit expert graph computes at load time when onnxruntime has no 2-bit
    MatMulNBits kernel (see edgemoe.export.layers.widened_copy). The tests use it as the reference.
    """
    return pack(unpack_values(packed, 2, count), 4)


# Candidate scales per block for the 2-bit fit, as fractions of the block's range / 3.
_RANGE_FRACTIONS = np.linspace(0.5, 1.0, 11, dtype=np.float32)
_REFINE_STEPS = 2


def _fit_2bit(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block of `blocks` [N, B, S]: the 2-bit values, scale and integer zero point that
    minimise the squared error of w - (q - z) * scale.

    Every zero point z in 0..3 is tried with every candidate scale (a fraction of the block's
    range divided by 3), rounding the values to the nearest level. The best pair per block then
    gets `_REFINE_STEPS` rounds of refitting: the least-squares scale for its values, then
    rounding again. A round is kept only when it lowers the error.

    Returns:
        q uint8 [N, B, S] in 0..3, scales float32 [N, B] (positive), zero points uint8 [N, B].
    """
    w = blocks
    span = w.max(axis=-1) - w.min(axis=-1)                                            # [N, B]
    span = np.where(span > 0, span, 1.0).astype(np.float32)
    best_err = np.full(span.shape, np.inf, np.float32)
    best_scale = np.ones_like(span)
    best_zero = np.zeros(span.shape, np.float32)
    for zero in range(4):
        for fraction in _RANGE_FRACTIONS:
            scale = span * (fraction / 3)
            q = np.clip(np.rint(w / scale[..., None] + zero), 0, 3)
            err = np.square(w - (q - zero) * scale[..., None]).sum(axis=-1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_zero = np.where(better, np.float32(zero), best_zero)
    scale, zero = best_scale, best_zero[..., None]
    q = np.clip(np.rint(w / scale[..., None] + zero), 0, 3)
    for _ in range(_REFINE_STEPS):
        levels = q - zero
        denom = np.square(levels).sum(axis=-1)
        fitted = np.where(denom > 0, (w * levels).sum(axis=-1) / np.where(denom > 0, denom, 1), scale)
        fitted = np.where(fitted > 0, fitted, scale).astype(np.float32)
        new_q = np.clip(np.rint(w / fitted[..., None] + zero), 0, 3)
        old_err = np.square(w - levels * scale[..., None]).sum(axis=-1)
        new_err = np.square(w - (new_q - zero) * fitted[..., None]).sum(axis=-1)
        keep = new_err < old_err
        scale = np.where(keep, fitted, scale)
        q = np.where(keep[..., None], new_q, q)
    return q.astype(np.uint8), scale.astype(np.float32), zero[..., 0].astype(np.uint8)
