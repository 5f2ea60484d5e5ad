"""End-to-end demo: federated softmax regression on scikit-learn's bundled digits.

Simulated clients hold a non-IID (Dirichlet label-skewed) share of the training split. Each
round samples some clients; each runs local SGD from the current global model and sends
``Update(delta = local - global, weight = num_examples)``, which the server folds as it
"arrives". The same run is done with FedAvg and with FedAdam; every round is evaluated on a
held-out test split. Optionally one client sends a delta holding NaN, which is refused while
the round carries on with the others.

Everything is deterministic by ``seed``: client sampling and each client's batch order depend
only on ``(seed, round, client)``, so both strategies see exactly the same clients and
batches. Importing this module has no side effects; :mod:`fedagg.cli` does the printing.

Usage::

    records = run_demo(seed=0, rounds=10, inject_bad=True, on_record=print)
    final = {r.strategy: r.test_accuracy for r in records}   # last round wins
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

import fedagg

__all__ = [
    "ClientData",
    "FederatedDigits",
    "Refusal",
    "RoundRecord",
    "check_settings",
    "demo_strategies",
    "dirichlet_partition",
    "evaluate",
    "format_header",
    "format_record",
    "format_summary",
    "init_model",
    "load_federated_digits",
    "local_sgd",
    "run_demo",
    "run_strategy",
]

Arr = npt.NDArray[Any]
Model = dict[str, Arr]

NUM_FEATURES = 64
NUM_CLASSES = 10
TEST_FRACTION = 0.25
ALPHA = 0.5  # Dirichlet concentration of the label skew (smaller = more skewed)
LOCAL_EPOCHS = 5
BATCH_SIZE = 32
CLIENT_LR = 0.5
FEDADAM_LR = 0.2
FEDADAM_TAU = 1e-3
MAX_CLIENTS = 200  # the training split has 1348 examples
BAD_CLIENT_ROUND = 2  # round (1-based, first strategy) in which one client sends NaN

# Tags mixed into the seed so that each random stream is independent of the others.
_DATA, _SAMPLE, _CLIENT = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientData:
    """One simulated client's local training examples."""

    client_id: str
    x: Arr
    y: Arr


@dataclass(frozen=True, slots=True)
class FederatedDigits:
    """The digits data split across clients, plus the server's held-out test split."""

    clients: tuple[ClientData, ...]
    x_test: Arr
    y_test: Arr


def dirichlet_partition(
    labels: Arr,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[Arr]:
    """Split example indices across clients with per-class Dirichlet(``alpha``) proportions.

    Draws again (up to ``max_tries`` times) until every client has at least ``min_size``
    examples, the usual recipe of non-IID FL benchmarks. Returns one sorted index array per
    client; raises :class:`~fedagg.ConfigError` if no draw fits.
    """
    if num_clients * min_size > len(labels):
        raise fedagg.ConfigError(
            f"cannot give {num_clients} clients {min_size} examples each from {len(labels)}"
        )
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_tries):
        parts: list[list[Arr]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            shuffled = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(shuffled)).astype(np.int64)
            for part, chunk in zip(parts, np.split(shuffled, cuts), strict=True):
                part.append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(o) for o in out) >= min_size:
            return out
    raise fedagg.ConfigError(
        f"could not split {len(labels)} examples across {num_clients} clients "
        f"with at least {min_size} each; use fewer clients"
    )


def load_federated_digits(seed: int, num_clients: int, alpha: float = ALPHA) -> FederatedDigits:
    """scikit-learn's digits (1797 8x8 images, bundled, no download), features scaled to
    [0, 1], a seeded 75/25 train/test split, and the train split partitioned across
    ``num_clients`` clients with Dirichlet(``alpha``) label skew."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - sklearn is in the dev and data extras
        raise ImportError("the demo needs scikit-learn: pip install 'fedagg[data]'") from e
    digits = load_digits()
    x = (np.asarray(digits.data, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    rng = np.random.default_rng((seed, _DATA))
    order = rng.permutation(len(y))
    n_test = round(TEST_FRACTION * len(y))
    test, train = order[:n_test], order[n_test:]
    x_train, y_train = x[train], y[train]
    if num_clients > len(train):
        raise fedagg.ConfigError(f"{num_clients} clients but only {len(train)} training examples")
    # Ask for a batch's worth of examples per client; relax that for many tiny clients.
    min_size = max(1, min(BATCH_SIZE // 2, len(train) // (2 * num_clients)))
    while True:
        try:
            parts = dirichlet_partition(
                y_train, num_clients, alpha, rng, min_size=min_size, max_tries=200
            )
            break
        except fedagg.ConfigError:
            if min_size == 1:
                raise
            min_size //= 2
    clients = tuple(
        ClientData(f"client-{i:02d}", x_train[idx], y_train[idx]) for i, idx in enumerate(parts)
    )
    return FederatedDigits(clients, x[test], y[test])


# --------------------------------------------------------------------------------------------
# Model: multinomial logistic regression, pure numpy, exact gradients
# --------------------------------------------------------------------------------------------


def init_model() -> Model:
    """The initial global model: all zeros (the loss is convex, so zeros are a fine start)."""
    return {
        "W": np.zeros((NUM_FEATURES, NUM_CLASSES), np.float32),
        "b": np.zeros(NUM_CLASSES, np.float32),
    }


def _gradients(w: Arr, b: Arr, x: Arr, y: Arr) -> tuple[Arr, Arr]:
    """Exact gradients of the mean cross-entropy of ``softmax(x @ w + b)`` w.r.t. w and b."""
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= np.float32(len(y))
    return x.T @ p, p.sum(axis=0)


def local_sgd(
    model: Mapping[str, Arr],
    x: Arr,
    y: Arr,
    *,
    rng: np.random.Generator,
    epochs: int = LOCAL_EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = CLIENT_LR,
) -> Model:
    """Minibatch SGD on one client's data, starting from (a copy of) ``model``."""
    w = np.array(model["W"], dtype=np.float32)
    b = np.array(model["b"], dtype=np.float32)
    step = np.float32(lr)
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for lo in range(0, len(y), batch_size):
            idx = order[lo : lo + batch_size]
            gw, gb = _gradients(w, b, x[idx], y[idx])
            w -= step * gw
            b -= step * gb
    return {"W": w, "b": b}


def evaluate(model: Mapping[str, Arr], x: Arr, y: Arr) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``(x, y)`` (computed in float64)."""
    logits = x.astype(np.float64) @ model["W"].astype(np.float64) + model["b"]
    top = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    loss = float(np.mean(lse - logits[np.arange(len(y)), y]))
    accuracy = float(np.mean(logits.argmax(axis=1) == y))
    return loss, accuracy


# --------------------------------------------------------------------------------------------
# The federated loop
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """An update the aggregator refused: who sent it and why."""

    client_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """The outcome of one round. ``params_sha256`` fingerprints the global model bit for bit
    after the round; ``agg_ms`` (fold + finalize + optimizer step time) is excluded from
    equality so that records of two runs compare equal exactly when the runs agree."""

    strategy: str
    round: int
    test_loss: float
    test_accuracy: float
    clients: int
    refused: tuple[Refusal, ...]
    params_sha256: str
    agg_ms: float = field(compare=False)


def demo_strategies() -> tuple[fedagg.Strategy, ...]:
    """The strategies the demo compares: FedAvg, then FedAdam (Reddi et al.'s formulation)."""
    return (
        fedagg.strategies.fedavg(),
        fedagg.strategies.fedadam(lr=FEDADAM_LR, tau=FEDADAM_TAU, flavor="paper"),
    )


def _sample_clients(seed: int, rnd: int, num_clients: int, per_round: int) -> list[int]:
    rng = np.random.default_rng((seed, _SAMPLE, rnd))
    return [int(i) for i in rng.choice(num_clients, size=per_round, replace=False)]


def _digest(flat: Arr) -> str:
    return hashlib.sha256(np.ascontiguousarray(flat).tobytes()).hexdigest()


def run_strategy(
    strategy: fedagg.Strategy,
    data: FederatedDigits,
    *,
    seed: int,
    rounds: int,
    per_round: int,
    bad_client_round: int | None = None,
    on_record: Callable[[RoundRecord], None] | None = None,
) -> tuple[fedagg.ServerState, list[RoundRecord]]:
    """Run ``rounds`` rounds of ``strategy`` from :func:`init_model`; return the final server
    state and one record per round.

    In round ``bad_client_round`` (if given) the second client to arrive sends a delta
    holding NaN; the aggregator refuses it and the round goes on with the others.
    """
    server = strategy.init(init_model())
    records: list[RoundRecord] = []
    for rnd in range(1, rounds + 1):
        agg_state = strategy.begin(server)
        global_model = server.model
        assert isinstance(global_model, Mapping)
        refused: list[Refusal] = []
        agg_seconds = 0.0
        picked = _sample_clients(seed, rnd, len(data.clients), per_round)
        for arrival, k in enumerate(picked):
            client = data.clients[k]
            rng = np.random.default_rng((seed, _CLIENT, rnd, k))
            local = local_sgd(global_model, client.x, client.y, rng=rng)
            delta = {name: local[name] - global_model[name] for name in local}
            if rnd == bad_client_round and arrival == 1:
                delta["W"][3, 7] = np.nan  # e.g. a client whose local training diverged
            update = fedagg.Update(
                delta=delta,
                weight=float(len(client.y)),
                client_id=client.client_id,
                base_version=server.version,
            )
            t0 = time.perf_counter()
            try:
                agg_state = strategy.aggregator.fold(agg_state, update)
            except fedagg.UpdateError as e:  # the state is exactly as before the fold
                refused.append(Refusal(e.client_id, e.reason))
            agg_seconds += time.perf_counter() - t0
        folded = strategy.aggregator.count(agg_state)
        t0 = time.perf_counter()
        server = strategy.apply(server, agg_state)
        agg_seconds += time.perf_counter() - t0
        model = server.model
        assert isinstance(model, Mapping)
        loss, accuracy = evaluate(model, data.x_test, data.y_test)
        record = RoundRecord(
            strategy=strategy.name,
            round=rnd,
            test_loss=loss,
            test_accuracy=accuracy,
            clients=folded,
            refused=tuple(refused),
            params_sha256=_digest(server.params),
            agg_ms=agg_seconds * 1e3,
        )
        records.append(record)
        if on_record is not None:
            on_record(record)
    return server, records


def _warm_up() -> None:
    """Run the fold kernels once on a tiny model so that a first-time JIT compile (or cache
    load) is not counted in the first round's aggregation time."""
    tiny = [np.zeros(4, np.float32)]
    agg = fedagg.aggregators.mean()
    state = agg.fold(agg.init(fedagg.ParamSpec.from_arrays(tiny)), fedagg.Update(delta=tiny))
    with contextlib.suppress(fedagg.NonFiniteUpdate):
        agg.fold(state, fedagg.Update(delta=[np.full(4, np.nan, np.float32)]))


def check_settings(seed: int, rounds: int, clients: int, per_round: int) -> None:
    """Raise :class:`~fedagg.ConfigError` unless :func:`run_demo` can run these settings."""
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise fedagg.ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if rounds < 1:
        raise fedagg.ConfigError(f"rounds must be >= 1, got {rounds}")
    if not 1 <= clients <= MAX_CLIENTS:
        raise fedagg.ConfigError(f"clients must be in [1, {MAX_CLIENTS}], got {clients}")
    if not 1 <= per_round <= clients:
        raise fedagg.ConfigError(f"per_round must be in [1, clients={clients}], got {per_round}")


def run_demo(
    seed: int = 0,
    rounds: int = 10,
    clients: int = 20,
    per_round: int = 10,
    *,
    inject_bad: bool = False,
    on_record: Callable[[RoundRecord], None] | None = None,
) -> list[RoundRecord]:
    """Run every strategy of :func:`demo_strategies` for ``rounds`` rounds on the same data
    and the same client schedule; return all round records, strategy by strategy.

    ``on_record`` is called with each record as soon as its round is done. With
    ``inject_bad``, one client of the first strategy's round ``min(2, rounds)`` sends NaN.
    """
    check_settings(seed, rounds, clients, per_round)
    data = load_federated_digits(seed, clients)
    _warm_up()
    records: list[RoundRecord] = []
    for i, strategy in enumerate(demo_strategies()):
        bad = min(BAD_CLIENT_ROUND, rounds) if inject_bad and i == 0 else None
        _, recs = run_strategy(
            strategy,
            data,
            seed=seed,
            rounds=rounds,
            per_round=per_round,
            bad_client_round=bad,
            on_record=on_record,
        )
        records.extend(recs)
    return records


# --------------------------------------------------------------------------------------------
# Text output (used by the CLI)
# --------------------------------------------------------------------------------------------

_ROW = "{:<9} {:>5} {:>10} {:>9} {:>8} {:>8}"


def format_header() -> str:
    """The column titles of the per-round table."""
    return _ROW.format("strategy", "round", "test loss", "test acc", "clients", "agg ms")


def format_record(record: RoundRecord) -> list[str]:
    """One table row for ``record``, followed by a line per refused update."""
    row = _ROW.format(
        record.strategy,
        record.round,
        f"{record.test_loss:.4f}",
        f"{100 * record.test_accuracy:.1f}%",
        record.clients,
        f"{record.agg_ms:.2f}",
    )
    refusals = [f"  refused update from client {r.client_id}: {r.reason}" for r in record.refused]
    return [row, *refusals]


def format_summary(records: Sequence[RoundRecord]) -> str:
    """One line: each strategy's final test accuracy and loss, and how many updates were
    refused."""
    last: dict[str, RoundRecord] = {}
    for r in records:
        last[r.strategy] = r
    parts = [
        f"{r.strategy} {100 * r.test_accuracy:.1f}% (loss {r.test_loss:.3f}) after {r.round} rounds"
        for r in last.values()
    ]
    refused = sum(len(r.refused) for r in records)
    return f"final test accuracy: {', '.join(parts)}; {refused} update(s) refused"
