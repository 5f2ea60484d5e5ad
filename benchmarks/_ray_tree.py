"""An aggregation tree whose nodes are Ray actors (the optional extra ``ray``): a baseline kept
with the benchmarks (no product path runs it; tested in ``tests/hierarchy/test_ray.py``).

Every node is an :class:`AggregatorNode` actor holding one partial monoid state. Updates are
folded at the leaves (:meth:`RayTree.submit`); an update may be passed as an object reference
(``ray.put``, or the output of a simulation worker actor, see :func:`train_round`), which Ray
resolves in the leaf's process: large numpy arrays come out of the node's shared-memory object
store as read-only zero-copy views, and the update never passes through the driver.

:meth:`RayTree.finalize` flushes bottom-up: every leaf sends its state to its parent, each parent
merges its children's states in child order (a fixed order, so the result is deterministic) and
sends the merge up; the root finalizes and only the aggregated delta comes back. Only the
references travel through the driver, the states go from actor to actor.

Placement: the root is placed by Ray; every other node is created after its parent, with a
*soft* node affinity to the parent's node (see :func:`placement_options`), so a subtree stays on
one machine when it can and spills over when it cannot. Nodes reserve ``num_cpus`` (0 by
default: they are mostly idle and must not starve the training workers).

A node that died (killed, out of memory, lost machine) makes the call raise :class:`NodeLost`
instead of hanging; a refused update raises its :class:`~fedagg.errors.UpdateError` at the
caller and leaves the leaf's state as it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.core.aggregate import Aggregator
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.core.update import Update
from fedagg.errors import ConfigError, FedaggError, StateError, UpdateError
from fedagg.jobs import Jobs, init_ray

__all__ = [
    "AggregatorNode",
    "NodeLost",
    "RayTree",
    "RoundResult",
    "placement_options",
    "train_round",
    "tree_aggregate",
    "tree_shape",
]

Arr = npt.NDArray[Any]


class NodeLost(StateError):
    """A node actor of a :class:`RayTree` died or did not answer in time: its partial state is
    lost, so the round's aggregate cannot be computed."""


# --------------------------------------------------------------------------------------------
# The node actor
# --------------------------------------------------------------------------------------------

#: A refused update as it travels back from a node: (class, client_id, reason) for an
#: UpdateError, (class, message) for another FedaggError. Exceptions with a custom __init__
#: do not survive pickling, so they are rebuilt on the driver.
ErrorInfo = tuple[Any, ...]


def _error_info(e: FedaggError) -> ErrorInfo:
    if isinstance(e, UpdateError):
        return (type(e), e.client_id, e.reason)
    return (type(e), str(e))


def _rebuild(info: ErrorInfo) -> FedaggError:
    cls: Any = info[0]
    err: FedaggError = cls(*info[1:])
    return err


class AggregatorNode:
    """One node of the tree (run as a Ray actor): a partial state of ``aggregator``."""

    def __init__(
        self, aggregator: Aggregator[Any], spec: ParamSpec, version: int | None, index: int
    ) -> None:
        self.aggregator = aggregator
        self.spec = spec
        self.index = index
        self.version = version
        self.state = aggregator.init(spec, version=version)

    def node_id(self) -> str:
        """The id of the Ray node (machine) this actor runs on."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def fold_each(self, updates: Update | Sequence[Update]) -> list[tuple[int, ErrorInfo]]:
        """Fold updates one at a time; returns the refused ones as ``(position, error)`` (each
        refusal leaves the state as it was, the others are folded)."""
        ups = [updates] if isinstance(updates, Update) else list(updates)
        refused: list[tuple[int, ErrorInfo]] = []
        for i, u in enumerate(ups):
            try:
                if not isinstance(u, Update):
                    raise ConfigError(f"a tree node folds Update objects, not {type(u).__name__}")
                self.aggregator.fold(self.state, u)
            except FedaggError as e:
                refused.append((i, _error_info(e)))
        return refused

    def flush(self, *children: Any) -> Any:
        """This node's state merged with its children's (in the given order); the node's own
        state is not changed, so a flush can be repeated."""
        if not children:
            return self.state
        out = self.aggregator.init(self.spec, version=self.version)
        self.aggregator.merge(out, self.state)
        for c in children:
            self.aggregator.merge(out, c)
        return out

    def finalize_flat(self, *children: Any) -> Arr | ErrorInfo:
        """The aggregated delta of this subtree as one flat buffer (or why there is none)."""
        try:
            return self.aggregator.finalize_flat(self.flush(*children))
        except FedaggError as e:
            return _error_info(e)

    def count(self) -> int:
        return self.aggregator.count(self.state)

    def reset(self, version: int | None) -> None:
        """Start a new round: an empty state for model ``version``."""
        self.version = version
        self.state = self.aggregator.init(self.spec, version=version)


# --------------------------------------------------------------------------------------------
# Shape and placement (pure functions)
# --------------------------------------------------------------------------------------------


def tree_shape(fanout: int, depth: int | None = None, leaves: int | None = None) -> list[int]:
    """Nodes per level, root first. ``depth`` levels of a full ``fanout``-ary tree
    (``fanout**(depth-1)`` leaves), or the shallowest tree over ``leaves`` leaves where each
    level has ``ceil(below / fanout)`` nodes."""
    if fanout < 1 or isinstance(fanout, bool):
        raise ConfigError(f"fanout must be >= 1, got {fanout!r}")
    if (depth is None) == (leaves is None):
        raise ConfigError("give exactly one of depth and leaves")
    if depth is not None:
        if depth < 1:
            raise ConfigError(f"depth must be >= 1, got {depth}")
        if fanout == 1 and depth > 1:
            raise ConfigError("fanout 1 makes a chain; use depth=1")
        return [fanout**k for k in range(depth)]
    assert leaves is not None
    if leaves < 1:
        raise ConfigError(f"leaves must be >= 1, got {leaves}")
    if fanout == 1 and leaves > 1:
        raise ConfigError("fanout must be >= 2 for more than one leaf")
    sizes = [leaves]
    while sizes[-1] > 1:
        sizes.append(math.ceil(sizes[-1] / fanout))
    return sizes[::-1]


def placement_options(parent_node_id: str | None, num_cpus: float = 0.0) -> dict[str, Any]:
    """Ray actor options for a tree node whose parent runs on Ray node ``parent_node_id``
    (``None`` for the root): soft affinity to that node, i.e. there if it has room, elsewhere
    otherwise."""
    opts: dict[str, Any] = {"num_cpus": num_cpus}
    if parent_node_id is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            node_id=parent_node_id, soft=True
        )
    return opts


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------


class RayTree:
    """A tree of :class:`AggregatorNode` actors computing ``aggregator`` over ``spec``.

    Give ``depth`` (levels, root included: ``fanout**(depth-1)`` leaves) or ``leaves``. Leaves
    are numbered ``0 .. leaves-1``; nodes are numbered level by level from the root (node 0).
    Connects to ``address`` or starts a local Ray instance unless Ray is already running (one
    it started is shut down by :meth:`close`). ``timeout`` (seconds, None: no limit) bounds
    every wait on the actors.
    """

    def __init__(
        self,
        aggregator: Aggregator[Any],
        spec: ParamSpec,
        *,
        fanout: int = 2,
        depth: int | None = None,
        leaves: int | None = None,
        version: int | None = None,
        address: str | None = None,
        num_cpus: float = 0.0,
        timeout: float | None = None,
    ) -> None:
        if not aggregator.decomposable:
            raise ConfigError("a tree needs a decomposable aggregator (an exact merge)")
        self.aggregator = aggregator
        self.spec = spec
        self.version = version
        self.timeout = timeout
        self.shape = tree_shape(fanout, depth, leaves)
        self._ray, self._owned = init_ray(address, None)
        # structure: node ids level by level; parent of node i, children of node i
        self.levels: list[list[int]] = []
        self.parent: list[int | None] = []
        self.children: list[list[int]] = []
        n = 0
        for lvl, size in enumerate(self.shape):
            self.levels.append(list(range(n, n + size)))
            for j in range(size):
                self.children.append([])
                if lvl == 0:
                    self.parent.append(None)
                    continue
                above = self.levels[lvl - 1]
                # contiguous groups: child j of this level belongs to parent j // fanout
                # (for a `leaves` tree, levels above have ceil(size / fanout) nodes)
                p = above[min(j // fanout, len(above) - 1)]
                self.parent.append(p)
                self.children[p].append(n + j)
            n += size
        actor = self._ray.remote(AggregatorNode)
        self._pending: list[tuple[int, Any]] = []  # (leaf, fold result) not yet checked
        self.actors: list[Any] = [None] * n
        self.node_ids: list[str] = [""] * n
        try:
            for level in self.levels:  # each level after its parents, next to them
                for i in level:
                    up = self.parent[i]
                    opts = placement_options(None if up is None else self.node_ids[up], num_cpus)
                    self.actors[i] = actor.options(**opts).remote(aggregator, spec, version, i)
                ids = self._get([self.actors[i].node_id.remote() for i in level], "start")
                for i, nid in zip(level, ids, strict=True):
                    self.node_ids[i] = nid
        except BaseException:
            self.close()
            raise

    # -- structure ----------------------------------------------------------------------------
    @property
    def leaves(self) -> int:
        return self.shape[-1]

    def leaf_node(self, leaf: int) -> int:
        """The node index of leaf ``leaf``."""
        if not 0 <= leaf < self.leaves:
            raise ConfigError(f"leaf must be in [0, {self.leaves}), got {leaf}")
        return self.levels[-1][leaf]

    # -- waiting on actors --------------------------------------------------------------------
    def _get(self, refs: Any, what: str) -> Any:
        ray = self._ray
        try:
            return ray.get(refs, timeout=self.timeout)
        except ray.exceptions.GetTimeoutError as e:
            raise NodeLost(f"tree {what}: no answer from a node within {self.timeout} s") from e
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
            raise NodeLost(f"tree {what}: a node actor died ({type(e).__name__}: {e})") from e

    # -- folding ------------------------------------------------------------------------------
    def submit(self, leaf: int, update: Any) -> None:
        """Fold ``update`` (an :class:`Update`, or an object reference to one) at ``leaf`` and
        wait: a refused update raises its :class:`UpdateError` here (the tree is unchanged)."""
        refused = self._get(self.actors[self.leaf_node(leaf)].fold_each.remote(update), "submit")
        if refused:
            raise _rebuild(refused[0][1])

    def submit_async(self, leaf: int, updates: Any) -> None:
        """Queue ``updates`` (an :class:`Update`, a list of them, or an object reference to
        either) for ``leaf`` without waiting. Updates sent to a leaf are folded in the order
        they were submitted; refusals are reported by :meth:`drain`."""
        self._pending.append((leaf, self.actors[self.leaf_node(leaf)].fold_each.remote(updates)))

    def drain(self) -> list[UpdateError]:
        """Wait for the queued submissions; the updates they refused (none were folded)."""
        pending, self._pending = self._pending, []
        results = self._get([r for _, r in pending], "fold")
        out: list[UpdateError] = []
        for refused in results:
            for _, info in refused:
                err = _rebuild(info)
                if not isinstance(err, UpdateError):
                    raise err
                out.append(err)
        return out

    # -- reducing -----------------------------------------------------------------------------
    def _flush_refs(self) -> Any:
        """Submit the bottom-up flush; the root's finalize reference."""
        refs: list[Any] = [None] * len(self.actors)
        for level in reversed(self.levels[1:]):
            for i in level:
                refs[i] = self.actors[i].flush.remote(*[refs[c] for c in self.children[i]])
        return self.actors[0].finalize_flat.remote(*[refs[c] for c in self.children[0]])

    def finalize_flat(self) -> Arr:
        """Flush bottom-up and finalize at the root: the aggregated delta, flat. Raises the
        first refusal of queued submissions (see :meth:`submit_async`) if any was not drained;
        the state does not include the refused updates, and a second call gives the result."""
        refused = self.drain()
        if refused:
            raise refused[0]
        out = self._get(self._flush_refs(), "finalize")
        if isinstance(out, tuple):
            raise _rebuild(out)
        return np.array(out)  # writable, owned by the caller

    def finalize(self) -> ArrayTree:
        """:meth:`finalize_flat`, shaped like the spec."""
        return self.spec.unflatten(self.finalize_flat())

    def count(self) -> int:
        """Updates folded in this round, over all leaves (after the queued submissions)."""
        counts = self._get([self.actors[i].count.remote() for i in self.levels[-1]], "count")
        return int(sum(counts))

    def reset(self, version: int | None = None) -> None:
        """A new round (for model ``version``) on the same actors; queued submissions are
        discarded after they ran."""
        self._pending = []
        self._get([a.reset.remote(version) for a in self.actors], "reset")
        self.version = version

    def close(self) -> None:
        """Kill the node actors; shut Ray down if this tree started it."""
        if self._ray.is_initialized():
            for a in self.actors:
                if a is not None:
                    self._ray.kill(a)
        self.actors = []
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()
        self._owned = False

    def __enter__(self) -> RayTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Convenience: a one-shot tree reduction, and a simulated round on Ray
# --------------------------------------------------------------------------------------------


def tree_aggregate(
    updates_by_leaf: Sequence[Iterable[Any]],
    aggregator: Aggregator[Any],
    spec: ParamSpec,
    *,
    fanout: int = 2,
    version: int | None = None,
) -> ArrayTree:
    """Aggregate ``updates_by_leaf[j]`` (updates or object references) at leaf ``j`` of a
    temporary :class:`RayTree` and return the finalized delta. Raises the first refusal."""
    with RayTree(aggregator, spec, fanout=fanout, leaves=len(updates_by_leaf),
                 version=version) as tree:  # fmt: skip
        for j, ups in enumerate(updates_by_leaf):
            for u in ups:
                tree.submit_async(j, u)
        return tree.finalize()


@dataclass(slots=True)
class RoundResult:
    """What :func:`train_round` returns; lists are in dispatch order."""

    delta: ArrayTree | None  # None when every update was refused
    states: list[Any]
    metrics: list[dict[str, float]]
    num_examples: list[int]
    extra: list[dict[str, Any]]
    refused: list[UpdateError] = field(default_factory=list)


def train_round(
    executor: Any,
    tree: RayTree,
    algorithm: Any,
    model: Any,
    params: dict[str, Arr],
    datas: Sequence[Any],
    rngs: Sequence[np.random.Generator],
    epochs: Sequence[int],
    states: Sequence[Any],
    server_state: Any,
    *,
    client_ids: Sequence[str],
    version: int | None = None,
) -> RoundResult:
    """One synchronous round on Ray: ``executor`` (the simulator's Ray executor, or anything
    with its ``train_to_updates``) trains the clients on its worker actors, each update goes
    from its worker to a leaf through the object store (client ``i`` of ``n`` to leaf
    ``i * leaves // n``, a contiguous split), and the tree reduces. The tree is reset to
    ``version`` first. Refused updates are reported, not raised."""
    tree.reset(version)
    n = len(datas)
    route = [i * tree.leaves // max(1, n) for i in range(n)]
    jobs = Jobs(algorithm, model, params, datas, rngs, epochs, states, server_state)
    meta, per_leaf = executor.train_to_updates(
        jobs, client_ids=client_ids, version=version, route=route
    )
    for leaf, refs in enumerate(per_leaf):
        for r in refs:
            tree.submit_async(leaf, r)
    refused = tree.drain()
    delta = tree.finalize() if len(refused) < n else None
    return RoundResult(
        delta=delta,
        states=[m[0] for m in meta],
        metrics=[m[1] for m in meta],
        num_examples=[m[2] for m in meta],
        extra=[m[3] for m in meta],
        refused=refused,
    )
