"""The DoS-SDE sampler (Cui et al., NeurIPS 2024, §3.3; upstream `model/shift_sampler.py`).

With a_k = α_k(1 − η_k), λ_k = σ_k/a_k and r = λ_s/λ_t for one step t → s (s = t − 1 on the grid):

  (1) x_s = (a_s/a_t)·r²·x_t + a_s[η_s/(1−η_s) − r²·η_t/(1−η_t)]·x̂₀ + a_s(1 − r²)·x_θ + σ_s√(1 − r²)·z
  (2)     − a_s·(λ_s − λ_t)²/λ_t · D1,                    D1 = (x_θ − x_θ,prev)/(λ_t − λ_prev)
  (3)     + a_s·[(λ_t − 3λ_s)(λ_t − λ_s)/2 − λ_s²·ln r] · D2,   D2 = 2(D1 − D1_prev)/(λ_t − λ_prev2)

(1) is the exact solution of the DoS-SDE with x_θ held constant (the x̂₀ term is the domain-shift
guidance); (2) and (3) integrate a first/second-order Taylor expansion of x_θ in λ against the
kernel 2λ_s²λ⁻³ dλ. Orders are 1, 2, 3, 3, … as the official ``shift_sample_3_order``.
Coefficients are float64 Python numbers applied to float32 tensors in the official order.

In the shifted coordinates y = x/a − η/(1−η)·x̂₀ (so y = x₀ + λ·ε), (1) is SDE-DPM-Solver++(1):
y_s = r²y_t + (1 − r²)x_θ + λ_s√(1 − r²)z. The experimental ``gamma`` < 1 (not in the paper's code)
interpolates towards the probability-flow ODE y_s = r·y_t + (1 − r)·x_θ (gamma = 0: no noise):
y_s = r^(1+γ)y_t + (1 − r^(1+γ))x_θ + λ_s√(1 − r^(2γ))z, with the multistep terms integrated
against its kernel (1+γ)λ_s^(1+γ)λ^−(2+γ) dλ.
"""

import math

import numpy as np
import torch


def predict_x0(x, eps, grid, k):
    """x_θ = x/α_k − (σ_k/α_k)·ε̂ with both factors cast to float32 first, as the official (no clipping). The
    factors are 0-dim CPU tensors, which a GPU kernel takes as scalars (no copy to the device, no wait)."""
    c1 = torch.tensor(grid.sqrt_recip_alpha_bar[k], dtype=torch.float32)
    c2 = torch.tensor(grid.sqrt_recipm1_alpha_bar[k], dtype=torch.float32)
    return c1 * x - c2 * eps.float()


def initial_state(x_hat0, grid, noise):
    """x_N = α_N·x̂₀ + σ_N·z (the x₀ part of the exact marginal carries 1 − η_N ≈ 2.5e-6 and is dropped)."""
    n = grid.num_steps
    return float(grid.alpha[n]) * x_hat0 + float(grid.sigma[n]) * noise


def _power_integral(p, lo, hi):
    """∫_lo^hi λ^(−p) dλ in float64."""
    if p == 1:
        return math.log(hi / lo)
    return (hi ** (1 - p) - lo ** (1 - p)) / (1 - p)


def gamma_kernel_moments(lam_t, lam_s, gamma):
    """∫K, ∫K·(λ − λ_t), ∫K·(λ − λ_t)²/2 over [λ_s, λ_t] for K = (1+γ)λ_s^(1+γ)λ^−(2+γ) (experimental path)."""
    p = 2.0 + gamma
    c = (1 + gamma) * lam_s ** (1 + gamma)
    m0 = _power_integral(p, lam_s, lam_t)
    m1 = _power_integral(p - 1, lam_s, lam_t)
    m2 = _power_integral(p - 2, lam_s, lam_t)
    return c * m0, c * (m1 - lam_t * m0), c * (m2 - 2 * lam_t * m1 + lam_t ** 2 * m0) / 2


def dossr_step(x, x0, x_hat0, noise, grid, t, d1=None, d2=None):
    """One official step t → s = t − 1: (1), then (2) if ``d1`` is given, then (3) if ``d2`` is given."""
    s = t - 1
    a_s, a_t, lam_s, lam_t = grid.a[s], grid.a[t], grid.lam[s], grid.lam[t]
    eta_s, eta_t = grid.eta[s], grid.eta[t]
    r = lam_s / lam_t
    # (1) first-order DoS-SDE step: state decay, domain-shift (x̂₀) term, x_θ term
    out = (a_s / a_t * r ** 2) * x
    out = out + (a_s * (eta_s / (1 - eta_s) - eta_t / (1 - eta_t) * r ** 2)) * x_hat0
    out = out + (a_s * (1 - r ** 2)) * x0
    # (2) second-order multistep term
    if d1 is not None:
        out = out - (a_s * (lam_s - lam_t) ** 2 / lam_t) * d1
    # (3) third-order multistep term
    if d2 is not None:
        out = out + (d2 * ((lam_t - 3 * lam_s) * (lam_t - lam_s) / 2 - lam_s ** 2 * np.log(r))) * a_s
    # fresh noise, std σ_s√(1 − r²) written as a_s·√(λ_s² − λ_s²r²)
    return out + (noise * np.sqrt(lam_s ** 2 - lam_s ** 2 * r ** 2)) * a_s


def dossr_step_gamma(x, x0, x_hat0, noise, grid, t, gamma, d1=None, d2=None):
    """Experimental step of the γ family (γ = 1 is (1)–(3) up to rounding; γ = 0 is deterministic)."""
    s = t - 1
    a_s, a_t, lam_s, lam_t = grid.a[s], grid.a[t], grid.lam[s], grid.lam[t]
    eta_s, eta_t = grid.eta[s], grid.eta[t]
    rg = (lam_s / lam_t) ** (1 + gamma)
    k0, k1, k2 = gamma_kernel_moments(lam_t, lam_s, gamma)
    out = (a_s / a_t * rg) * x + (a_s * (eta_s / (1 - eta_s) - eta_t / (1 - eta_t) * rg)) * x_hat0 + (a_s * k0) * x0
    if d1 is not None:
        out = out + (a_s * k1) * d1
    if d2 is not None:
        out = out + (a_s * k2) * d2
    if gamma > 0:
        out = out + noise * float(a_s * lam_s * math.sqrt(max(0.0, 1 - (lam_s / lam_t) ** (2 * gamma))))
    return out


@torch.no_grad()
def sample_dossr(model, x_hat0, grid, noise_sampler, *, order=3, gamma=1.0, callback=None):
    """Run the DoS-SDE from τ_N = 499 to τ_0 = 0 and return the final **state** x_0 (not x_θ).

    ``model(x, tau)`` returns ε̂ for the float32 latent ``x`` at the integer timestep ``tau``.
    ``noise_sampler(name, shape)`` returns N(0, I) draws: "init", then "step_0", "step_1", … (one per
    step, fresh each step; none at ``gamma`` = 0). ``callback(info)`` gets k-diffusion-style keys ``x``, ``i``, ``tau``,
    ``lam``, ``denoised`` after every step; raising from it cancels the run.
    ``gamma`` = 1 is the official sampler; other values are the experimental γ family.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"`order` must be 1, 2 or 3, got {order}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"`gamma` must be in [0, 1] (1 = official SDE, 0 = deterministic), got {gamma}")
    x_hat0 = x_hat0.float()
    x = initial_state(x_hat0, grid, noise_sampler("init", x_hat0.shape).to(x_hat0))
    x0_prev = d1_prev = None
    n = grid.num_steps
    for i, t in enumerate(range(n, 0, -1)):
        eps = model(x, int(grid.tau[t]))
        x0 = predict_x0(x, eps, grid, t)
        noise = noise_sampler(f"step_{i}", x.shape).to(x) if gamma > 0 else None  # γ = 0 adds none
        d1 = d2 = None
        if order >= 2 and x0_prev is not None:
            d1 = (x0 - x0_prev) / (grid.lam[t] - grid.lam[t + 1])
        if order >= 3 and d1_prev is not None:
            d2 = 2 * (d1 - d1_prev) / (grid.lam[t] - grid.lam[t + 2])
        if gamma == 1.0:
            x = dossr_step(x, x0, x_hat0, noise, grid, t, d1, d2)
        else:
            x = dossr_step_gamma(x, x0, x_hat0, noise, grid, t, gamma, d1, d2)
        # rotate the history
        x0_prev, d1_prev = x0, d1
        if callback is not None:
            callback({"x": x, "i": i, "tau": int(grid.tau[t]), "lam": float(grid.lam[t]), "denoised": x0})
    return x
