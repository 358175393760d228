"""DoSSR noise schedule, shifting sequence and timestep grid (Cui et al., NeurIPS 2024, §3; upstream
`ldm/modules/diffusionmodules/util.py`, `model/shift_sampler.py`).

The domain-shift forward process mixes the HR latent x₀ with the LR latent x̂₀:

    q(x_t | x₀, x̂₀) = N(α_t[(1 − η_t)·x₀ + η_t·x̂₀], σ_t² I),   α_t = √ᾱ_t,  σ_t = √(1 − ᾱ_t),

with SD's scaled-linear β and the shifting sequence η ("trunc_12"): a half cosine from ≈0 to ≈1 over
t < t₁ = 500, then η = 1. Sampling starts at t₁ − 1 = 499, where the state is (almost) a noisy x̂₀.

Every table here is float64 and named after the paper's symbols. Coefficients become Python floats
only inside a sampler step. (The official checkpoint stores η under the buffer name "lambdas";
here η is ``eta`` and λ is the sampler's λ_t = σ_t / (α_t(1 − η_t)).)
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..sr_common.sd21 import NUM_TRAIN_TIMESTEPS, scaled_linear_betas

T1 = NUM_TRAIN_TIMESTEPS // 2  # start of η = 1 ("trunc_12"); the trained model needs exactly this value


def beta_schedule():
    """β_i = linspace(√0.00085, √0.012, 1000)_i², i = 0..999 (torch float64 linspace, as SD)."""
    return scaled_linear_betas(torch.float64).numpy()


def alpha_bar_schedule():
    """ᾱ_i = ∏_{k≤i} (1 − β_k)."""
    return np.cumprod(1.0 - beta_schedule(), axis=0)


def eta_schedule():
    """Shifting sequence: η_i = (1 − cos(π·u_i))/2 with u = linspace(0.001, 0.999, t₁) for i < t₁, else 1."""
    eta = torch.ones(NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    u = torch.linspace(0.001, 0.999, T1, dtype=torch.float64)
    eta[:T1] = (1 - torch.cos(u * math.pi)) / 2
    return eta.numpy()


def grid_timesteps(num_steps):
    """τ_0 < … < τ_N: N + 1 points spread over [0, t₁ − 1], ascending.

    As guided-diffusion's ``space_timesteps(t₁, str(N + 1))``: the position accumulates the float
    stride (t₁ − 1)/N and each point is Python's ``round`` of it (half to even). This is *not*
    round(k·(t₁ − 1)/N): for N = 20 the accumulation gives 249 at k = 10, not 250.
    """
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool):
        raise TypeError(f"`num_steps` must be an int, got {type(num_steps).__name__}")
    if not 1 <= num_steps <= T1 - 1:
        raise ValueError(f"`num_steps` must be between 1 and {T1 - 1}, got {num_steps}")
    stride = (T1 - 1) / num_steps
    position, taken = 0.0, []
    for _ in range(num_steps + 1):
        taken.append(round(position))
        position += stride
    return sorted(set(taken))


@dataclass(frozen=True)
class DoSSRGrid:
    """Per-grid-point float64 tables, index k = 0..N with τ_0 = 0 and τ_N = 499.

    ``alpha_bar`` is re-derived as the official sampler does (spaced β_k = 1 − ᾱ[τ_k]/ᾱ[τ_{k−1}],
    then a cumulative product), equal to ᾱ[τ_k] up to float64 rounding.
    """

    tau: np.ndarray         # integer timesteps given to the network (τ_N … τ_1 are called)
    alpha_bar: np.ndarray   # ᾱ_k
    alpha: np.ndarray       # α_k = √ᾱ_k
    sigma: np.ndarray       # σ_k = √(1 − ᾱ_k)
    eta: np.ndarray         # η_k = η[τ_k]
    a: np.ndarray           # a_k = α_k (1 − η_k)
    lam: np.ndarray         # λ_k = σ_k / a_k
    sqrt_recip_alpha_bar: np.ndarray    # 1/α_k, for x_θ = x/α − (σ/α)·ε̂
    sqrt_recipm1_alpha_bar: np.ndarray  # σ_k/α_k = √(1/ᾱ_k − 1)

    @property
    def num_steps(self):
        return len(self.tau) - 1


def make_grid(num_steps):
    """The float64 tables of an N-step DoSSR run."""
    tau = grid_timesteps(num_steps)
    alpha_bar_full = alpha_bar_schedule()
    eta_full = eta_schedule()
    betas, last = [], 1.0
    for t in tau:
        betas.append(1 - alpha_bar_full[t] / last)
        last = alpha_bar_full[t]
    alpha_bar = np.cumprod(1.0 - np.array(betas, dtype=np.float64), axis=0)
    eta = np.array([eta_full[t] for t in tau], dtype=np.float64)
    alpha = np.sqrt(alpha_bar)
    sigma = np.sqrt(1.0 - alpha_bar)
    a = alpha * (1.0 - eta)
    return DoSSRGrid(tau=np.array(tau, dtype=np.int64), alpha_bar=alpha_bar, alpha=alpha, sigma=sigma, eta=eta, a=a,
                     lam=sigma / a, sqrt_recip_alpha_bar=np.sqrt(1.0 / alpha_bar),
                     sqrt_recipm1_alpha_bar=np.sqrt(1.0 / alpha_bar - 1))
