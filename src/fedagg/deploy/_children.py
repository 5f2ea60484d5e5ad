"""The edge aggregators below a server (its children), as the server sees them: their scope
and routes (which clients' tasks go to which edge), their hello, task streams and heartbeats'
bookkeeping, and what they send up (relayed updates with their clients' signatures, partial
aggregates).

Edges are scoped and cannot forge (their own side: :mod:`fedagg.deploy._edge`,
:mod:`fedagg.deploy._edge_server`): an edge claims only clients of its ``deploy.edge_clients``
scope not held directly or by another live edge, and every job it forwards carries its
client's own signatures, verified here with the client's key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import AuthError, body, upload_body
from fedagg.deploy._digest import ALGORITHMS
from fedagg.deploy._engine import Item
from fedagg.deploy._options import PROTOCOL
from fedagg.deploy._partial import partial_dtype, partial_nbytes
from fedagg.deploy._store import EventRow, PartialRows, UploadRow
from fedagg.deploy._transport import Call, CallError, Status
from fedagg.deploy._upload import check_metrics

if TYPE_CHECKING:
    from fedagg.deploy._service import FederationService

__all__ = ["Children"]

log = logging.getLogger("fedagg.server")


class Children:
    """The edge aggregators below ``svc`` (its ``edges`` keyring; none if it is None)."""

    def __init__(self, svc: FederationService) -> None:
        self.svc = svc
        #: the edges that said hello to this process: routes are not kept across a restart,
        #: an edge says hello again when its link comes back (until then it is told to retry)
        self.greeted: set[str] = set()

    def drop(self, name: str) -> None:
        """An edge aggregator stayed away for ``client_timeout``: every open job of its
        subtree is a dropout (what it accepted and did not forward is re-sent, and refused,
        if it comes back: the parent neither double counts nor waits for it)."""
        s = self.svc.edge_sessions[name]
        s.drop = None
        if s.connected:
            return
        for c in [c for c, e in self.svc.route.items() if e == name]:
            self.svc.sessions[c].connected = False
            self.svc.drop(c)

    def is_edge(self, auth: Any) -> bool:
        return self.svc.edges is not None and auth.client in self.svc.edges.index

    def auth(self, method: str, auth: Any, content: bytes) -> str:
        assert self.svc.edges is not None
        self.svc.admit.verify(self.svc.edges, method, auth, content)
        return str(auth.client)

    def greet(self, edge: str) -> None:
        """An edge that has not said hello to this process (it restarted since: the edge's
        link says hello again when it reconnects) is told to retry."""
        if edge not in self.greeted:
            raise CallError(
                Status.UNAVAILABLE,
                f"edge {edge!r} has not said hello to this server since it started: retry",
            )

    def routed(self, edge: str, client: int) -> None:
        self.greet(edge)
        if self.svc.route.get(client) != edge:
            raise CallError(
                Status.PERMISSION_DENIED,
                f"client {client} is not in the subtree of edge {edge!r}",
            )

    def live(self, edge: str) -> bool:
        """The edge's task stream is open, or closed less than ``client_timeout`` ago (its
        subtree is not dropped yet): it holds the clients it claimed."""
        s = self.svc.edge_sessions[edge]
        return s.connected or s.drop is not None

    def held(self, client: int, edge: str) -> bool:
        """Whether ``client`` is served otherwise than through ``edge``: it has a direct task
        stream open here, or another edge holds it (see :meth:`live`)."""
        other = self.svc.route.get(client)
        if other is not None and other != edge:
            return self.live(other)
        return other is None and self.svc.sessions[client].queue is not None

    def check_direct(self, client: int) -> None:
        """A client connecting directly: refused while an edge aggregator holds it (its tasks
        go there); once that edge is gone (dropped after ``client_timeout``), the client is
        served directly from now on, and the edge cannot claim it back while it is connected."""
        edge = self.svc.route.get(client)
        if edge is None:
            return
        if self.live(edge):
            raise CallError(
                Status.PERMISSION_DENIED,
                f"client {self.svc.keys.names[client]!r} is served through an edge aggregator here",
            )
        del self.svc.route[client]

    def verify_origin(
        self, client: int, origin: Any, task: int, version: int, weight: float, nbytes: int,
        metrics: Mapping[str, float],
    ) -> None:  # fmt: skip
        """An update an edge forwards (relayed, or a job of a partial) must carry its client's
        own signatures (``Origin``), checked here with the client's key: the header signature
        over the same upload body (task, version, weight, size, metrics) and the trailer
        signature over (that signature, the digest). With ``digest`` on, the digest must be
        there (a relay's bytes are then checked against it as they arrive).

        The client's timestamp and nonce are not checked for freshness: the edge's own
        request around them is (signed, fresh, never replayed), the client's signature only
        proves what the client sent, and the (client, job) idempotency key stops the same job
        from being counted twice whatever carries it."""
        why = None
        if len(origin.sha256) not in (0, 32) or (self.svc.opt.digest and not origin.sha256):
            why = "no client digest" if not origin.sha256 else "a malformed digest"
        elif origin.digest_algorithm not in ("", *ALGORITHMS):
            why = "an unknown digest algorithm"
        elif not origin.auth.signature or not origin.trailer_signature:
            why = "no client signature"
        else:
            content = upload_body(task, version, weight, nbytes, dict(metrics))
            try:
                who = self.svc.keys.verify("Push", origin.auth, content)
                signed = origin.auth.signature + origin.sha256
                self.svc.keys.verify("PushTrailer", origin.auth, signed, origin.trailer_signature)
            except AuthError:
                why = "the client's signature does not verify"
            else:
                if who != client:
                    why = "signed by another client"
        if why is not None:
            log.info("job %d of client %d refused: %s", task, client, why)
            raise CallError(
                Status.UNAUTHENTICATED,
                f"job {task} of client {client}: {why} (an edge forwards only what its "
                "clients signed)",
            )

    def hello(self, req: Any) -> pb.HelloReply:
        serves = sorted(int(c) for c in req.serves)
        name = self.auth("Hello", req.auth, body(protocol=req.protocol, serves=serves))
        self.greeted.add(name)  # (a refused hello too: its edge's later requests are refused)
        if req.protocol != PROTOCOL:
            raise CallError(
                Status.FAILED_PRECONDITION,
                f"protocol {req.protocol} not supported (this server speaks {PROTOCOL})",
            )
        # its scope (deploy.edge_clients): a client out of range, not served here or not in
        # the scope gets the same words (an edge learns nothing of other names or indices)
        scope = self.svc.admit.edge_clients.get(name, frozenset())
        bad = [c for c in serves if c not in scope or not 0 <= c < len(self.svc.sessions)
               or (self.svc.serves is not None and c not in self.svc.serves)]  # fmt: skip
        if bad:
            log.info("edge %r refused: claims clients %s outside its scope", name, bad[:5])
            raise CallError(
                Status.PERMISSION_DENIED,
                f"edge {name!r} may not serve clients {bad[:5]} here (deploy.edge_clients)",
            )
        held = [c for c in serves if self.held(c, name)]
        if held:
            log.info("edge %r refused: clients %s are served directly or by another edge",
                     name, held[:5])  # fmt: skip
            raise CallError(
                Status.PERMISSION_DENIED,
                f"edge {name!r} claims clients {held[:5]} that are connected directly or "
                "through another edge",
            )
        for c in serves:
            self.svc.route[c] = name
        spec = self.svc.engine.spec
        opt = self.svc.opt
        return pb.HelloReply(
            protocol=PROTOCOL, client_index=0, spec_json=json.dumps(spec.to_dict()),
            model_bytes=spec.nbytes, chunk_bytes=opt.chunk_bytes, digest=opt.digest,
            digest_algorithm=opt.digest_algorithm,
        )  # fmt: skip

    async def tasks(self, call: Call, edge: str) -> None:
        """An edge aggregator's task stream: the tasks of every client of its subtree."""
        self.greet(edge)
        mine = {c for c, e in self.svc.route.items() if e == edge}
        for c in mine:
            cs = self.svc.sessions[c]
            cs.connected = True
            if cs.drop is not None:
                cs.drop.cancel()
                cs.drop = None
        await self.svc.stream_tasks(
            call, self.svc.edge_sessions[edge], mine, lambda: self.drop(edge)
        )

    async def push_partial(
        self, edge: str, first: Any, it: AsyncIterator[bytes], head: Any
    ) -> pb.PushReply:
        """A partial aggregate from an edge aggregator: its jobs must be open tasks of its
        subtree, all of them, for one model version; taken whole, once (a re-sent partial whose
        jobs were all accepted is acknowledged as a duplicate)."""
        assert self.svc.edges is not None
        p = head.partial
        loop = asyncio.get_running_loop()

        def report_dropouts() -> None:  # clients that dropped out at the edge
            for d in p.dropped:
                task = self.svc.engine.tasks.get(d.task)
                if task is not None and task.client == d.client and (
                    self.svc.route.get(d.client) == edge
                ):  # fmt: skip
                    self.svc.enqueue("dropout", int(d.client), int(d.task))

        if not p.jobs:
            if head.nbytes:
                raise CallError(Status.INVALID_ARGUMENT, "a payload without jobs")
            await self.svc.up.read_unspooled(first, it, head, 1, "a dropout report")
            report_dropouts()
            return pb.PushReply(task=head.task, duplicate=False)
        keys = [(int(j.client), int(j.task)) for j in p.jobs]
        if len(set(k[1] for k in keys)) != len(keys):
            raise CallError(Status.INVALID_ARGUMENT, "a partial lists a job twice")
        for c, _ in keys:
            self.routed(edge, c)
        if not all(math.isfinite(j.weight) and j.weight > 0 for j in p.jobs):
            raise CallError(Status.INVALID_ARGUMENT, "weights must be finite and > 0")
        if p.accumulator_bits == 0 and getattr(self.svc.engine, "secure_rounds", False):
            # a secure round's masked partial (at the root, or at an intermediate edge that
            # merges it into its own masked partial)
            return await self._push_masked(edge, first, it, head, keys, report_dropouts)
        self.verify_jobs(head)
        fresh = [k for k in keys if k not in self.svc.accepted]
        logged = await self.svc.in_engine(  # one trip to the engine thread, not one per job
            lambda: {k for k in fresh if self.svc.engine.store.has_upload(*k)}
        )
        seen = [k not in fresh or k in logged for k in keys]
        if all(seen):  # a re-sent partial: read it (no larger than the accepted one), acknowledge
            acc = {32: "float32", 64: "float64"}.get(int(p.accumulator_bits))
            spec = self.svc.engine.spec
            if acc is None or head.nbytes != partial_nbytes(spec, acc):
                raise CallError(
                    Status.INVALID_ARGUMENT,
                    f"re-sent partial of {head.nbytes} bytes, accumulator bits "
                    f"{p.accumulator_bits}: not the size of a partial of this model",
                )
            itemsize = partial_dtype(spec, acc).itemsize
            await self.svc.up.read_unspooled(first, it, head, itemsize, "re-sent partial")
            self.svc.stats.duplicates += 1
            return pb.PushReply(task=head.task, duplicate=True)
        if any(seen):
            raise CallError(Status.FAILED_PRECONDITION, "a partial overlaps accepted uploads")
        for c, j in keys:
            problem = self.svc.engine.task_problem(c, j, head.version)
            if problem is not None:
                raise CallError(
                    Status.FAILED_PRECONDITION,
                    f"job {j} of client {c} cannot be merged ({problem})",
                )
        acc = {32: "float32", 64: "float64"}.get(int(p.accumulator_bits))
        if acc is None or not (math.isfinite(p.weight) and p.weight > 0):
            raise CallError(Status.INVALID_ARGUMENT, "bad partial accumulator or weight")
        mine = self.svc.engine.partial_accumulator()
        if mine is None:
            raise CallError(
                Status.FAILED_PRECONDITION,
                "this server's aggregator is not a mean monoid: it cannot merge partials",
            )
        if acc != mine:
            raise CallError(
                Status.INVALID_ARGUMENT,
                f"a {acc} partial cannot merge into this server's {mine} accumulator: "
                "configure every tier alike",
            )
        spec = self.svc.engine.spec
        if head.nbytes != partial_nbytes(spec, acc):
            raise CallError(
                Status.INVALID_ARGUMENT,
                f"partial has {head.nbytes} bytes, expected {partial_nbytes(spec, acc)}",
            )
        path, digest, check, _ = await self.svc.up.receive(
            keys[0][0], first, it, head, partial_dtype(spec, acc), self.svc.edges
        )
        parts = tuple(
            UploadRow(
                int(j.client),
                int(j.task),
                str(path),
                float(j.weight),
                head.version,
                {"train_loss": float(j.train_loss)} if math.isfinite(j.train_loss) else {},
                head.nbytes,
                digest,
                check,
            )
            for j in sorted(p.jobs, key=lambda j: j.task)
        )
        info = {"weight": float(p.weight), "weight_comp": float(p.weight_comp),
                "accumulator": acc, "edge": edge}  # fmt: skip
        report_dropouts()
        self._keep_partial_origins(head)
        assert self.svc.queue is not None
        done: asyncio.Future[EventRow | None] = loop.create_future()
        item = ("partial", self.svc.now(), None, None, None, PartialRows(parts, info))
        await self.svc.queue.put(Item(item, done))
        row = await done
        if row is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.svc.stats.duplicates += 1
            return pb.PushReply(task=head.task, duplicate=True)
        self.svc.stats.uploads += len(parts)
        return pb.PushReply(task=head.task, duplicate=False)

    async def _push_masked(
        self, edge: str, first: Any, it: AsyncIterator[bytes], head: Any,
        keys: list[tuple[int, int]], report_dropouts: Callable[[], None],
    ) -> pb.PushReply:  # fmt: skip
        """A masked partial (uint32, the wrap-around sum of its jobs' masked uploads): its
        jobs open secure jobs of the edge's subtree, of one round (one masked length), each
        with its client's signatures over its own masked upload (weight 1, ``4 * dim``
        bytes); no value checks (uniform noise); logged as a partial the root's policy gets
        as a :class:`~fedagg.policy.MaskedMerge`. A re-sent one is a duplicate."""
        logged = await self.svc.in_engine(
            lambda: [self.svc.engine.store.has_upload(*k) for k in keys]
        )
        if all(logged):  # a re-sent masked partial: read it (4-byte words), acknowledge
            await self.svc.up.read_unspooled(first, it, head, 4, "re-sent masked partial")
            self.svc.stats.duplicates += 1
            return pb.PushReply(task=head.task, duplicate=True)
        if any(logged):
            raise CallError(
                Status.FAILED_PRECONDITION, "a masked partial overlaps accepted uploads"
            )
        dims = {self.svc.engine.secure_dim(j) for _, j in keys}
        dim = dims.pop() if len(dims) == 1 else None
        if dim is None and not self.svc.engine.ready():  # an edge catching up with its parent
            raise CallError(Status.UNAVAILABLE, "this edge is catching up with its parent: retry")
        if dim is None:
            raise CallError(
                Status.FAILED_PRECONDITION,
                "a masked partial's jobs are not the open jobs of one secure round",
            )
        if head.nbytes != 4 * dim:
            raise CallError(Status.INVALID_ARGUMENT,
                            f"masked partial of {head.nbytes} bytes, not {4 * dim}")  # fmt: skip
        for c, j in keys:
            problem = self.svc.engine.task_problem(c, j, head.version)
            if problem is not None:
                raise CallError(Status.FAILED_PRECONDITION,
                                f"job {j} of client {c} cannot be merged ({problem})")  # fmt: skip
        for j in head.partial.jobs:
            metrics = check_metrics(j.origin.metrics)
            self.verify_origin(int(j.client), j.origin, int(j.task), int(head.version),
                               float(j.weight), head.nbytes, metrics)  # fmt: skip
        assert self.svc.edges is not None
        path, digest, check, _ = await self.svc.up.receive(
            keys[0][0], first, it, head, np.dtype(np.uint32), self.svc.edges, finite=False
        )

        def row(j: Any) -> UploadRow:
            loss = {"train_loss": float(j.train_loss)} if math.isfinite(j.train_loss) else {}
            return UploadRow(int(j.client), int(j.task), str(path), 1.0, head.version, loss,
                             head.nbytes, digest, check)  # fmt: skip

        parts = tuple(row(j) for j in sorted(head.partial.jobs, key=lambda j: j.task))
        report_dropouts()
        self._keep_partial_origins(head)
        done: asyncio.Future[EventRow | None] = asyncio.get_running_loop().create_future()
        item = ("partial", self.svc.now(), None, None, None,
                PartialRows(parts, {"masked": True, "edge": edge}))  # fmt: skip
        await self.svc.queue.put(Item(item, done))
        if await done is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.svc.stats.duplicates += 1
            return pb.PushReply(task=head.task, duplicate=True)
        self.svc.stats.uploads += len(parts)
        return pb.PushReply(task=head.task, duplicate=False)

    def verify_jobs(self, head: Any) -> None:
        """Each job of a partial carries its client's signatures over what the job says (task,
        the partial's version, weight, the model's size, metrics as signed, whose
        ``train_loss`` must be the job's): an edge cannot invent a client's participation or
        change its weight. It can still mis-add the sum (the root holds no proof of it):
        relay mode, or a robust rule at the root, answers that."""
        nbytes = self.svc.engine.spec.nbytes
        for j in head.partial.jobs:
            o = j.origin
            metrics = check_metrics(o.metrics)
            loss = metrics.get("train_loss", math.nan)
            if not (loss == j.train_loss or (math.isnan(loss) and math.isnan(j.train_loss))):
                raise CallError(
                    Status.UNAUTHENTICATED,
                    f"job {j.task} of client {j.client}: train_loss {j.train_loss} is not the "
                    f"one its client signed",
                )
            self.verify_origin(int(j.client), o, int(j.task), int(head.version),
                                float(j.weight), nbytes, metrics)  # fmt: skip

    def _keep_partial_origins(self, head: Any) -> None:
        for j in head.partial.jobs:
            self.svc.engine.keep_origin(int(j.client), int(j.task), j.origin.SerializeToString())
