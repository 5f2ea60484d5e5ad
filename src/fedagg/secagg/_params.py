"""A secure round's public parameters, as the server sends them to every client at stage 0.

:class:`RoundParams` is everything a client needs to take part: the round (its id, the client
ids, the graph seed, degree and threshold: :meth:`RoundParams.config`) and the encoding of its
update (clip, bits, rotation seed, weight cap: :meth:`RoundParams.encoder`). It travels as
bytes (:meth:`RoundParams.to_bytes` / :meth:`RoundParams.from_bytes`: a fixed big-endian
layout, every field checked, no pickle; a distributed-DP round appends its noise: kind,
noise multiplier, expected clients); a malformed or inconsistent one raises
:class:`~fedagg.errors.SecAggError`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

from fedagg.errors import ConfigError, SecAggError
from fedagg.secagg._encode import Encoder
from fedagg.secagg._messages import RoundConfig
from fedagg.secagg._prg import MAX_WORDS

__all__ = ["MAX_CLIENTS", "RoundParams"]

#: Client ids are below 2**32 on the wire.
MAX_CLIENTS = (1 << 32) - 1
_MAX_SEED = 64
#: round_id, dim, d, degree, threshold, clip, bits, max_weight, chunk, has rotation
_HEAD = struct.Struct(">QQQIIdBdIB")
#: the distributed-DP trailer: noise kind (1 gaussian, 2 skellam), noise multiplier, clients
_NOISE = struct.Struct(">BdI")
_KINDS = ("", "gaussian", "skellam")


def _int(name: str, v: Any, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")


def _real(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")


@dataclass(frozen=True)
class RoundParams:
    """The public parameters of one secure round (module docs).

    ``ids`` are the round's client ids (sorted, distinct, >= 1: Shamir abscissae), ``d`` the
    update's length and ``dim`` its encoded length (``encoder().length(d)``: the weight rides
    as the last element), ``degree``/``threshold`` the effective ``k``/``t`` (as
    :class:`RoundConfig` resolves them), ``clip``/``bits``/``rotation`` the :class:`Encoder`'s
    (``rotation``: None or the round's public seed) for ``len(ids)`` clients, ``max_weight``
    the public weight cap (a weight w is encoded as ``min(w, max_weight) / max_weight``) and
    ``chunk`` the words the server unmasks at a time. ``noise``/``noise_multiplier``/
    ``noise_clients``: distributed DP (the :class:`Encoder`'s; every weight is then 1)."""

    round_id: int
    ids: tuple[int, ...]
    dim: int
    d: int
    graph_seed: bytes
    degree: int
    threshold: int
    clip: float
    bits: int = 32
    rotation: int | None = None
    max_weight: float = 1.0
    chunk: int = 1 << 16
    noise: str = ""
    noise_multiplier: float = 0.0
    noise_clients: int = 1
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _int("round_id", self.round_id, 0, (1 << 64) - 1)
        ids = tuple(self.ids)
        if len(ids) < 2 or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise ConfigError(f"ids must be >= 2 client ids, got {self.ids!r}")
        if list(ids) != sorted(set(ids)) or ids[0] < 1 or ids[-1] > MAX_CLIENTS:
            raise ConfigError("ids must be distinct, sorted, in [1, 2**32 - 1]")
        object.__setattr__(self, "ids", ids)
        _int("d", self.d, 1, MAX_WORDS)
        _int("dim", self.dim, 2, MAX_WORDS)
        if not isinstance(self.graph_seed, bytes) or not 1 <= len(self.graph_seed) <= _MAX_SEED:
            raise ConfigError(f"graph_seed must be 1 to {_MAX_SEED} bytes")
        _int("degree", self.degree, 1, MAX_CLIENTS)
        _int("threshold", self.threshold, 1, MAX_CLIENTS)
        _real("clip", self.clip)
        _int("bits", self.bits, 1, 32)
        _real("max_weight", self.max_weight)
        _int("chunk", self.chunk, 1, MAX_CLIENTS)
        enc = self._encoder(len(ids))  # checks rotation and noise
        if self.dim != enc.length(self.d):
            raise ConfigError(f"dim {self.dim} is not the encoded length {enc.length(self.d)}")
        cfg = RoundConfig(
            self.round_id, ids, self.dim, self.graph_seed, self.degree, self.threshold, self.chunk
        )
        if (cfg.degree, cfg.threshold) != (self.degree, self.threshold):
            raise ConfigError(
                f"degree/threshold ({self.degree}, {self.threshold}) are not the effective "
                f"({cfg.degree}, {cfg.threshold}) of the round's graph"
            )
        self._cache["encoder"] = enc
        self._cache["config"] = cfg

    def _encoder(self, n: int) -> Encoder:
        if not self.noise:
            return Encoder(float(self.clip), self.bits, n, self.rotation)
        return Encoder(
            float(self.clip), self.bits, n, self.rotation, self.noise,
            float(self.noise_multiplier), self.noise_clients, self.d,
        )  # fmt: skip

    @classmethod
    def make(
        cls,
        round_id: int,
        ids: tuple[int, ...],
        d: int,
        graph_seed: bytes,
        *,
        degree: int = 0,
        threshold: int = 0,
        clip: float = 10.0,
        bits: int = 32,
        rotation: int | None = None,
        max_weight: float = 1.0,
        chunk: int = 1 << 16,
        noise: str = "",
        noise_multiplier: float = 0.0,
        noise_clients: int = 1,
    ) -> RoundParams:
        """The parameters of a round, ``degree``/``threshold`` 0 meaning the defaults
        (:func:`~fedagg.secagg.default_degree`, :func:`~fedagg.secagg.default_threshold`) and
        ``dim`` computed from ``d``."""
        ids = tuple(sorted(ids))
        dim = Encoder(float(clip), bits, len(ids), rotation).length(d)
        cfg = RoundConfig(round_id, ids, dim, graph_seed, degree, threshold, chunk)
        return cls(
            round_id, ids, dim, d, graph_seed, cfg.degree, cfg.threshold, float(clip), bits,
            rotation, float(max_weight), chunk, noise, float(noise_multiplier), noise_clients,
        )  # fmt: skip

    def encoder(self) -> Encoder:
        """The round's :class:`Encoder` (for ``len(ids)`` clients)."""
        enc: Encoder = self._cache["encoder"]
        return enc

    def config(self) -> RoundConfig:
        """The round's :class:`RoundConfig` (the protocol's view, graph included)."""
        cfg: RoundConfig = self._cache["config"]
        return cfg

    def weight(self, w: float) -> float:
        """The encoded weight of a client weight ``w``: ``min(w, max_weight) / max_weight``."""
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0:
            raise SecAggError(f"a client weight must be a finite number > 0, got {w!r}")
        if self.noise:
            return 1.0  # distributed DP: uniform weights (bounded sensitivity)
        return min(float(w), float(self.max_weight)) / float(self.max_weight)

    # -- bytes --------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        rot = self.rotation
        head = _HEAD.pack(
            self.round_id, self.dim, self.d, self.degree, self.threshold, float(self.clip),
            self.bits, float(self.max_weight), self.chunk, 0 if rot is None else 1,
        )  # fmt: skip
        out = [head]
        if rot is not None:
            out.append(rot.to_bytes(32, "big"))
        out.append(len(self.graph_seed).to_bytes(1, "big") + self.graph_seed)
        out.append(len(self.ids).to_bytes(4, "big"))
        out.append(b"".join(i.to_bytes(4, "big") for i in self.ids))
        if self.noise:
            kind = _KINDS.index(self.noise)
            out.append(_NOISE.pack(kind, float(self.noise_multiplier), self.noise_clients))
        return b"".join(out)

    @classmethod
    def from_bytes(cls, raw: bytes) -> RoundParams:
        """The parameters :meth:`to_bytes` wrote; anything else raises :class:`SecAggError`."""
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise SecAggError("round parameters must be bytes")
        raw = bytes(raw)
        if len(raw) < _HEAD.size + 1 + 4:
            raise SecAggError("round parameters are truncated")
        rid, dim, d, k, t, clip, bits, mw, chunk, has_rot = _HEAD.unpack_from(raw)
        o = _HEAD.size
        rot: int | None = None
        if has_rot not in (0, 1):
            raise SecAggError("round parameters: bad rotation flag")
        if has_rot:
            if len(raw) < o + 32:
                raise SecAggError("round parameters are truncated")
            rot = int.from_bytes(raw[o : o + 32], "big")
            o += 32
        if len(raw) < o + 1:
            raise SecAggError("round parameters are truncated")
        n_seed = raw[o]
        seed = raw[o + 1 : o + 1 + n_seed]
        o += 1 + n_seed
        if len(seed) != n_seed or len(raw) < o + 4:
            raise SecAggError("round parameters are truncated")
        n = int.from_bytes(raw[o : o + 4], "big")
        o += 4
        rest = len(raw) - o - 4 * n
        if rest not in (0, _NOISE.size):
            raise SecAggError(
                f"round parameters: {n} client ids need {4 * n} bytes, {len(raw) - o} remain"
            )
        ids = tuple(int.from_bytes(raw[o + 4 * i : o + 4 * i + 4], "big") for i in range(n))
        noise, z, ne = "", 0.0, 1
        if rest:
            kind, z, ne = _NOISE.unpack_from(raw, o + 4 * n)
            if kind not in (1, 2):
                raise SecAggError("round parameters: bad noise kind")
            noise = _KINDS[kind]
        try:
            return cls(rid, ids, dim, d, seed, k, t, clip, bits, rot, mw, chunk, noise, z, ne)
        except ConfigError as e:
            raise SecAggError(f"bad round parameters: {e}") from None
