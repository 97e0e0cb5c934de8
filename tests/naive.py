"""A literal per-step transcription of the original's maths in float64, sharing no code with the
package: an independent oracle for the reference path (which is in turn the kernels' oracle)."""

from __future__ import annotations

import math

import torch


def exact_cos(tick: int, r: int) -> list[float]:
    """cos(tick * omega_j) for omega = linspace(-pi, pi, r), with the phase reduced in Python integers."""
    if r == 1:
        ms, den = [-1], 1
    else:
        ms, den = [2 * j - (r - 1) for j in range(r)], r - 1
    return [math.cos(math.pi * ((tick * m) % (2 * den)) / den) for m in ms]


def naive_recurrence(keys, queries, values, beta, gamma, p1, p2, p3, dones, tilde_k, tilde_v, s, tick, eps=1e-5):
    f = lambda t: t.detach().double()  # noqa: E731
    keys, queries, values, beta, gamma, p1, p2, p3 = map(f, (keys, queries, values, beta, gamma, p1, p2, p3))
    tk, tv, s = tilde_k.detach().double().clone(), tilde_v.detach().double().clone(), s.detach().double().clone()
    B, T, H, D = keys.shape
    eta = p1.shape[-1]
    R = tk.shape[1]
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            keep = 1.0 if dones is None else 1.0 - float(dones[b, t])
            c = exact_cos(int(tick[b]) + t + 1, R)
            for h in range(H):
                K = torch.einsum("n,d->nd", p1[b, t, h].relu(), keys[b, t, h].relu()).reshape(-1)
                Q = torch.einsum("n,d->nd", p2[b, t, h].relu(), queries[b, t, h].relu()).reshape(-1)
                G = torch.einsum("n,d->nd", p3[b, t, h].sigmoid(), gamma[b, t, h].sigmoid()).reshape(-1)
                bt = beta[b, t, h].sigmoid()
                for j in range(R):
                    tk[b, j, h] = (1 - G) * keep * tk[b, j, h] + c[j] * G * K
                    tv[b, j, h] = (1 - bt) * keep * tv[b, j, h] + c[j] * bt * values[b, t, h]
                s[b, h] = (1 - G) * keep * s[b, h] + G * K
                kv = sum(tv[b, j, h] * torch.dot(tk[b, j, h], Q) for j in range(R))
                out[b, t, h] = kv / (2 * R * torch.dot(s[b, h], Q) + eps)
    assert eta * D == tk.shape[-1]
    return out, (tk, tv, s)
