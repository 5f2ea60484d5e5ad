"""Naive reference implementations of the robust rules, straight from their definitions
(all updates in memory, explicit pairwise distances and SVDs): what the bounded-memory
versions in ``fedagg.core.robust`` must reproduce."""

from __future__ import annotations

from typing import Any

import numpy as np

Arr = Any


def median(x: Arr) -> Arr:
    return np.median(x, axis=0)


def trimmed_mean(x: Arr, b: int) -> Arr:
    n = len(x)
    b = min(b, (n - 1) // 2)
    return np.sort(x, axis=0)[b : n - b].mean(axis=0)


def sq_dists(x: Arr) -> Arr:
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)


def krum_scores(x: Arr, alive: list[int], f: int) -> list[float]:
    d = sq_dists(x)
    k = len(alive) - f - 2
    return [float(np.sort([d[i, j] for j in alive if j != i])[:k].sum()) for i in alive]


def multi_krum(x: Arr, f: int, m: int) -> Arr:
    scores = krum_scores(x, list(range(len(x))), f)
    best = np.argsort(scores, kind="stable")[:m]
    return x[np.sort(best)].mean(axis=0)


def bulyan(x: Arr, f: int) -> Arr:
    alive = list(range(len(x)))
    chosen = []
    for _ in range(len(x) - 2 * f):
        ff = min(f, max(0, len(alive) - 3))
        scores = krum_scores(x, alive, ff)
        pick = alive[int(np.argmin(scores))]
        chosen.append(pick)
        alive.remove(pick)
    sel = x[sorted(chosen)]
    med = np.median(sel, axis=0)
    beta = len(chosen) - 2 * f
    idx = np.argsort(np.abs(sel - med), axis=0, kind="stable")[:beta]
    return np.take_along_axis(sel, idx, axis=0).mean(axis=0)


def geometric_median(x: Arr, w: Arr, maxiter: int = 4, nu: float = 1e-5, ftol: float = 1e-6) -> Arr:
    a = np.asarray(w, float) / np.sum(w)
    z = a @ x
    obj = float(a @ np.linalg.norm(x - z, axis=1))
    for _ in range(maxiter):
        beta = a / np.maximum(nu, np.linalg.norm(x - z, axis=1))
        z = beta @ x / beta.sum()
        new = float(a @ np.linalg.norm(x - z, axis=1))
        done = abs(obj - new) <= ftol * max(new, 1e-300)
        obj = new
        if done:
            break
    return z


def centered_clipping(x: Arr, tau: float, iters: int, v0: Arr | None = None) -> Arr:
    v = np.zeros(x.shape[1]) if v0 is None else np.asarray(v0, float)
    for _ in range(iters):
        diff = x - v
        norms = np.linalg.norm(diff, axis=1)
        s = np.minimum(1.0, tau / np.maximum(norms, 1e-300))
        v = v + (diff * s[:, None]).mean(axis=0)
    return v


def flag_weights(y: Arr, g: Arr, lam: float, eps: float) -> tuple[float, Arr, Arr]:
    """The objective at subspace ``y`` and the reference's IRLS weights, one pair at a time."""
    p = g.shape[1]
    r = ((y.T @ g) ** 2).sum(0)
    sin2 = np.abs(1 - r)
    obj = float(np.sqrt(sin2).sum())
    a = (sin2 + eps) ** -0.25
    b = np.zeros((p, p))
    if lam > 0:
        scale = lam / (p * (p - 1))
        for i in range(p):
            for j in range(p):
                if i != j:
                    dr = float(((y.T @ (g[:, i] - g[:, j])) ** 2).sum())
                    obj += scale * np.sqrt(abs(1 - dr))
                    b[i, j] = scale * (abs(1 - dr) + eps) ** -0.25
    return obj, a, b


def flag(
    x: Arr, m: int, lam: float = 0.0, iters: int = 3, eps: float = 1e-7, start: Arr | None = None
) -> Arr:
    """IRLS with explicit (n x columns) matrices and SVDs. The first weights come from the
    orthonormal ``start`` (n x m) as in the reference code (which draws it at random); by
    default from a subspace orthogonal to every update (``Y0^T g = 0``), the limit of a random
    start in high dimension."""
    norms = np.linalg.norm(x, axis=1)
    keep = norms > 0
    g = (x[keep] / norms[keep, None]).T  # n x p
    p = g.shape[1]
    m = min(m, p)
    y0 = np.zeros((g.shape[0], m)) if start is None else start
    _, a, b = flag_weights(y0, g, lam, eps)
    best = None
    for _ in range(iters):
        cols = [a[i] * g[:, i] for i in range(p)]
        cols += [b[i, j] * (g[:, i] - g[:, j]) for i in range(p) for j in range(p) if i != j]
        mat = np.stack(cols, axis=1)
        u, sv, _ = np.linalg.svd(mat, full_matrices=False)
        y = u[:, :m][:, sv[:m] > sv.max() * 1e-6]
        obj, a, b = flag_weights(y, g, lam, eps)
        if best is not None and best[0] - obj <= 1e-10:
            if obj < best[0]:
                best = (obj, y)
            break
        if best is None or obj < best[0]:
            best = (obj, y)
    y = best[1]
    return y @ (y.T @ g.sum(axis=1)) / m
