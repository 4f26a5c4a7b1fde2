"""How the fused GELU's erf coefficients in ``sparse_cpu.cpp`` were made (run: ``python sparse_ops/csrc/fit_erf.py``).

erf(a) ~ a P(a^2) / Q(a^2) on [0, 4], P of degree 6, Q of degree 4 with Q(0) = 1: the linearised problem
erf(a) Q(u) - a P(u) = 0 (u = a^2) solved by weighted least squares on Chebyshev nodes, reweighted towards the
largest errors (Lawson) and by 1 / |Q| (Sanathanan-Koerner) so that the true error, not the linearised one,
is minimised. Prints the coefficients and the worst absolute error of the fp32 Horner evaluation the kernel
does: about 4e-7 (the fit itself is about 5e-8; the rest is fp32 rounding).
"""
import numpy as np
from scipy.special import erf

LIMIT = 4.0


def fit(p_degree: int = 6, q_degree: int = 4, iterations: int = 60) -> tuple[np.ndarray, np.ndarray]:
    a = (np.cos(np.linspace(0.0, np.pi, 6000)) + 1.0) * LIMIT / 2
    u, f = a * a, erf(a)
    columns = np.hstack([-(a[:, None] * u[:, None] ** np.arange(p_degree + 1)),
                         f[:, None] * u[:, None] ** np.arange(1, q_degree + 1)])
    weights, q_values, best = np.ones_like(a), np.ones_like(a), (np.inf, None, None)
    for _ in range(iterations):
        scale = np.sqrt(weights) / np.abs(q_values)
        sol = np.linalg.lstsq(columns * scale[:, None], -f * scale, rcond=None)[0]
        p, q = sol[:p_degree + 1], np.concatenate([[1.0], sol[p_degree + 1:]])
        q_values = np.polyval(q[::-1], u)
        err = np.abs(a * np.polyval(p[::-1], u) / q_values - f)
        if err.max() < best[0]:
            best = (err.max(), p, q)
        weights = weights * np.sqrt(err / err.max()) + 1e-12
        weights /= weights.sum()
    return best[1], best[2]


def fp32_error(p: np.ndarray, q: np.ndarray) -> float:
    a = np.linspace(0.0, LIMIT, 400_001, dtype=np.float32)
    u = a * a
    num, den = np.float32(p[-1]), np.float32(q[-1])
    for c in p[-2::-1]:
        num = num * u + np.float32(c)
    for c in q[-2::-1]:
        den = den * u + np.float32(c)
    return float(np.abs((a * num / den).astype(np.float64) - erf(a.astype(np.float64))).max())


if __name__ == "__main__":
    p, q = fit()
    print("P (u^0 first):", ", ".join(f"{np.float32(c):.8g}" for c in p))
    print("Q (u^0 first):", ", ".join(f"{np.float32(c):.8g}" for c in q))
    print(f"max |erf error| of the fp32 evaluation on [0, {LIMIT}]: {fp32_error(p, q):.2e}")
