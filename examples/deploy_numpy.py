"""A deployed client with its own numpy training code.

The server is ``fedagg server examples/configs/deploy.toml`` (a softmax regression on 8x8
digits: parameters W (64, 10) and b (10,)). This client brings its own data and its own
training loop; fedagg does the rest (TLS, signed requests, streaming, retries)::

    python examples/deploy_numpy.py --key keys/client-003.key --clients 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from fedagg.deploy import Client, ClientKey, Result, TaskContext


def local_data(index: int, clients: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))[: len(y) * 4 // 5]  # the train split
    mine = order[index::clients]
    return (x[mine] / 16.0).astype(np.float32), y[mine]


def make_train(clients: int, lr: float = 0.05, batch: int = 10):  # type: ignore[no-untyped-def]
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def train(model: dict[str, np.ndarray], task: TaskContext) -> Result:
        if task.client_index not in cache:
            cache[task.client_index] = local_data(task.client_index, clients)
        x, y = cache[task.client_index]
        w, b = model["W"].copy(), model["b"].copy()
        rng = task.rng()
        losses = []
        for _ in range(task.epochs):
            for idx in np.array_split(rng.permutation(len(y)), max(1, len(y) // batch)):
                logits = x[idx] @ w + b
                p = np.exp(logits - logits.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                losses.append(float(-np.log(p[np.arange(len(idx)), y[idx]] + 1e-12).mean()))
                p[np.arange(len(idx)), y[idx]] -= 1.0
                w -= lr * x[idx].T @ p / len(idx)
                b -= lr * p.mean(0)
        delta = {"W": w - model["W"], "b": b - model["b"]}
        return Result(delta, len(y), {"train_loss": float(np.mean(losses))})

    return train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--key", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--server", default="127.0.0.1:7531")
    ap.add_argument("--ca", default="certs/ca.pem")
    ap.add_argument("--insecure", action="store_true")
    a = ap.parse_args()
    ca = None if a.insecure else Path(a.ca).read_bytes()
    client = Client(a.server, ClientKey.load(a.key), make_train(a.clients), ca=ca,
                    insecure=a.insecure)  # fmt: skip
    report = client.run()
    print(f"{client.key.name}: {report.uploads} updates sent")


if __name__ == "__main__":
    main()
