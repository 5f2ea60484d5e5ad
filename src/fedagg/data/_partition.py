"""Partitioners: split one dataset's examples among clients, and assemble a federation.

Every partitioner takes an explicit ``seed`` (an int, or a ``np.random.Generator`` that it
draws from) and returns one int64 index array per client. The arrays are disjoint, cover
every example, and are sorted (a client's examples keep the dataset's order; trainers shuffle
anyway, and sorted gathers are cache-friendly). All of them work the same way: draw an owner
for every example, then group the indices by owner.

* :func:`iid`: a random permutation cut into near-equal parts (sizes differ by at most 1).
* :func:`dirichlet`: label skew (Hsu, Qi & Brown 2019; Yurochkin et al. 2019). For each class,
  the class's examples are shuffled and cut among clients in proportions ``p ~ Dir(α·1)``.
  The draw is repeated (at most ``max_tries`` times) until every client holds at least
  ``min_size`` examples; only the counts are checked per try, indices are cut once.
* :func:`shards`: pathological label skew (McMahan et al. 2017). Sort by label (random order
  within a label), cut into ``num_clients * shards_per_client`` contiguous shards of near-equal
  size, deal ``shards_per_client`` random shards to each client. A shard spans at most two
  labels when it is no larger than the smallest class, so a client then sees at most
  ``2 * shards_per_client`` labels.
* :func:`quantity_skew`: sizes proportional to ``lognormal(0, σ)`` weights with at least one
  example each (the remaining ``n - num_clients`` are apportioned by largest remainder); the
  labels are i.i.d.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.data._types import (
    ArrayDataset,
    FederatedData,
    Seed,
    as_generator,
    check_float,
    check_int,
    index_array,
    label_array,
)
from fedagg.errors import ConfigError

__all__ = [
    "dirichlet",
    "federate",
    "format_histogram",
    "iid",
    "label_dirichlet",
    "quantity_skew",
    "shards",
    "split",
]

Parts = list[npt.NDArray[np.int64]]


def _group(owner: npt.NDArray[np.int64], num_clients: int) -> Parts:
    """Indices grouped by owner: part ``i`` holds, in increasing order, where ``owner == i``."""
    order = np.argsort(owner, kind="stable").astype(np.int64)
    counts = np.bincount(owner, minlength=num_clients)
    return [np.ascontiguousarray(p) for p in np.split(order, np.cumsum(counts)[:-1])]


def _check_counts(n: object, num_clients: object) -> tuple[int, int]:
    n = check_int("n", n, low=1)
    num_clients = check_int("num_clients", num_clients, low=1)
    if n < num_clients:
        raise ConfigError(f"cannot give each of {num_clients} clients an example out of {n}")
    return n, num_clients


def iid(n: int, num_clients: int, seed: Seed) -> Parts:
    """``n`` examples shuffled and cut into ``num_clients`` parts whose sizes differ by <= 1."""
    n, num_clients = _check_counts(n, num_clients)
    rng = as_generator(seed)
    sizes = np.full(num_clients, n // num_clients, dtype=np.int64)
    sizes[: n % num_clients] += 1
    owner = np.empty(n, dtype=np.int64)
    owner[rng.permutation(n)] = np.repeat(np.arange(num_clients, dtype=np.int64), sizes)
    return _group(owner, num_clients)


def dirichlet(
    labels: npt.ArrayLike,
    num_clients: int,
    alpha: float,
    seed: Seed,
    min_size: int = 1,
    *,
    max_tries: int = 1000,
) -> Parts:
    """Label skew: each class is split among clients in proportions drawn from ``Dir(α)``.

    Small ``alpha`` (e.g. 0.1) gives each client few labels; large ``alpha`` approaches IID.
    Redraws until every client has at least ``min_size`` examples (``min_size=0`` allows
    empty clients); raises ConfigError after ``max_tries`` failed draws.
    """
    y = label_array(labels)
    n = check_int("number of labels", y.shape[0], low=1)
    num_clients = check_int("num_clients", num_clients, low=1)
    alpha = check_float("alpha", alpha, low=0.0, strict_low=True)
    min_size = check_int("min_size", min_size, low=0)
    max_tries = check_int("max_tries", max_tries, low=1)
    if n < num_clients * min_size:
        raise ConfigError(
            f"cannot give each of {num_clients} clients {min_size} examples out of {n}"
        )
    rng = as_generator(seed)
    classes, per_class = np.unique(y, return_counts=True)
    members = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    concentration = np.full(num_clients, alpha)
    for _ in range(max_tries):
        p = rng.dirichlet(concentration, size=classes.shape[0])  # (classes, clients)
        cuts = np.floor(np.cumsum(p, axis=1) * per_class[:, None]).astype(np.int64)
        cuts = np.minimum(cuts, per_class[:, None])
        cuts[:, -1] = per_class
        counts = np.diff(cuts, axis=1, prepend=0)
        if int(counts.sum(axis=0).min()) >= min_size:
            break
    else:
        raise ConfigError(
            f"dirichlet: none of {max_tries} draws gave each of {num_clients} clients at least "
            f"{min_size} examples (n={n}, alpha={alpha:g}); raise alpha, lower min_size or "
            "use fewer clients"
        )
    owner = np.empty(n, dtype=np.int64)
    client_ids = np.arange(num_clients, dtype=np.int64)
    for idx, row in zip(members, counts, strict=True):
        owner[idx] = np.repeat(client_ids, row)
    return _group(owner, num_clients)


def label_dirichlet(labels: npt.ArrayLike, num_clients: int, alpha: float, seed: Seed) -> Parts:
    """Per-client label skew with equal sizes: each client draws its label mix ``q ~ Dir(α)``
    and gets ``n // num_clients`` examples (one more for the first ``n % num_clients``) drawn
    from the classes in those proportions, without replacement.

    Unlike :func:`dirichlet` (which splits each class among the clients and can leave
    clients empty), every client has data, so it suits many clients on a small set (FedAU's
    250 clients on MNIST-5k). When a class runs out, the client's remaining draws go to the
    classes left, in its own proportions.
    """
    y = label_array(labels)
    n = check_int("number of labels", y.shape[0], low=1)
    num_clients = check_int("num_clients", num_clients, low=1)
    alpha = check_float("alpha", alpha, low=0.0, strict_low=True)
    if n < num_clients:
        raise ConfigError(f"cannot give each of {num_clients} clients an example out of {n}")
    rng = as_generator(seed)
    classes = np.unique(y)
    pools = [rng.permutation(np.flatnonzero(y == c)) for c in classes]
    left = np.array([len(p) for p in pools], dtype=np.int64)
    used = np.zeros(len(classes), dtype=np.int64)
    owner = np.empty(n, dtype=np.int64)
    sizes = np.full(num_clients, n // num_clients, dtype=np.int64)
    sizes[: n % num_clients] += 1
    for client, size in enumerate(sizes.tolist()):
        q = rng.dirichlet(np.full(len(classes), alpha))
        want = size
        while want > 0:
            avail = left > 0
            w = np.where(avail, q, 0.0)
            w = w / w.sum() if w.sum() > 0 else avail / avail.sum()
            take = np.minimum(rng.multinomial(want, w), left)
            for c in np.flatnonzero(take).tolist():
                k = int(take[c])
                owner[pools[c][used[c] : used[c] + k]] = client
                used[c] += k
            left -= take
            want -= int(take.sum())
    return _group(owner, num_clients)


def shards(labels: npt.ArrayLike, num_clients: int, shards_per_client: int, seed: Seed) -> Parts:
    """Pathological label skew: each client gets ``shards_per_client`` label-sorted shards."""
    y = label_array(labels)
    num_clients = check_int("num_clients", num_clients, low=1)
    shards_per_client = check_int("shards_per_client", shards_per_client, low=1)
    n = y.shape[0]
    num_shards = num_clients * shards_per_client
    if n < num_shards:
        raise ConfigError(
            f"{n} examples cannot fill {num_clients} x {shards_per_client} = {num_shards} shards"
        )
    rng = as_generator(seed)
    shuffled = rng.permutation(n)
    by_label = shuffled[np.argsort(y[shuffled], kind="stable")]
    shard_sizes = np.full(num_shards, n // num_shards, dtype=np.int64)
    shard_sizes[: n % num_shards] += 1
    shard_of_rank = np.repeat(np.arange(num_shards, dtype=np.int64), shard_sizes)
    client_of_shard = np.empty(num_shards, dtype=np.int64)
    client_of_shard[rng.permutation(num_shards)] = np.arange(num_shards) // shards_per_client
    owner = np.empty(n, dtype=np.int64)
    owner[by_label] = client_of_shard[shard_of_rank]
    return _group(owner, num_clients)


def quantity_skew(n: int, num_clients: int, sigma: float, seed: Seed) -> Parts:
    """Size skew: client sizes proportional to ``lognormal(0, sigma)`` draws, each >= 1.

    ``sigma=0`` gives equal sizes (up to 1); larger ``sigma`` gives heavier-tailed sizes.
    """
    n, num_clients = _check_counts(n, num_clients)
    sigma = check_float("sigma", sigma, low=0.0)
    rng = as_generator(seed)
    weights = rng.lognormal(0.0, sigma, num_clients)
    spare = n - num_clients
    share = weights / weights.sum() * spare
    sizes = np.floor(share).astype(np.int64)
    remainder = spare - int(sizes.sum())
    if remainder > 0:
        sizes[np.argsort(sizes - share, kind="stable")[:remainder]] += 1
    sizes += 1
    owner = np.empty(n, dtype=np.int64)
    owner[rng.permutation(n)] = np.repeat(np.arange(num_clients, dtype=np.int64), sizes)
    return _group(owner, num_clients)


def split(
    dataset: ArrayDataset, test_fraction: float, seed: Seed, *, stratify: bool = True
) -> tuple[ArrayDataset, ArrayDataset]:
    """A random ``(train, test)`` split with about ``test_fraction`` of the examples in test.

    Stratified by default: each label contributes ``round(n_label * test_fraction)``
    examples, so the test set's label mix matches the data's. Both sets keep dataset order.
    """
    test_fraction = check_float("test_fraction", test_fraction, low=0.0, strict_low=True)
    if test_fraction >= 1.0:
        raise ConfigError(f"test_fraction must be < 1, got {test_fraction}")
    rng = as_generator(seed)
    n = len(dataset)
    in_test = np.zeros(n, dtype=bool)
    if stratify:
        groups = [np.flatnonzero(dataset.y == c) for c in np.unique(dataset.y)]
    else:
        groups = [np.arange(n)]
    for members in groups:
        k = math.floor(members.shape[0] * test_fraction + 0.5)
        in_test[rng.permutation(members)[:k]] = True
    n_test = int(in_test.sum())
    if n_test == 0 or n_test == n:
        raise ConfigError(
            f"test_fraction={test_fraction} leaves {n - n_test} train and {n_test} test "
            f"examples out of {n}; both must be non-empty"
        )
    return dataset.subset(np.flatnonzero(~in_test)), dataset.subset(np.flatnonzero(in_test))


def federate(
    dataset: ArrayDataset,
    parts: Sequence[npt.ArrayLike],
    *,
    test: ArrayDataset,
    name: str,
    meta: Mapping[str, Any],
) -> FederatedData:
    """A federation whose client ``i`` holds ``dataset``'s examples at ``parts[i]``.

    The parts must be disjoint, non-empty index arrays; they need not cover the dataset.
    """
    if len(parts) == 0:
        raise ConfigError("federate needs at least one part")
    idx = [index_array(p, len(dataset)) for p in parts]
    empty = [i for i, p in enumerate(idx) if p.shape[0] == 0]
    if empty:
        raise ConfigError(f"clients {empty[:10]} have no examples")
    flat = np.concatenate(idx)
    if np.unique(flat).shape[0] != flat.shape[0]:
        raise ConfigError("parts overlap: an example is given to more than one client")
    return FederatedData(
        name=name,
        clients=tuple(dataset.subset(p) for p in idx),
        test=test,
        num_features=dataset.num_features,
        num_classes=dataset.num_classes,
        meta=meta,
    )


def label_skew(hist: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Per client, the total-variation distance between its label mix and the global one."""
    counts = hist.astype(np.float64)
    sizes = counts.sum(axis=1, keepdims=True)
    local = np.divide(counts, sizes, out=np.zeros_like(counts), where=sizes > 0)
    total = counts.sum(axis=0)
    glob = total / max(total.sum(), 1.0)
    out: npt.NDArray[np.float64] = 0.5 * np.abs(local - glob).sum(axis=1)
    return out


def format_histogram(fd: FederatedData, max_rows: int = 10) -> str:
    """A text report of a federation: size and label-skew summary, then per-client counts.

    Shows the first ``max_rows`` clients. Calls ``fd.histogram()``, which for lazily
    generated clients generates all of them once.
    """
    max_rows = check_int("max_rows", max_rows, low=0)
    hist = fd.histogram()
    sizes = hist.sum(axis=1)
    labels_held = (hist > 0).sum(axis=1)
    lines = [
        f"{fd.name}: {fd.num_clients} clients, {fd.num_classes} classes, "
        f"{int(sizes.sum()):,} training and {len(fd.test):,} test examples",
        f"client sizes: min {int(sizes.min()):,}, median {float(np.median(sizes)):,.0f}, "
        f"max {int(sizes.max()):,}; labels per client: mean {labels_held.mean():.1f}; "
        f"mean TV distance to the global label mix: {label_skew(hist).mean():.3f}",
    ]
    shown = hist[:max_rows]
    if shown.shape[0]:
        width = max(5, len(f"{int(shown.max()):,}"), len(str(fd.num_classes - 1)))
        size_width = max(6, len(f"{int(sizes[:max_rows].max()):,}"))
        client_width = max(6, len(str(shown.shape[0] - 1)))
        head = [f"{'client':>{client_width}}", f"{'n':>{size_width}}"]
        head += [f"{c:>{width}}" for c in range(fd.num_classes)]
        lines.append(" ".join(head))
        for i, row in enumerate(shown):
            cells = [f"{i:>{client_width}}", f"{int(sizes[i]):>{size_width},}"]
            cells += [f"{int(v):>{width},}" for v in row]
            lines.append(" ".join(cells))
    if fd.num_clients > shown.shape[0]:
        lines.append(f"... ({fd.num_clients - shown.shape[0]:,} more clients)")
    return "\n".join(lines)
