"""``load``: one entry point from a config file's (dataset, partition, parameters) to data.

For a bundled dataset the examples are first split into train and global test
(``test_fraction``, stratified), then the training examples are partitioned. The split and
the partition use independent streams derived from ``seed``, so one seed gives the same test
set whatever the partition. ``synthetic`` has its own, natural partition (one client per
user). The result's ``meta`` holds ``dataset``, ``num_clients``, ``partition``, ``seed`` and
``params`` (every parameter, defaults included), so that::

    m = fd.meta
    load(m["dataset"], num_clients=m["num_clients"], partition=m["partition"],
         seed=m["seed"], **m["params"])

regenerates the same data.
"""

from __future__ import annotations

from typing import Any

from fedagg.data._bundled import digits, mnist1d, mnist5k
from fedagg.data._partition import (
    dirichlet,
    federate,
    iid,
    label_dirichlet,
    quantity_skew,
    shards,
    split,
)
from fedagg.data._synthetic import synthetic
from fedagg.data._types import ArrayDataset, FederatedData, check_int, check_seed, stream
from fedagg.errors import ConfigError

__all__ = ["DATASETS", "PARTITIONS", "load"]

#: Dataset names accepted by :func:`load`.
DATASETS = ("digits", "mnist1d", "mnist5k", "synthetic")
#: Partition names accepted by :func:`load` ("natural" only for synthetic).
PARTITIONS = ("dirichlet", "iid", "label_dirichlet", "natural", "quantity", "shards")

_REQUIRED = object()
# Parameters per partition of a bundled dataset, with defaults (_REQUIRED: no default).
_PARTITION_PARAMS: dict[str, dict[str, Any]] = {
    "iid": {},
    "dirichlet": {"alpha": _REQUIRED, "min_size": 1},
    "label_dirichlet": {"alpha": _REQUIRED},
    "shards": {"shards_per_client": 2},
    "quantity": {"sigma": _REQUIRED},
}
_DATASET_PARAMS: dict[str, dict[str, Any]] = {
    "mnist5k": {},
    "digits": {},
    "mnist1d": {"data_seed": 42},
}
_SYNTHETIC_PARAMS: dict[str, Any] = {
    "alpha": _REQUIRED,
    "beta": _REQUIRED,
    "dim": 60,
    "num_classes": 10,
    "iid": False,
    "test_users": None,
}
_SPLIT, _PARTITION = 16, 17  # stream tags


def _resolve(where: str, spec: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown} for {where}; valid: {sorted(spec)}")
    out = {k: given.get(k, default) for k, default in spec.items()}
    missing = sorted(k for k, v in out.items() if v is _REQUIRED)
    if missing:
        raise ConfigError(f"{where} needs parameter(s) {missing}")
    return out


def load(
    name: str,
    *,
    num_clients: int,
    partition: str | None = None,
    seed: int = 0,
    **kwargs: Any,
) -> FederatedData:
    """A federation of ``num_clients`` clients built from a named dataset and partition.

    ``name`` is one of :data:`DATASETS`; ``partition`` one of ``iid`` (default for bundled
    sets), ``dirichlet`` (``alpha``, ``min_size=1``), ``shards`` (``shards_per_client=2``),
    ``quantity`` (``sigma``), or ``natural`` (default, and the only one, for ``synthetic``:
    ``alpha``, ``beta``, ``dim=60``, ``num_classes=10``, ``iid=False``, ``test_users=None``;
    ``alpha`` and ``beta`` default to 0 when ``iid=True``). Bundled sets also take
    ``test_fraction=0.2``; ``mnist1d`` takes ``data_seed=42``. Unknown names or parameters
    raise ConfigError listing the valid ones.
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; valid: {list(DATASETS)}")
    num_clients = check_int("num_clients", num_clients, low=1)
    seed = check_seed(seed)
    if partition is None:
        partition = "natural" if name == "synthetic" else "iid"
    if partition not in PARTITIONS:
        raise ConfigError(f"unknown partition {partition!r}; valid: {list(PARTITIONS)}")
    if name == "synthetic":
        return _load_synthetic(num_clients, partition, seed, kwargs)
    if partition == "natural":
        raise ConfigError(
            f"partition 'natural' is only for 'synthetic'; for {name!r} use one of "
            f"{[p for p in PARTITIONS if p != 'natural']}"
        )
    spec = {"test_fraction": 0.2, **_DATASET_PARAMS[name], **_PARTITION_PARAMS[partition]}
    params = _resolve(f"dataset {name!r} with partition {partition!r}", spec, kwargs)

    dataset = _bundled(name, params)
    train, test = split(dataset, params["test_fraction"], stream(seed, _SPLIT))
    rng = stream(seed, _PARTITION)
    if partition == "iid":
        parts = iid(len(train), num_clients, rng)
    elif partition == "dirichlet":
        parts = dirichlet(train.y, num_clients, params["alpha"], rng, params["min_size"])
    elif partition == "label_dirichlet":
        parts = label_dirichlet(train.y, num_clients, params["alpha"], rng)
    elif partition == "shards":
        parts = shards(train.y, num_clients, params["shards_per_client"], rng)
    else:
        parts = quantity_skew(len(train), num_clients, params["sigma"], rng)
    meta = {
        "dataset": name,
        "num_clients": num_clients,
        "partition": partition,
        "seed": seed,
        "params": params,
    }
    label = f"{name}/{partition}" + "".join(
        f",{k}={v}" for k, v in params.items() if k not in ("test_fraction", "data_seed")
    )
    return federate(train, parts, test=test, name=label, meta=meta)


def _bundled(name: str, params: dict[str, Any]) -> ArrayDataset:
    if name == "mnist5k":
        return mnist5k()
    if name == "digits":
        return digits()
    return mnist1d(params["data_seed"])


def _load_synthetic(
    num_clients: int, partition: str, seed: int, kwargs: dict[str, Any]
) -> FederatedData:
    if partition != "natural":
        raise ConfigError(
            f"dataset 'synthetic' supports only partition 'natural' (one client per user; "
            f"pass iid=True for Synthetic-IID), got {partition!r}"
        )
    spec = dict(_SYNTHETIC_PARAMS)
    if kwargs.get("iid") is True:
        spec["alpha"] = spec["beta"] = 0.0
    params = _resolve("dataset 'synthetic'", spec, kwargs)
    return synthetic(
        params["alpha"],
        params["beta"],
        num_clients=num_clients,
        dim=params["dim"],
        num_classes=params["num_classes"],
        seed=seed,
        iid=params["iid"],
        test_users=params["test_users"],
    )
