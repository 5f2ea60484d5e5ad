"""The named asynchronous policies as settings of :class:`~fedagg.policy.AsyncPolicy`:
FedBuff, FedFix, async FedAvg, FedAsync and sync FedAvg (see :mod:`fedagg.policy._async` for
the mechanism and the table of papers)."""

from __future__ import annotations

from typing import Literal

from fedagg.core.staleness import Staleness, constant, fedbuff_staleness
from fedagg.core.strategy import Strategy
from fedagg.errors import ConfigError
from fedagg.policy._async import AsyncPolicy, Restart

__all__ = ["async_fedavg", "fedasync", "fedbuff", "fedfix", "sync_fedavg"]

Weights = Literal["identical", "unbiased"]
BufferWeights = Literal["identical", "unbiased", "examples"]


def fedbuff(
    strategy: Strategy,
    rounds: int,
    buffer: int = 10,
    concurrency: int | None = None,
    *,
    staleness: Staleness | None = None,
    restart: Restart = "arrival",
    weights: BufferWeights = "identical",
    max_staleness: int | None = None,
) -> AsyncPolicy:
    """FedBuff (Nguyen et al., AISTATS 2022): fold ``s(tau_i) delta_i`` into a buffer and
    step the server optimizer (any: FedBuff + FedAdam is ``fedbuff(fedadam(), ...)``) every
    ``buffer`` updates.

    ``weights`` sets what the step adds:

    * ``"identical"`` (default; the paper's Algorithm 1): ``sum_i s(tau_i) delta_i / K``, K
      the updates in the buffer (fewer than ``buffer`` only if it closes early because
      nobody is training any more);
    * ``"examples"``: weighted by sample count, ``sum_i s(tau_i) n_i delta_i / sum_i n_i``;
    * ``"unbiased"``: ``p_i / freq_i`` with ``p_i = 1/N`` (Fraboni et al.), divided by N.
    """
    s = fedbuff_staleness() if staleness is None else staleness
    _check_weights(weights, ("identical", "unbiased", "examples"))
    unbiased = weights == "unbiased"
    return AsyncPolicy(
        strategy,
        rounds,
        trigger="buffer",
        buffer=buffer,
        concurrency=concurrency,
        restart=restart,
        staleness=s,
        base="examples" if weights == "examples" else "uniform",
        normalize="clients" if unbiased else "participants",
        correction="frequency" if unbiased else "none",
        max_staleness=max_staleness,
    )


def fedfix(
    strategy: Strategy,
    rounds: int,
    window: float,
    *,
    weights: Weights = "unbiased",
    concurrency: int | None = None,
) -> AsyncPolicy:
    """FedFix-dt (Fraboni et al., JMLR 2023): every ``window`` of virtual time, aggregate the
    clients that finished in it with ``p_i = 1/N`` (``identical``) or ``p_i ceil(tau_i / dt)``
    (``unbiased``, so ``E[omega_i] = p_i``), and send the new model to exactly them."""
    _check_weights(weights)
    return AsyncPolicy(
        strategy,
        rounds,
        trigger="window",
        window=window,
        concurrency=concurrency,
        restart="step",
        base="uniform",
        normalize="clients",
        correction="windows" if weights == "unbiased" else "none",
    )


def async_fedavg(
    strategy: Strategy,
    rounds: int,
    *,
    weights: Weights = "identical",
    concurrency: int | None = None,
    staleness: Staleness | None = None,
) -> AsyncPolicy:
    """Asynchronous FedAvg: a server step at every arrival, ``omega = 1`` (``identical``) or
    ``p_i / freq_i`` with ``p_i = 1/N`` (``unbiased``)."""
    _check_weights(weights)
    unbiased = weights == "unbiased"
    return AsyncPolicy(
        strategy,
        rounds,
        trigger="arrival",
        concurrency=concurrency,
        restart="arrival",
        staleness=constant() if staleness is None else staleness,
        base="uniform",
        normalize="clients" if unbiased else "participants",
        correction="frequency" if unbiased else "none",
    )


def fedasync(
    strategy: Strategy,
    rounds: int,
    alpha: float = 0.6,
    *,
    staleness: Staleness | None = None,
    concurrency: int | None = None,
    max_staleness: int | None = None,
) -> AsyncPolicy:
    """FedAsync (Xie et al. 2019): on every arrival ``x <- (1 - a) x + a x_new`` with
    ``a = alpha * s(staleness)``; ``x_new`` is the client's model (its base plus delta)."""
    return AsyncPolicy(
        strategy,
        rounds,
        trigger="arrival",
        concurrency=concurrency,
        restart="arrival",
        staleness=constant() if staleness is None else staleness,
        base="uniform",
        mixing=alpha,
        max_staleness=max_staleness,
    )


def sync_fedavg(strategy: Strategy, rounds: int, clients_per_round: int) -> AsyncPolicy:
    """Synchronous FedAvg as the special case of the general form: a buffer of all the
    ``clients_per_round`` clients training, who all restart with the new model."""
    return AsyncPolicy(
        strategy,
        rounds,
        trigger="buffer",
        buffer=clients_per_round,
        concurrency=clients_per_round,
        restart="step",
    )


def _check_weights(weights: str, valid: tuple[str, ...] = ("identical", "unbiased")) -> None:
    if weights not in valid:
        names = ", ".join(repr(v) for v in valid[:-1]) + f" or {valid[-1]!r}"
        raise ConfigError(f"weights must be {names}, not {weights!r}")
