"""Your own model: a torch module, a dict of arrays, or a file of initial parameters.

    model = fedagg.models.from_torch(net)                   # any torch.nn.Module classifier
    model = fedagg.models.from_arrays({"w": w, "b": b})     # trained by your train function
    params = fedagg.models.read_params("init.safetensors")  # .npz, .safetensors, torch file
    model = fedagg.models.with_init(model, params)          # start from those parameters

A model made from arrays has no built-in training: a client trains it with your ``train``
function (``[client] train``); its ``evaluate`` is your ``evaluate`` function, if any (else
its metrics are NaN).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.errors import ConfigError
from fedagg.models._types import Params, ParamsLike

__all__ = [
    "ArrayModel",
    "EvalData",
    "Initialized",
    "check_params",
    "from_arrays",
    "from_torch",
    "read_params",
    "with_init",
]

Arr = npt.NDArray[Any]
#: ``evaluate(params, data, task) -> {metric: value}`` (see :mod:`fedagg.clients`' Task).
EvaluateFn = Callable[[Params, Any, Any], Mapping[str, float]]


class EvalData:
    """Held-out examples (``x``, ``y``) as an ``evaluate`` function receives them."""

    def __init__(self, x: Arr, y: Arr) -> None:
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return len(self.y)


def _metrics_pair(out: Any, who: str) -> tuple[float, float]:
    if not isinstance(out, Mapping):
        raise ConfigError(f"{who} must return a dict of metrics, got {type(out).__name__}")
    return float(out.get("loss", np.nan)), float(out.get("accuracy", np.nan))


def _floats(params: ParamsLike, key: str) -> Params:
    """``params`` as named float arrays (copies), or a ConfigError naming ``key``."""
    if not isinstance(params, Mapping) or not params:
        raise ConfigError(
            f"{key}: expected a non-empty dict of arrays, got {type(params).__name__}"
        )
    out: Params = {}
    for name, a in params.items():
        arr = np.array(a)
        if not isinstance(name, str) or not np.issubdtype(arr.dtype, np.floating):
            raise ConfigError(
                f"{key}: parameter {name!r} must be a float array (named by a string), got "
                f"dtype {arr.dtype}"
            )
        out[name] = arr
    return out


class ArrayModel:
    """A model that is only its parameters: a client trains it with your ``train`` function.

    ``init`` returns copies of ``params`` (whatever the seed); ``evaluate`` calls your
    ``evaluate(params, EvalData(x, y), None)`` and reads its ``"loss"`` and ``"accuracy"``
    (NaN without one); ``loss_and_grad`` raises (there is no built-in training).
    """

    def __init__(self, params: ParamsLike, evaluate: EvaluateFn | None = None) -> None:
        self.params = _floats(params, "model")
        self.evaluate_fn = evaluate

    @property
    def name(self) -> str:
        return "arrays"

    def init(self, seed: int) -> Params:
        return {k: v.copy() for k, v in self.params.items()}

    def loss_and_grad(self, params: ParamsLike, x: Arr, y: Arr) -> tuple[float, Params]:
        raise ConfigError(
            "this model is a dict of arrays with no built-in training: name your train "
            'function in [client] train = "module:function"'
        )

    def evaluate(
        self, params: ParamsLike, x: Arr, y: Arr, batch: int = 4096
    ) -> tuple[float, float]:
        if self.evaluate_fn is None:
            return float("nan"), float("nan")
        out = self.evaluate_fn(dict(params), EvalData(x, y), None)
        return _metrics_pair(out, "evaluate")


class Initialized:
    """``model`` starting from ``params`` (checked against ``model.init``'s names, shapes and
    dtypes), optionally evaluated by your ``evaluate`` function; everything else is
    ``model``'s (stacked training too, where it has it)."""

    def __init__(
        self, model: Any, params: ParamsLike | None = None, evaluate: EvaluateFn | None = None
    ) -> None:
        self.base = model
        self.start = None if params is None else check_params(model.init(0), params, "model.init")
        self.evaluate_fn = evaluate

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("base", "start", "evaluate_fn"):
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def name(self) -> str:
        return str(self.base.name)

    def init(self, seed: int) -> Params:
        if self.start is None:
            out: Params = self.base.init(seed)
            return out
        return {k: v.copy() for k, v in self.start.items()}

    def loss_and_grad(self, params: ParamsLike, x: Arr, y: Arr) -> tuple[float, Params]:
        out: tuple[float, Params] = self.base.loss_and_grad(params, x, y)
        return out

    def evaluate(
        self, params: ParamsLike, x: Arr, y: Arr, batch: int = 4096
    ) -> tuple[float, float]:
        if self.evaluate_fn is None:
            loss, acc = self.base.evaluate(params, x, y, batch)
            return float(loss), float(acc)
        return _metrics_pair(self.evaluate_fn(dict(params), EvalData(x, y), None), "evaluate")


def from_torch(module: Any, loss_fn: Any = None) -> Any:
    """A ``torch.nn.Module`` classifier as a fedagg model (:class:`fedagg.models.torch.TorchModel`;
    needs torch). ``loss_fn(outputs, labels)``: the mean loss (default cross-entropy)."""
    try:
        from fedagg.models.torch import TorchModel
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("a torch model needs torch: pip install 'fedagg[torch]'") from e
    if loss_fn is None:
        return TorchModel(module)
    return TorchModel(module, loss_fn)


def from_arrays(params: ParamsLike, *, evaluate: EvaluateFn | None = None) -> ArrayModel:
    """A model that is only ``params`` (named float arrays), trained by your ``train``."""
    return ArrayModel(params, evaluate)


def with_init(model: Any, params: ParamsLike, *, evaluate: EvaluateFn | None = None) -> Initialized:
    """``model`` starting from ``params`` instead of its own initialisation."""
    return Initialized(model, params, evaluate)


def check_params(expected: ParamsLike, loaded: ParamsLike, key: str) -> Params:
    """``loaded`` checked against ``expected`` (same names, shapes; float values), cast to the
    expected dtypes. A mismatch raises ConfigError naming ``key``, the parameter and both
    shapes."""
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    if missing or extra:
        raise ConfigError(
            f"{key}: the parameters do not match the model's: missing {missing}, unexpected "
            f"{extra} (the model has {sorted(expected)})"
        )
    out: Params = {}
    for name, want in expected.items():
        w = np.asarray(want)
        a = np.asarray(loaded[name])
        if a.shape != w.shape:
            raise ConfigError(
                f"{key}: parameter {name!r} has shape {a.shape} in the file, the model's is "
                f"{w.shape}"
            )
        if not np.issubdtype(a.dtype, np.floating):
            raise ConfigError(f"{key}: parameter {name!r} has dtype {a.dtype}, not a float")
        out[name] = np.array(a, dtype=w.dtype)
    return out


_ST_DTYPES = {
    "F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
    "I32": np.int32, "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def _read_safetensors(path: Path, key: str) -> Params:
    """A ``.safetensors`` file: an 8-byte little-endian header length, a JSON header
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` and the raw data."""
    raw = path.read_bytes()
    bad = f"{key} = {str(path)!r} is not a valid safetensors file"
    if len(raw) < 8:
        raise ConfigError(f"{bad}: too short")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ConfigError(f"{bad}: header length {n} beyond the file's {len(raw)} bytes")
    try:
        header = json.loads(raw[8 : 8 + n])
    except ValueError as e:
        raise ConfigError(f"{bad}: its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ConfigError(f"{bad}: its header is not a JSON object")
    data = memoryview(raw)[8 + n :]
    out: Params = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dt = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
            shape = tuple(int(s) for s in info["shape"])
            lo, hi = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{bad}: entry {name!r} is malformed or of an unknown dtype") from e
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= lo <= hi <= len(data) or hi - lo != count * dt.itemsize:
            raise ConfigError(f"{bad}: entry {name!r} has offsets [{lo}, {hi}] that do not fit")
        out[name] = np.frombuffer(data[lo:hi], dtype=dt).reshape(shape).astype(dt.newbyteorder("="))
    return out


def _read_torch(path: Path, key: str) -> Params:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(f"{key} = {str(path)!r} is a torch file: reading it needs torch") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds: unpickling refused, corrupt zip, ...
        raise ConfigError(
            f"{key} = {str(path)!r}: not a torch state_dict readable with weights_only=True "
            f"({type(e).__name__}: {e})"
        ) from e
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"{key} = {str(path)!r}: expected a state_dict (a dict of tensors)")
    return {str(k): v.detach().cpu().numpy() for k, v in obj.items()}


def read_params(path: str | Path, *, key: str = "model.init") -> Params:
    """Named arrays from ``path``: ``.npz``, ``.safetensors``, or a torch state_dict (any other
    suffix, e.g. ``.pt``, read with ``torch.load(weights_only=True)``). Only floating-point
    entries are returned (integer buffers such as ``num_batches_tracked`` are skipped)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key} = {str(path)!r}: no such file")
    if p.suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                out: Params = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError) as e:
            raise ConfigError(f"{key} = {str(path)!r} is not a readable .npz file ({e})") from e
    elif p.suffix == ".safetensors":
        out = _read_safetensors(p, key)
    else:
        out = _read_torch(p, key)
    floats = {k: v for k, v in out.items() if np.issubdtype(v.dtype, np.floating)}
    if not floats:
        raise ConfigError(f"{key} = {str(path)!r} holds no floating-point arrays")
    return floats
