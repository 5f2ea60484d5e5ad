"""Bounds on a client's claimed weight and update norm in the deployed server (issue 14,
finding 6), and the round stats of updates refused at a canonical-order round's fold.

The federation is built from a config (``build_federation``, the server's own path) and
driven in-process with hand-written spool files: honest clients send small random deltas
with similar sample counts, the attacker a huge weight and/or huge values. Under the default
``[deploy]`` table, the round's aggregate must stay near the honest clients' mean, whatever
the fold order and wherever the attacker's upload falls in the round.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedagg.config import DEFAULTS
from fedagg.core.aggregate import compose, mean
from fedagg.core.spec import ParamSpec
from fedagg.core.update import Update
from fedagg.deploy._app import build_federation
from fedagg.deploy._canonical import Canonical
from fedagg.deploy._fed import Federation
from fedagg.deploy._store import UploadRow
from fedagg.errors import InvalidWeight

CLIENTS = 5
ATTACKER = 2
Deltas = dict[int, tuple[np.ndarray, float, int]]  # job -> (delta, weight, client)
#: how an attacker's job is answered: (delta, weight) from the honest delta's shape
Attack = Callable[[int], tuple[np.ndarray, float]]


def _config(d: Path, order: str, rounds: int = 3, **deploy: Any) -> dict[str, Any]:
    return {
        "seed": 0,
        "rounds": rounds,
        "data": {"name": "digits", "num_clients": CLIENTS, "partition": "iid"},
        "policy": {"clients_per_round": CLIENTS},
        "deploy": {"order": order, "state": str(d), **deploy},
    }


def _fed(d: Path, order: str, rounds: int = 3, **kw: Any) -> Federation:
    ckpt = {k: kw.pop(k) for k in ("checkpoint_updates",) if k in kw}
    return build_federation(_config(d, order, rounds, **kw, **ckpt), d)


def _honest(job: int, size: int) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(1000 + job)
    return (rng.standard_normal(size) * 0.01).astype(np.float32), float(280 + job % 7)


def _spool(fed: Federation, job: int, client: int, version: int, d: np.ndarray,
           w: float) -> UploadRow:  # fmt: skip
    path = fed.spool / f"{job:012d}-c{client}.upd"
    d.tofile(path)
    return UploadRow(client, job, str(path), w, version, {"train_loss": 1.0 + client}, d.nbytes,
                     hashlib.sha256(d.tobytes()).digest())  # fmt: skip


def _drive(
    fed: Federation, attack: Attack | None, *, last: bool | None = False,
    stop_after: int | None = None,
    sent: Deltas | None = None, who: int = ATTACKER,
) -> tuple[list[np.ndarray], int]:  # fmt: skip
    """Run to the end (or ``stop_after`` arrivals), answering each round's tasks in job
    order, the attacker's (client ATTACKER) first or ``last``. Returns the model after each
    applied round (its version's params) and the number of arrivals sent."""
    fed.open()
    if not fed.started:
        fed.step([r for r in fed.log([("start", 0.0, None, None, None, None)]) if r])
    models = [fed.server.params.copy()]
    n = fed.spec.size
    events, t = 0, fed.now + 1.0  # a restart carries on the clock of the log
    while not fed.finished:
        tasks = sorted(fed.tasks.values(), key=lambda x: x.job)
        if last is not None:  # else: in job order
            tasks.sort(key=lambda x: (x.client == who) == last)  # False sorts first
        task = tasks[0]
        if attack is not None and task.client == who:
            d, w = attack(n)
        else:
            d, w = _honest(task.job, n)
        if sent is not None:
            sent[task.job] = (d, w, task.client)
        up = _spool(fed, task.job, task.client, task.version, d, w)
        v = fed.server.version
        fed.step([r for r in fed.log([("arrival", t, task.client, task.job, None, up)]) if r])
        if fed.server.version != v:
            models.append(fed.server.params.copy())
        t += 1.0
        events += 1
        if stop_after is not None and events >= stop_after:
            break
    return models, events


def _honest_means(fed: Federation, sent: Deltas) -> list[np.ndarray]:
    """Each round's weighted mean of the honest clients' deltas (float64)."""
    out = []
    for r in fed.store.rounds():
        jobs = [j for j in sorted(sent) if j // CLIENTS == r["round"]]  # CLIENTS jobs a round
        ws = [sent[j][1] for j in jobs if sent[j][2] != ATTACKER]
        ds = [sent[j][0].astype(np.float64) for j in jobs if sent[j][2] != ATTACKER]
        out.append(sum(w * d for w, d in zip(ws, ds, strict=True)) / math.fsum(ws))
    return out


def _huge_weight(n: int) -> tuple[np.ndarray, float]:
    """A big-but-storable update with a huge claimed weight: it would set the mean alone."""
    return np.full(n, 100.0, np.float32), 1e12


def _huge_values(n: int) -> tuple[np.ndarray, float]:
    return np.full(n, 1e30, np.float32), 1e12


def _distances(fed: Federation, models: list[np.ndarray], sent: Deltas) -> list[float]:
    """How far each round's applied step is from the honest mean, over the honest norm."""
    means = _honest_means(fed, sent)
    honest = max(float(np.linalg.norm(d)) for d, _, c in sent.values() if c != ATTACKER)
    steps = [b.astype(np.float64) - a for a, b in itertools.pairwise(models)]
    return [float(np.linalg.norm(s - m)) / honest for s, m in zip(steps, means, strict=True)]


# -- the default config bounds a huge weight and huge values --------------------------------------
@pytest.mark.parametrize("order", ["arrival", "canonical"])
@pytest.mark.parametrize("last", [False, True], ids=["first", "last"])
@pytest.mark.parametrize("attack", [_huge_weight, _huge_values], ids=["weight", "values"])
def test_default_config_keeps_every_round_near_the_honest_mean(
    tmp_path: Path, order: str, last: bool, attack: Attack
) -> None:
    fed = _fed(tmp_path, order)
    sent: Deltas = {}
    models, _ = _drive(fed, attack, last=last, sent=sent)
    rounds = fed.store.rounds()
    assert len(rounds) == 3 and all(r["applied"] for r in rounds)
    assert all(np.isfinite(m).all() for m in models)
    # weight_cap x norm_cap bounds the attacker's pull: at most 10/(4+10) of 10 + 1 honest norms
    dist = _distances(fed, models, sent)
    assert max(dist) < 10.0, dist
    # in absolute terms: a small fraction of the attacker's update (honest norms are ~0.25)
    attacker = float(np.linalg.norm(attack(fed.spec.size)[0].astype(np.float64)))
    assert max(dist) * 0.3 < 1e-3 * attacker


def test_without_bounds_the_attacker_sets_the_model(tmp_path: Path) -> None:
    """The same run with the bounds off: the claimed weight wins (what finding 6 reported)."""
    fed = _fed(tmp_path, "arrival", weight_cap=0.0, norm_cap=0.0)
    sent: Deltas = {}
    models, _ = _drive(fed, _huge_weight, sent=sent)
    assert min(_distances(fed, models, sent)) > 100.0
    assert abs(float(models[1][0] - models[0][0]) - 100.0) < 1e-3  # the attacker's value


def test_reject_mode_refuses_the_attacker_and_counts_it(tmp_path: Path) -> None:
    for order in ("arrival", "canonical"):
        fed = _fed(tmp_path / order, order, norm_mode="reject")
        sent: Deltas = {}
        models, _ = _drive(fed, _huge_weight, sent=sent)
        for r in fed.store.rounds():
            assert (r["folded"], r["refused"], r["applied"]) == (CLIENTS - 1, 1, True), r
            assert ATTACKER not in r["participants"]
        # the step is the honest clients' weighted mean (float32 rounding apart)
        assert max(_distances(fed, models, sent)) < 1e-4


def test_clip_mode_folds_the_attacker_bounded(tmp_path: Path) -> None:
    fed = _fed(tmp_path, "arrival")
    sent: Deltas = {}
    models, _ = _drive(fed, _huge_weight, sent=sent)
    for r in fed.store.rounds():
        assert (r["folded"], r["refused"]) == (CLIENTS, 0), r
    dist = _distances(fed, models, sent)
    assert min(dist) > 0.5 and max(dist) < 10.0, dist  # it counts, but bounded


def test_max_norm_is_an_absolute_bound_from_the_first_update(tmp_path: Path) -> None:
    fed = _fed(tmp_path, "arrival", max_norm=0.5, norm_mode="reject")
    _drive(fed, _huge_weight, last=False)
    for r in fed.store.rounds():
        assert (r["folded"], r["refused"]) == (CLIENTS - 1, 1), r


# -- warm-up: the first round is held, then updates fold as they arrive ---------------------------
def test_warm_up_holds_the_first_round_then_folds_on_arrival(tmp_path: Path) -> None:
    fed = _fed(tmp_path, "arrival", checkpoint_updates=1)
    _drive(fed, _huge_weight, stop_after=2)
    agg = fed.state.agg
    assert agg.held and len(agg.pending) == 2  # round 0: no reference yet, kept as views
    assert all(isinstance(u.delta, np.memmap) for u in agg.pending)
    fed.close()
    fed = _fed(tmp_path, "arrival", checkpoint_updates=1)
    _drive(fed, _huge_weight, stop_after=CLIENTS - 2 + 2)  # round 0 closes; 2 of round 1
    agg = fed.state.agg
    assert not agg.held and not agg.pending and agg.inner.count == 2  # folded on arrival
    ws = [w for _, w, _ in agg.window]
    assert len(ws) == CLIENTS  # round 0's bounded claims, one per client
    assert max(ws) <= 10.0 * sorted(ws)[(CLIENTS - 1) // 2]
    # mid-round checkpoints work again once the window is warm (checkpoint_updates=1)
    assert fed.store.checkpoints()[0][0] == fed.applied


def test_disabled_bounds_are_the_plain_aggregator(tmp_path: Path) -> None:
    fed = _fed(tmp_path / "a", "arrival", weight_cap=0.0, norm_cap=0.0)
    assert type(fed.policy.strategy.aggregator).__name__ == "Mean"  # type: ignore[attr-defined]
    fed = _fed(tmp_path / "c", "canonical", weight_cap=0.0, norm_cap=0.0)
    assert type(fed.policy.strategy.aggregator) is Canonical  # type: ignore[attr-defined]


def test_honest_results_are_unchanged_by_the_default_bounds(tmp_path: Path) -> None:
    for order in ("arrival", "canonical"):
        on = _fed(tmp_path / f"{order}-on", order)
        off = _fed(tmp_path / f"{order}-off", order, weight_cap=0.0, norm_cap=0.0)
        a, _ = _drive(on, None)
        b, _ = _drive(off, None)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), order


# -- determinism: a crash after any event replays to the same bits -------------------------------
@pytest.mark.parametrize("order", ["arrival", "canonical"])
@pytest.mark.parametrize("mid", [0, 1])
def test_a_crash_after_any_event_replays_to_the_same_bits(
    tmp_path: Path, order: str, mid: int
) -> None:
    ref = _fed(tmp_path / "ref", order, checkpoint_updates=mid)
    want, total = _drive(ref, _huge_weight)
    for k in range(1, total, 2):
        d = tmp_path / f"k{k}"
        first = _fed(d, order, checkpoint_updates=mid)
        _drive(first, _huge_weight, stop_after=k)
        first.close()  # the process dies here; nothing but the directory survives
        again = _fed(d, order, checkpoint_updates=mid)
        _drive(again, _huge_weight)
        assert np.array_equal(again.server.params, want[-1]), k
        assert again.store.rounds() == ref.store.rounds(), k


# -- the round stats: refused at a canonical round's fold is refused, not folded -----------------
def test_updates_refused_at_the_canonical_fold_count_as_refused(tmp_path: Path) -> None:
    fed = _fed(tmp_path, "canonical", norm_mode="reject")
    _drive(fed, _huge_weight, last=True)
    for r in fed.store.rounds():
        assert (r["folded"], r["refused"]) == (CLIENTS - 1, 1), r
        assert sorted(r["participants"]) == [c for c in range(CLIENTS) if c != ATTACKER]


def test_fedbuff_counts_updates_refused_at_the_canonical_fold_as_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "canonical", rounds=4, norm_mode="reject")
    cfg["policy"] = {"kind": "fedbuff", "buffer": CLIENTS, "concurrency": CLIENTS}
    fed = build_federation(cfg, tmp_path)
    _drive(fed, _huge_weight, who=0, last=None)  # client 0: one picked in every buffer
    rounds = fed.store.rounds()
    assert len(rounds) == 4
    assert sum(r["refused"] for r in rounds) >= 3, rounds
    for r in rounds:
        assert 0 not in r["participants"], r
        assert r["folded"] == len(r["participants"]) == CLIENTS - r["refused"], r


def test_a_rule_refusing_at_the_canonical_fold_is_counted_refused() -> None:
    """Plain canonical order (no bounds): a rule's own refusal at the round's fold."""
    from fedagg import strategies
    from fedagg.sim import Applied, Arrival, Start, SyncPolicy

    def refuse_x(spec: ParamSpec, u: Update) -> Update:
        if u.client_id == "1":
            raise InvalidWeight(u.client_id, "refused by the rule")
        return u

    agg = Canonical(compose(refuse_x, mean()), key=lambda u: u.client_id)
    strategy = strategies.fedavg(aggregator=agg)
    policy = SyncPolicy(strategy=strategy, rounds=1, clients_per_round=3)
    server = strategy.init([np.zeros(4, np.float32)])

    class Ctx:
        num_clients, seed = 3, 0

        def available(self, slot: int) -> np.ndarray:
            return np.arange(3)

    state = policy.init(server, Ctx())
    policy.step(state, Start(0.0), Ctx())
    actions = []
    for job in range(3):
        u = Update(np.full(4, 1.0 + job, np.float32), weight=1.0 + job, client_id=str(job),
                   base_version=0, metrics={"train_loss": float(job)})  # fmt: skip
        actions += policy.step(state, Arrival(1.0 + job, job, job, u), Ctx())
    stats = next(a.stats for a in actions if isinstance(a, Applied))
    assert (stats.folded, stats.refused, stats.applied) == (2, 1, True)
    assert stats.participants == (0, 2)
    assert stats.weight == 1.0 + 3.0 and stats.client_loss == (0.0 + 3.0 * 2.0) / 4.0
    assert state.server.params.tolist() == [2.5] * 4  # (1*1 + 3*3) / 4


# -- the aggregator itself: any position, any order, bounded --------------------------------------
def _bounded(hold: bool, **kw: Any) -> Any:
    from fedagg.deploy._bounds import Bounded, Bounds, _arrival_key

    return Bounded(mean(), (lambda u: u.client_id) if hold else _arrival_key,
                   bounds=Bounds(**kw), hold=hold)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    honest=st.lists(st.tuples(st.floats(1.0, 1e3), st.floats(1e-3, 10.0)), min_size=3, max_size=8),
    at=st.integers(0, 8),
    weight=st.floats(1.0, 1e15),
    value=st.floats(-1e30, 1e30),
    hold=st.booleans(),
    warm=st.booleans(),
)
def test_any_attacker_is_bounded(
    honest: list[tuple[float, float]], at: int, weight: float, value: float, hold: bool,
    warm: bool,
) -> None:  # fmt: skip
    n = 16
    spec = ParamSpec.from_arrays([np.zeros(n, np.float32)])
    agg = _bounded(hold, warmup=3)
    if warm:  # a window from earlier rounds like this round's honest claims
        st0 = agg.init(spec)
        for i, (w, s) in enumerate(honest):
            agg.fold(st0, Update(np.full(n, s / 4, np.float32), weight=w, client_id=f"h{i}"))
        agg.finalize_flat(st0)
    state = agg.init(spec)
    assert state.held == (hold or not warm)
    ups = [
        Update(np.full(n, s / 4, np.float32), weight=w, client_id=f"h{i}")  # norm s
        for i, (w, s) in enumerate(honest)
    ]
    ups.insert(min(at, len(ups)), Update(np.full(n, value, np.float32), weight=weight,
                                         client_id="x"))  # fmt: skip
    for u in ups:
        try:
            agg.fold(state, u)
        except Exception as e:  # the overflow guard may refuse it outright: that is bounded too
            assert u.client_id == "x", e
    out = agg.finalize_flat(state).astype(np.float64)
    ws = [w for w, _ in honest]
    hm = sum(w * np.full(n, s / 4) for w, s in honest) / math.fsum(ws)
    smax = max(s for _, s in honest)
    # the attacker's weight <= 10 x median weight, norm <= 10 x median norm
    assert np.linalg.norm(out - hm) <= (10.0 + 1.0) * smax * (1 + 1e-5)


def test_bounds_config_is_validated() -> None:
    from fedagg.deploy._bounds import Bounds
    from fedagg.errors import ConfigError

    for bad in ({"weight_cap": -1.0}, {"norm_cap": 0.5}, {"norm_mode": "drop"},
                {"window": 0}, {"warmup": 100}, {"max_norm": math.inf}):  # fmt: skip
        with pytest.raises(ConfigError):
            Bounds(**bad)  # type: ignore[arg-type]
    d = DEFAULTS["deploy"]
    assert (d["weight_cap"], d["norm_cap"], d["norm_mode"], d["max_norm"]) == (
        10.0, 10.0, "clip", 0.0,
    )  # fmt: skip


def test_the_window_counts_each_client_once_and_warms_with_a_small_federation() -> None:
    from fedagg.deploy._bounds import bounds_of, slide

    flood = [("x", 1e12, 1e3)] * 50 + [("a", 10.0, 1.0), ("b", 11.0, 1.2)]
    assert slide([("x", 1.0, 1.0), ("a", 9.0, 0.9)], flood, 64) == [
        ("x", 1e12, 1e3), ("a", 10.0, 1.0), ("b", 11.0, 1.2),
    ]  # fmt: skip
    assert slide([], [("c", 1.0, 1.0), ("d", 2.0, 2.0), ("e", 3.0, 3.0)], 2)[0][0] == "d"
    d = DEFAULTS["deploy"]
    assert bounds_of(d).warmup == d["bound_warmup"] == 5
    assert bounds_of(d, clients=3).warmup == 2  # half the clients have a claim: warm
    assert bounds_of(d, clients=100).warmup == 5
