"""DoSSR schedule tables: values pinned from the official code's run, and the fixture's float64 arrays."""

import os

import numpy as np
import pytest

from comfyui_diffsr.dossr_core.schedule import eta_schedule, grid_timesteps, make_grid

DATA = os.path.join(os.path.dirname(__file__), "data")

# the official run's tables, N = 5: τ, ᾱ, α, σ, η, λ, a
TABLE_N5 = [
    (0, 0.999150, 0.999575, 0.029155, 2.47e-6, 0.0291672, 0.999572),
    (100, 0.894223, 0.945634, 0.325233, 0.0964168, 0.380630, 0.854459),
    (200, 0.753692, 0.868154, 0.496294, 0.3469862, 0.875427, 0.566917),
    (299, 0.592183, 0.769534, 0.638605, 0.6530138, 2.39162, 0.267018),
    (399, 0.426086, 0.652753, 0.757571, 0.9035832, 12.0371, 0.0629363),
    (499, 0.277670, 0.526944, 0.849900, 0.9999975, 653679, 1.30e-6),
]


def test_n5_table_pinned():
    g = make_grid(5)
    for k, (tau, abar, alpha, sigma, eta, lam, a) in enumerate(TABLE_N5):
        assert g.tau[k] == tau
        for ours, ref in ((g.alpha_bar[k], abar), (g.alpha[k], alpha), (g.sigma[k], sigma), (g.eta[k], eta),
                          (g.lam[k], lam), (g.a[k], a)):
            assert ours == pytest.approx(ref, rel=2e-3), (k, ours, ref)
    assert g.alpha.dtype == np.float64 and g.lam.dtype == np.float64


@pytest.mark.parametrize("n, taus", [
    (1, [0, 499]), (2, [0, 250, 499]), (3, [0, 166, 333, 499]), (5, [0, 100, 200, 299, 399, 499]),
    (10, [0, 50, 100, 150, 200, 250, 299, 349, 399, 449, 499]),
    (15, [0, 33, 67, 100, 133, 166, 200, 233, 266, 299, 333, 366, 399, 432, 466, 499])])
def test_grid_matches_space_timesteps(n, taus):
    assert grid_timesteps(n) == taus


def test_n20_float_accumulation_quirk():
    taus = grid_timesteps(20)
    assert taus[10] == 249  # round(10·499/20) would give 250 (space_timesteps accumulates floats)
    assert len(taus) == 21 and taus[-1] == 499


def test_eta_trunc_12():
    eta = eta_schedule()
    assert eta[0] == pytest.approx(2.47e-6, rel=1e-2)
    assert eta[499] == pytest.approx(0.99999753, rel=1e-7)
    assert (eta[500:] == 1).all()


def test_grid_equals_official_arrays():
    from safetensors.torch import load_file

    ref = load_file(os.path.join(DATA, "dossr", "schedule_N5.safetensors"))
    g = make_grid(5)
    assert list(ref["timesteps"]) == list(g.tau)
    for key, ours in (("alphas_cumprod", g.alpha_bar), ("sqrt_alphas_cumprod", g.alpha), ("sigmas", g.sigma),
                      ("etas", g.eta), ("a", g.a), ("lambdas", g.lam)):
        np.testing.assert_array_equal(ref[key].numpy(), ours)


@pytest.mark.parametrize("bad", [0, -1, 500])
def test_bad_step_counts_refused(bad):
    with pytest.raises(ValueError, match="num_steps"):
        make_grid(bad)
    with pytest.raises(TypeError):
        make_grid(2.0)


def test_a_bool_step_count_is_refused():
    """``True`` is an int to Python: a flag passed where the step count goes would silently run 1 step."""
    for flag in (True, False, np.bool_(True)):
        with pytest.raises(TypeError, match="num_steps"):
            grid_timesteps(flag)
