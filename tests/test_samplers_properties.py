"""Property tests of the schedule math: every valid input gives a well-formed schedule, and every
invalid one raises our error."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings, strategies as st

from comfy_turbo import samplers as s

TABLE = s.scaled_linear_sigmas().to(torch.float32)


def table_sigma(timesteps: torch.Tensor) -> torch.Tensor:
    return TABLE[timesteps.long()]


steps_st = st.integers(min_value=1, max_value=4)
strength_st = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False, exclude_min=False)
spacing_st = st.sampled_from(s.SPACINGS)


def valid(steps, strength, spacing):
    if spacing == "trailing":
        return int(steps * strength) >= 1
    return int(10 * strength) >= 1


@settings(max_examples=400, deadline=None)
@given(steps=steps_st, strength=strength_st, spacing=spacing_st)
def test_valid_inputs_give_well_formed_sigmas(steps, strength, spacing):
    if not valid(steps, strength, spacing):
        try:
            s.turbo_sigmas(table_sigma, steps, strength, spacing)
        except s.TurboScheduleError as e:
            assert "strength" in str(e)
            return
        raise AssertionError("expected TurboScheduleError")
    sigmas = s.turbo_sigmas(table_sigma, steps, strength, spacing)
    values = sigmas.tolist()
    assert values[-1] == 0.0
    assert all(a > b for a, b in zip(values, values[1:]))                  # strictly decreasing
    assert all(float(TABLE[0]) <= v <= float(TABLE[-1]) for v in values[:-1])   # within the model's range
    if spacing == "trailing":
        assert len(values) == s.effective_steps(steps, strength) + 1
        assert len(values) - 1 == min(int(steps * strength), steps)
    else:
        assert 1 <= len(values) - 1 <= steps


@settings(max_examples=400, deadline=None)
@given(steps=steps_st, strength=strength_st)
def test_exact_strength_always_runs_every_step_from_the_timestep_strength_selects(steps, strength):
    if 1000 * strength < steps:
        try:
            s.turbo_sigmas(table_sigma, steps, strength, "trailing", "exact")
        except s.TurboScheduleError as e:
            assert "strength" in str(e)
            return
        raise AssertionError("expected TurboScheduleError")
    timesteps = s.turbo_timesteps(steps, strength, "trailing", "exact")
    assert len(timesteps) == steps                                          # never fewer, never none
    assert timesteps[0] == round(1000 * strength) - 1                       # where strength points
    assert all(a > b for a, b in zip(timesteps, timesteps[1:])) and timesteps[-1] >= 0
    sigmas = s.turbo_sigmas(table_sigma, steps, strength, "trailing", "exact").tolist()
    assert len(sigmas) == steps + 1 and sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    if strength == 1.0:
        assert timesteps == s.trailing_timesteps(steps)


@settings(max_examples=400, deadline=None)
@given(steps=steps_st, total=st.integers(min_value=1, max_value=1000))
def test_exact_strength_is_the_reference_where_steps_over_strength_is_whole(steps, total):
    """steps / strength = N whole: exact mode is diffusers' schedule at N steps, wherever the reference's own
    int(N * strength) gives those steps (floating point makes it drop one for some N, e.g. 49 * (1/49))."""
    strength = steps / max(total, steps)
    n = round(steps / strength)
    if int(n * strength) != steps:
        return
    assert s.turbo_timesteps(steps, strength, "trailing", "exact") == s.turbo_timesteps(n, strength)


def test_exact_strength_examples():
    assert s.exact_timesteps(2, 0.3) == [299, 149]                          # the example
    assert s.exact_timesteps(1, 0.3) == [299] and s.exact_timesteps(4, 1.0) == [999, 749, 499, 249]
    assert s.exact_timesteps(2, 2 / 3) == [666, 332] == s.turbo_timesteps(3, 2 / 3)
    for bad_mode in ("linear", None):
        try:
            s.turbo_timesteps(2, 0.5, "trailing", bad_mode)
        except s.TurboScheduleError as e:
            assert "strength_mode" in str(e)
        else:
            raise AssertionError(bad_mode)


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(min_value=1, max_value=1000))
def test_trailing_timesteps_for_any_step_count(steps):
    timesteps = s.trailing_timesteps(steps)
    assert len(timesteps) == steps
    assert timesteps[0] == 999
    assert all(a > b for a, b in zip(timesteps, timesteps[1:]))
    assert timesteps[-1] >= 0


@settings(max_examples=200, deadline=None)
@given(steps=st.one_of(st.integers(max_value=0), st.integers(min_value=1001), st.floats(allow_nan=True),
                       st.text(max_size=3), st.booleans(), st.none()))
def test_invalid_steps_raise_our_error(steps):
    try:
        s.turbo_timesteps(steps)
    except s.TurboScheduleError as e:
        assert "steps" in str(e)
    else:
        raise AssertionError(f"steps={steps!r} was accepted")


@settings(max_examples=200, deadline=None)
@given(strength=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True),
                          st.just(float("nan")), st.text(max_size=3), st.none()))
def test_invalid_strength_raises_our_error(strength):
    try:
        s.turbo_timesteps(4, strength)
    except s.TurboScheduleError as e:
        assert "strength" in str(e)
    else:
        raise AssertionError(f"strength={strength!r} was accepted")


@settings(max_examples=300, deadline=None)
@given(sigma_from=st.floats(min_value=1e-3, max_value=20.0), frac=st.floats(min_value=0.0, max_value=1.0),
       eta=st.floats(min_value=0.0, max_value=1.0))
def test_ancestral_step_preserves_total_variance(sigma_from, frac, eta):
    sigma_to = sigma_from * frac
    down, up = s.ancestral_step(sigma_from, sigma_to, eta)
    assert 0.0 <= up <= sigma_to + 1e-12 and 0.0 <= down <= sigma_to + 1e-12
    assert math.isclose(down ** 2 + up ** 2, sigma_to ** 2, rel_tol=1e-9, abs_tol=1e-12)
