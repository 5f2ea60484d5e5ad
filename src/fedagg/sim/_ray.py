"""Client training on a Ray cluster (the optional extra ``ray``). Ray is only the executor.

Each worker is a long-lived Ray actor (:class:`SimWorker`). It keeps the algorithm and model
objects it was sent and a byte-bounded LRU cache of client datasets, so a client that comes back
to the same worker is not shipped again: the driver remembers which objects (by identity) each
worker holds and sends only the missing ones, with the keys the worker must evict. Objects are
therefore taken to be immutable, as fedagg's datasets, models and algorithms are (frozen, with
read-only arrays); the driver keeps the cached ones alive (at most ``cache_bytes`` of data per
worker), so their identity is not reused.

A dispatch's jobs are spread over the workers at most ``ceil(n / workers)`` per worker, each job
preferring a worker that already caches its data. Every worker runs the same ``train_many`` the
in-process executor runs, with the same per-job random streams, and a client's result does not
depend on which others share its call, so the results (put back in dispatch order) and thus the
model are the ones :class:`~fedagg.sim.LocalExecutor` gives. The simulation (clock, policy,
folding) stays in this process.

:meth:`RayExecutor.train_to_updates` is the other path, used with an aggregation tree of Ray
actors (the baseline ``benchmarks/_ray_tree.py``): the workers turn their results into
:class:`~fedagg.core.update.Update` objects and keep them in Ray's object store, and only object
references and small metadata come back to the driver.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.core.update import Update
from fedagg.errors import ConfigError
from fedagg.jobs import Jobs, init_ray, train_chunk

__all__ = ["RayExecutor", "SimWorker", "assign_jobs"]

Arr = npt.NDArray[Any]
#: Default bound on the client data each worker caches (bytes of numpy arrays).
DEFAULT_CACHE_BYTES = 1 << 30


def data_nbytes(obj: Any) -> int:
    """The bytes of the numpy arrays an object holds directly (at least 1; for the cache)."""
    if isinstance(obj, np.ndarray):
        return max(1, obj.nbytes)
    fields = [getattr(obj, name, None) for name in getattr(type(obj), "__slots__", ())]
    fields.extend(getattr(obj, "__dict__", {}).values())
    if isinstance(obj, (tuple, list)):
        fields.extend(obj)
    return max(1, sum(f.nbytes for f in fields if isinstance(f, np.ndarray)))


class SimWorker:
    """A simulation worker (run as a Ray actor): trains clients with cached objects.

    ``ship`` arguments are ``(key, object)`` pairs to add to the cache before the call and
    ``evict`` the keys to drop; every other argument names cached objects by key.
    """

    def __init__(self) -> None:
        self._objs: dict[int, Any] = {}

    def node_id(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def cached(self) -> list[int]:
        """The keys held (for tests and diagnostics)."""
        return sorted(self._objs)

    def _sync(self, ship: Sequence[tuple[int, Any]], evict: Sequence[int]) -> None:
        for k in evict:
            self._objs.pop(k, None)
        for k, obj in ship:
            self._objs[k] = obj

    def train(
        self,
        ship: Sequence[tuple[int, Any]],
        evict: Sequence[int],
        alg_key: int,
        model_key: int,
        params: dict[str, Arr],
        data_keys: Sequence[int],
        rngs: Sequence[np.random.Generator],
        epochs: Sequence[int],
        states: Sequence[Any],
        server_state: Any,
        tasks: Sequence[Any] | None = None,
    ) -> list[tuple[Any, Any]]:
        self._sync(ship, evict)
        datas = [self._objs[k] for k in data_keys]
        jobs = Jobs(self._objs[alg_key], self._objs[model_key], params, datas, rngs, epochs,
                    states, server_state, tasks)  # fmt: skip
        return train_chunk(jobs)

    def train_to_updates(
        self,
        client_ids: Sequence[str],
        version: int | None,
        groups: Sequence[Sequence[int]],
        *call: Any,
    ) -> tuple[Any, ...]:
        """:meth:`train` on ``call`` (its arguments), then return ``(meta, *updates per
        group)``: ``meta`` holds each job's ``(new_state, metrics, num_examples, extra)``; group
        ``g`` is the list of the :class:`Update` objects of the jobs ``groups[g]`` (positions in
        this call)."""
        out = self.train(*call)
        ups = [
            Update(
                delta=res.delta,
                weight=float(res.num_examples),
                client_id=str(cid),
                base_version=version,
                metrics=res.metrics,
            )
            for (res, _), cid in zip(out, client_ids, strict=True)
        ]
        meta = [(st, dict(res.metrics), int(res.num_examples), dict(res.extra)) for res, st in out]
        return (meta, *[[ups[i] for i in g] for g in groups])


def assign_jobs(
    keys: Sequence[int], workers: int, held: Sequence[Any], held_bytes: Sequence[int]
) -> list[list[int]]:
    """Job positions per worker: at most ``ceil(n / workers)`` each; a job goes to the first
    worker caching its key (``key in held[w]``) that has room, else to the least loaded worker
    (ties: the one caching the fewest bytes, then the lowest index)."""
    n = len(keys)
    cap = max(1, math.ceil(n / workers))
    out: list[list[int]] = [[] for _ in range(workers)]
    for i, k in enumerate(keys):
        w = next((w for w in range(workers) if k in held[w] and len(out[w]) < cap), None)
        if w is None:
            w = min(range(workers), key=lambda v: (len(out[v]), held_bytes[v], v))
        out[w].append(i)
    return out


class RayExecutor:
    """Runs client training on ``workers`` long-lived Ray actors (see the module docstring).

    Connects to ``address`` (a running cluster) or starts a local Ray instance with ``workers``
    CPUs, unless Ray is already initialised in this process. Each actor reserves ``num_cpus``
    and caches at most ``cache_bytes`` of client data; actors that cannot all start within
    ``start_timeout`` seconds (a cluster too small) raise :class:`ConfigError`. ``node_ids``
    holds each actor's Ray node. :meth:`close` kills the actors and shuts down a Ray instance
    this executor started.
    """

    def __init__(
        self,
        workers: int = 2,
        address: str | None = None,
        *,
        num_cpus: float = 1.0,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        start_timeout: float | None = 120.0,
    ) -> None:
        if workers < 1:
            raise ConfigError("workers must be >= 1")
        if num_cpus < 0 or cache_bytes < 0:
            raise ConfigError("num_cpus and cache_bytes must be >= 0")
        self.workers = workers
        self.cache_bytes = cache_bytes
        self._ray, self._owned = init_ray(address, workers)
        # the driver's mirror of the actors' caches
        self._ids: dict[int, tuple[Any, int]] = {}  # id(obj) -> (obj, key); obj kept alive
        self._id_of: dict[int, int] = {}  # key -> id(obj)
        self._holders: dict[int, int] = {}  # key -> how many actors hold it
        self._pinned: list[set[int]] = [set() for _ in range(workers)]  # algorithms, models
        self._lru: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(workers)]
        self._lru_bytes = [0] * workers
        self._next_key = 0
        self.shipped = 0  # data objects sent so far (cache misses), for tests and diagnostics
        ray = self._ray
        actor = ray.remote(SimWorker)
        self.actors: list[Any] = [actor.options(num_cpus=num_cpus).remote() for _ in range(workers)]
        try:  # wait for the actors: a cluster too small for them would hang the first dispatch
            self.node_ids: list[str] = ray.get(
                [a.node_id.remote() for a in self.actors], timeout=start_timeout
            )
        except ray.exceptions.GetTimeoutError as e:
            cpus = ray.cluster_resources().get("CPU", 0)
            self.close()
            raise ConfigError(
                f"{workers} Ray workers of {num_cpus} CPU did not start within {start_timeout} s "
                f"(the cluster has {cpus} CPUs); use fewer workers or a smaller num_cpus"
            ) from e

    # -- the driver's cache mirror ------------------------------------------------------------
    def _key(self, obj: Any) -> int:
        hit = self._ids.get(id(obj))
        if hit is not None and hit[0] is obj:
            return hit[1]
        k = self._next_key
        self._next_key += 1
        self._ids[id(obj)] = (obj, k)
        self._id_of[k] = id(obj)
        self._holders[k] = 0
        return k

    def _obj(self, key: int) -> Any:
        return self._ids[self._id_of[key]][0]

    def _release(self, key: int) -> None:
        self._holders[key] -= 1
        if self._holders[key] == 0:
            del self._holders[key]
            del self._ids[self._id_of.pop(key)]

    def _plan(
        self, w: int, alg_key: int, model_key: int, data_keys: Sequence[int]
    ) -> tuple[list[tuple[int, Any]], list[int]]:
        """What worker ``w`` must receive and evict to run a call on these keys."""
        ship: list[tuple[int, Any]] = []
        for k in (alg_key, model_key):
            if k not in self._pinned[w]:
                self._pinned[w].add(k)
                self._holders[k] += 1
                ship.append((k, self._obj(k)))
        lru = self._lru[w]
        sent = {k for k, _ in ship}
        for k in data_keys:
            if k in lru:
                lru.move_to_end(k)
            elif k not in self._pinned[w] and k not in sent:
                nb = data_nbytes(self._obj(k))
                lru[k] = nb
                self._lru_bytes[w] += nb
                self._holders[k] += 1
                ship.append((k, self._obj(k)))
                sent.add(k)
                self.shipped += 1
        evict: list[int] = []
        needed = set(data_keys)
        for k in list(lru):
            if self._lru_bytes[w] <= self.cache_bytes:
                break
            if k in needed:
                continue
            self._lru_bytes[w] -= lru.pop(k)
            evict.append(k)
            self._release(k)
        return ship, evict

    def _run(self, jobs: Jobs, call: Callable[[Any, list[int], tuple[Any, ...]], Any]) -> list[Any]:
        """Spread ``jobs`` over the workers: ``call(actor, idx, args)`` starts worker training
        of the jobs ``idx`` (positions in ``jobs``) on ``args`` (:meth:`SimWorker.train`'s) and
        returns a reference to a list of one result per job. Returns the results in dispatch
        order."""
        p_ref = self._ray.put(jobs.params)
        alg_key, model_key = self._key(jobs.algorithm), self._key(jobs.model)
        keys = [self._key(d) for d in jobs.datas]
        plan = assign_jobs(keys, self.workers, self._lru, self._lru_bytes)
        calls: list[tuple[list[int], Any]] = []
        for w, idx in enumerate(plan):
            if not idx:
                continue
            ship, evict = self._plan(w, alg_key, model_key, [keys[i] for i in idx])
            args = (ship, evict, alg_key, model_key, p_ref, [keys[i] for i in idx],
                    [jobs.rngs[i] for i in idx], [jobs.epochs[i] for i in idx],
                    [jobs.states[i] for i in idx], jobs.server_state,
                    None if jobs.tasks is None else [jobs.tasks[i] for i in idx])  # fmt: skip
            calls.append((idx, call(self.actors[w], idx, args)))
        out: list[Any] = [None] * len(jobs.datas)
        for (idx, _), chunk in zip(calls, self._ray.get([f for _, f in calls]), strict=True):
            for i, res in zip(idx, chunk, strict=True):
                out[i] = res
        return out

    # -- the executor protocol ----------------------------------------------------------------
    def train(
        self,
        algorithm: Any,
        model: Any,
        params: dict[str, Arr],
        datas: Sequence[Any],
        rngs: Sequence[np.random.Generator],
        epochs: Sequence[int],
        states: Sequence[Any],
        server_state: Any,
        tasks: Sequence[Any] | None = None,
    ) -> list[tuple[Any, Any]]:
        jobs = Jobs(algorithm, model, params, datas, rngs, epochs, states, server_state, tasks)
        return self._run(jobs, lambda actor, idx, args: actor.train.remote(*args))

    def train_to_updates(
        self,
        jobs: Jobs,
        *,
        client_ids: Sequence[str],
        version: int | None,
        route: Sequence[int],
    ) -> tuple[list[tuple[Any, dict[str, float], int, dict[str, Any]]], list[list[Any]]]:
        """Train ``jobs`` (:meth:`train`'s arguments) and keep the updates in Ray's object store.

        ``route[i]`` is the destination (e.g. a tree leaf) of job ``i``'s update. Returns each
        job's ``(new_state, metrics, num_examples, extra)`` in dispatch order, and per
        destination the object references of lists of updates for it, in worker order.
        """
        n = len(jobs.datas)
        if len(route) != n or len(client_ids) != n:
            raise ConfigError("route and client_ids need one entry per job")
        dests = max(route, default=-1) + 1
        per_dest: list[list[Any]] = [[] for _ in range(dests)]

        def call(actor: Any, idx: list[int], args: tuple[Any, ...]) -> Any:
            groups = [[p for p, i in enumerate(idx) if route[i] == d] for d in range(dests)]
            used = [d for d in range(dests) if groups[d]]
            refs = actor.train_to_updates.options(num_returns=1 + len(used)).remote(
                [client_ids[i] for i in idx], version, [groups[d] for d in used], *args
            )
            for d, r in zip(used, refs[1:], strict=True):
                per_dest[d].append(r)
            return refs[0]

        return self._run(jobs, call), per_dest

    def close(self) -> None:
        if self._ray.is_initialized():
            for a in self.actors:
                self._ray.kill(a)
        self.actors = []
        self._ids.clear()
        self._id_of.clear()
        self._holders.clear()
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()
        self._owned = False
