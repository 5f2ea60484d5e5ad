"""The user code the tests name in configs: a numpy softmax regression with its own train and
evaluate functions (written to a temporary directory and imported from there by name)."""

SOURCE = '''
import json
import os

import numpy as np

from fedagg.clients import Result


def make(features=64, classes=10):
    return {"w": np.zeros((features, classes), np.float32), "b": np.zeros(classes, np.float32)}


def _loss_grad(p, x, y):
    z = x @ p["w"] + p["b"]
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    e /= e.sum(1, keepdims=True)
    n = len(y)
    loss = float(-np.log(e[np.arange(n), y] + 1e-12).mean())
    e[np.arange(n), y] -= 1
    e /= n
    return loss, {"w": x.T @ e, "b": e.sum(0)}


def own_data(index, clients):
    """What a client with no [data] loads itself: its share of sklearn's digits."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    mine = np.arange(len(y))[index::clients]
    return x[mine] / 16.0, y[mine]


def train(params, data, task):
    log = task.config.get("log") or os.environ.get("USER_TASK_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"job": task.job, "version": task.version, "epochs": task.epochs,
                                "seed": task.seed, "client_index": task.client_index,
                                "name": task.name, "config": dict(task.config),
                                "pid": os.getpid(), "none": data is None}) + "\\n")
    if data is None:
        x, y = own_data(task.client_index, int(task.config.get("clients", 3)))
    else:
        x, y = data.x, data.y
    p = {k: v.astype(np.float64) for k, v in params.items()}  # trains in float64
    lr = float(task.config.get("lr", 0.5))
    rng = task.rng()
    loss = 0.0
    for _ in range(task.epochs):
        for idx in np.array_split(rng.permutation(len(y)), max(1, len(y) // 10)):
            loss, g = _loss_grad(p, x[idx].astype(np.float64), y[idx])
            for k in p:
                p[k] -= lr * g[k]
    delta = {k: p[k] - params[k] for k in p}  # float64 deltas for a float32 model
    return Result(delta, len(y), {"train_loss": loss})


def evaluate(params, data, task):
    p = {k: v.astype(np.float64) for k, v in params.items()}
    loss, _ = _loss_grad(p, data.x.astype(np.float64), data.y)
    acc = float(((data.x @ p["w"] + p["b"]).argmax(1) == data.y).mean())
    return {"loss": loss, "accuracy": acc}


def held_out():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x[-300:] / 16.0, y[-300:]


def lr_schedule(version, config):
    return {"lr": 0.5 / (1 + version)}


def frozen_after_first(version, config):
    return {"lr": 0.05 if version == 0 else 1e-30}


def torch_mlp(hidden=16):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 10))
'''
