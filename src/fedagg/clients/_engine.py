"""Local minibatch SGD for one client, and for many clients at once on stacked parameters.

Both engines draw each epoch's batch order as ``rng.permutation(n)`` from the client's own
generator, in the same order, and apply the same step ``w -= lr * g`` (with ``g`` the
gradient after the algorithm's correction), so the stacked engine reproduces the per-client
one up to the round-off of batched matrix products.

The stacked engine sorts clients by their number of steps (descending) and cuts them into
groups of at most :data:`GROUP_CLIENTS`. In a group, step ``t`` trains the clients that still
have a step ``t``: always a prefix of the group, so a step is a fixed handful of numpy calls
on that prefix whatever the number of clients, and a client that is done costs nothing.
Batches are materialised a window of steps at a time (at most :data:`WINDOW_BYTES`), each
client's batches contiguous and filled by one ``take`` from its own data (cache-friendly);
a step then gathers one block per active client. A short last batch is padded (with the
client's example 0) and masked out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.errors import ConfigError
from fedagg.models import Examples, Model, Params, ParamsLike, StackedModel

Arr = npt.NDArray[Any]

#: ``correct(w, g) -> g'``: the algorithm's gradient correction for one client.
Correct = Callable[[Params, Params], Params]
#: ``correct(w, g, m) -> g'`` on the stacked prefix of ``m`` clients of a group.
StackedCorrect = Callable[[Params, Params, int], Params]
#: Given the indices (into the call's clients) of a group, in group order, its correction.
MakeCorrect = Callable[[Sequence[int]], StackedCorrect | None]

#: The stacked engine trains at most this many clients in lockstep (one group).
GROUP_CLIENTS = 1024
#: Batches are laid out in step order this many bytes (of examples) at a time.
WINDOW_BYTES = 1 << 25


# --------------------------------------------------------------------------------------------
# Checks and conversions
# --------------------------------------------------------------------------------------------


def check_hparams(epochs: int, batch_size: int, lr: float, steps: int | None = None) -> None:
    if steps is not None and (
        isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1
    ):
        raise ConfigError(f"steps must be None or an int >= 1, got {steps!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ConfigError(f"epochs must be an int >= 1, got {epochs!r}")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be finite and > 0, got {lr!r}")


def resolve_epochs(default: int, epochs: int | None) -> int:
    if epochs is None:
        return default
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ConfigError(f"epochs must be an int >= 0, got {epochs!r}")
    return int(epochs)


def start_params(params: ParamsLike) -> Params:
    """The global parameters as arrays (no copy); refuses anything but float arrays."""
    if not isinstance(params, Mapping) or not params:
        raise ConfigError("params must be a non-empty dict of arrays")
    out: Params = {}
    for k, v in params.items():
        a = np.asarray(v)
        if a.dtype.kind != "f":
            raise ConfigError(f"parameter {k!r} has dtype {a.dtype}; expected floats")
        out[str(k)] = a
    return out


def client_data(data: Examples) -> tuple[Arr, Arr]:
    """``(x, y)`` of a client, checked for matching lengths."""
    try:
        x, y = np.asarray(data.x), np.asarray(data.y)
    except AttributeError as e:
        raise ConfigError(f"client data needs attributes x and y: {e}") from e
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ConfigError(f"client data must be x (n, d) and y (n,), got {x.shape} and {y.shape}")
    return x, y


def check_like(what: str, arrays: ParamsLike, start: Params) -> Params:
    """``arrays`` as a dict with exactly the names and shapes of ``start``, in its dtypes."""
    if not isinstance(arrays, Mapping) or set(arrays) != set(start):
        got = sorted(arrays) if isinstance(arrays, Mapping) else type(arrays).__name__
        raise ConfigError(f"{what} must have the parameters' names {sorted(start)}, got {got}")
    out: Params = {}
    for k, ref in start.items():
        a = np.asarray(arrays[k], dtype=ref.dtype)
        if a.shape != ref.shape:
            raise ConfigError(f"{what}[{k!r}] has shape {a.shape}, expected {ref.shape}")
        out[k] = a
    return out


def num_steps(n: int, epochs: int, batch_size: int) -> int:
    return epochs * (-(-n // batch_size))


def examples_seen(n: int, steps: int, batch_size: int) -> int:
    """Examples in the first ``steps`` batches of epochs of ``n`` examples in batches of
    ``batch_size`` (the last batch of each epoch holds the remainder)."""
    if n == 0 or steps == 0:
        return 0
    per = -(-n // batch_size)
    full, rest = divmod(steps, per)
    return full * n + min(rest * batch_size, n)


def fixed_steps(n: int, epochs: int, batch_size: int, max_steps: int | None) -> tuple[int, int]:
    """``(epochs, steps)`` to run: as given, or ``max_steps`` steps over enough epochs."""
    if max_steps is None or epochs == 0 or n == 0:
        return epochs, num_steps(n, epochs, batch_size)
    per = -(-n // batch_size)
    return -(-max_steps // per), max_steps


# --------------------------------------------------------------------------------------------
# One client
# --------------------------------------------------------------------------------------------


def run_one(
    model: Model,
    start: Params,
    x: Arr,
    y: Arr,
    rng: np.random.Generator,
    epochs: int,
    batch_size: int,
    lr: float,
    correct: Correct | None,
    max_steps: int | None = None,
) -> tuple[Params, int, float]:
    """``epochs`` of minibatch SGD from ``start``; returns (trained, steps, mean batch loss).

    Each epoch visits the examples in the order ``rng.permutation(n)`` in batches of
    ``batch_size`` (the last one may be smaller). The mean loss is NaN if no step was taken.
    With ``max_steps``, exactly that many steps are taken (if ``epochs > 0``), over as many
    epochs as they need.
    """
    w = {k: np.array(v, copy=True) for k, v in start.items()}
    n = len(y)
    epochs, cap = fixed_steps(n, epochs, batch_size, max_steps)
    steps = 0
    total = 0.0
    for _ in range(epochs):
        order = rng.permutation(n)
        for lo in range(0, n, batch_size):
            if steps == cap:
                break
            idx = order[lo : lo + batch_size]
            loss, g = model.loss_and_grad(w, x[idx], y[idx])
            if correct is not None:
                g = correct(w, g)
            for k, wk in w.items():
                wk -= wk.dtype.type(lr) * g[k]
            steps += 1
            total += loss
    return w, steps, (total / steps if steps else float("nan"))


# --------------------------------------------------------------------------------------------
# Many clients, stacked
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """One client's result from the stacked engine."""

    delta: Params
    steps: int
    loss: float


def run_many(
    model: StackedModel,
    start: Params,
    data: Sequence[tuple[Arr, Arr]],
    rngs: Sequence[np.random.Generator],
    epochs: Sequence[int],
    batch_size: int,
    lr: float,
    make_correct: MakeCorrect | None,
    max_steps: int | None = None,
) -> list[Outcome]:
    """What :func:`run_one` gives for each client (deltas instead of trained parameters),
    computed on stacked parameters, group by group.

    A client's result does not depend on the other clients of the call.
    Every client's deltas are views of one contiguous row (in ``start``'s key order), so
    :meth:`fedagg.ParamSpec.as_flat` takes them without a copy.
    """
    ns = np.array([len(y) for _, y in data], dtype=np.int64)
    plan = [fixed_steps(int(n), e, batch_size, max_steps) for n, e in zip(ns, epochs, strict=True)]
    epochs = [e for e, _ in plan]
    steps = np.array([k for _, k in plan], dtype=np.int64)
    # Batch orders from each client's generator, exactly as run_one draws them.
    orders = [
        [rng.permutation(int(n)) for _ in range(e)]
        for rng, n, e in zip(rngs, ns, epochs, strict=True)
    ]
    dtype = next(iter(start.values())).dtype
    out: list[Outcome | None] = [None] * len(data)
    for i in np.flatnonzero(steps == 0).tolist():
        out[i] = Outcome({k: np.zeros_like(v) for k, v in start.items()}, 0, float("nan"))
    ranked = [i for i in np.argsort(-steps, kind="stable").tolist() if steps[i] > 0]
    if not ranked:
        return [o for o in out if o is not None]

    # Groups of clients adjacent in the ranking (similar step counts).
    groups = [ranked[lo : lo + GROUP_CLIENTS] for lo in range(0, len(ranked), GROUP_CLIENTS)]
    buffers = _Buffers()  # reused by every group: fresh pages are costly
    results = [
        _run_group(
            model,
            start,
            data,
            orders,
            members,
            steps,
            batch_size,
            lr,
            dtype,
            None if make_correct is None else make_correct(members),
            buffers,
        )
        for members in groups
    ]
    for members, group in zip(groups, results, strict=True):
        for i, o in zip(members, group, strict=True):
            out[i] = o
    return [o for o in out if o is not None]


class _Buffers:
    """Reusable window buffers (examples, labels, mask), grown on demand."""

    def __init__(self) -> None:
        self.x: Arr = np.empty((0, 0, 0), dtype=np.float32)
        self.y: Arr = np.empty((0, 0), dtype=np.int64)
        self.v: Arr = np.empty((0, 0), dtype=bool)

    def get(self, rows: int, bs: int, dim: int, dtype: np.dtype[Any]) -> tuple[Arr, Arr, Arr]:
        x = self.x
        if x.dtype != dtype or x.shape[1:] != (bs, dim) or len(x) < rows:
            self.x = x = np.empty((rows, bs, dim), dtype=dtype)
        if self.y.shape[1:] != (bs,) or len(self.y) < rows:
            self.y = np.empty((rows, bs), dtype=np.int64)
            self.v = np.empty((rows, bs), dtype=bool)
        return x[:rows], self.y[:rows], self.v[:rows]


def _run_group(
    model: StackedModel,
    start: Params,
    data: Sequence[tuple[Arr, Arr]],
    orders: Sequence[Sequence[Arr]],
    members: Sequence[int],
    steps_all: npt.NDArray[np.int64],
    batch_size: int,
    lr: float,
    dtype: np.dtype[Any],
    correct: StackedCorrect | None,
    buffers: _Buffers,
) -> list[Outcome]:
    """Train one group of clients (sorted by steps, descending) in lockstep."""
    g = len(members)
    bs = batch_size
    steps = steps_all[members]
    xs = [np.asarray(data[i][0], dtype=dtype) for i in members]
    ys = [np.asarray(data[i][1], dtype=np.int64) for i in members]
    dim = xs[0].shape[1]

    # Step t trains the active[t] clients that have a step t (a prefix of the group, as steps
    # are sorted descending); first[t] counts the (client, step) batches before step t.
    horizon = int(steps[0])
    active = np.searchsorted(-steps, -np.arange(horizon), side="left")
    first = np.zeros(horizon + 1, dtype=np.intp)
    np.cumsum(active, out=first[1:])

    # Each client's batches as local example indices (steps, B); -1 pads a short last batch
    # (it reads example 0, which the mask then ignores).
    blocks = []
    for r, i in enumerate(members):
        n = len(ys[r])
        per = -(-n // bs) * bs
        if per == n:
            blocks.append(np.stack(orders[i]).reshape(-1, bs))
        else:
            block = np.full((len(orders[i]), per), -1, dtype=np.intp)
            block[:, :n] = orders[i]
            blocks.append(block.reshape(-1, bs))

    w = {k: np.repeat(v[None], g, axis=0) for k, v in start.items()}
    loss_sum = np.zeros(g, dtype=np.float64)
    step = dtype.type(lr)
    window = max(1, WINDOW_BYTES // (bs * dim * dtype.itemsize))
    t0 = 0
    while t0 < horizon:
        # A window of steps [t0, t1) holding at most `window` batches: client r's batches
        # of the window are contiguous from row at[r], filled with one take per client
        # (which reads only that client's data and writes contiguously).
        lo = int(first[t0])
        t1 = int(np.searchsorted(first, lo + window, side="right")) - 1
        t1 = min(max(t1, t0 + 1), horizon)
        xw, yw, vw = buffers.get(int(first[t1]) - lo, bs, dim, dtype)
        live = int(active[t0])
        counts = np.minimum(steps[:live], t1) - t0
        at = np.zeros(live, dtype=np.intp)
        np.cumsum(counts[:-1], out=at[1:])
        for r in range(live):
            a, b = int(at[r]), int(at[r] + counts[r])
            idx = blocks[r][t0 : t0 + b - a]
            np.take(xs[r], idx, axis=0, out=xw[a:b], mode="clip")
            np.take(ys[r], idx, out=yw[a:b], mode="clip")
            np.greater_equal(idx, 0, out=vw[a:b])
        for t in range(t0, t1):
            m = int(active[t])
            rows = at[:m] + (t - t0)
            xb = np.take(xw, rows, axis=0, mode="clip")
            yb = np.take(yw, rows, axis=0, mode="clip")
            vb = np.take(vw, rows, axis=0, mode="clip")
            view = {k: v[:m] for k, v in w.items()}
            losses, grad = model.loss_and_grad_stacked(view, xb, yb, vb)
            if correct is not None:
                grad = correct(view, grad, m)
            for k, v in view.items():
                gk = grad[k]
                if gk.flags.writeable and gk.dtype == v.dtype:
                    gk *= step
                    v -= gk
                else:
                    v -= step * gk
            loss_sum[:m] += losses
        t0 = t1

    # Deltas: one contiguous row per client, in start's key order, all in one 1-D buffer
    # (so that ParamSpec.as_flat recognises a client's arrays as one flat row).
    sizes_p = [v.size for v in start.values()]
    flat = np.empty(g * sum(sizes_p), dtype=dtype).reshape(g, sum(sizes_p))
    col = 0
    for (k, v), s in zip(start.items(), sizes_p, strict=True):
        np.subtract(w[k].reshape(g, s), v.reshape(1, s), out=flat[:, col : col + s])
        col += s
    out = []
    for r in range(g):
        delta: Params = {}
        col = 0
        for (k, v), s in zip(start.items(), sizes_p, strict=True):
            delta[k] = flat[r, col : col + s].reshape(v.shape)
            col += s
        out.append(Outcome(delta, int(steps[r]), float(loss_sum[r] / steps[r])))
    return out
