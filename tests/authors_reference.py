"""A plain NumPy transcription of the authors' update loop (BlockSlimQN).

Written from the reading of yuehniu/mL-BFGS opt/slimblock.py in
shared/reference/paper-and-authors-code.md, in the authors' own form:
un-normalised sums (A <- beta A + x, first A = x), a gradient-sum refresh at
every T-th step, pair momentum ("double momentum"), rho stored as s^T y, the
1e-12 epsilons, global normalisation and heavy-ball momentum. Two of their
defects are fixed, as the library documents: the gradient sums use g + wd*theta
(not (1 + wd) g) and every parameter belongs to a block.
"""

import numpy as np

EPS = 1e-12


class AuthorsBlockSlimQN:
    def __init__(self, blocks, lr, momentum, weight_decay, beta, pair_momentum, update_period,
                 memory, tau_max, sigma_low=0.01, sigma_high=1.5):
        self.blocks = blocks  # list of index arrays into the flat parameter vector
        self.lr, self.mom, self.wd = lr, momentum, weight_decay
        self.beta, self.mmm, self.T, self.M = beta, pair_momentum, update_period, memory
        self.tau_max, self.lo, self.hi = tau_max, sigma_low, sigma_high
        self.steps = 0
        self.avg_p, self.avg_g, self.snap_p, self.snap_g = {}, {}, {}, {}
        self.S = {b: [] for b in range(len(blocks))}
        self.Y = {b: [] for b in range(len(blocks))}
        self.rho = {b: [] for b in range(len(blocks))}
        self.h0 = {b: 1.0 for b in range(len(blocks))}
        self.start = False
        self.buf = None

    def step(self, theta, grad):
        """One optimizer step on the flat vectors; returns the new theta."""
        self.steps += 1
        update = self.steps % self.T == 0
        g = grad + self.wd * theta
        for b, idx in enumerate(self.blocks):
            p, gb = theta[idx], g[idx]
            first = b not in self.avg_p
            self.avg_p[b] = p.copy() if first else self.beta * self.avg_p[b] + p
            self.avg_g[b] = gb.copy() if first else self.beta * self.avg_g[b] + gb
            if not update:
                continue
            if b in self.snap_p:
                s = self.avg_p[b] - self.snap_p[b]
                y = self.avg_g[b] - self.snap_g[b]
                if self.S[b]:
                    s = (1 - self.mmm) * s + self.mmm * self.S[b][-1]
                    y = (1 - self.mmm) * y + self.mmm * self.Y[b][-1]
                mu = s @ y / (s @ s + EPS)
                if mu < self.lo:
                    phi = (1 - self.lo) / (1 - mu)
                elif mu > self.hi:
                    phi = (self.hi - 1) / (mu - 1)
                else:
                    phi = 1.0
                phi = min(phi, self.tau_max)
                y = phi * y + (1 - phi) * s
                self.S[b].append(s)
                self.Y[b].append(y)
                self.rho[b].append(s @ y)
                if len(self.S[b]) > self.M:
                    self.S[b].pop(0), self.Y[b].pop(0), self.rho[b].pop(0)
                self.h0[b] = (s @ y) / (y @ y + EPS)
                self.start = True
            self.snap_p[b] = self.avg_p[b].copy()
            self.snap_g[b] = self.avg_g[b].copy()
            self.avg_g[b] = gb.copy()  # refresh
        d = g.copy()
        if self.start:
            for b, idx in enumerate(self.blocks):
                q = g[idx].copy()
                alphas = []
                for s, y, r in zip(reversed(self.S[b]), reversed(self.Y[b]), reversed(self.rho[b])):
                    a = s @ q / r
                    q -= a * y
                    alphas.append(a)
                q *= self.h0[b]
                for s, y, r, a in zip(self.S[b], self.Y[b], self.rho[b], reversed(alphas)):
                    q += (a - y @ q / r) * s
                d[idx] = q
            d = d / np.sqrt(d @ d)
        self.buf = d if self.buf is None else self.mom * self.buf + d
        return theta - self.lr * self.buf
