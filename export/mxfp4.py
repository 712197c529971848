"""MXFP4 dequantization: FP4 (E2M1) values in blocks of 32 with one shared E8M0 scale per block.

The element and scale encodings follow the OCP Microscaling Formats (MX) v1.0 specification:
- an E2M1 element is 4 bits: sign, 2 exponent bits (bias 1), 1 mantissa bit. Exponent 0 is
  subnormal (0 or 0.5), so the magnitudes are 0, 0.5, 1, 1.5, 2, 3, 4, 6;
- an E8M0 scale is one byte s meaning 2 ** (s - 127); s = 255 is NaN.

The tensor layout is the one gpt-oss checkpoints use and transformers 5.25 reads
(integrations/mxfp4.py): for a weight W [..., R, C] in PyTorch's [out, in] layout,
`NAME_blocks` is uint8 [..., R, C / 32, 16] and `NAME_scales` uint8 [..., R, C / 32]. Byte i of a
block holds element 2i in its low nibble and element 2i + 1 in its high nibble.
"""

from __future__ import annotations

import numpy as np

BLOCK_SIZE = 32  # elements sharing one scale
SCALE_BIAS = 127
SCALE_NAN = 255


class Mxfp4Error(ValueError):
    """MXFP4 blocks and scales that do not fit together or hold a NaN scale."""


def e2m1_values() -> np.ndarray:
    """Return the float32 value of each of the 16 E2M1 codes, indexed by code."""
    codes = np.arange(16)
    sign = np.where(codes & 0b1000, -1.0, 1.0)
    exponent = (codes >> 1) & 0b11
    mantissa = codes & 0b1
    magnitude = np.where(exponent == 0, 0.5 * mantissa,                       # subnormal: 2^(1-1) * m/2
                         2.0 ** (exponent - 1) * (1 + 0.5 * mantissa))
    return (sign * magnitude).astype(np.float32)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Return W float32 [..., R, C] from `blocks` uint8 [..., R, C/32, 16] and `scales` uint8 [..., R, C/32].

    Raises:
        Mxfp4Error: the shapes do not match, or a scale is the E8M0 NaN code 255.
    """
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise Mxfp4Error(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK_SIZE // 2 or blocks.shape[:-1] != scales.shape:
        raise Mxfp4Error(f"MXFP4 blocks of shape {list(blocks.shape)} do not fit scales of shape "
                         f"{list(scales.shape)}: expected blocks [..., G, {BLOCK_SIZE // 2}] with scales [..., G]")
    if np.any(scales == SCALE_NAN):
        raise Mxfp4Error(f"MXFP4 scales contain the NaN code {SCALE_NAN}; the checkpoint is damaged")
    values = e2m1_values()
    elements = np.empty(blocks.shape[:-1] + (BLOCK_SIZE,), np.float32)              # [..., G, 32]
    elements[..., 0::2] = values[blocks & 0x0F]
    elements[..., 1::2] = values[blocks >> 4]
    # Scaling by a power of two is exact in float32.
    exponents = scales.astype(np.int32) - SCALE_BIAS                               # [..., G]
    weight = np.ldexp(elements, exponents[..., None])                              # [..., G, 32]
    return weight.reshape(blocks.shape[:-2] + (-1,))                               # [..., C]
