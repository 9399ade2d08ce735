"""Unit tests of samplers/: pure torch, no ComfyUI imported."""
import math
import sys

import pytest
import torch

from comfy_turbo import samplers as s


def test_samplers_import_without_comfyui():
    import subprocess
    code = ("import importlib.util, sys; "
            "spec = importlib.util.spec_from_file_location('comfy_turbo', 'REPO/__init__.py', "
            "submodule_search_locations=['REPO']); m = importlib.util.module_from_spec(spec); "
            "sys.modules['comfy_turbo'] = m; spec.loader.exec_module(m); import comfy_turbo.samplers; "
            "assert not any(k == 'comfy' or k.startswith('comfy.') or k == 'comfy_api' for k in sys.modules), "
            "sorted(sys.modules)")
    from conftest import REPO
    subprocess.run([sys.executable, "-c", code.replace("REPO", str(REPO))], check=True)


@pytest.mark.parametrize("steps,expected", [
    (1, [999]), (2, [999, 499]), (3, [999, 666, 332]), (4, [999, 749, 499, 249])])
def test_trailing_timesteps(steps, expected):
    assert s.trailing_timesteps(steps) == expected


@pytest.mark.parametrize("steps,strength,expected", [
    (2, 0.5, [499]), (4, 0.5, [499, 249]), (4, 0.75, [749, 499, 249]), (4, 0.25, [249]),
    (3, 0.7, [666, 332]), (1, 1.0, [999]), (4, 1.0, [999, 749, 499, 249])])
def test_img2img_strength_runs_last_steps(steps, strength, expected):
    assert s.turbo_timesteps(steps, strength) == expected
    assert s.effective_steps(steps, strength) == len(expected)


@pytest.mark.parametrize("steps,strength", [(1, 0.5), (2, 0.25), (3, 0.3), (4, 0.2), (1, 0.99)])
def test_too_little_strength_is_an_error(steps, strength):
    with pytest.raises(s.TurboScheduleError, match=r"steps \* strength .* < 1"):
        s.turbo_timesteps(steps, strength)


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.0, True, "2"])
def test_bad_steps(steps):
    with pytest.raises(s.TurboScheduleError, match="steps"):
        s.turbo_timesteps(steps)


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.01, float("nan"), float("inf"), "1"])
def test_bad_strength(strength):
    with pytest.raises(s.TurboScheduleError, match="strength"):
        s.turbo_timesteps(2, strength)


def test_unknown_spacing():
    with pytest.raises(s.TurboScheduleError, match="spacing"):
        s.turbo_timesteps(2, 1.0, "leading")


@pytest.mark.parametrize("steps,strength,expected", [
    (4, 1.0, [999, 899, 799, 699]), (1, 1.0, [999]), (2, 0.5, [499, 399]),
    (4, 0.15, [899 - 800]), (3, 0.3, [299, 199, 99])])
def test_stability_spacing_matches_builtin_grid(steps, strength, expected):
    assert s.turbo_timesteps(steps, strength, "stability") == expected


def test_stability_spacing_below_a_tenth_is_an_error():
    with pytest.raises(s.TurboScheduleError, match="0.1"):
        s.turbo_timesteps(1, 0.05, "stability")


def test_scaled_linear_sigma_table():
    table = s.scaled_linear_sigmas()
    assert table.shape == (1000,)
    assert torch.all(table[1:] > table[:-1])
    assert math.isclose(float(table[999]), 14.614642, rel_tol=1e-5)   # SD's well-known sigma_max
    assert math.isclose(float(table[0]), 0.0291675, rel_tol=1e-4)     # and sigma_min


def test_turbo_sigmas_index_the_table_and_end_in_zero():
    table = s.scaled_linear_sigmas()
    sigmas = s.turbo_sigmas(lambda t: table[t.long()], 4)
    assert sigmas.dtype == torch.float32
    expected = [float(table[t]) for t in (999, 749, 499, 249)] + [0.0]
    assert sigmas.tolist() == pytest.approx(expected, rel=1e-6)


def test_ancestral_step_matches_diffusers_formula():
    sigma_from, sigma_to = 14.6146, 4.0817
    down, up = s.ancestral_step(sigma_from, sigma_to, 1.0)
    ref_up = (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5
    assert up == pytest.approx(ref_up)
    assert down == pytest.approx((sigma_to ** 2 - ref_up ** 2) ** 0.5)
    assert s.ancestral_step(sigma_from, sigma_to, 0.0) == (sigma_to, 0.0)
    assert s.ancestral_step(sigma_from, 0.0, 1.0) == (0.0, 0.0)


class CountingDenoiser:
    """x0 prediction of a toy linear model; counts its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, **kwargs):
        self.calls.append(float(sigma[0]))
        return 0.5 * x / (1 + sigma[:, None, None, None] ** 2) ** 0.5


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_one_model_call_per_step(steps, eta):
    table = s.scaled_linear_sigmas()
    sigmas = s.turbo_sigmas(lambda t: table[t.long()], steps)
    model, seen = CountingDenoiser(), []
    x = torch.randn(2, 4, 8, 8) * sigmas[0]
    out = s.sample_turbo_euler(model, x, sigmas, extra_args={"seed": 3}, eta=eta,
                               callback=lambda d: seen.append(d["i"]))
    assert len(model.calls) == steps
    assert model.calls == pytest.approx(sigmas[:-1].tolist())
    assert seen == list(range(steps))
    assert torch.isfinite(out).all() and out.shape == x.shape


def test_one_step_returns_the_denoised_prediction():
    sigmas = torch.tensor([14.6146, 0.0])
    x = torch.randn(1, 4, 8, 8)
    model = CountingDenoiser()
    out = s.sample_turbo_euler(model, x, sigmas, eta=1.0)
    torch.testing.assert_close(out, model(x, sigmas[:1]))


def test_euler_step_is_deterministic_and_ancestral_uses_seeded_noise():
    sigmas = torch.tensor([14.6146, 1.6129, 0.0])
    x = torch.randn(1, 4, 8, 8)
    run = lambda eta, seed: s.sample_turbo_euler(CountingDenoiser(), x, sigmas, {"seed": seed}, eta=eta)
    torch.testing.assert_close(run(0.0, 1), run(0.0, 2))            # Euler ignores the seed
    torch.testing.assert_close(run(1.0, 5), run(1.0, 5))            # ancestral: same seed, same result
    assert not torch.allclose(run(1.0, 5), run(1.0, 6))             # and a new seed changes it


def test_ancestral_noise_is_not_the_initial_noise_stream():
    x = torch.zeros(1, 4, 8, 8)
    first = s.seeded_noise_sampler(x, 7)(1.0, 0.5)
    initial = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(first, initial)


def test_the_largest_seed_wraps_the_ancestral_noise_seed_to_zero():
    x = torch.zeros(1, 4, 8, 8)
    largest = s.seeded_noise_sampler(x, 2 ** 64 - 1)(1.0, 0.5)          # seed + 1 would overflow the generator
    torch.testing.assert_close(largest, torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))


def test_injected_noise_sampler_and_s_noise():
    sigmas = torch.tensor([14.6146, 1.6129, 0.0])
    x = torch.randn(1, 4, 8, 8) * 14.6146
    noise = torch.randn_like(x)
    model = CountingDenoiser()
    base = s.sample_turbo_euler(model, x, sigmas, eta=1.0, s_noise=0.0)
    with_noise = s.sample_turbo_euler(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=lambda a, b: noise)
    # The final step returns the x0 prediction, which depends on the noise added in step 1.
    assert not torch.allclose(base, with_noise)
