"""Reading a Hugging Face checkpoint directory: config, safetensors shards, tokenizer files.

The safetensors reader is a small numpy one so that BF16 works (numpy has no bfloat16: such
tensors are read as uint16 and widened to float32) and nothing but numpy is needed. FP8 e4m3
tensors are read only through `get_e4m3`, which decodes them through a 256-entry table; the
family that reads them applies their scales.
Format: 8-byte little-endian header length, a JSON header mapping tensor names to dtype, shape
and byte offsets, then the raw little-endian data.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import numpy as np

# safetensors dtype name -> numpy dtype of the stored bytes
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _e4m3fn_values() -> np.ndarray:
    """Return the float32 value of each of the 256 float8 e4m3fn codes (OCP FP8 format: sign,
    4 exponent bits with bias 7, 3 mantissa bits, no infinities, S.1111.111 is NaN)."""
    codes = np.arange(256)
    exponent, mantissa = (codes >> 3) & 0xF, codes & 0x7
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0 ** -6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    values = np.where(codes & 0x80, -magnitude, magnitude)
    values[(codes & 0x7F) == 0x7F] = np.nan
    return values.astype(np.float32)


E4M3FN_VALUES = _e4m3fn_values()


class CheckpointError(Exception):
    """The checkpoint directory is missing a file or tensor, or holds one we cannot read."""


class SafetensorsFile:
    """Memory-mapped view of one `.safetensors` file."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (header_len,) = struct.unpack("<Q", self._map[:8])
        if header_len > len(self._map) - 8:
            raise CheckpointError(f"{path} is not a valid safetensors file (header length {header_len} "
                                  f"exceeds the file size {len(self._map)})")
        header = json.loads(self._map[8:8 + header_len])
        header.pop("__metadata__", None)
        self._header = header
        self._data_start = 8 + header_len

    def names(self) -> list[str]:
        return list(self._header)

    def dtype(self, name: str) -> str:
        """Return the safetensors dtype name of a tensor, such as "BF16" or "F8_E4M3"."""
        return self._header[name]["dtype"]

    def get_e4m3(self, name: str) -> np.ndarray:
        """Return an F8_E4M3 tensor decoded to float32, without its scales.

        `get` rejects FP8 tensors, because their values mean nothing without their scales, and
        only the family that reads the checkpoint's quantization_config applies those.
        """
        info = self._header[name]
        if info["dtype"] != "F8_E4M3":
            raise CheckpointError(f"tensor {name} in {self.path} has dtype {info['dtype']}, expected F8_E4M3")
        begin, end = info["data_offsets"]
        raw = np.frombuffer(self._map, dtype=np.uint8, count=end - begin, offset=self._data_start + begin)
        return E4M3FN_VALUES[raw].reshape(info["shape"])

    def get(self, name: str) -> np.ndarray:
        """Return the tensor as float32 (floating types) or its stored integer type."""
        info = self._header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"tensor {name} in {self.path} has dtype {info['dtype']}, which edgemoe "
                                  f"cannot read; supported: {', '.join(_DTYPES)}")
        begin, end = info["data_offsets"]
        raw = np.frombuffer(self._map, dtype=dtype, count=(end - begin) // np.dtype(dtype).itemsize,
                            offset=self._data_start + begin).reshape(info["shape"])
        if info["dtype"] == "BF16":
            # bfloat16 is the upper half of a float32.
            return (raw.astype(np.uint32) << 16).view(np.float32)
        if np.issubdtype(dtype, np.floating):
            return raw.astype(np.float32)
        return raw.copy()


class Checkpoint:
    """A Hugging Face checkpoint directory with one or several safetensors files."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.exists():
            raise CheckpointError(f"checkpoint directory {self.directory} not found")
        if not self.directory.is_dir():
            raise CheckpointError(f"checkpoint path {self.directory} is not a directory; give the folder "
                                  "that holds config.json and the safetensors files")
        self.config = self._read_json("config.json", required=True)
        self.generation_config = self._read_json("generation_config.json", required=False)
        self._files: dict[str, SafetensorsFile] = {}
        self._index = self._build_index()

    def _read_json(self, name: str, required: bool) -> dict:
        path = self.directory / name
        if not path.is_file():
            if required:
                raise CheckpointError(f"{name} not found in {self.directory}; a Hugging Face checkpoint "
                                      "directory needs config.json and its safetensors weights")
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"invalid JSON in {path}: {exc}") from exc

    def _build_index(self) -> dict[str, str]:
        index_path = self.directory / "model.safetensors.index.json"
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            return dict(weight_map)
        single = self.directory / "model.safetensors"
        shards = sorted(self.directory.glob("model-*.safetensors"))
        files = [single] if single.is_file() else shards
        if not files:
            raise CheckpointError(
                f"no safetensors weights in {self.directory}: expected model.safetensors or "
                "model-*.safetensors with model.safetensors.index.json (PyTorch .bin checkpoints "
                "are not supported; convert them with transformers' save_pretrained)")
        index = {}
        for path in files:
            for name in self._open(path.name).names():
                index[name] = path.name
        return index

    def _open(self, file_name: str) -> SafetensorsFile:
        if file_name not in self._files:
            path = self.directory / file_name
            if not path.is_file():
                raise CheckpointError(f"weight file {path} listed in the index is missing")
            self._files[file_name] = SafetensorsFile(path)
        return self._files[file_name]

    def has(self, name: str) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        return list(self._index)

    def dtype(self, name: str) -> str:
        """Return the safetensors dtype name of a tensor in the checkpoint."""
        if name not in self._index:
            raise CheckpointError(f"tensor {name} not found in the checkpoint {self.directory}")
        return self._open(self._index[name]).dtype(name)

    def get_e4m3(self, name: str) -> np.ndarray:
        """Return an F8_E4M3 tensor decoded to float32, without its scales (see SafetensorsFile)."""
        return self._open(self._index[name]).get_e4m3(name)

    def get(self, name: str) -> np.ndarray:
        """Return a tensor by its safetensors name.

        Raises:
            CheckpointError: naming the tensor when no file in the checkpoint holds it.
        """
        file_name = self._index.get(name)
        if file_name is None:
            raise CheckpointError(f"tensor {name} not found in the checkpoint {self.directory}")
        return self._open(file_name).get(name)
