"""A deployed client that trains a PyTorch module, which the server serves as its model.

The server builds the same module through ``[model] factory = "deploy_torch:make_model"``
(examples/configs/deploy_torch.toml): the global model is the module's parameters, by name.
The client loads the received arrays into its module, trains it with torch.optim.SGD and
returns the delta of its parameters::

    fedagg server examples/configs/deploy_torch.toml
    python examples/deploy_torch.py --key keys/client-005.key --clients 8 --hidden 32

With ``--hidden 0`` (the default) the module is a softmax regression whose parameters are
named as fedagg's built-in ``logreg`` (``W`` (64, 10), ``b`` (10,)), so this client also
trains against examples/configs/deploy.toml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from fedagg.deploy import Client, ClientKey, Result, TaskContext
from fedagg.models.torch import load_params, to_params


class SoftmaxRegression(nn.Module):
    """``x @ W + b``: parameters named and shaped as fedagg's ``logreg``."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.zeros(features, classes))
        self.b = nn.Parameter(torch.zeros(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W + self.b


def make_model(hidden: int = 0, features: int = 64, classes: int = 10) -> nn.Module:
    """The model (the server's ``[model] factory``): a softmax regression, or an MLP with one
    hidden layer of ``hidden`` units."""
    torch.manual_seed(0)  # every process builds the same initial module
    if hidden <= 0:
        return SoftmaxRegression(features, classes)
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def make_train(clients: int, hidden: int = 0, lr: float = 0.05, batch: int = 10):  # type: ignore[no-untyped-def]
    x_all, y_all = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y_all))[: len(y_all) * 4 // 5]
    net = make_model(hidden)

    def train(model: dict[str, np.ndarray], task: TaskContext) -> Result:
        mine = order[task.client_index :: clients]
        x = torch.tensor(x_all[mine] / 16.0, dtype=torch.float32)
        y = torch.tensor(y_all[mine])
        torch.manual_seed(int(task.rng().integers(2**31)))
        load_params(net, model)  # the global model, by parameter name
        step = float(task.config.get("lr", lr))  # a per-task lr, if the server sends one
        opt = torch.optim.SGD(net.parameters(), lr=step)
        loss = torch.tensor(0.0)
        for _ in range(task.epochs):
            for idx in torch.randperm(len(y)).split(batch):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                loss.backward()
                opt.step()
        trained = to_params(net)
        delta = {k: trained[k] - model[k] for k in trained}
        return Result(delta, len(y), {"train_loss": float(loss)})

    return train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--key", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=0, help="the server's [model.args] hidden")
    ap.add_argument("--server", default="127.0.0.1:7531")
    ap.add_argument("--ca", default="certs/ca.pem")
    ap.add_argument("--insecure", action="store_true")
    a = ap.parse_args()
    ca = None if a.insecure else Path(a.ca).read_bytes()
    client = Client(a.server, ClientKey.load(a.key), make_train(a.clients, a.hidden), ca=ca,
                    insecure=a.insecure)  # fmt: skip
    print(f"{client.key.name}: {client.run().uploads} updates sent")


if __name__ == "__main__":
    main()
