"""Secure aggregation over the in-memory transport (the real client and service, no network):
the ``Secure`` RPC's refusals (on its length before parsing, unauthenticated, not the open
request, a malformed message: typed errors, nothing logged), and the deployed client's
refusal of a lying server (a replaced public key, inconsistent survivor lists) checked
against its own keyring."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg import strategies
from fedagg.config import build_policy, build_strategy, resolve_config
from fedagg.deploy import Client, ClientKey, Federation, Keyring, Result, ServerOptions
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._app import keyring_identities
from fedagg.deploy._memory import MemoryChannel
from fedagg.deploy._secure import MAX_SECURE, secure_body
from fedagg.deploy._secure_client import SecureJobs, secure_expectations
from fedagg.deploy._service import FederationService
from fedagg.errors import ConfigError, SecAggError
from fedagg.policy import SecurePolicy
from fedagg.secagg import (
    AdvertiseKeys,
    KeyDirectory,
    MaskedInput,
    RoundParams,
    SecureExpectations,
    ServerSession,
    UnmaskRequest,
    check_params,
    decode_reply,
    encode_message,
    public_identity,
)
from fedagg.sim import SyncPolicy

N, D = 4, 200
NAMES = [f"c{i}" for i in range(N)]
KEYS = {n: ClientKey(n, Ed25519PrivateKey.generate()) for n in NAMES}
RING = Keyring({n: KEYS[n].private.public_key() for n in NAMES})
WEIGHTS = {0: 3.0, 1: 5.0, 2: 7.0, 3: 2.0}


def _train(model: Any, task: Any) -> Result:
    rng = np.random.default_rng([task.job, 7])
    delta = (rng.standard_normal(D) * 0.01).astype(np.float32)
    return Result(delta, WEIGHTS[task.client_index], {"train_loss": 0.25})


def _service(
    d: Path, rounds: int = 1, wait_for: int = 0, **secure: Any
) -> tuple[Federation, FederationService]:
    strategy = strategies.fedavg()
    policy = SecurePolicy(SyncPolicy(strategy=strategy, rounds=rounds, clients_per_round=N),
                          stage_timeout=1.0, max_weight=10.0, **secure)  # fmt: skip
    fed = Federation(policy, strategy.init([np.zeros(D, np.float32)]), num_clients=N, seed=3,
                     directory=d, identity={"t": "secure"},
                     identities=keyring_identities(RING))  # fmt: skip
    opts = ServerOptions(listen="127.0.0.1:0", insecure=True, fsync=False, chunk_bytes=4096,
                         wait_for=wait_for, client_timeout=1.0)  # fmt: skip
    return fed, FederationService(fed, RING, opts)


def _client(
    svc: FederationService,
    name: str,
    keyring: Keyring | None = RING,
    expect: SecureExpectations | None = None,
) -> Client:
    channel = MemoryChannel(svc, max_message=2 * MAX_SECURE)
    return Client("memory", KEYS[name], _train, insecure=True, retry_for=5.0, heartbeat=1.0,
                  channel=channel, keyring=keyring, expect=expect)  # fmt: skip


def _secure_req(name: str, task: int, round_: int, stage: int, payload: bytes) -> bytes:
    content = secure_body(task, round_, stage, payload)
    auth = pb.Auth(**KEYS[name].sign("Secure", content))
    return pb.SecureRequest(auth=auth, task=task, round=round_, stage=stage,
                            payload=payload).SerializeToString()  # fmt: skip


def test_the_secure_rpc_refuses_bad_requests_with_typed_errors(tmp_path: Path) -> None:
    """Too long (before parsing), unauthenticated (a signature over other content), and
    valid but answering no open request: refused, and nothing reaches the event log."""

    async def run() -> list[tuple[grpc.StatusCode, str]]:
        _, svc = _service(tmp_path, wait_for=N)  # no round starts: no client connects
        await svc.start()
        call = _client(svc, "c0")._method("Secure", "unary_unary")
        good = _secure_req("c0", 0, 0, 0, b"x")
        bad_sig = pb.SecureRequest.FromString(good)
        bad_sig.payload = b"y"  # not what the Auth signs
        too_long = _secure_req("c0", 0, 0, 0, b"\0" * (MAX_SECURE + 1))
        out = []
        try:
            for raw in (too_long, bad_sig.SerializeToString(), good):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call(raw, timeout=5)
                out.append((e.value.code(), str(e.value.details())))
        finally:
            await svc.stop()
        return out

    got = asyncio.run(run())
    assert [c for c, _ in got] == [
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
    ], got
    assert f"at most {MAX_SECURE}" in got[0][1]
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("SELECT count(*) FROM events WHERE kind='secure'").fetchone() == (0,)


def test_a_malformed_stage_reply_is_refused_and_the_round_goes_on_without_it(
    tmp_path: Path,
) -> None:
    """Client c3 sends garbage as its stage-1 reply: INVALID_ARGUMENT (c3 stops), nothing of
    it is logged, and the round completes over c0, c1 and c2 with their weighted mean."""

    async def run() -> tuple[Federation, BaseException | None]:
        fed, svc = _service(tmp_path, wait_for=N)
        await svc.start()
        clients = [_client(svc, n) for n in NAMES]
        answer = clients[3].secure.answer
        clients[3].secure.answer = lambda job, r, stage, p: (  # type: ignore[method-assign]
            b"\x01garbage" if stage == 1 else answer(job, r, stage, p)
        )
        runs = [asyncio.create_task(c.run_async()) for c in clients]
        try:
            await asyncio.wait_for(svc.wait(), 30)
            await asyncio.wait_for(asyncio.gather(*runs[:2]), 10)
        finally:
            for r in runs:
                r.cancel()
            done = await asyncio.gather(*runs, return_exceptions=True)
            await svc.stop()
        return fed, done[3] if isinstance(done[3], BaseException) else None

    fed, err = asyncio.run(run())
    assert err is not None and "INVALID_ARGUMENT" in str(err), err
    with sqlite3.connect(tmp_path / "state.db") as db:
        rows = db.execute("SELECT client, tag FROM events WHERE kind='secure'").fetchall()
    assert (3, 1) not in rows and (3, 0) in rows
    want = sum(WEIGHTS[c] * _train(None, _Job(c, c)).delta.astype(np.float64) for c in (0, 1, 2))
    want /= WEIGHTS[0] + WEIGHTS[1] + WEIGHTS[2]
    assert np.linalg.norm(fed.server.params - want) < 1e-5


class _Job:
    def __init__(self, job: int, client: int) -> None:
        self.job, self.client_index = job, client


def test_distributed_dp_clients_add_their_noise_before_masking(tmp_path: Path) -> None:
    """Distributed DP over the deployed client: each client adds its discrete Gaussian share
    (drawn from fresh randomness) before masking; the unmasked mean of the 4 clients differs
    from their plaintext (unweighted) mean by noise of the planned std, z C sqrt(m / m_min) / m
    (a client that added no noise could not even build its upload: the round would fail)."""
    z, clip = 0.5, 1.0

    async def run() -> Federation:
        fed, svc = _service(tmp_path, wait_for=N, noise="gaussian", noise_multiplier=z,
                            clip=clip)  # fmt: skip
        await svc.start()
        runs = [asyncio.create_task(_client(svc, n).run_async()) for n in NAMES]
        try:
            await asyncio.wait_for(svc.wait(), 30)
        finally:
            for r in runs:
                r.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            await svc.stop()
        return fed

    fed = asyncio.run(run())
    plain = sum(_train(None, _Job(c, c)).delta.astype(np.float64) for c in range(N)) / N
    err = np.asarray(fed.server.params, dtype=np.float64) - plain
    want = z * clip * np.sqrt(N / 2) / N  # m = 4 survivors, noise sized for m_min = 2
    assert 0.7 < err.std() / want < 1.4, (err.std(), want)
    assert abs(err.mean()) < 4 * want / np.sqrt(D)


# -- a lying server, against the deployed client's own keyring -----------------------------------
def _round() -> tuple[RoundParams, dict[int, SecureJobs], ServerSession]:
    params = RoundParams.make(
        9, (1, 2, 3, 4), D, b"g" * 32, degree=0, threshold=0, clip=10.0, max_weight=10.0
    )
    jobs = {i + 1: SecureJobs(KEYS[n], RING) for i, n in enumerate(NAMES)}
    ids = {u: public_identity(k) for u, k in enumerate(keyring_identities(RING), 1)}
    server = ServerSession(params.config(), ids)
    for u, j in jobs.items():
        reply = j.begin(100 + u, 9, encode_message(params))
        assert reply is not None
        server.receive_advertise(decode_reply(0, reply))
    return params, jobs, server


def test_a_client_refuses_a_directory_with_a_replaced_public_key() -> None:
    _, jobs, server = _round()
    dirs = server.close_advertise()
    d = dirs[1]
    forged_by = Ed25519PrivateKey.generate()  # the server's own key, not client 2's
    real = d.keys[2]
    fake = AdvertiseKeys(2, real.c_pk, real.s_pk, forged_by.sign(b"anything"))
    lying = KeyDirectory(d.round_id, {**d.keys, 2: fake})
    assert jobs[1].answer(101, 9, 1, encode_message(lying)) is None
    assert jobs[1].refused == 1
    # the honest directory is refused too now: the client left the round
    assert jobs[1].answer(101, 9, 1, encode_message(d)) is None


def test_a_client_refuses_inconsistent_survivor_lists() -> None:
    """The consistency round lists 1..4 as survivors; an unmask request then names 4 as
    dropped (asking for its mask key share while 4's self-mask share may be asked too)."""
    _, jobs, server = _round()
    for u, kd in server.close_advertise().items():
        server.receive_shares(decode_reply(1, jobs[u].answer(100 + u, 9, 1, encode_message(kd))))
    for u, fs in server.close_shares().items():
        assert jobs[u].answer(100 + u, 9, 2, encode_message(fs)) is None  # kept for masking
        x = np.full(D, 0.01 * u)
        masked = asyncio.run(jobs[u].masked(100 + u, x, 1.0, 5.0))
        assert masked is not None and masked.dtype == np.uint32
        server.receive_masked(MaskedInput(u, masked))
    requests = server.close_masked()
    assert requests[1].survivors == frozenset({1, 2, 3, 4})
    j = jobs[1]
    assert j.answer(101, 9, 3, encode_message(requests[1])) is not None
    lying = UnmaskRequest(9, frozenset({1, 2, 3}), frozenset({4}), {})
    assert j.answer(101, 9, 4, encode_message(lying)) is None
    assert j.refused == 1


def test_a_client_without_a_keyring_refuses_secure_aggregation() -> None:
    params = RoundParams.make(9, (1, 2, 3, 4), D, b"g" * 32, degree=0, threshold=0, clip=10.0)
    with pytest.raises(ConfigError, match="authorized_keys"):
        SecureJobs(KEYS["c0"], None).begin(101, 9, encode_message(params))


# -- a server lowering the protection the client's own config asks (finding 4) ---------------
DP = SecureExpectations(clip=1.0, bits=32, max_weight=10.0, rotation=False, noise="gaussian",
                        noise_multiplier=0.5, noise_clients=2)  # fmt: skip
HONEST: dict[str, Any] = dict(clip=1.0, max_weight=10.0, noise="gaussian", noise_multiplier=0.5,
                              noise_clients=2)  # fmt: skip


def _params(ids: tuple[int, ...] = (1, 2, 3, 4), rid: int = 9, **kw: Any) -> RoundParams:
    return RoundParams.make(rid, ids, D, b"g" * 32, **{**HONEST, **kw})


@pytest.mark.parametrize(
    ("lie", "name"),
    [
        ({"noise_multiplier": 0.1}, "noise_multiplier = 0.1"),
        ({"clip": 100.0}, "clip = 100.0"),
        ({"noise": "", "noise_multiplier": 0.0}, "noise = ''"),
        ({"noise_clients": 1}, "noise_clients = 1"),
        ({"ids": (1, 2)}, "cohort size (number of ids) = 2"),
    ],
)
def test_a_client_refuses_parameters_below_its_own_config(
    lie: dict[str, Any], name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A lower noise multiplier, a larger clip, no noise, fewer noise shares, a 2-client
    cohort: refused at stage 0 (no reply: a dropout), the error naming the parameter, the
    server's value and the client's; the honest parameters are accepted."""
    assert SecureJobs(KEYS["c0"], RING, DP).begin(101, 9, encode_message(_params())) is not None
    with pytest.raises(SecAggError, match="this client's config asks"):
        check_params(_params(**lie), DP)
    jobs = SecureJobs(KEYS["c0"], RING, DP)
    caplog.set_level(logging.ERROR, logger="fedagg.client")
    assert jobs.begin(101, 9, encode_message(_params(**lie))) is None
    assert jobs.refused == 1 and 101 not in jobs.jobs
    assert jobs.answer(101, 9, 1, b"") is None  # no part in the round
    (rec,) = caplog.records
    assert name in rec.getMessage() and "stage 0 refused" in rec.getMessage()


def test_a_config_clients_expectations_accept_its_honest_servers_parameters() -> None:
    """The expectations a deployed client builds from its config are met by what the server
    built from the same config sends (distributed DP: [privacy] clip, noise_clients =
    SecurePolicy.min_survivors), and refuse a lower noise multiplier."""
    cfg = resolve_config({"secure_aggregation": {"kind": "secagg+"}, "policy": {
        "clients_per_round": 4}, "privacy": {"mechanism": "distributed",
        "noise_multiplier": 0.7, "clip": 2.0}})  # fmt: skip
    pol = build_policy(cfg, build_strategy(cfg))
    while not isinstance(pol, SecurePolicy):
        pol = pol.inner
    exp = secure_expectations(cfg)
    assert exp is not None and exp.noise_clients == pol.min_survivors == 2
    kw = dict(clip=pol.clip, bits=pol.bits, max_weight=pol.max_weight, noise=pol.noise,
              noise_multiplier=pol.noise_multiplier, noise_clients=pol.min_survivors)  # fmt: skip
    check_params(_params(**kw), exp)
    with pytest.raises(SecAggError, match=r"noise_multiplier = 0\.35.*>= 0\.7"):
        check_params(_params(**{**kw, "noise_multiplier": 0.35}), exp)
    assert secure_expectations(resolve_config({})) is None


def test_deployed_clients_refuse_a_server_with_less_noise_than_their_config(
    tmp_path: Path,
) -> None:
    """Over the transport: the server runs distributed DP with z = 0.1, the clients' configs
    ask 0.5: every client refuses at stage 0, the round is abandoned, the model unchanged."""

    async def run() -> tuple[Federation, list[Client]]:
        fed, svc = _service(tmp_path, wait_for=N, noise="gaussian", noise_multiplier=0.1,
                            clip=1.0)  # fmt: skip
        await svc.start()
        clients = [_client(svc, n, expect=DP) for n in NAMES]
        runs = [asyncio.create_task(c.run_async()) for c in clients]
        try:
            await asyncio.wait_for(svc.wait(), 30)
        finally:
            for r in runs:
                r.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            await svc.stop()
        return fed, clients

    fed, clients = asyncio.run(run())
    assert [c.secure.refused for c in clients] == [1] * N
    assert not np.asarray(fed.server.params).any()


def test_a_client_sends_one_masked_upload_per_model_version() -> None:
    """Two secure rounds at model version 5 (a re-run round): the client masks and uploads
    in the first; the second, begun before that upload, is refused before masking, and a
    third at version 5 is refused at stage 0; version 6 is accepted."""
    jobs = {u: SecureJobs(KEYS[n], RING) for u, n in enumerate(NAMES, 1)}
    plain = _params(noise="", noise_multiplier=0.0, clip=10.0)
    second = _params(rid=10, noise="", noise_multiplier=0.0, clip=10.0)
    sa = _to_masking(jobs, plain, 100, 5)
    sb = _to_masking(jobs, second, 200, 5)
    x = np.full(D, 0.01)
    assert asyncio.run(jobs[1].masked(101, x, 1.0, 5.0)) is not None
    assert asyncio.run(jobs[1].masked(101, x, 1.0, 5.0)) is not None  # its retry: the same
    assert asyncio.run(jobs[1].masked(201, x, 1.0, 5.0)) is None
    assert jobs[1].refused == 1 and sa and sb
    third = _params(rid=11, noise="", noise_multiplier=0.0, clip=10.0)
    assert jobs[1].begin(301, 11, encode_message(third), 5) is None
    assert jobs[1].refused == 2
    assert jobs[1].begin(401, 11, encode_message(third), 6) is not None


def _to_masking(jobs: dict[int, SecureJobs], params: RoundParams, base: int, version: int) -> bool:
    """Run ``params``' round for ``jobs`` (tasks base + id) up to the masked uploads."""
    ids = {u: public_identity(k) for u, k in enumerate(keyring_identities(RING), 1)}
    server = ServerSession(params.config(), ids)
    rid = params.round_id
    for u, j in jobs.items():
        reply = j.begin(base + u, rid, encode_message(params), version)
        assert reply is not None
        server.receive_advertise(decode_reply(0, reply))
    for u, kd in server.close_advertise().items():
        reply = jobs[u].answer(base + u, rid, 1, encode_message(kd))
        assert reply is not None
        server.receive_shares(decode_reply(1, reply))
    for u, fs in server.close_shares().items():
        assert jobs[u].answer(base + u, rid, 2, encode_message(fs)) is None
    return True


def test_a_client_refuses_a_round_id_it_already_took_part_in() -> None:
    """A server reusing a round id for another task (to replay a past session's signed
    messages) is refused at stage 0; the same task's stage-0 request again is still answered
    alike (a restarted server re-sends it)."""
    j = SecureJobs(KEYS[NAMES[0]], RING)
    params = _params(noise="", noise_multiplier=0.0, clip=10.0)
    first = j.begin(100, params.round_id, encode_message(params), 1)
    assert first is not None
    assert j.begin(100, params.round_id, encode_message(params), 1) == first
    assert j.begin(500, params.round_id, encode_message(params), 2) is None
    assert j.refused == 1
