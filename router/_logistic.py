"""L2-regularised logistic regression in numpy (Newton / IRLS), small and deterministic."""

from __future__ import annotations

import numpy as np

__all__ = ["fit_logistic", "sigmoid"]


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    """Numerically stable logistic function."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    *,
    l2: float = 1.0,
    sample_weight: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> tuple[np.ndarray, float]:
    """Fit ``P(y=1 | x) = sigmoid(x @ w + b)`` minimising log-loss + ``l2/2 * |w|^2``.

    The bias is not penalised. With one class only, ``w = 0`` and ``b`` is the smoothed log-odds
    of the base rate.

    Args:
        x: Features ``(n, d)``; standardise them first so ``l2`` means the same for each.
        y: Labels in {0, 1} (or probabilities) ``(n,)``.
        l2: Ridge penalty on the weights.
        sample_weight: Optional per-example weights.
        max_iter: Newton steps at most.
        tol: Stop when the step is smaller than this.

    Returns:
        ``(w, b)``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = x.shape
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    base = float((sw * y).sum() + 0.5) / float(sw.sum() + 1.0)
    b0 = float(np.log(base / (1.0 - base)))
    if n == 0 or np.all(y == y[0]):
        return np.zeros(d), b0
    xa = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    theta[-1] = b0
    reg = np.full(d + 1, float(l2))
    reg[-1] = 0.0
    for _ in range(max_iter):
        p = sigmoid(xa @ theta)
        grad = xa.T @ (sw * (p - y)) + reg * theta
        h = (xa * (sw * p * (1.0 - p))[:, None]).T @ xa + np.diag(reg) + 1e-9 * np.eye(d + 1)
        step = np.linalg.solve(h, grad)
        theta -= step
        if float(np.abs(step).max()) < tol:
            break
    return theta[:-1].copy(), float(theta[-1])
