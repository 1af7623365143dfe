"""Shared reference implementations for the tests (plain NumPy, float64)."""

import numpy as np


def dense_bfgs_inverse(pairs, gamma, n):
    """H from H0 = gamma I by the BFGS inverse update, pairs oldest -> newest."""
    h = gamma * np.eye(n)
    for s, y in pairs:
        rho = 1.0 / (s @ y)
        v = np.eye(n) - rho * np.outer(y, s)
        h = v.T @ h @ v + rho * np.outer(s, s)
    return h


def damp(s, y, sigma_low, sigma_high, tau_max):
    """The spec's damping: returns (tau, y_hat, mu)."""
    mu = (s @ y) / (s @ s)
    if mu < sigma_low:
        phi = (1 - sigma_low) / (1 - mu)
    elif mu > sigma_high:
        phi = (sigma_high - 1) / (mu - 1)
    else:
        phi = 1.0
    tau = min(phi, tau_max)
    return tau, tau * y + (1 - tau) * s, mu
