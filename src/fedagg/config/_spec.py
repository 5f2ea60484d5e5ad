"""Every config key, defined once: its type, default, one-line doc, and where natural its
choices and bounds. :data:`SPEC` is the source of the defaults (``DEFAULTS``), of the
validation in :func:`~fedagg.config.resolve_config`, of :func:`~fedagg.config.json_schema`
and of the reference in ``docs/config.md`` (``python -m fedagg.config docs``).

Types: ``int`` (an integer; an integral float such as ``2.0`` is taken as ``2``, never a
boolean), ``float`` (a number; an integer is taken as a float; ``inf`` only where the
default is ``inf``), ``bool`` (``true``/``false`` only), ``str``, ``list[int]``,
``list[str]``, ``table`` (free-form, checked by its user), ``scalar table`` (values booleans,
numbers or strings) and ``z`` (a formula name or a number).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "AGGREGATORS",
    "REF_PATTERN",
    "SPEC",
    "Key",
    "Kind",
    "Section",
    "boolean",
    "integer",
    "number",
    "string",
]  # fmt: skip

Kind = Literal["int", "float", "bool", "str", "list", "table", "z"]

#: A ``"module:name"`` reference (both parts dotted Python identifiers).
REF_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"  # noqa: E501

#: The built-in ``[strategy] aggregator`` rules (see :func:`fedagg.config.build_aggregator`).
AGGREGATORS = (
    "mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median",
    "centered_clipping", "flag",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Key:
    """One config key. ``kind`` is its type; ``items`` the element type of a list;
    ``values`` the kind every value of a table must have ("" any); ``choices`` a closed set
    of strings (with ``ref``: or a ``"module:name"``); ``ref`` alone: "" or a reference;
    ``noun`` names the thing in "unknown <noun>" errors."""

    kind: Kind
    default: Any
    doc: str
    choices: tuple[str, ...] = ()
    ref: bool = False
    noun: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    items: Key | None = None
    values: str = ""

    @property
    def allow_inf(self) -> bool:
        """A float key takes ``inf`` where its default is ``inf``."""
        return self.kind == "float" and self.default == math.inf

    def type_name(self) -> str:
        """The type as the docs and errors name it (``list[int]``, ``table``...)."""
        if self.kind == "list" and self.items is not None:
            return f"list[{self.items.kind}]"
        if self.kind == "table" and self.values:
            return "table of bool/int/float/str"
        if self.kind == "z":
            return "str or float"
        return self.kind

    def bounds_text(self) -> str:
        """The bounds as ``>= 1``, ``in [0, 1]``, ``> 0``, or ""."""
        lo = (
            (">=", self.minimum) if self.minimum is not None
            else (">", self.exclusive_minimum) if self.exclusive_minimum is not None
            else None
        )  # fmt: skip
        hi = (
            ("<=", self.maximum) if self.maximum is not None
            else ("<", self.exclusive_maximum) if self.exclusive_maximum is not None
            else None
        )  # fmt: skip
        if lo and hi:
            left = "[" if lo[0] == ">=" else "("
            right = "]" if hi[0] == "<=" else ")"
            return f"in {left}{_num(lo[1])}, {_num(hi[1])}{right}"
        if lo:
            return f"{lo[0]} {_num(lo[1])}"
        if hi:
            return f"{hi[0]} {_num(hi[1])}"
        return ""


@dataclass(frozen=True, slots=True)
class Section:
    """A table of keys (and nested sections) with a one-line doc."""

    doc: str
    keys: dict[str, Key | Section] = field(default_factory=dict)


def _num(x: float | None) -> str:
    assert x is not None
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def integer(default: int, doc: str, *, ge: float | None = None, le: float | None = None) -> Key:
    return Key("int", default, doc, minimum=ge, maximum=le)


def number(
    default: float,
    doc: str,
    *,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
) -> Key:
    return Key(
        "float", default, doc, minimum=ge, maximum=le, exclusive_minimum=gt, exclusive_maximum=lt
    )


def boolean(default: bool, doc: str) -> Key:
    return Key("bool", default, doc)


def string(
    default: str, doc: str, *, choices: tuple[str, ...] = (), ref: bool = False, noun: str = ""
) -> Key:
    return Key("str", default, doc, choices=choices, ref=ref, noun=noun)


def _ref(doc: str) -> Key:
    return string("", doc, ref=True)


def _table(doc: str, values: str = "") -> Key:
    return Key("table", {}, doc, values=values)


def _list(item: Key, default: list[Any], doc: str) -> Key:
    return Key("list", default, doc, items=item)


def _dist(kind: str, mean: float, sigma: float, what: str) -> Section:
    return Section(
        f"{what}: a distribution over clients (each client draws its value once)",
        {
            "kind": string(
                kind, "constant (mean), lognormal (mean, sigma) or uniform (low, high)",
                choices=("constant", "lognormal", "uniform"), noun="distribution",
            ),
            "mean": number(mean, "the mean (constant: the value)", ge=0),
            "sigma": number(sigma, "lognormal: the standard deviation of the log", ge=0),
            "low": number(0.0, "uniform: the lower end", ge=0),
            "high": number(0.0, "uniform: the upper end", ge=0),
        },
    )  # fmt: skip


_TOP = {
    "name": string("mnist5k-fedavg", "the run's name (in the run database and plot names)"),
    "seed": integer(0, "the seed of every random stream (data split, sampling, training)", ge=0),
    "rounds": integer(20, "server steps: rounds (sync), or aggregations (async policies)", ge=1),
    "eval_every": integer(1, "evaluate the global model every this many rounds (and at the "
                          "last)", ge=1),
    "eval_train": boolean(False, "also evaluate the loss over every client's training data"),
    "eval_clients": integer(100, "the client-weighted accuracy is measured on at most this "
                            "many of a round's participants (0: none)", ge=0),
    "max_time": number(math.inf, "stop at this virtual time in seconds (an equal time budget "
                       "for comparing policies; inf: no budget)", gt=0),
    "eval_data": string("", "held-out data the server evaluates the global model on every "
                        "eval_every rounds: a .npz file with arrays x and y, or "
                        "\"module:function\" returning (x, y); \"\": the dataset's test split "
                        "(in deployment, \"\" and no [data] dataset: no server-side "
                        "evaluation)"),
    "eval_metrics": _ref("how clients' evaluation metrics are aggregated: \"\" (a mean "
                         "weighted by each client's num_examples) or \"module:function\" "
                         "taking [(num_examples, {metric: value}), ...]"),
    "code_path": string("", "the directory \"module:function\" references are imported from "
                        "first (\"\": the config file's directory, which load_config writes "
                        "here, or the working directory for a config given as a dict)"),
}  # fmt: skip

_DATA = Section("the dataset and how it is split across clients", {
    "name": string("mnist5k", "a bundled dataset, or none: your code loads its own data "
                   "(deployment)", noun="dataset",
                   choices=("digits", "mnist1d", "mnist5k", "synthetic", "none")),
    "num_clients": integer(100, "clients the data is split across", ge=1),
    "partition": string("dirichlet", "how examples are split: dirichlet (alpha), "
                        "label_dirichlet (alpha), shards (shards_per_client), quantity "
                        "(sigma), natural (synthetic only), iid", noun="partition",
                        choices=("dirichlet", "label_dirichlet", "shards", "quantity",
                                 "natural", "iid")),
    "alpha": number(0.5, "Dirichlet concentration (smaller: more skew); synthetic: model "
                    "heterogeneity", ge=0),
    "beta": number(0.5, "synthetic: data heterogeneity", ge=0),
    "iid": boolean(False, "synthetic: identically distributed users"),
    "shards_per_client": integer(2, "shards: label-sorted shards per client", ge=1),
    "sigma": number(1.0, "quantity: the lognormal sigma of client sizes", ge=0),
    "test_fraction": number(0.2, "bundled datasets: the held-out test fraction", ge=0, le=1),
})  # fmt: skip

_MODEL = Section("the model trained", {
    "name": string("logreg", "a built-in model (when no factory or init is given)",
                   choices=("logreg", "mlp"), noun="model"),
    "hidden": _list(integer(64, "", ge=1), [64], "mlp: the hidden layer widths"),
    "init": string("", "initial parameters from a file: .npz, .safetensors, or a torch "
                   "state_dict (read with weights_only=True)"),
    "factory": _ref("\"module:function\" called with args that returns a torch.nn.Module or a "
                    "dict of arrays"),
    "args": _table("keyword arguments of the factory"),
})  # fmt: skip

_CLIENT = Section("local training on each client", {
    "algorithm": string("fedavg", "the built-in client algorithm", noun="client algorithm",
                        choices=("fedavg", "fedprox", "scaffold", "fedamd", "momentum")),
    "epochs": integer(1, "local epochs per task", ge=1),
    "batch_size": integer(10, "local minibatch size", ge=1),
    "lr": number(0.05, "local learning rate", gt=0),
    "mu": number(0.0, "fedprox: the proximal term's weight", ge=0),
    "beta": number(0.9, "momentum: the worker momentum", ge=0, lt=1),
    "steps": integer(0, "fixed local steps per task instead of epochs (0: epochs)", ge=0),
    "anchor_batch": integer(0, "fedamd: the anchors' batch size (0: the full local data)",
                            ge=0),
    "train": _ref("your training code: \"module:function\", train(params, data, task) -> "
                  "fedagg.clients.Result"),
    "evaluate": _ref("your evaluation code: \"module:function\", evaluate(params, data, task) "
                     "-> {metric: value}"),
    "config": _table("per-task client config sent with every task (task.config)", "scalar"),
    "schedule": _ref("\"module:function\", schedule(version, config) -> config: the per-task "
                     "config per round (e.g. an lr schedule)"),
})  # fmt: skip

_STRATEGY = Section("the server strategy: aggregation rule and server optimizer", {
    "name": string("fedavg", "the server optimizer", noun="strategy",
                   choices=("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")),
    "lr": number(1.0, "server learning rate", gt=0),
    "momentum": number(0.9, "fedavgm: server momentum", ge=0, lt=1),
    "beta1": number(0.9, "fedadam/fedyogi/fedadagrad: first-moment decay (fedadagrad with "
                    "flavor \"flower\": Flower's fixed 0)", ge=0, lt=1),
    "beta2": number(0.99, "fedadam/fedyogi: second-moment decay", ge=0, lt=1),
    "tau": number(1e-3, "adaptive optimizers: the adaptivity (epsilon)", gt=0),
    "flavor": string("paper", "which reference the adaptive optimizers match",
                     choices=("paper", "flower"), noun="flavor"),
    "accumulator": string("float32", "the mean's accumulator precision",
                          choices=("float32", "float64"), noun="accumulator"),
    "clip_norm": number(0.0, "clip each update to this L2 norm first (0: no clipping)", ge=0),
    "aggregator": string("mean", "the aggregation rule: a built-in one or \"module:Class\" "
                         "(your aggregator, with aggregator_args)", choices=AGGREGATORS,
                         ref=True, noun="aggregator"),
    "f": integer(0, "robust rules: the Byzantine clients tolerated", ge=0),
    "trim": integer(0, "trimmed_mean: values trimmed at each end (0: f)", ge=0),
    "keep": integer(0, "multi_krum: updates averaged (0: 1)", ge=0),
    "tau_cc": number(100.0, "centered_clipping: the clipping radius", gt=0),
    "iters": integer(1, "centered_clipping: iterations", ge=1),
    "subspace": integer(0, "flag: the subspace dimension (0: automatic)", ge=0),
    "lam": number(0.0, "flag: the regularization", ge=0),
    "spool": string("", "robust rules: a directory updates are spooled to (\"\": in memory)"),
    "aggregator_args": _table("keyword arguments of a custom aggregator (aggregator = "
                              "\"module:Class\")"),
})  # fmt: skip

_BYZANTINE = Section("simulated Byzantine clients", {
    "clients": integer(0, "the first this many clients are Byzantine", ge=0),
    "attack": string("none", "what they send (label_flip: they train on flipped labels)",
                     noun="attack",
                     choices=("none", "sign_flip", "reverse", "gaussian", "alie", "ipm",
                              "min_max", "min_sum", "random", "label_flip")),
    "scale": number(1.0, "sign_flip: the scale of the flipped update"),
    "eps": number(0.1, "ipm: epsilon"),
    "z": Key("z", "paper", "alie: z, a formula (paper, code) or a number",
             choices=("paper", "code"), noun="z formula"),
    "direction": string("unit_vec", "min_max/min_sum: the perturbation direction",
                        choices=("unit_vec", "sign", "std"), noun="direction"),
})  # fmt: skip

_POLICY = Section("when the server aggregates: sync rounds or an async policy", {
    "kind": string("sync", "sync rounds, or an async policy", noun="policy",
                   choices=("sync", "fedbuff", "fedasync", "fedfix", "async", "fedamd")),
    "clients_per_round": integer(10, "clients sampled per round", ge=1),
    "over_select": number(0.0, "sync: sample clients_per_round * (1 + over_select)", ge=0),
    "deadline": number(math.inf, "sync: seconds a round waits for updates (inf: no deadline)",
                       gt=0),
    "min_updates": integer(1, "sync: updates a round needs to close", ge=1),
    "stragglers": number(0.0, "sync: the fraction of clients that are slow each round", ge=0,
                         le=1),
    "straggler_mode": string("drop", "sync: drop stragglers, or take their partial work",
                             choices=("drop", "partial"), noun="straggler mode"),
    "weighting": string("examples", "sync: participation weighting", noun="weighting",
                        choices=("examples", "participating", "all", "fedau")),
    "cutoff": integer(100_000, "fedau: the interval estimate's cutoff K", ge=1),
    "buffer": integer(10, "fedbuff: updates per server step", ge=1),
    "concurrency": integer(0, "async: clients training at once (0: the policy's default)",
                           ge=0),
    "restart": string("arrival", "fedbuff: who restarts, on each arrival or each step",
                      choices=("arrival", "step"), noun="restart"),
    "weights": string("identical", "async: update weights (examples: fedbuff and fedamd only)",
                      choices=("identical", "unbiased", "examples"), noun="weights"),
    "staleness": string("polynomial", "the staleness weight s(tau)",
                        choices=("constant", "polynomial", "hinge"), noun="staleness"),
    "staleness_a": number(0.5, "staleness parameter a", ge=0),
    "staleness_b": number(4.0, "staleness parameter b (hinge: the free steps)", ge=0),
    "max_staleness": integer(-1, "refuse updates staler than this (-1: no limit)", ge=-1),
    "alpha": number(0.6, "fedasync: the mixing weight", gt=0, le=1),
    "window": number(1.0, "fedfix: seconds per aggregation window", gt=0),
    "anchor_prob": number(0.2, "fedamd: the anchor probability in [0, 1), or an integer "
                          "period >= 2", ge=0),
})  # fmt: skip

_SYSTEM = Section("the simulated clients' speeds, links and availability", {
    "compute": _dist("lognormal", 2000.0, 0.5, "examples per second"),
    "downlink": _dist("lognormal", 2.5e6, 0.5, "download bytes per second"),
    "uplink": _dist("lognormal", 1.0e6, 0.5, "upload bytes per second"),
    "latency": _dist("constant", 0.05, 0.0, "seconds of latency per transfer"),
    "dropout": number(0.0, "the probability a job is lost", ge=0, le=1),
    "jitter": number(0.0, "per-job variation of compute time", ge=0),
    "availability": Section("when each client is available", {
        "kind": string("always", "always, bernoulli (p), markov (p, max_on) or cyclic (p, "
                       "period)", choices=("always", "bernoulli", "markov", "cyclic"),
                       noun="availability"),
        "p": number(1.0, "the fraction of time available", ge=0, le=1),
        "max_on": number(0.05, "markov: the largest switch-on probability", ge=0, le=1),
        "period": integer(100, "cyclic: slots per cycle", ge=1),
    }),
})  # fmt: skip

_EXECUTOR = Section("where simulated clients train", {
    "kind": string("local", "in this process, in worker processes, or on Ray",
                   choices=("local", "processes", "ray"), noun="executor"),
    "workers": integer(2, "processes/ray: the workers", ge=1),
})  # fmt: skip

_OUTPUT = Section("where the simulator writes", {
    "db": string("runs/fedagg.db", "the run database"),
    "plots": string("runs/plots", "the directory of PNG plots"),
})  # fmt: skip

_DEPLOY = Section("fedagg server / fedagg client (ignored by the simulator)", {
    "listen": string("127.0.0.1:7531", "host:port the server binds"),
    "server": string("127.0.0.1:7531", "host:port clients connect to"),
    "state": string("fedagg-state", "the server's state directory (event log, checkpoints, "
                    "spooled updates)"),
    "certs": string("certs", "TLS: server.pem and server.key (server), ca.pem (clients)"),
    "insecure": boolean(False, "run without TLS"),
    "keys": string("keys", "the directory of authorized_keys (server)"),
    "chunk_mib": number(4.0, "the largest data chunk of an upload or pull, MiB",
                        ge=4 / 1024, le=64),
    "queue": integer(64, "accepted events waiting for the engine (then backpressure)", ge=1),
    "order": string("arrival", "fold order: as updates arrive, or canonical (reproducible)",
                    choices=("arrival", "canonical"), noun="order"),
    "checkpoint_every": integer(1, "checkpoint every this many rounds", ge=1),
    "checkpoint_updates": integer(0, "also checkpoint every this many folds (0: off)", ge=0),
    "client_timeout": number(30.0, "seconds a client with open tasks may stay disconnected",
                             gt=0),
    "heartbeat": number(10.0, "seconds between keep-alives on an idle task stream", gt=0),
    "wait_for": integer(0, "clients connected before the first round (0: all)", ge=0),
    "rate": number(50.0, "per-client requests per second (0: no limit)", ge=0),
    "burst": number(200.0, "per-client request burst", ge=0),
    "skew": number(60.0, "allowed clock skew of signed requests, seconds", ge=0),
    "fsync": boolean(True, "fsync each spooled upload before acknowledging it"),
    "max_clients": integer(100_000, "refuse a keyring larger than this", ge=1),
    "digest": boolean(True, "require a signed digest of every upload's bytes"),
    "digest_algorithm": string("blake3", "the uploads' signed digest: blake3 or sha256",
                               choices=("sha256", "blake3"), noun="digest algorithm"),
    "durability": string("retained", "fsync: acknowledge an upload once durable; retained: once "
                         "logged, synced in groups, the client keeping it until the "
                         "watermark covers it", choices=("fsync", "retained"),
                         noun="durability"),
    "ingest": string("spool", "fold: fold each checked chunk as it arrives (decomposable "
                     "aggregators); spool: spool, then fold", choices=("fold", "spool"),
                     noun="ingest"),
    "max_streams": integer(8, "the most parallel streams one upload may use (server)",
                           ge=1, le=64),
    "streams": integer(0, "parallel streams per upload (client; 0: by the update's size)",
                       ge=0, le=64),
    "receivers": integer(0, "processes the root server folds uploads in, through shared "
                         "memory (a plain mean; 0: in the server's process)", ge=0, le=64),
    "data_listen": string("auto", "the data port, a stream transport for uploads (server): "
                          "\"auto\" (listen's host, a free port; none under TLS), "
                          "\"host:port\", or \"\" (none: uploads over gRPC)"),
    "transport": string("auto", "how uploads travel (client): auto (the server's data port "
                        "when it has one, it connects and TLS is off, else gRPC), stream "
                        "(the data port, also under TLS), grpc",
                        choices=("auto", "stream", "grpc"), noun="transport"),
    "max_uploads": integer(8, "uploads received (and models sent) at once", ge=1),
    "adaptive_window": boolean(False, "let gRPC grow each stream's flow-control window"),
    "first_timeout": number(10.0, "seconds for an RPC's first message", gt=0),
    "idle_timeout": number(30.0, "seconds an upload or download may stall", gt=0),
    "min_rate_kib": number(64.0, "an upload's or download's progress floor, KiB/s", gt=0),
    "client_uploads": integer(2, "uploads/downloads one client may have in progress", ge=1),
    "preauth": integer(64, "unauthenticated RPCs at once, in all", ge=1),
    "preauth_per_peer": integer(32, "unauthenticated RPCs at once, per peer IP address",
                                ge=1),
    "parent": string("", "aggregation tiers: host:port of the parent (\"\": this server is "
                     "the root)"),
    "edge_key": string("", "this edge's private key (its name is the key's)"),
    "edges": string("", "authorized keys of the edge aggregators below this server"),
    "edge_clients": _table("which clients each edge may serve: { \"edge-0\" = [\"client-0\", "
                           "...] }, or \"*\" for any client; an edge not listed may serve "
                           "none"),
    "serves": _list(string("", ""), [], "client names of this edge's subtree (empty: all)"),
    "edge_mode": string("auto", "aggregate (partials), relay (updates), auto: by policy",
                        choices=("auto", "aggregate", "relay"), noun="edge mode"),
    "flush_after": number(1.0, "seconds after its first update a partial is sent anyway",
                          ge=0),
    "leaf_rule": string("", "a robust rule run over this edge's own clients (then a mean "
                        "above); \"\": none", choices=("", *AGGREGATORS), ref=True,
                        noun="leaf rule"),
    "weight_cap": number(10.0, "a claimed weight is capped at weight_cap x the median (0: "
                         "off)", ge=0),
    "norm_cap": number(10.0, "an update's L2 norm is bounded by norm_cap x the median (0: "
                       "off)", ge=0),
    "norm_mode": string("clip", "over the bound: clip (scale the update down) or reject",
                        choices=("clip", "reject"), noun="norm mode"),
    "max_norm": number(0.0, "an absolute bound on every update's norm (0: none)", ge=0),
    "bound_window": integer(64, "medians over the latest claims of this many clients", ge=1),
    "bound_warmup": integer(5, "claims needed before the medians of earlier rounds are used",
                            ge=1),
    "fed_eval_every": integer(0, "federated evaluation every this many model versions (0: "
                              "off)", ge=0),
    "fed_eval_clients": integer(0, "clients asked to evaluate (0: all connected)", ge=0),
    "eval_timeout": number(60.0, "seconds to wait for clients' metrics", ge=0),
    "metrics": string("", "host:port serving Prometheus metrics at /metrics, e.g. "
                      "\"127.0.0.1:9464\" (plain HTTP, unauthenticated: keep it on loopback); "
                      "\"\": off"),
})  # fmt: skip

_SECURE = Section("secure aggregation (SecAgg+): the server sees only the sum of the masked "
                  "updates (sync policy; mean aggregator)", {
    "kind": string("none", "none, or SecAgg+ (Bell et al. 2020)", choices=("none", "secagg+"),
                   noun="secure aggregation"),
    "neighbors": integer(0, "k, each client's neighbours in the random k-regular graph (0: "
                         "2 ceil(1.5 log2 n), all clients up to 12)", ge=0),
    "threshold": integer(0, "t, shares needed to rebuild a secret: a strict majority of the "
                         "k neighbours (0: the least, floor(k/2) + 1)", ge=0),
    "clip": number(10.0, "the L2 bound each update is clipped to before it is encoded", gt=0),
    "bits": integer(32, "bits of the field Z_2^b each element lives in (ceil(log2 n) of them "
                    "headroom for the sum)", ge=8, le=32),
    "rotation": boolean(False, "a randomised Hadamard rotation before rounding (spreads a "
                        "spiky update over every coordinate)"),
    "max_weight": number(1000.0, "the public weight cap: a client's weight w is encoded as "
                         "min(w, max_weight) / max_weight", gt=0),
    "stage_timeout": number(30.0, "seconds each key, consistency and unmasking stage waits "
                            "for replies (virtual seconds in simulation)", gt=0),
    "dropout": number(0.0, "simulation only: the fraction of a round's clients that drop "
                      "out of the protocol, each at a stage drawn uniformly of the four",
                      ge=0, lt=1),
})  # fmt: skip

_PRIVACY = Section("differential privacy: user-level (epsilon, delta), tracked per round and "
                   "enforced", {
    "mechanism": string("none", "none; central (clip + Gaussian noise on the sum at the "
                        "server, DP-FedAvg); local (each client noises its own update); "
                        "distributed (discrete noise added by each client under secure "
                        "aggregation)", choices=("none", "central", "local", "distributed"),
                        noun="privacy mechanism"),
    "noise_multiplier": number(1.0, "z: the noise's standard deviation is z x clip", ge=0),
    "clip": number(1.0, "C: each client's update is clipped to this L2 norm (the initial "
                   "clip when adaptive)", gt=0),
    "target_quantile": number(0.0, "adaptive clipping (Andrew et al. 2021): the quantile of "
                              "update norms the clip tracks (0: a fixed clip)", ge=0, lt=1),
    "clip_learning_rate": number(0.2, "adaptive clipping: the geometric update's step", gt=0),
    "count_stddev": number(0.0, "adaptive clipping: the noise on the count of unclipped "
                           "updates (0: expected clients per round / 20)", ge=0),
    "delta": number(0.0, "the delta of (epsilon, delta) (0: 1 / num_clients^1.1)", ge=0,
                    lt=1),
    "max_epsilon": number(math.inf, "stop training before epsilon would exceed this",
                          gt=0),
    "accountant": string("rdp", "how epsilon is computed: Renyi DP, or the tighter privacy "
                         "loss distribution", choices=("rdp", "pld"), noun="accountant"),
    "sampling": string("poisson", "how clients are sampled under DP: each with probability "
                       "clients_per_round / num_clients (what the accountant assumes), or "
                       "a fixed-size sample (accounted as sampling without replacement)",
                       choices=("poisson", "fixed"), noun="sampling"),
})  # fmt: skip

#: The whole config: top-level keys, then one section per table.
SPEC = Section(
    "a fedagg run config (simulation and deployment)",
    {
        **_TOP,
        "data": _DATA,
        "model": _MODEL,
        "client": _CLIENT,
        "strategy": _STRATEGY,
        "byzantine": _BYZANTINE,
        "policy": _POLICY,
        "system": _SYSTEM,
        "executor": _EXECUTOR,
        "output": _OUTPUT,
        "deploy": _DEPLOY,
        "secure_aggregation": _SECURE,
        "privacy": _PRIVACY,
    },
)
