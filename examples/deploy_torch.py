"""A deployed client that trains with PyTorch.

Same server as examples/deploy_numpy.py (``fedagg server examples/configs/deploy.toml``:
W (64, 10), b (10,)). The client maps the received arrays onto a ``torch.nn.Linear`` (whose
weight is W transposed), trains with torch.optim.SGD and returns the delta as arrays laid
out like the model it received::

    python examples/deploy_torch.py --key keys/client-005.key --clients 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

from fedagg.deploy import Client, ClientKey, Result, TaskContext


def make_train(clients: int, lr: float = 0.05, batch: int = 10):  # type: ignore[no-untyped-def]
    x_all, y_all = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y_all))[: len(y_all) * 4 // 5]

    def train(model: dict[str, np.ndarray], task: TaskContext) -> Result:
        mine = order[task.client_index :: clients]
        x = torch.tensor(x_all[mine] / 16.0, dtype=torch.float32)
        y = torch.tensor(y_all[mine])
        torch.manual_seed(int(task.rng().integers(2**31)))
        net = torch.nn.Linear(64, 10)
        with torch.no_grad():
            net.weight.copy_(torch.from_numpy(model["W"].T.copy()))
            net.bias.copy_(torch.from_numpy(model["b"].copy()))
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        loss = torch.tensor(0.0)
        for _ in range(task.epochs):
            for idx in torch.randperm(len(y)).split(batch):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
                loss.backward()
                opt.step()
        with torch.no_grad():
            w = net.weight.T.numpy().copy()
            b = net.bias.numpy().copy()
        delta = {"W": w - model["W"], "b": b - model["b"]}
        return Result(delta, len(y), {"train_loss": float(loss)})

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
    print(f"{client.key.name}: {client.run().uploads} updates sent")


if __name__ == "__main__":
    main()
