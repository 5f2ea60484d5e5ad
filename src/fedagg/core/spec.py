"""ParamSpec: a model's named arrays laid out as one contiguous flat buffer.

A spec is plain data (names, shapes, one dtype). It maps a model (a list or dict of arrays) to a
flat 1-D buffer and back; :meth:`ParamSpec.unflatten` returns views, never copies, and
:meth:`ParamSpec.as_flat` recognises arrays that already are views of one flat buffer (or raw
bytes) and returns the buffer itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

import numpy as np
import numpy.typing as npt

from fedagg.errors import SpecError

__all__ = ["ArrayTree", "Delta", "ParamSpec"]

#: A model or an update as the user holds it: a list (or tuple) or a dict of arrays.
ArrayTree: TypeAlias = Sequence[npt.NDArray[Any]] | Mapping[str, npt.NDArray[Any]]
Flat: TypeAlias = npt.NDArray[Any]
#: What an update's delta may be: arrays shaped like the spec (list or dict), one flat
#: array, or raw bytes in the spec's dtype (viewed without a copy).
Delta: TypeAlias = ArrayTree | Flat | bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """Names, shapes and the dtype of a model's arrays, and their offsets in a flat buffer.

    ``keyed`` records whether the model was a dict (``True``) or a list; ``unflatten`` gives
    back the same structure.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: np.dtype[Any]
    keyed: bool
    _offsets: tuple[int, ...] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "dtype", np.dtype(self.dtype))
        except TypeError as e:
            raise SpecError(f"invalid dtype {self.dtype!r}") from e
        if len(self.names) != len(self.shapes):
            raise SpecError("names and shapes differ in length")
        if len(set(self.names)) != len(self.names):
            raise SpecError("array names must be unique")
        if not self.names:
            raise SpecError("a spec needs at least one array")
        if self.dtype.kind != "f":
            raise SpecError(f"only floating-point models are supported, got dtype {self.dtype}")
        for shape in self.shapes:
            if any((not isinstance(d, int)) or d < 0 for d in shape):
                raise SpecError(f"invalid shape {shape}")
        out = [0]
        for shape in self.shapes:
            out.append(out[-1] + math.prod(shape))
        object.__setattr__(self, "_offsets", tuple(out))

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, arrays: ArrayTree) -> ParamSpec:
        """The spec of a list (or tuple) or a dict of arrays, all of one floating dtype."""
        if isinstance(arrays, Mapping):
            if not all(isinstance(k, str) for k in arrays):
                raise SpecError("a dict model needs str keys (the arrays' names)")
            names = tuple(arrays)
            values = [np.asarray(v) for v in arrays.values()]
            keyed = True
        elif isinstance(arrays, (list, tuple)):
            values = [np.asarray(v) for v in arrays]
            names = tuple(str(i) for i in range(len(values)))
            keyed = False
        else:
            raise SpecError(f"expected a list or dict of arrays, got {type(arrays).__name__}")
        if not values:
            raise SpecError("a spec needs at least one array")
        dtypes = {v.dtype for v in values}
        if len(dtypes) != 1:
            raise SpecError(
                f"all arrays must share one dtype, got {sorted(str(d) for d in dtypes)}; "
                "cast them (e.g. to float32) first"
            )
        dtype = dtypes.pop()
        shapes = tuple(tuple(int(d) for d in v.shape) for v in values)
        return cls(names=names, shapes=shapes, dtype=np.dtype(dtype), keyed=keyed)

    # -- derived layout ---------------------------------------------------------------------
    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each array in the flat buffer, in elements; the last entry is ``size``."""
        return self._offsets

    @property
    def size(self) -> int:
        """Total number of elements."""
        return self._offsets[-1]

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.names)

    # -- conversions ------------------------------------------------------------------------
    def zeros(self, dtype: npt.DTypeLike | None = None) -> Flat:
        """A new zero flat buffer (of the spec's dtype unless another is given)."""
        return np.zeros(self.size, dtype=self.dtype if dtype is None else dtype)

    def unflatten(self, flat: Flat) -> ArrayTree:
        """Views of ``flat`` shaped like the model, as a list or a dict. No copy is made."""
        flat = np.asarray(flat)
        if flat.ndim != 1 or flat.shape[0] != self.size:
            raise SpecError(f"expected a flat buffer of {self.size} elements, got {flat.shape}")
        off = self.offsets
        views = [flat[off[i] : off[i + 1]].reshape(s) for i, s in enumerate(self.shapes)]
        if self.keyed:
            return dict(zip(self.names, views, strict=True))
        return views

    def leaves(self, arrays: ArrayTree) -> list[npt.NDArray[Any]]:
        """The arrays of a model in spec order; raises SpecError where they do not fit."""
        problem = self.mismatch(arrays)
        if problem is not None:
            raise SpecError(problem)
        return self._leaves_unchecked(arrays)

    def _leaves_unchecked(self, arrays: ArrayTree) -> list[npt.NDArray[Any]]:
        if isinstance(arrays, Mapping):
            return [np.asarray(arrays[n]) for n in self.names]
        return [np.asarray(a) for a in arrays]

    def mismatch(self, arrays: Delta) -> str | None:
        """Why ``arrays`` does not fit this spec, or ``None`` if it does."""
        if isinstance(arrays, (bytes, bytearray, memoryview)):
            view = memoryview(arrays)
            if not view.c_contiguous:
                return "buffer is not contiguous"
            nbytes = view.nbytes
            if nbytes != self.nbytes:
                return f"buffer of {nbytes} bytes, expected {self.nbytes}"
            return None
        if isinstance(arrays, np.ndarray):
            if arrays.ndim == 1 and arrays.shape[0] == self.size:
                return _dtype_problem("flat buffer", arrays.dtype, self.dtype)
            return f"flat buffer of shape {arrays.shape}, expected ({self.size},)"
        if isinstance(arrays, Mapping):
            if set(arrays) != set(self.names):
                missing = sorted(set(self.names) - set(arrays))
                extra = sorted(set(map(str, arrays)) - set(self.names))
                return f"array names differ from the spec (missing {missing}, unexpected {extra})"
            items = [(n, arrays[n]) for n in self.names]
        elif isinstance(arrays, (list, tuple)):
            if len(arrays) != len(self.names):
                return f"{len(arrays)} arrays, expected {len(self.names)}"
            items = list(zip(self.names, arrays, strict=True))
        else:
            return f"expected a list or dict of arrays or a flat buffer, got {type(arrays)}"
        for (name, a), shape in zip(items, self.shapes, strict=True):
            arr = np.asarray(a)
            if arr.shape != shape:
                return f"array {name!r} has shape {arr.shape}, expected {shape}"
            problem = _dtype_problem(f"array {name!r}", arr.dtype, self.dtype)
            if problem is not None:
                return problem
        return None

    def as_flat(self, arrays: Delta) -> Flat:
        """One contiguous flat buffer holding ``arrays``, without a copy where possible.

        A flat array or a bytes-like buffer is viewed as is; a list or dict whose arrays are
        consecutive views of one flat buffer (as :meth:`unflatten` makes them) returns that
        buffer; anything else is copied into a new buffer. Call :meth:`mismatch` first:
        this method assumes ``arrays`` fits the spec.
        """
        if isinstance(arrays, (bytes, bytearray, memoryview)):
            return np.frombuffer(arrays, dtype=self.dtype)
        if isinstance(arrays, np.ndarray) and arrays.ndim == 1 and arrays.shape[0] == self.size:
            return np.ascontiguousarray(arrays)
        leaves = self._leaves_unchecked(cast(ArrayTree, arrays))
        base = _common_flat_base(leaves, self)
        if base is not None:
            return base
        out = np.empty(self.size, dtype=self.dtype)
        off = self.offsets
        for i, leaf in enumerate(leaves):
            out[off[i] : off[i + 1]] = leaf.reshape(-1)
        return out

    def segments(self, arrays: Delta) -> list[Flat]:
        """The update as 1-D contiguous pieces covering the flat layout in order, no copies.

        A flat buffer (or arrays viewing one) is a single piece; otherwise each array is one
        piece (copied only if it was not contiguous).
        """
        if isinstance(arrays, (bytes, bytearray, memoryview, np.ndarray)):
            return [self.as_flat(arrays)]
        leaves = self._leaves_unchecked(arrays)
        base = _common_flat_base(leaves, self)
        if base is not None:
            return [base]
        return [np.ascontiguousarray(leaf).reshape(-1) for leaf in leaves]

    # -- plain data -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "dtype": self.dtype.str,
            "keyed": self.keyed,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ParamSpec:
        try:
            return cls(
                names=tuple(str(n) for n in d["names"]),
                shapes=tuple(tuple(int(x) for x in s) for s in d["shapes"]),
                dtype=np.dtype(d["dtype"]),
                keyed=bool(d["keyed"]),
            )
        except (KeyError, TypeError) as e:
            raise SpecError(f"not a ParamSpec description: {e}") from e


def _dtype_problem(what: str, got: np.dtype[Any], want: np.dtype[Any]) -> str | None:
    if got != want:
        return f"{what} has dtype {got}, expected {want}"
    return None


def _common_flat_base(leaves: list[npt.NDArray[Any]], spec: ParamSpec) -> Flat | None:
    """The flat range of one buffer that ``leaves`` are consecutive views of, if there is one
    (e.g. the arrays of :meth:`ParamSpec.unflatten`, or of one row of a 2-D array)."""
    root = leaves[0]
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not root.flags.c_contiguous or root.dtype != spec.dtype:
        return None
    itemsize = spec.dtype.itemsize
    root_ptr = _ptr(root)
    first, rem = divmod(_ptr(leaves[0]) - root_ptr, itemsize)
    if rem or first < 0 or first + spec.size > root.size:
        return None
    off = spec.offsets
    for i, leaf in enumerate(leaves):
        if not leaf.flags.c_contiguous or leaf.dtype != spec.dtype:
            return None
        if leaf.size and _ptr(leaf) != root_ptr + (first + off[i]) * itemsize:
            return None
    return root.reshape(-1)[first : first + spec.size]


def _ptr(a: npt.NDArray[Any]) -> int:
    return int(a.__array_interface__["data"][0])
