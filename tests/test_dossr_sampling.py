"""The DoS-SDE sampler: bit parity with the official per-step states, and a closed-form toy model."""

import json
import math
import os

import pytest
import torch

from comfyui_diffsr.dossr_core.sampling import dossr_step, dossr_step_gamma, gamma_kernel_moments, sample_dossr
from comfyui_diffsr.dossr_core.schedule import make_grid

from conftest import fixture_noise

DATA = os.path.join(os.path.dirname(__file__), "data")

FIX = os.path.join(DATA, "dossr")
# the fixtures are committed: a checkout without them fails here instead of collecting no parity case
CASES = json.load(open(os.path.join(FIX, "cases.json"), encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_sampler_bit_parity_with_official_eps(case):
    """Fed the official ε̂ and noises, every state equals the official one bit for bit (same float order;
    measured: all 7 cases bit-equal)."""
    from safetensors.torch import load_file

    d = load_file(os.path.join(FIX, case["tensors"]))
    noise = fixture_noise(d, case["steps"])
    calls, states = [], []

    def model(x, tau):
        calls.append(tau)
        return d[f"eps_{len(calls) - 1}"]

    sample_dossr(model, d["x_hat0"], make_grid(case["steps"]), lambda name, shape: noise[name],
                 callback=lambda info: states.append(info["x"]))
    assert calls == case["timesteps_called"]
    assert len(states) == len(d["x_steps"]) == case["steps"]
    for k, (ours, ref) in enumerate(zip(states, d["x_steps"])):
        assert torch.equal(ours, ref), (k, (ours - ref).abs().max().item())


def oracle(x0, grid):
    """ε̂ of a model that knows x₀: x_θ = x₀ exactly (up to float32)."""
    def model(x, tau):
        k = int(list(grid.tau).index(tau))
        return (x - float(grid.alpha[k]) * x0) / float(grid.sigma[k])
    return model


def antithetic(gen, drawn):
    """A noise sampler for a batch of 2: draws z (recorded in ``drawn``, float64) and returns (z, −z)."""
    def sample(name, shape):
        z = torch.randn((1,) + tuple(shape[1:]), generator=gen)
        drawn[name] = z.double()
        return torch.cat([z, -z])
    return sample


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0])
def test_toy_oracle_keeps_the_domain_shift_marginal(gamma):
    """With x_θ = x₀ every step of the γ family is exact: x_0 ~ N(α_0[(1−η_0)x₀ + η_0 x̂₀], σ_0²) for any γ
    (state decay r^(1+γ), x_θ weight ∫K = 1 − r^(1+γ), noise variance 1 − r^(2γ) must fit together).
    The noise is antithetic (z, −z), so the mean is exact up to rounding (measured ≤ 2.1e-7 off for all γ;
    a wrong exponent moves it by 0.05–0.35); the std keeps sampling error (measured ≤ 0.24 %; a wrong noise
    variance moves it by 12–32 %)."""
    grid = make_grid(5)
    x0 = torch.full((2, 4, 256, 256), 0.7)
    x_hat0 = torch.full_like(x0, -0.4)
    gen = torch.Generator().manual_seed(1)
    out = sample_dossr(oracle(x0, grid), x_hat0, grid, antithetic(gen, {}), gamma=gamma)
    mean = grid.alpha[0] * ((1 - grid.eta[0]) * 0.7 + grid.eta[0] * -0.4)
    assert out.mean().item() == pytest.approx(mean, abs=2e-6)
    assert out.std().item() == pytest.approx(grid.sigma[0], rel=3e-3)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 0.99, 1.0])
def test_toy_oracle_follows_the_exact_normalised_recursion(gamma):
    """Pathwise: in y = x/a − η/(1−η)·x̂₀ = x₀ + λ·ε, with x_θ = x₀, the normalised error ε = (y − x₀)/λ follows
    ε_s = r^γ·ε_t + √(1 − r^(2γ))·z (r = λ_s/λ_t; unit variance kept) from ε_N = z_init + (x̂₀ − x₀)/λ_N.
    The sampler's output must equal a_0(x₀ + λ_0ε_0 + η_0/(1−η_0)·x̂₀) for the same draws (float64 reference;
    measured ≤ 5.3e-7 off for all γ). γ = 0.99 is a γ-family run, not the official step (which is 2.4e-4 off)."""
    grid = make_grid(5)
    x0 = torch.full((2, 4, 64, 64), 0.7)
    x_hat0 = torch.full_like(x0, -0.4)
    drawn = {}
    out = sample_dossr(oracle(x0, grid), x_hat0, grid, antithetic(torch.Generator().manual_seed(2), drawn),
                       gamma=gamma)
    for sign, half in ((1, out[:1]), (-1, out[1:])):
        eps = (-0.4 - 0.7) / grid.lam[5] + sign * drawn["init"]
        for i, t in enumerate(range(5, 0, -1)):
            r = grid.lam[t - 1] / grid.lam[t]
            eps = r ** gamma * eps + (math.sqrt(1 - r ** (2 * gamma)) * sign * drawn[f"step_{i}"] if gamma else 0)
        ref = grid.a[0] * (0.7 + grid.lam[0] * eps + grid.eta[0] / (1 - grid.eta[0]) * -0.4)
        assert (half.double() - ref).abs().max().item() < 2e-6


def test_orders_agree_when_x_theta_is_constant():
    grid = make_grid(5)
    x0 = torch.randn(1, 4, 16, 16)
    x_hat0 = torch.randn(1, 4, 16, 16)
    outs = []
    for order in (1, 2, 3):
        gen = torch.Generator().manual_seed(3)
        outs.append(sample_dossr(oracle(x0, grid), x_hat0, grid, lambda n, s: torch.randn(s, generator=gen),
                                 order=order))
    assert torch.allclose(outs[0], outs[2], atol=1e-4) and torch.allclose(outs[1], outs[2], atol=1e-4)


def test_each_order_adds_its_difference_from_the_step_that_has_it():
    """Order k takes the Taylor terms up to D_(k−1), each from the first step with enough history (D1 from step 1,
    D2 from step 2): with an x_θ that moves from step to step, the orders' states are equal after step 0, orders 2
    and 3 after step 1 (order 1 apart), and all three apart after step 2. The parity cases run order 3 only, and
    the constant-x_θ test above has D1 = D2 = 0, so an order 2 that took D2 (or an order 3 that did not) passed
    both."""
    grid = make_grid(4)
    x_hat0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    def model(x, tau):  # a smooth ε̂ whose x_θ is not constant along the path
        return torch.tanh(x) * (tau / 500) + 0.1

    states = {}
    for order in (1, 2, 3):
        gen = torch.Generator().manual_seed(6)
        states[order] = []
        sample_dossr(model, x_hat0, grid, lambda name, shape: torch.randn(shape, generator=gen), order=order,
                     callback=lambda info: states[order].append(info["x"]))
    first, second, third = (tuple(states[order][i] for order in (1, 2, 3)) for i in range(3))
    assert torch.equal(first[0], first[1]) and torch.equal(first[1], first[2])
    assert not torch.equal(second[0], second[1]) and torch.equal(second[1], second[2])
    assert not torch.equal(third[0], third[1]) and not torch.equal(third[1], third[2])


def test_first_step_is_the_x_hat0_x_theta_mix():
    """λ_N ≈ 6.5e5: the first step is α_s η_s x̂₀ + α_s(1−η_s) x_θ + σ_s z (float64 keeps it finite)."""
    grid = make_grid(5)
    x, x0, xh, z = (torch.randn(1, 4, 8, 8) for _ in range(4))
    out = dossr_step(x, x0, xh, z, grid, 5)
    s = 4
    ref = grid.alpha[s] * grid.eta[s] * xh + grid.alpha[s] * (1 - grid.eta[s]) * x0 + grid.sigma[s] * z
    assert torch.isfinite(out).all() and torch.allclose(out, ref.float(), atol=1e-4)  # (a_s/a_t)r² ≈ 1.6e-5


def test_gamma_family_at_one_is_the_official_step():
    grid = make_grid(5)
    x, x0, xh, z, d1, d2 = (torch.randn(1, 4, 8, 8) for _ in range(6))
    for t in (3, 2, 1):
        a = dossr_step(x, x0, xh, z, grid, t, d1, d2)
        b = dossr_step_gamma(x, x0, xh, z, grid, t, 1.0, d1, d2)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5)
    k0, k1, k2 = gamma_kernel_moments(grid.lam[2], grid.lam[1], 1.0)
    lam_t, lam_s = grid.lam[2], grid.lam[1]
    assert k1 == pytest.approx(-(lam_s - lam_t) ** 2 / lam_t, rel=1e-9)


def test_gamma_zero_is_deterministic():
    grid = make_grid(5)
    x0 = torch.randn(1, 4, 8, 8)
    x_hat0 = torch.randn(1, 4, 8, 8)
    init = torch.randn(1, 4, 8, 8)
    outs, asked = [], []

    def noise(name, shape):
        asked.append(name)
        return init if name == "init" else torch.randn(shape, generator=gen)

    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        outs.append(sample_dossr(oracle(x0, grid), x_hat0, grid, noise, gamma=0.0))
    assert torch.equal(outs[0], outs[1])
    assert asked == ["init", "init"]  # no step noise is drawn where none is added


def test_callback_can_cancel():
    grid = make_grid(3)

    def stop(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_dossr(lambda x, t: torch.zeros_like(x), torch.zeros(1, 4, 8, 8), grid,
                     lambda n, s: torch.zeros(s), callback=stop)


def test_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        sample_dossr(None, torch.zeros(1, 4, 8, 8), make_grid(2), None, order=4)
    with pytest.raises(ValueError, match="gamma"):
        sample_dossr(None, torch.zeros(1, 4, 8, 8), make_grid(2), None, gamma=2.0)


def test_callback_reports_the_step_grid_point_and_its_x0_prediction():
    """The callback's k-diffusion-style keys (a preview or a progress display reads them): after step i, ``tau`` is
    the timestep the network was called at and ``lam`` its λ = σ/(α(1−η)) on the grid (N → 1), ``denoised`` the x_θ
    of that step: with a network that knows x₀, x₀ itself; ``x`` the new state."""
    steps = 3
    grid = make_grid(steps)
    x0 = torch.full((1, 4, 8, 8), 0.7)
    x_hat0 = torch.full_like(x0, -0.4)
    gen = torch.Generator().manual_seed(4)
    called, infos = [], []
    known = oracle(x0, grid)

    def model(x, tau):
        called.append(tau)
        return known(x, tau)

    out = sample_dossr(model, x_hat0, grid, lambda name, shape: torch.randn(shape, generator=gen),
                       callback=infos.append)
    assert [info["i"] for info in infos] == [0, 1, 2]
    assert [info["tau"] for info in infos] == called == [499, 333, 166]
    for info, t in zip(infos, (3, 2, 1)):
        sigma, alpha = math.sqrt(1 - grid.alpha_bar[t]), math.sqrt(grid.alpha_bar[t])
        assert isinstance(info["lam"], float)
        assert info["lam"] == pytest.approx(sigma / (alpha * (1 - grid.eta[t])), rel=1e-12)
        torch.testing.assert_close(info["denoised"], x0, atol=1e-4, rtol=0)
    assert infos[0]["lam"] > infos[1]["lam"] > infos[2]["lam"] > grid.lam[0]
    assert infos[-1]["x"] is out
