"""Secure aggregation in the simulator: SecurePolicy around sync rounds, in-process clients,
seeded protocol dropouts; the applied update is the survivors' weighted mean of clipped
deltas within the encoding's bound, rounds beyond the threshold are skipped, runs replay."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import fedagg
from fedagg import policy, sim
from fedagg.cli import main
from fedagg.config import build_policy, build_strategy, resolve_config
from fedagg.core.update import Update
from fedagg.secagg import Encoder, SecureClient, encode_message
from fedagg.sim._secure import SimSecure
from tests.sim.fakes import FakeData, Result

D = 300  # model size
CLIP = 4.0
MAX_W = 40.0


def _delta(size: int) -> np.ndarray:
    """Client of ``size`` examples: a fixed delta; every third one longer than the clip."""
    rng = np.random.default_rng(size)
    x = rng.standard_normal(D) * (0.5 if size % 3 else 0.6)
    return x.astype(np.float32)


class VecModel:
    def init(self, seed: int) -> dict[str, np.ndarray]:
        return {"w": np.linspace(-1, 1, D, dtype=np.float32)}

    def evaluate(self, params: Any, x: Any, y: Any) -> tuple[float, float]:
        return 0.0, 0.0


class VecClient:
    epochs = 1
    batch_size = 1

    def train_many(
        self, model: Any, params: Any, datas: Sequence[Any], rngs: Any, **kw: Any
    ) -> list[tuple[Result, Any]]:
        return [
            (Result({"w": _delta(len(d))}, len(d), 1, {"train_loss": float(len(d))}, {}), None)
            for d in datas
        ]


def _sizes(n: int) -> list[int]:
    return [10 + 3 * c for c in range(n)]  # distinct: a size names its client


def _run(
    n: int, dropout: float, seed: int, rounds: int = 1, bits: int = 24
) -> tuple[sim.SimResult, Any]:
    strategy = fedagg.strategies.fedavg(1.0)
    inner = policy.SyncPolicy(strategy, rounds, n)
    secure = policy.SecurePolicy(inner, clip=CLIP, bits=bits, max_weight=MAX_W, stage_timeout=5.0)
    data = FakeData(_sizes(n))
    s = sim.Simulation(
        data, VecModel(), VecClient(), strategy, secure, sim.SystemModel(n, seed=seed),
        seed=seed, secure_dropout=dropout,
    )  # fmt: skip
    return s.run(), data


def _reference(participants: Sequence[int], sizes: list[int]) -> tuple[np.ndarray, float]:
    """The plaintext weighted mean of the participants' clipped deltas, and its bound's W."""
    xs, ws = [], []
    for c in participants:
        x = _delta(sizes[c]).astype(np.float64)
        xs.append(x * min(1.0, CLIP / float(np.linalg.norm(x))))
        ws.append(min(sizes[c], MAX_W) / MAX_W)
    w = np.array(ws)
    return (w[:, None] * np.array(xs)).sum(0) / w.sum(), float(w.sum())


@pytest.mark.parametrize(("dropout", "seed"), [(0.0, 1), (0.1, 2), (0.3, 1)])
def test_applied_update_is_the_plaintext_weighted_mean_within_the_bound(
    dropout: float, seed: int
) -> None:
    n = 16
    res, data = _run(n, dropout, seed)
    st = res.records[0].stats
    assert st.applied and st.folded == len(st.participants) >= 8
    last = {c: SimSecure(seed, dropout).last_stage(0, c) for c in range(n)}
    if dropout > 0:  # these seeds draw dropouts at stage 0 (no shares) and after the upload
        assert {0, 2} <= {s for s in last.values() if s < 4}
    # those that dropped before uploading are out; those after it are in the sum
    assert list(st.participants) == [c for c in range(n) if last[c] >= 2]
    assert st.dropped == n - st.folded
    assert st.refused == 0 and st.refusals == ()
    ref, w_sum = _reference(st.participants, data.sizes)
    old = VecModel().init(0)["w"].astype(np.float64)
    got = res.server.params.astype(np.float64) - old
    enc = Encoder(CLIP, 24, n)
    m = st.folded
    e_v, e_w = enc.error_bound(D, m), m / enc.levels
    bound = (e_v + CLIP * e_w) / (w_sum - e_w)
    slack = 2.0**-22 * (np.linalg.norm(old) + np.linalg.norm(ref))  # float32 cast and add
    err = float(np.linalg.norm(got - ref))
    assert err <= bound + slack, (err, bound, slack)
    # each job is reported with the mean weight (the clients' own weights stay secret)
    assert np.allclose(st.omega, 1.0 / m)
    assert math.isclose(st.client_loss, np.mean([data.sizes[c] for c in st.participants]))


def test_a_round_beyond_the_threshold_is_skipped_with_the_reason() -> None:
    res, _ = _run(6, 0.9, seed=0, rounds=3)
    skipped = [r.stats for r in res.records if not r.stats.applied]
    assert skipped, "expected an abandoned round at 90% dropouts"
    for st in skipped:
        reasons = dict(st.refusals)
        assert any(k.startswith("secure aggregation abandoned at stage") for k in reasons)
        assert st.folded == 0 and st.omega == ()
        assert st.refused + st.dropped == st.dispatched
    if not res.records[0].stats.applied:
        assert np.array_equal(res.server.params, VecModel().init(0)["w"]) or any(
            r.stats.applied for r in res.records
        )
    assert res.policy_state.last_abandon  # the full reason is kept


def test_same_seed_same_bits_and_secure_rounds_mask_every_upload() -> None:
    a, _ = _run(10, 0.3, seed=5, rounds=3)
    b, _ = _run(10, 0.3, seed=5, rounds=3)
    c, _ = _run(10, 0.3, seed=6, rounds=3)
    assert a.server.params.tobytes() == b.server.params.tobytes()
    assert a.server.params.tobytes() != c.server.params.tobytes()
    assert [r.row() | {"wall_time": 0} for r in a.records] == [
        r.row() | {"wall_time": 0} for r in b.records
    ]
    # uploads are uint32 masked vectors: 4 bytes per encoded element (d + 1 here)
    assert a.records[0].bytes_up >= a.records[0].stats.folded * 4 * (D + 1)


SMALL: dict[str, Any] = {
    "rounds": 2,
    "data": {"name": "digits", "num_clients": 10, "partition": "dirichlet", "alpha": 1.0},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "policy": {"clients_per_round": 5},
    "secure_aggregation": {"kind": "secagg+", "dropout": 0.1},
}


@pytest.mark.parametrize(
    ("over", "key"),
    [
        ({"strategy": {"aggregator": "median"}}, "strategy.aggregator"),
        ({"strategy": {"clip_norm": 1.0}}, "strategy.clip_norm"),
        ({"policy": {"kind": "fedbuff"}}, "policy.kind"),
        ({"policy": {"weighting": "fedau"}}, "policy.weighting"),
        ({"client": {"algorithm": "scaffold"}}, "client.algorithm"),
        ({"byzantine": {"clients": 2, "attack": "alie"}}, "byzantine.attack"),
        ({"deploy": {"checkpoint_updates": 5}}, "deploy.checkpoint_updates"),
        ({"secure_aggregation": {"bits": 8}, "policy": {"clients_per_round": 300}}, "headroom"),
    ],
)
def test_what_needs_plaintext_is_refused_at_build(over: dict[str, Any], key: str) -> None:
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in SMALL.items()}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    resolved = resolve_config(cfg)
    with pytest.raises(fedagg.ConfigError, match=key.replace(".", r"\.")):
        build_policy(resolved, build_strategy(resolved))


def test_api_refusals() -> None:
    strategy = fedagg.strategies.fedavg(aggregator=fedagg.aggregators.median())
    with pytest.raises(fedagg.ConfigError, match="robust rules need plaintext"):
        policy.SecurePolicy(policy.SyncPolicy(strategy, 1, 4))
    with pytest.raises(fedagg.ConfigError, match="sync rounds"):
        policy.SecurePolicy(policy.fedbuff(fedagg.strategies.fedavg(), 1, 2))  # type: ignore[arg-type]


def test_cli_simulate_with_secure_aggregation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "secure.toml"
    conf.write_text(
        'name = "secure"\nrounds = 3\n[data]\nname = "digits"\nnum_clients = 10\n'
        "[policy]\nclients_per_round = 5\n"
        '[secure_aggregation]\nkind = "secagg+"\nclip = 5.0\ndropout = 0.1\n'
    )
    db = tmp_path / "runs.db"
    assert main(["simulate", str(conf), "--db", str(db), "--no-plots", "--quiet"]) == 0
    assert "final test accuracy" in capsys.readouterr().out
    with sim.RunDB(db) as d:
        rows = d.rounds(d.runs()[0].id)
    assert len(rows) == 3 and sum(int(r["applied"]) for r in rows) >= 2
    assert all(r["bytes_up"] >= 4 * 651 * int(r["folded"]) for r in rows)


class _Ctx:
    """A pure policy context with identities (what a deployment's server provides)."""

    def __init__(self, n: int) -> None:
        self.keys = {c: Ed25519PrivateKey.generate() for c in range(n)}
        self.num_clients, self.seed = n, 0

    def available(self, slot: int) -> np.ndarray:
        return np.arange(self.num_clients)

    def identity(self, client: int) -> bytes:
        return self.keys[client].public_key().public_bytes_raw()


def test_the_pure_policy_with_byte_replies_a_bad_message_and_an_edge_merge() -> None:
    n = 4
    ctx = _Ctx(n)
    strategy = fedagg.strategies.fedavg(1.0)
    pol = policy.SecurePolicy(policy.SyncPolicy(strategy, 1, n), clip=CLIP, bits=24,
                              max_weight=MAX_W)  # fmt: skip
    state = pol.init(strategy.init(VecModel().init(0)), ctx)
    acts = pol.step(state, policy.Start(0.0), ctx)
    req = next(a for a in acts if isinstance(a, policy.SecureRequest))
    assert req.stage == 0 and sorted(req.messages) == list(range(n))
    assert any(isinstance(a, policy.SetTimer) and a.tag == policy.stage_tag(req.round, 0)
               for a in acts)  # fmt: skip
    params = req.messages[0]
    pub = {c + 1: ctx.identity(c) for c in range(n)}
    clients = {c: SecureClient(params, c + 1, ctx.keys[c], pub) for c in range(n)}
    sizes = _sizes(n)

    def reply(c: int, stage: int, msg: Any, now: float = 0.0) -> list[Any]:
        return pol.step(state, policy.SecureReply(now, c, req.jobs[c], req.round, stage, msg), ctx)

    assert reply(1, 3, b"stale") == []  # another stage: ignored
    acts = reply(0, 0, b"junk")  # refused: noted, client 0 is out
    for c in (1, 2, 3):
        acts = reply(c, 0, encode_message(clients[c].handle(params)))  # wire bytes
    (req1,) = [a for a in acts if isinstance(a, policy.SecureRequest)]
    assert req1.stage == 1 and sorted(req1.messages) == [1, 2, 3]
    for c, m in req1.messages.items():
        acts = reply(c, 1, clients[c].handle(m))
    (req2,) = [a for a in acts if isinstance(a, policy.SecureRequest)]
    for c, m in req2.messages.items():
        clients[c].handle(m)
    ys = {c: clients[c].masked(_delta(sizes[c]), sizes[c], np.random.default_rng(c))
          for c in (1, 2, 3)}  # fmt: skip
    up = Update(ys[1], 1.0, "1", metrics={"train_loss": 2.0})
    assert pol.step(state, policy.Arrival(1.0, 1, req.jobs[1], up), ctx) == []
    merged = policy.MaskedMerge(2.0, req.round, ((2, req.jobs[2], 3.0), (3, req.jobs[3], 4.0)),
                                ys[2] + ys[3])  # fmt: skip
    acts = pol.step(state, merged, ctx)
    for stage in (3, 4):
        (rq,) = [a for a in acts if isinstance(a, policy.SecureRequest)]
        assert rq.stage == stage
        for c, m in rq.messages.items():
            acts = reply(c, stage, clients[c].handle(m), 3.0)
    (applied,) = [a for a in acts if isinstance(a, policy.Applied)]
    st = applied.stats
    assert st.applied and st.participants == (1, 2, 3) and st.folded == 3
    assert (st.refused, st.dropped, dict(st.refusals)) == (1, 0, {"secagg: bad stage-0 message": 1})
    assert st.client_loss == 3.0
    ref, _ = _reference([1, 2, 3], sizes)
    got = state.server.params.astype(np.float64) - VecModel().init(0)["w"]
    assert np.linalg.norm(got - ref) < 1e-4
    assert state.open is None


def test_plaintext_never_reaches_the_aggregate() -> None:
    """A plaintext partial (an edge's Merge) or a float upload in a secure round is refused."""
    n = 3
    ctx = _Ctx(n)
    strategy = fedagg.strategies.fedavg(1.0)
    pol = policy.SecurePolicy(policy.SyncPolicy(strategy, 1, n), clip=CLIP, stage_timeout=1.0)
    state = pol.init(strategy.init(VecModel().init(0)), ctx)
    acts = pol.step(state, policy.Start(0.0), ctx)
    req = next(a for a in acts if isinstance(a, policy.SecureRequest))
    part = strategy.begin(state.server)
    plain = policy.Merge(0.5, ((0, req.jobs[0], 1.0, 0.0),), part)
    assert pol.step(state, plain, ctx) == []
    flat = Update(np.ones(D, np.float32), 1.0, "1")
    pol.step(state, policy.Arrival(0.6, 1, req.jobs[1], flat), ctx)  # not in stage 2 yet
    acts = pol.step(state, policy.Timer(1.0, policy.stage_tag(req.round, 0)), ctx)
    (applied,) = [a for a in acts if isinstance(a, policy.Applied)]  # nobody advertised keys
    st = applied.stats
    assert not st.applied and st.folded == 0
    assert dict(st.refusals)["secagg: plaintext partial refused"] == 1
    assert np.array_equal(state.server.params, VecModel().init(0)["w"])
