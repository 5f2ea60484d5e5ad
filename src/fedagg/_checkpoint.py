"""Save and load states bit-exactly: one ``.npz`` file, arrays raw plus a JSON skeleton.

No pickle: loading a file never runs code. Only the state types registered here can be
rebuilt; fields marked ``transient`` (scratch buffers) are not saved and come back as ``None``.
Python floats go through JSON's shortest round-trip repr, so they too come back to the bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from typing import Any, BinaryIO

import numpy as np

from fedagg.core.aggregate import MeanState
from fedagg.core.optim import AdamState, ChainState, EmptyState, OptState, TraceState
from fedagg.core.participation import IntervalState
from fedagg.core.robust import MemoryStore, SpoolState
from fedagg.core.spec import ParamSpec
from fedagg.core.strategy import ServerState
from fedagg.errors import FedaggError, StateError

__all__ = ["FORMAT_VERSION", "dump", "dumps", "load", "loads", "register", "save"]

FORMAT_VERSION = 1
_TYPES: dict[str, type[Any]] = {}


def register(cls: type[Any]) -> type[Any]:
    """Allow a dataclass state type to be saved and loaded (usable as a decorator)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    _TYPES[cls.__qualname__] = cls
    return cls


for _cls in (
    MeanState, AdamState, ChainState, EmptyState, OptState, TraceState, ServerState, IntervalState,
    SpoolState, MemoryStore,
):  # fmt: skip
    register(_cls)


def _encode(obj: Any, arrays: list[np.ndarray[Any, Any]]) -> Any:
    if isinstance(obj, np.ndarray):
        arrays.append(obj)
        return {"$array": len(arrays) - 1}
    if isinstance(obj, ParamSpec):
        return {"$spec": obj.to_dict()}
    view = getattr(obj, "checkpoint_view", None)
    if callable(view):  # e.g. a spool on disk is saved with its rows in memory
        obj = view()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        name = type(obj).__qualname__
        if _TYPES.get(name) is not type(obj):
            raise StateError(f"{name} is not a registered state type")
        fields = {
            f.name: _encode(getattr(obj, f.name), arrays)
            for f in dataclasses.fields(obj)
            if not f.metadata.get("transient")
        }
        return {"$type": name, "fields": fields}
    if isinstance(obj, (list, tuple)):
        return {"$seq": [_encode(x, arrays) for x in obj], "tuple": isinstance(obj, tuple)}
    if isinstance(obj, (set, frozenset)):
        if not all(isinstance(k, int) for k in obj):
            raise StateError("only sets of ints can be saved")
        return {"$set": sorted(obj)}
    if isinstance(obj, dict):
        if obj and all(type(k) is int for k in obj):  # job or client ids
            return {"$idict": [[k, _encode(v, arrays)] for k, v in obj.items()]}
        if not all(isinstance(k, str) for k in obj):
            raise StateError("only str- or int-keyed dicts can be saved")
        return {"$dict": {k: _encode(v, arrays) for k, v in obj.items()}}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise StateError(f"cannot save a value of type {type(obj).__name__}")


def _decode(node: Any, arrays: dict[str, np.ndarray[Any, Any]]) -> Any:
    if isinstance(node, dict):
        if "$array" in node:
            return arrays[f"a{node['$array']}"]
        if "$spec" in node:
            return ParamSpec.from_dict(node["$spec"])
        if "$type" in node:
            cls = _TYPES.get(node["$type"])
            if cls is None:
                raise StateError(f"unknown state type {node['$type']!r}")
            kwargs = {k: _decode(v, arrays) for k, v in node["fields"].items()}
            obj = cls(**kwargs)
            check = getattr(obj, "check", None)
            if callable(check):
                check()  # a state that does not fit its spec never reaches a kernel
            return obj
        if "$seq" in node:
            items = [_decode(x, arrays) for x in node["$seq"]]
            return tuple(items) if node.get("tuple") else items
        if "$dict" in node:
            return {k: _decode(v, arrays) for k, v in node["$dict"].items()}
        if "$idict" in node:
            return {int(k): _decode(v, arrays) for k, v in node["$idict"]}
        if "$set" in node:
            return {int(k) for k in node["$set"]}
        raise StateError("malformed state file")
    return node


def dumps(state: Any) -> bytes:
    """The state as bytes (an uncompressed ``.npz`` archive)."""
    buf = io.BytesIO()
    np.savez(buf, **_payload(state))
    return buf.getvalue()


def dump(state: Any, file: BinaryIO) -> bytes:
    """Write the state to ``file`` as :func:`dumps` would (an ``.npz`` archive :func:`loads`
    reads), streamed: the archive's entries are written as they are made (zip data
    descriptors), 16 MiB at a time, so no copy of the state is held in memory. Returns the
    sha256 of the bytes written."""
    out = _Hashing(file)
    np.savez(out, **_payload(state))
    return out.digest.digest()


class _Hashing:
    """A write-only stream (no tell, no seek: zipfile then writes each entry's sizes after
    its data) that hashes what it writes."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.digest = hashlib.sha256()

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def read(self, size: int = -1) -> bytes:  # what numpy looks for to take a file object
        raise io.UnsupportedOperation("write-only")


def _payload(state: Any) -> dict[str, Any]:
    arrays: list[np.ndarray[Any, Any]] = []
    skeleton = {"format": FORMAT_VERSION, "state": _encode(state, arrays)}
    meta = np.frombuffer(json.dumps(skeleton, allow_nan=True).encode(), dtype=np.uint8)
    payload: dict[str, Any] = {f"a{i}": a for i, a in enumerate(arrays)}
    payload["__meta__"] = meta
    return payload


def loads(data: bytes) -> Any:
    """Rebuild a state from :func:`dumps` bytes. Raises :class:`StateError` if unreadable."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            arrays = {k: z[k] for k in z.files if k != "__meta__"}
        if meta.get("format") != FORMAT_VERSION:
            raise StateError(f"unsupported state format {meta.get('format')!r}")
        return _decode(meta["state"], arrays)
    except FedaggError:
        raise
    except (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise StateError(f"not a fedagg state file: {e}") from e


def save(path: str | os.PathLike[str], state: Any) -> None:
    """Write ``state`` to ``path`` atomically (write to a temporary file, then rename)."""
    data = dumps(state)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | os.PathLike[str]) -> Any:
    """Read a state written by :func:`save`."""
    with open(path, "rb") as f:
        return loads(f.read())
