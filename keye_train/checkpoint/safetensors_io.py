"""Streaming, memory-bounded reading and writing of (sharded) Hugging Face safetensors directories."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from keye_train.checkpoint.kill_points import kill_point

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
# safetensors header dtype names -> torch dtype names, for reporting without reading tensor data.
_ST_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64"}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16 (likewise fp16, fp32)."""
    if isinstance(name, torch.dtype):
        return name
    key = name.lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of bf16, fp16, fp32")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16', the spelling of config.json's torch_dtype."""
    return str(dtype).removeprefix("torch.")


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units as Hugging Face uses; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"shard size {text!r} is not a size; write it like 5GB, 500MB or 200KB")
    size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"shard size {text!r} must be positive")
    return size


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and file of one stored tensor, read from the safetensors header only."""

    shape: tuple[int, ...]
    dtype: str
    file: Path

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face model dir: those of the index, else model.safetensors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{index_path} is not a safetensors index (no readable 'weight_map'): {err}"
            ) from err
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(
                    f"{index_path} lists shard {file.name}, which is missing from {directory}"
                )
        return files
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    raise FileNotFoundError(
        f"{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors checkpoints are read "
        "(re-save a pytorch_model.bin checkpoint with save_pretrained(safe_serialization=True))"
    )


def _open(file: Path | str) -> Any:
    try:
        return safe_open(file, framework="pt")
    except Exception as err:  # safetensors' own error type derives from Exception only
        raise ValueError(
            f"{file} is not a readable safetensors file ({err}); re-download or re-save it"
        ) from err


def read_layout(directory: str | Path) -> dict[str, TensorInfo]:
    """Key -> TensorInfo over all shards, without reading tensor data."""
    layout: dict[str, TensorInfo] = {}
    for file in checkpoint_files(directory):
        with _open(file) as handle:
            names = handle.keys()  # safe_open handles are not iterable
            for key in names:
                if key in layout:
                    raise ValueError(f"key {key!r} is stored twice: in {layout[key].file} and in {file}")
                piece = handle.get_slice(key)
                dtype = _ST_DTYPE_NAMES.get(piece.get_dtype(), piece.get_dtype())
                layout[key] = TensorInfo(tuple(piece.get_shape()), dtype, file)
    return layout


def iter_shard(file: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of one safetensors file, one tensor in memory at a time."""
    with _open(file) as handle:
        names = handle.keys()  # safe_open handles are not iterable
        for key in names:
            try:
                tensor = handle.get_tensor(key)
            except Exception as err:  # safetensors' own error type derives from Exception only
                raise ValueError(
                    f"{file}: tensor {key!r} cannot be read ({err}); the file is damaged"
                ) from err
            yield key, tensor


def iter_checkpoint(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) over every shard of a checkpoint dir, shard by shard."""
    for file in checkpoint_files(directory):
        yield from iter_shard(file)
        kill_point("source.read")


def _as_os_error(err: Exception, path: Path) -> Exception:
    """safetensors reports a failed write as `SafetensorError: ... (os error 28)`: the OSError it stands
    for, naming the file, so a full disk reads like every other failed write."""
    if isinstance(err, OSError):
        return err
    code = re.search(r"(?:os error |Os \{ code: )(\d+)", str(err))
    if code is None:
        return err
    return OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path))


class ShardedWriter:
    """Writes tensors into shards of at most `max_shard_bytes` plus a Hugging Face index.

    At most one shard is held in memory. The shard count is only known at the end, so shards are written
    under provisional names and renamed to `model-0000i-of-0000n.safetensors` by close(). A single shard
    is named model.safetensors without index, as save_pretrained does.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_shard_bytes: int,
        dtype: torch.dtype | None = None,
        log: Callable[[str], None] | None = None,
        label: str = "model",
    ) -> None:
        self.directory = Path(directory)
        self.label = label
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        self.log = log
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._keys: set[str] = set()
        self.total_bytes = 0
        self.total_parameters = 0

    @property
    def keys(self) -> set[str]:
        """Keys added so far."""
        return set(self._keys)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._keys:
            raise ValueError(f"tensor {key!r} was given twice to the writer of {self.directory}")
        if tensor.device.type == "meta":
            raise ValueError(f"tensor {key!r} is on the meta device and has no data to save")
        tensor = tensor.detach().to("cpu")
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # safetensors refuses tensors sharing storage (tied weights); an own contiguous copy avoids that.
        self._pending[key] = (
            tensor.contiguous().clone() if self._shares_storage(tensor) else tensor.contiguous()
        )
        self._pending_bytes += nbytes
        self._keys.add(key)
        self.total_bytes += nbytes
        self.total_parameters += tensor.numel()

    def _shares_storage(self, tensor: torch.Tensor) -> bool:
        ptr = tensor.untyped_storage().data_ptr()
        return any(other.untyped_storage().data_ptr() == ptr for other in self._pending.values())

    def _flush(self) -> None:
        path = self.directory / f"shard-{len(self._written) + 1:05d}.partial"
        try:
            save_file(self._pending, str(path), metadata={"format": "pt"})
        except Exception as err:  # safetensors' own error type derives from Exception only
            raise _as_os_error(err, path) from err
        kill_point("shard.written")
        self._written.append((path, list(self._pending)))
        if self.log is not None:
            self.log(
                f"  [{self.label}] wrote shard {len(self._written)}: {len(self._pending)} tensors, "
                f"{self._pending_bytes / 1e6:.1f} MB"
            )
        self._pending = {}
        self._pending_bytes = 0

    def close(self) -> list[Path]:
        """Flush the last shard, give shards their final names, write the index; returns the files."""
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        if count == 1:
            final = self.directory / SINGLE_FILE
            os.replace(self._written[0][0], final)
            return [final]
        weight_map: dict[str, str] = {}
        files = []
        for number, (path, keys) in enumerate(self._written, start=1):
            final = self.directory / f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update(dict.fromkeys(keys, final.name))
        index = {
            "metadata": {"total_size": self.total_bytes, "total_parameters": self.total_parameters},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return files
