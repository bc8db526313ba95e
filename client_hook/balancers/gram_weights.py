"""Task weights from the T x T Gram matrix of the task gradients, G_ij = <g_i, g_j> (torch only).

Every method here is a pure function `G -> w`: the update direction on the shared parameters is
d = sum_i w_i g_i = J^T w, so the network's gradient is the backward of sum_i w_i L_i with w held
constant, and nothing but G is needed (Quinton and Rey, "Jacobian Descent for Multi-Objective
Optimization", arXiv 2406.16232: every such aggregator is a function of the Gramian).

The weights are returned on the scale where no conflict and equal gradients give w_i = 1 (the
papers' own weights, which sum to about 1, times T), so they read like every other balancer's.

The solvers are small and exact or convergent in float64 on the host: T is tens at most, and a
few T x T solves per step cost far less than the T backward passes that built G. Reading G on the
host is one device synchronisation per step; Nash-MTL amortises it by solving every k steps.

Runtime code is self-contained on purpose: the client depends on torch and the standard library
only, and torchjd's UPGrad / CAGrad / Nash-MTL need numpy and quadprog or cvxpy at run time. torchjd
is a test-time reference only (tests/client_hook/test_gram_weights.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-12


def _host(gram: Tensor) -> Tensor:
    """G as a symmetric float64 CPU matrix (the one host read of a step)."""
    g = gram.detach().to("cpu", torch.float64)
    return 0.5 * (g + g.T)


def nonnegative_quadratic(gram: Tensor, linear: Tensor, iterations: int = 100) -> Tensor:
    """argmin_{s >= 0} s^T G s - 2 linear^T s, by Lawson and Hanson's active-set method (Solving
    Least Squares Problems, 1974, ch. 23), written on the normal equations: G = A^T A is all it
    needs. Exact after finitely many steps; singular G is handled by least squares on the free set.
    """
    size = gram.shape[0]
    s = torch.zeros(size, dtype=gram.dtype)
    free = torch.zeros(size, dtype=torch.bool)
    tol = 1e-12 * max(float(gram.diagonal().abs().max()), 1.0)
    for _ in range(iterations):
        descent = linear - gram @ s  # minus half the gradient
        candidates = torch.where(~free & (descent > tol))[0]
        if len(candidates) == 0:
            break
        free[candidates[descent[candidates].argmax()]] = True
        for _ in range(iterations):
            z = _solve_on(gram, linear, free)
            if bool((z[free] > tol).all()):
                s = z
                break
            # step from s toward z until the first free coordinate reaches 0, then drop it
            blocking = free & (z <= tol)
            step = (s[blocking] / (s[blocking] - z[blocking]).clamp_min(_EPS)).min()
            s = s + step * (z - s)
            free &= s > tol
            s = torch.where(free, s, torch.zeros_like(s))
    return s


def _solve_on(gram: Tensor, linear: Tensor, free: Tensor) -> Tensor:
    z = torch.zeros_like(linear)
    idx = torch.where(free)[0]
    sub = gram[idx][:, idx]
    z[idx] = torch.linalg.lstsq(sub, linear[idx].unsqueeze(1)).solution.squeeze(1)
    return z


def upgrad_weights(gram: Tensor, preference: Tensor | None = None) -> Tensor:
    """UPGrad (Quinton and Rey, arXiv 2406.16232, Def. 3 and Prop. 5): each task gradient g_i
    projected onto the dual cone {v : J v >= 0} of all of them, then combined with the preference
    p (default 1/T). The projection of J^T u is J^T w with w = argmin_{v >= u} v^T G v (Prop. 5),
    so w = sum_i p_i w^(i), w^(i) = e_i + argmin_{s >= 0} (e_i + s)^T G (e_i + s).
    """
    g = _host(gram)
    size = g.shape[0]
    pref = torch.full((size,), 1.0 / size, dtype=g.dtype) if preference is None else preference
    total = torch.zeros(size, dtype=g.dtype)
    for i in range(size):
        unit = torch.zeros(size, dtype=g.dtype)
        unit[i] = 1.0
        total += pref[i] * (unit + nonnegative_quadratic(g, -g @ unit))
    return (size * total).float()


def aligned_mtl_weights(gram: Tensor, preference: Tensor | None = None) -> Tensor:
    """Aligned-MTL (Senushkin, Patakin, Kuznetsov, Konushin, CVPR 2023, Algorithm 1): with
    G = V diag(lambda) V^T (its nonzero eigenvalues), B = sqrt(lambda_min) V diag(lambda)^-1/2 V^T
    makes the aligned gradients orthogonal with equal norms (condition number 1, Sec. 4); the
    weights are w = B p with the preference p (default 1/T).
    """
    g = _host(gram)
    size = g.shape[0]
    pref = torch.full((size,), 1.0 / size, dtype=g.dtype) if preference is None else preference
    eigenvalues, vectors = torch.linalg.eigh(g)
    keep = eigenvalues > eigenvalues.max().clamp_min(0) * size * torch.finfo(g.dtype).eps
    if not bool(keep.any()):
        return (size * pref).float()  # every gradient is zero: nothing to align
    eigenvalues, vectors = eigenvalues[keep], vectors[:, keep]
    balance = eigenvalues.min().sqrt() * (vectors / eigenvalues.sqrt()) @ vectors.T
    return (size * balance @ pref).float()


def imtl_g_weights(gram: Tensor) -> Tensor:
    """IMTL-G (Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, ICLR 2021, Sec. 3.2, Eq. 5-6): the
    combined g = sum_i a_i g_i with sum_i a_i = 1 has the same projection on every unit task
    gradient u_i = g_i/||g_i||. <g, u_i> = (G a)_i / ||g_i|| = c for all i gives G a = c d,
    d_i = ||g_i|| = sqrt(G_ii), so a = G^+ d / sum(G^+ d) (the pseudo-inverse where G is singular,
    as in Quinton and Rey's generalisation).
    """
    g = _host(gram)
    size = g.shape[0]
    v = torch.linalg.pinv(g, hermitian=True) @ g.diagonal().clamp_min(0).sqrt()
    total = v.sum()
    if float(total.abs()) < _EPS:
        return torch.ones(size)
    return (size * v / total).float()


def cagrad_weights(gram: Tensor, c: float = 0.4, iterations: int = 2000) -> Tensor:
    """CAGrad (Liu, Liu, Jin, Stone, Liu, NeurIPS 2021, arXiv 2110.14048, Sec. 3.1, Eq. 4 dual):
    g_0 = mean_i g_i, phi = c^2 ||g_0||^2, w* = argmin_{w in simplex} g_w^T g_0 + sqrt(phi) ||g_w||
    with g_w = sum_i w_i g_i, and d = g_0 + (sqrt(phi) / ||g_w*||) g_w*; all inner products come
    from G. Solved by projected gradient with backtracking on the simplex (Duchi et al. 2008's
    projection). Returns T times the weights of d (1 + T sqrt(phi) w*_i / ||g_w*||).
    """
    g = _host(gram)
    size = g.shape[0]
    mean = torch.full((size,), 1.0 / size, dtype=g.dtype)
    sqrt_phi = c * abs(float(mean @ g @ mean)) ** 0.5
    w = _simplex_minimise(g, mean, sqrt_phi, iterations)
    gw_norm = abs(float(w @ g @ w)) ** 0.5
    weights = mean.clone()
    if gw_norm > 1e-4 * max(float(g.diagonal().max()), _EPS) ** 0.5:
        weights += (sqrt_phi / gw_norm) * w
    return (size * weights).float()


def _simplex_minimise(g: Tensor, mean: Tensor, sqrt_phi: float, iterations: int) -> Tensor:
    def objective(w: Tensor) -> Tensor:
        return w @ g @ mean + sqrt_phi * (w @ g @ w).clamp_min(_EPS).sqrt()

    def gradient(w: Tensor) -> Tensor:
        return g @ mean + sqrt_phi * (g @ w) / (w @ g @ w).clamp_min(_EPS).sqrt()

    w, step = mean.clone(), 1.0 / max(float(g.diagonal().sum()), _EPS)
    value = objective(w)
    for _ in range(iterations):
        direction = gradient(w)
        while True:
            candidate = project_to_simplex(w - step * direction)
            new_value = objective(candidate)
            moved = candidate - w
            if float(new_value) <= float(value + direction @ moved + (moved @ moved) / (2 * step)):
                break
            step *= 0.5
        if float((candidate - w).abs().max()) < 1e-12:
            break
        w, value, step = candidate, new_value, step * 2.0
    return w


def project_to_simplex(v: Tensor) -> Tensor:
    """Euclidean projection onto {w >= 0, sum w = 1} (Duchi, Shalev-Shwartz, Singer, Chandra,
    ICML 2008, Fig. 1)."""
    u, _ = torch.sort(v, descending=True)
    cumulative = torch.cumsum(u, 0) - 1.0
    index = torch.arange(1, len(v) + 1, dtype=v.dtype)
    rho = int(torch.nonzero(u - cumulative / index > 0).max())
    theta = cumulative[rho] / (rho + 1)
    return (v - theta).clamp_min(0.0)


def nash_mtl_weights(gram: Tensor, start: Tensor | None = None, iterations: int = 50) -> Tensor:
    """Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, ICML 2022,
    arXiv 2202.01017, Sec. 3.2): the Nash bargaining solution alpha > 0 of G alpha = 1/alpha.
    The update sum_i alpha_i g_i then has squared norm alpha^T G alpha = T whatever the scale
    of the gradients; alpha is returned as is (not rescaled to the other balancers' scale).

    G alpha = 1/alpha is the stationarity condition of the convex f(alpha) = alpha^T G alpha / 2
    - sum_i log alpha_i, solved by damped Newton steps that keep alpha > 0, on G / ||G||_F for
    conditioning (alpha for G is that solution / sqrt(||G||_F)); a tiny ridge keeps f strictly
    convex where G is singular. `start` warm-starts from a previous (unscaled) solution.
    """
    g = _host(gram)
    size = g.shape[0]
    scale = g.norm().clamp_min(_EPS)
    g = g / scale + 1e-8 * torch.eye(size, dtype=g.dtype)
    alpha = torch.ones(size, dtype=g.dtype)
    if start is not None and bool((start > 0).all()):
        alpha = start.to("cpu", torch.float64) * scale.sqrt()

    def objective(a: Tensor) -> float:
        return float(0.5 * a @ g @ a - a.log().sum())

    for _ in range(iterations):
        grad = g @ alpha - 1.0 / alpha
        if float(grad.abs().max()) < 1e-10:
            break
        step = torch.linalg.solve(g + torch.diag(1.0 / alpha**2), grad)
        t, current = 1.0, objective(alpha)
        while bool(((alpha - t * step) <= 0).any()) or objective(alpha - t * step) > current:
            t *= 0.5
            if t < 1e-12:
                return (alpha / scale.sqrt()).float()
        alpha = alpha - t * step
    return (alpha / scale.sqrt()).float()
