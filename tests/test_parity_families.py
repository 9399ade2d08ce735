"""Family parity: ``samplers/families.py`` against diffusers' own schedulers, family by family.

Each family's diffusers scheduler is configured as its authors configure it
(:func:`parity_helpers.family_reference`, from the team notes' families.md and the model cards), and
its timesteps are selected by the reference pipeline's own ``retrieve_timesteps`` / ``get_timesteps``.

References (diffusers 0.35.2)
-----------------------------
* Schedulers: ``LCMScheduler`` (scheduling_lcm.py), ``TCDScheduler`` (scheduling_tcd.py),
  ``DDIMScheduler`` with ``timestep_spacing="trailing"`` (scheduling_ddim.py), ``EulerDiscreteScheduler``
  trailing, also ``prediction_type="sample"`` (scheduling_euler_discrete.py),
  ``EulerAncestralDiscreteScheduler`` (scheduling_euler_ancestral_discrete.py),
  ``FlowMatchEulerDiscreteScheduler`` shift 3 and schnell's shift 1 (scheduling_flow_match_euler_discrete.py).
* Pipelines: ``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline`` (the loop:
  ``scale_model_input`` then ``step(..., **prepare_extra_step_kwargs)``; txt2img latents
  ``noise * init_noise_sigma``, img2img ``add_noise`` at ``timesteps[:1]``), ``StableDiffusion3(Img2Img)Pipeline``
  and ``Flux(Img2Img)Pipeline`` (no input scaling; txt2img latents = noise, img2img ``scale_noise``).

How the trajectory is compared
------------------------------
Both loops drive the SAME stand-in network (a fixed nonlinear function of the model input and the
timestep, read as eps, x0 or velocity as the family predicts) with the SAME noise: ours through
``sample_family(..., noise_sampler=...)``, diffusers' by rebinding the scheduler module's ``randn_tensor``
(:func:`parity_helpers.inject_randn_tensor`). Compared at every step: the timestep the network saw
(exactly), the network's input, and the latent entering the step, in diffusers' own space (ours
converted: DDPM latent ``x / sqrt(1 + sigma²)`` for LCM / TCD / DDIM), and the final latent as is.
"""
from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
import zlib

import pytest
import torch

from parity_helpers import (
    REPO_ROOT,
    family_reference,
    family_reference_timesteps,
    inject_randn_tensor,
    max_abs,
    max_rel,
    parity_record,  # noqa: F401  (pytest fixture)
)

from comfy_turbo import samplers
from comfy_turbo.samplers import families as F

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOL = 1e-5
SIGMA_TOL = 1e-5  # relative
SHAPE = (2, 4, 8, 8)
SOURCES = ("diffusers-table", "scaled_linear")


@pytest.fixture(autouse=True, scope="module")
def _quiet_diffusers():
    """The authors' configs carry keys some schedulers ignore, and DMD2's custom timesteps are off the
    LCM grid: diffusers logs a warning for each; silence them here only."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------
# The stand-in network (as in test_parity_trajectory)
# ---------------------------------------------------------------------------------------------
_MIX = torch.tensor([[0.9, -0.3, 0.2, 0.1],
                     [0.2, 0.8, -0.25, 0.05],
                     [-0.1, 0.3, 0.7, 0.2],
                     [0.15, -0.2, 0.1, 0.95]])


def standin_net(x_in: torch.Tensor, t) -> torch.Tensor:
    """A fixed nonlinear "UNet": mixes channels and space, depends on the timestep ``t``."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000.0
    # einsum("oc,bchw->bohw", _MIX, x_in), without BLAS: 8 ms a call on this loaded 2-core machine, this 20 us
    mixed = (_MIX.to(x_in.dtype)[None, :, :, None, None] * x_in[:, None]).sum(2)
    spatial = 0.25 * (x_in.roll(1, dims=-1) + x_in.roll(-1, dims=-2))
    return torch.tanh(mixed * (0.6 + 0.5 * t)) + 0.3 * torch.sin(2.0 * x_in + 3.0 * t) + 0.2 * spatial * t


# ---------------------------------------------------------------------------------------------
# The two loops
# ---------------------------------------------------------------------------------------------
def _noise_module(scheduler):
    import importlib

    return importlib.import_module(type(scheduler).__module__)


def diffusers_run(family, steps, strength, noise, x0=None, step_noises=(), gamma=None):
    """The reference pipeline's loop. Returns the latents entering each step, the network inputs, the
    timesteps seen, the final latent and the number of noise draws."""
    ref = family_reference(family, steps, gamma)
    scheduler = ref.scheduler
    timesteps, t_start = family_reference_timesteps(ref, steps, strength, img2img=x0 is not None)
    flow = ref.pipeline != "sdxl"
    if x0 is None:
        latents = noise if flow else noise * scheduler.init_noise_sigma
    elif flow:
        latents = scheduler.scale_noise(x0, timesteps[:1].repeat(x0.shape[0]), noise)
    else:
        latents = scheduler.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
    xs, inputs, seen = [], [], []
    with inject_randn_tensor(_noise_module(scheduler), step_noises) as draws:
        for t in timesteps:
            xs.append(latents)
            x_in = latents if flow else scheduler.scale_model_input(latents, t)
            inputs.append(x_in)
            seen.append(float(t) if flow else int(t))
            out = scheduler.step(standin_net(x_in, t), t, latents, **ref.step_kwargs)
            latents = out.prev_sample
        n_draws = len(draws)
    return {"xs": xs, "inputs": inputs, "seen": seen, "final": latents, "draws": n_draws,
            "timesteps": timesteps, "t_start": t_start, "scheduler": scheduler}


def sigma_source(family, source):
    """(sigma_of_timestep, fp32-or-fp64 table) for our side: the reference scheduler's own fp32 table
    (isolates the step arithmetic) or ``samplers.scaled_linear_sigmas`` (what the pack ships). Flow
    families compute their sigmas and need no table."""
    if F.family_spec(family).architectures[0] in ("sd3", "flux"):
        return None, None
    if source == "one-timestep-late":  # a deliberately wrong table, for the guard test below
        table = samplers.scaled_linear_sigmas()
        return (lambda t: table[(t.long() - 1).clamp(min=0)]), table
    if source == "diffusers-table":
        ac = family_reference(family, 1).scheduler.alphas_cumprod
        table = ((1 - ac) / ac) ** 0.5
    else:
        table = samplers.scaled_linear_sigmas()
    return (lambda t: table[t.long()]), table


def ours_run(family, steps, strength, noise, x0=None, step_noises=(), gamma=None, source="scaled_linear",
             edit=None):
    sigma_fn, table = sigma_source(family, source)
    log_table = None if table is None else table.double().log()
    schedule = F.family_schedule(family, steps, strength, gamma=gamma, sigma_of_timestep=sigma_fn)
    if edit is not None:
        schedule = edit(schedule)
    seen, inputs, xs = [], [], []

    def model(x, sigma, **_):
        i = len(seen)
        if schedule.is_flow:
            t = schedule.timesteps[i]
        else:  # the nearest table entry, as ComfyUI's ModelSamplingDiscrete.timestep does
            t = int((sigma[:1].double().log()[None, :] - log_table[:, None]).abs().argmin(0))
        seen.append(t)
        x_in = F.model_input(x, sigma, schedule.prediction)
        inputs.append(x_in)
        return F.denoised_from_output(standin_net(x_in, t), x, sigma, schedule.prediction)

    calls = []

    def noise_sampler(sigma, sigma_next):
        calls.append(float(sigma))
        return step_noises[len(calls) - 1]

    x = F.start_latent(schedule, noise, x0)
    final = F.sample_family(model, x, schedule, callback=lambda d: xs.append(d["x"]), disable=True,
                            noise_sampler=noise_sampler)
    if schedule.sampler in ("lcm", "tcd", "ddim"):  # diffusers holds DDPM-space latents there
        xs = [x / (1 + float(s) ** 2) ** 0.5 for x, s in zip(xs, schedule.sigmas)]
    return {"xs": xs, "inputs": inputs, "seen": seen, "final": final, "draws": len(calls), "schedule": schedule}


def _scaled(a, b):
    """max|a - b| / max(1, max|b|): absolute on O(1) tensors, relative on Euler's txt2img latents
    (|x| up to ~60 at sigma_max 14.6, where one fp32 ulp is ~4e-6), as test_parity_trajectory."""
    return max_abs(a, b) / max(1.0, b.abs().max().item())


def _compare(ours, ref):
    assert ours["seen"] == ref["seen"], f"the network saw timesteps {ours['seen']}, diffusers {ref['seen']}"
    assert len(ours["xs"]) == len(ref["xs"]) == len(ours["inputs"]) == len(ref["inputs"])
    pairs = (list(zip(ours["xs"], ref["xs"])) + list(zip(ours["inputs"], ref["inputs"]))
             + [(ours["final"], ref["final"])])
    parts = {
        "max_abs_latents": max(max_abs(a, b) for a, b in zip(ours["xs"], ref["xs"])),
        "max_abs_inputs": max(max_abs(a, b) for a, b in zip(ours["inputs"], ref["inputs"])),
        "max_abs_final": max_abs(ours["final"], ref["final"]),
    }
    parts["max_abs"] = max(parts.values())
    return max(_scaled(a, b) for a, b in pairs), parts


# ---------------------------------------------------------------------------------------------
# Cases: every family at every supported step count (txt2img), and image-to-image at a few strengths
# ---------------------------------------------------------------------------------------------
TCD_GAMMAS = {"tcd": (0.0, 0.3, 0.7, 1.0), "hyper-sd-unified": (1.0, 0.5)}
IMG2IMG = {  # family: [(steps, strength)]; 1.0 = a full-strength img2img (add_noise of the image)
    "sd-turbo": [(2, 0.5), (4, 0.75), (1, 1.0)],
    "sdxl-turbo": [(4, 0.5), (3, 0.75)],
    "sdxl-lightning": [(4, 0.5), (8, 0.75), (2, 1.0)],
    "dmd2": [(4, 0.5), (4, 0.75), (1, 1.0)],
    "hyper-sd": [(4, 0.5), (8, 0.25)],
    "hyper-sd-1step-unet": [(1, 1.0)],
    "hyper-sd-unified": [(4, 0.5), (8, 0.6)],
    "lcm": [(4, 0.5), (8, 0.6), (3, 0.7)],
    "tcd": [(4, 0.5), (8, 0.75)],
    "pcm": [(4, 0.5), (16, 0.5), (16, 0.9)],
    "sd3.5-large-turbo": [(4, 0.3), (4, 0.75), (2, 0.5)],
    "flux.1-schnell": [(4, 0.3), (4, 0.6), (1, 1.0)],
}


def _cases():
    for family, spec in F.FAMILIES.items():
        for gamma in TCD_GAMMAS.get(family, (None,)):
            for steps in spec.steps:
                yield family, steps, 1.0, False, gamma
            for steps, strength in IMG2IMG[family]:
                yield family, steps, strength, True, gamma


CASES = list(_cases())


def _case_id(case):
    family, steps, strength, img2img, gamma = case
    g = "" if gamma is None else f"-g{gamma}"
    return f"{family}-{'img2img' if img2img else 'txt2img'}-N{steps}-s{strength}{g}"


@pytest.mark.parametrize("family,steps,strength,img2img,gamma", CASES, ids=[_case_id(c) for c in CASES])
def test_trajectory_matches_diffusers(family, steps, strength, img2img, gamma, parity_record):
    """Every network input, every latent entering a step and the final latent agree with diffusers'
    ``step`` loop within 1e-5 (scale-relative on Euler's sigma-space latents; plain max-abs with the
    scheduler's own sigma table), and the network sees exactly diffusers' timesteps."""
    gen = torch.Generator().manual_seed(zlib.crc32(_case_id((family, steps, strength, img2img, gamma)).encode()))
    noise = torch.randn(SHAPE, generator=gen)
    x0 = torch.randn(SHAPE, generator=gen) * 0.8 if img2img else None  # an "encoded image"
    step_noises = [torch.randn(SHAPE, generator=gen) for _ in range(steps)]
    ref = diffusers_run(family, steps, strength, noise, x0, step_noises, gamma)
    for source in SOURCES:
        ours = ours_run(family, steps, strength, noise, x0, step_noises, gamma, source)
        err, parts = _compare(ours, ref)
        mode = "img2img" if img2img else "txt2img"
        g = "" if gamma is None else f"-g{gamma}"
        parity_record(f"family/{family}/{mode}/N{steps}-s{strength}{g}/{source}", err, TOL,
                      metric="max_abs/max(1,ref_max)", sampler=ours["schedule"].sampler, **parts)
        assert err <= TOL, (source, parts)
    schedule = ours["schedule"]
    assert list(schedule.timesteps) == ref["seen"]
    # the same noise, draw for draw: diffusers' Euler ancestral also draws on its last step (times 0)
    expected = ref["draws"] - (1 if schedule.sampler == "euler_ancestral" else 0)
    assert ours["draws"] == expected, (ours["draws"], ref["draws"])
    if schedule.sampler in ("lcm", "euler_ancestral") or (schedule.sampler == "tcd" and gamma):
        assert ours["draws"] == len(schedule.timesteps) - 1


def test_injected_noise_actually_matters():
    """Guard for the test above: with other step noise the LCM, TCD and Euler-ancestral trajectories
    move far beyond the tolerance, so the injected noise is really what is compared."""
    gen = torch.Generator().manual_seed(11)
    noise = torch.randn(SHAPE, generator=gen)
    a = [torch.randn(SHAPE, generator=gen) for _ in range(4)]
    b = [torch.randn(SHAPE, generator=gen) for _ in range(4)]
    for family, steps in (("dmd2", 4), ("tcd", 4), ("sdxl-turbo", 4)):
        ref = diffusers_run(family, steps, 1.0, noise, None, a)
        ours = ours_run(family, steps, 1.0, noise, None, b)
        assert max_abs(ours["final"], ref["final"]) > 1e-2, family


def test_the_comparison_catches_a_wrong_schedule():
    """Guards for the test above. Sigmas one timestep late (999 -> 998's sigma) are seen as the wrong
    timesteps; and DDIM's landing at ``t - T // N`` (PCM, 16 steps: 875 where the next call is at 874)
    moves the result by far more than the tolerance, so reproducing it matters."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    for family, steps in (("lcm", 4), ("dmd2", 1), ("sdxl-lightning", 2), ("hyper-sd", 4)):
        ref = diffusers_run(family, steps, 1.0, noise, step_noises=[noise] * steps)
        ours = ours_run(family, steps, 1.0, noise, step_noises=[noise] * steps, source="one-timestep-late")
        assert ours["seen"] == [t - 1 for t in ref["seen"]]
        with pytest.raises(AssertionError, match="the network saw timesteps"):
            _compare(ours, ref)

    def land_on_the_next_timestep(schedule):
        return dataclasses.replace(schedule, landing_sigmas=torch.cat([schedule.sigmas[1:-1],
                                                                       schedule.landing_sigmas[-1:]]))

    ref = diffusers_run("pcm", 16, 1.0, noise)
    good = ours_run("pcm", 16, 1.0, noise)
    naive = ours_run("pcm", 16, 1.0, noise, edit=land_on_the_next_timestep)
    assert _compare(good, ref)[0] <= TOL and _compare(naive, ref)[0] > 1e-3  # measured: 5e-7 against 2e-2


@pytest.mark.parametrize("family,steps", [("dmd2", 4), ("lcm", 4), ("tcd", 4), ("hyper-sd-unified", 3)])
def test_default_seeded_noise_equals_diffusers_generator(family, steps, parity_record):
    """No injection: ``extra_args={"seed": s}`` draws what diffusers draws with
    ``step(..., generator=torch.Generator().manual_seed(s + 1))`` (one draw per step but the last)."""
    seed = 4321
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    ref_info = family_reference(family, steps)
    scheduler = ref_info.scheduler
    timesteps, _ = family_reference_timesteps(ref_info, steps, 1.0, img2img=False)
    generator = torch.Generator().manual_seed(seed + 1)
    latents = noise * scheduler.init_noise_sigma
    for t in timesteps:
        x_in = scheduler.scale_model_input(latents, t)
        out = scheduler.step(standin_net(x_in, t), t, latents, generator=generator, **ref_info.step_kwargs)
        latents = out.prev_sample

    schedule = F.family_schedule(family, steps)
    table = samplers.scaled_linear_sigmas()

    def model(x, sigma, **_):
        t = int((sigma[:1].double().log()[None, :] - table.log()[:, None]).abs().argmin(0))
        x_in = F.model_input(x, sigma, schedule.prediction)
        return F.denoised_from_output(standin_net(x_in, t), x, sigma, schedule.prediction)

    ours = F.sample_family(model, F.start_latent(schedule, noise), schedule, extra_args={"seed": seed})
    err = _scaled(ours, latents)
    parity_record(f"family/{family}/seeded-generator/N{steps}", err, TOL, metric="max_abs/max(1,ref_max)")
    assert err <= TOL


# ---------------------------------------------------------------------------------------------
# Timesteps and sigmas
# ---------------------------------------------------------------------------------------------
def _valid_strengths(family, steps):
    if F.FAMILIES[family].architectures[0] in ("sd3", "flux"):
        return (1.0, 0.9, 0.75, 0.5, 0.3, 0.1)
    return tuple(s for s in (1.0, 0.9, 0.75, 0.6, 0.5, 0.3, 0.25) if int(steps * s) >= 1)


def _reference_sigmas(ref, timesteps, t_start):
    """diffusers' sigmas for the run: the Euler / flow schedulers' own ``sigmas[t_start:]``; for LCM / TCD /
    DDIM (which hold alphā, not sigma) ``sqrt((1 - alphā_t) / alphā_t)`` at the timesteps, then 0."""
    if hasattr(ref.scheduler, "sigmas"):
        return ref.scheduler.sigmas[t_start:]
    ac = ref.scheduler.alphas_cumprod[timesteps.long()]
    return torch.cat([((1 - ac) / ac) ** 0.5, torch.zeros(1)])


@pytest.mark.parametrize("family", F.FAMILY_NAMES)
def test_timesteps_and_sigmas_equal_diffusers(family, parity_record):
    """For every supported step count and a range of strengths, our timesteps are exactly the reference
    pipeline's (``retrieve_timesteps`` then ``get_timesteps``) and our sigmas within 1e-5 relative, ending in
    an exact 0. DDIM's landing points are diffusers' ``alpha_prod_t_prev`` (``alphā`` at ``t - T // N``,
    ``final_alpha_cumprod`` past 0) within 1e-6 relative, compared as alphā = 1 / (1 + sigma²): at t = 0
    diffusers' float32 ``1 - alphā_0 = 0.00085`` itself carries ~1e-5 relative rounding, so sigma there
    cannot be compared to 1e-5."""
    worst, compared = 0.0, []
    for steps in F.FAMILIES[family].steps:
        for strength in _valid_strengths(family, steps):
            for img2img in ((False, True) if strength == 1.0 else (True,)):
                ref = family_reference(family, steps)
                timesteps, t_start = family_reference_timesteps(ref, steps, strength, img2img)
                schedule = F.family_schedule(family, steps, strength)
                if schedule.is_flow:
                    assert list(schedule.timesteps) == timesteps.tolist(), (steps, strength)
                else:
                    assert list(schedule.timesteps) == [int(t) for t in timesteps], (steps, strength)
                ref_sigmas = _reference_sigmas(ref, timesteps, t_start)
                assert schedule.sigmas.dtype == torch.float32 and schedule.sigmas.shape == ref_sigmas.shape
                assert schedule.sigmas[-1].item() == 0.0 and ref_sigmas[-1].item() == 0.0
                err = max_rel(schedule.sigmas[:-1], ref_sigmas[:-1])
                assert err <= SIGMA_TOL, (steps, strength, schedule.sigmas, ref_sigmas)
                if schedule.sampler == "ddim":
                    sch = ref.scheduler
                    prev = [int(t) - sch.config.num_train_timesteps // sch.num_inference_steps for t in timesteps]
                    ac = torch.stack([sch.alphas_cumprod[p] if p >= 0 else sch.final_alpha_cumprod for p in prev])
                    landing_err = max_rel(1 / (1 + schedule.landing_sigmas.double() ** 2), ac)
                    assert landing_err <= 1e-6, (steps, strength, landing_err)
                worst = max(worst, err)
                compared.append([steps, strength, img2img, list(schedule.timesteps)])
    parity_record(f"family-schedule/{family}", worst, SIGMA_TOL, metric="max_rel", cases=len(compared))


def test_spot_values():
    """The numbers the families' references name, so that a change in diffusers itself is noticed too."""
    ts = lambda *a, **k: list(F.family_schedule(*a, **k).timesteps)  # noqa: E731
    assert ts("sd-turbo", 3) == [999, 666, 332]                         # not `simple`'s 999/666/333
    assert ts("sdxl-lightning", 8) == [999, 874, 749, 624, 499, 374, 249, 124]
    assert ts("dmd2", 4) == [999, 749, 499, 249] and ts("dmd2", 1) == [399]
    assert ts("hyper-sd-1step-unet", 1) == [800]
    assert ts("lcm", 4) == [999, 759, 499, 259]                          # not sgm_uniform's 754/509/264
    assert ts("lcm", 2) == [999, 499] and ts("lcm", 1) == [999]
    assert ts("tcd", 8) == [999, 879, 759, 639, 499, 379, 259, 139]
    assert ts("pcm", 16)[:4] == [999, 937, 874, 811]
    assert ts("dmd2", 4, 0.5) == [499, 249] and ts("lcm", 4, 0.75) == [759, 499, 259]
    sd35 = F.family_schedule("sd3.5-large-turbo", 4).sigmas
    assert torch.allclose(sd35, torch.tensor([1.0, 0.8577, 0.6022, 0.0089, 0.0]), atol=1e-4)
    assert F.family_schedule("flux.1-schnell", 4).sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    # flow img2img skips int(N - N * strength) steps: 4 steps at 0.3 run 2 (SD's int rule would run 1)
    assert len(F.family_schedule("flux.1-schnell", 4, 0.3).timesteps) == 2
    # DDIM and TCD end on alphā_0 (sigma 0.029), not at sigma 0
    assert math.isclose(float(F.family_schedule("hyper-sd", 4).landing_sigmas[-1]), 0.02916, rel_tol=1e-3)
    tcd = F.family_schedule("tcd", 4, gamma=0.3)
    assert [F.tcd_intermediate_timestep(t, 0.3) for t in (759, 499, 259, 0)] == [531, 349, 181, 0]
    assert tcd.landing_sigmas[-1] == F.family_schedule("hyper-sd", 4).landing_sigmas[-1]


def test_reference_schedulers_are_the_authors_configs():
    """Each family's reference is the diffusers class and settings its authors name."""
    import diffusers

    expect = {
        "sd-turbo": (diffusers.EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
        "sdxl-turbo": (diffusers.EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing"}),
        "sdxl-lightning": (diffusers.EulerDiscreteScheduler, {"timestep_spacing": "trailing",
                                                              "prediction_type": "epsilon"}),
        "dmd2": (diffusers.LCMScheduler, {"original_inference_steps": 50, "timestep_scaling": 10.0}),
        "hyper-sd": (diffusers.DDIMScheduler, {"timestep_spacing": "trailing", "set_alpha_to_one": False}),
        "hyper-sd-1step-unet": (diffusers.LCMScheduler, {"timestep_scaling": 10.0}),
        "hyper-sd-unified": (diffusers.TCDScheduler, {"original_inference_steps": 50}),
        "lcm": (diffusers.LCMScheduler, {"original_inference_steps": 50, "timestep_scaling": 10.0}),
        "tcd": (diffusers.TCDScheduler, {"original_inference_steps": 50}),
        "pcm": (diffusers.DDIMScheduler, {"timestep_spacing": "trailing", "clip_sample": False,
                                          "set_alpha_to_one": False}),
        "sd3.5-large-turbo": (diffusers.FlowMatchEulerDiscreteScheduler, {"shift": 3.0,
                                                                          "use_dynamic_shifting": False}),
        "flux.1-schnell": (diffusers.FlowMatchEulerDiscreteScheduler, {"shift": 1.0, "use_dynamic_shifting": False}),
    }
    assert set(expect) == set(F.FAMILY_NAMES)
    for family, (cls, fields) in expect.items():
        ref = family_reference(family, F.FAMILIES[family].steps[-1])
        assert type(ref.scheduler) is cls, family
        for key, value in fields.items():
            assert ref.scheduler.config[key] == value, (family, key)
        if ref.pipeline == "sdxl":
            assert ref.scheduler.config.prediction_type == "epsilon"
            assert (ref.scheduler.config.beta_start, ref.scheduler.config.beta_end) == (0.00085, 0.012)
            assert ref.scheduler.config.beta_schedule == "scaled_linear"
    assert family_reference("sdxl-lightning", 1).scheduler.config.prediction_type == "sample"
    assert family_reference("tcd", 4).step_kwargs == {"eta": 0.3}
    assert family_reference("hyper-sd-unified", 4).step_kwargs == {"eta": 1.0}


def test_family_settings():
    """Sampler, prediction and initial noise per family, as the references use them."""
    expect = {  # family: (sampler, prediction at the largest step count, initial noise)
        "sd-turbo": ("euler", "epsilon", "sigma"), "sdxl-turbo": ("euler_ancestral", "epsilon", "sigma"),
        "sdxl-lightning": ("euler", "epsilon", "sigma"), "dmd2": ("lcm", "epsilon", "unit"),
        "hyper-sd": ("ddim", "epsilon", "unit"), "hyper-sd-1step-unet": ("lcm", "epsilon", "unit"),
        "hyper-sd-unified": ("tcd", "epsilon", "unit"), "lcm": ("lcm", "epsilon", "unit"),
        "tcd": ("tcd", "epsilon", "unit"), "pcm": ("ddim", "epsilon", "unit"),
        "sd3.5-large-turbo": ("euler", "flow", "sigma"), "flux.1-schnell": ("euler", "flow", "sigma"),
    }
    for family, (sampler, prediction, initial_noise) in expect.items():
        schedule = F.family_schedule(family, F.FAMILIES[family].steps[-1])
        assert (schedule.sampler, schedule.prediction, schedule.initial_noise) == (sampler, prediction,
                                                                                    initial_noise), family
    assert F.family_schedule("sdxl-lightning", 1).prediction == "sample"
    assert F.family_schedule("sdxl-turbo", 2).eta == 1.0 and F.family_schedule("sd-turbo", 2).eta == 0.0
    assert F.family_schedule("tcd", 4).gamma == 0.3 and F.family_schedule("hyper-sd-unified", 4).gamma == 1.0
    assert F.family_schedule("tcd", 4, gamma=0.6).gamma == 0.6


# ---------------------------------------------------------------------------------------------
# Initial noise: what the network sees first
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,steps", [("dmd2", 1), ("dmd2", 4), ("hyper-sd-1step-unet", 1), ("lcm", 4),
                                          ("tcd", 2), ("hyper-sd", 2), ("pcm", 4)])
def test_unit_noise_families_feed_the_noise_itself(family, steps, parity_record):
    """LCM / TCD / DDIM families start text-to-image where the network's first input IS the unit noise
    (``init_noise_sigma = 1``), also below sigma_max (DMD2 399, Hyper-SD 800), where ComfyUI's KSampler
    would scale by sigma instead: 24 % (399) and 1.9 % (800) less."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    ref = diffusers_run(family, steps, 1.0, noise, step_noises=[noise] * steps)
    ours = ours_run(family, steps, 1.0, noise, step_noises=[noise] * steps)
    err = max(max_abs(ours["inputs"][0], noise), max_abs(ref["inputs"][0], noise))
    parity_record(f"family-initial-noise/{family}/N{steps}", err, 1e-6)
    assert err <= 1e-6
    sigma = float(ours["schedule"].sigmas[0])
    comfy_sigma_scaling = sigma / (1 + sigma ** 2) ** 0.5  # ComfyUI's noise * sigma, as the network sees it
    if ours["schedule"].timesteps[0] == 399:
        assert 0.23 < 1 - comfy_sigma_scaling < 0.25
    if ours["schedule"].timesteps[0] == 800:
        assert 0.018 < 1 - comfy_sigma_scaling < 0.020


@pytest.mark.parametrize("family", ["sd-turbo", "sdxl-lightning"])
def test_sigma_noise_families_start_at_sigma_max(family):
    """Trailing-Euler families start text-to-image at ``noise * sigma_max`` (diffusers' trailing
    ``init_noise_sigma``), so the network first sees ``noise * sigma / sqrt(1 + sigma²)``."""
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ref = diffusers_run(family, 1, 1.0, noise)
    schedule = F.family_schedule(family, 1)
    start = F.start_latent(schedule, noise)
    assert max_rel(start, noise * ref["scheduler"].init_noise_sigma) <= 1e-6
    assert max_abs(F.model_input(start, schedule.sigmas[0], "epsilon"), ref["inputs"][0]) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Step functions
# ---------------------------------------------------------------------------------------------
def test_step_functions_end_as_the_references_end():
    """DDIM / TCD return the DDPM-space latent at alphā_0 after their last step; DDIM between aligned
    timesteps is the Euler step; flow Euler is ``x + (sigma_next - sigma) * v``."""
    gen = torch.Generator().manual_seed(2)
    x, x0 = torch.randn(SHAPE, generator=gen) * 3, torch.randn(SHAPE, generator=gen)
    sigma, sigma0 = 2.5, float(samplers.scaled_linear_sigmas()[0])
    eps = (x - x0) / sigma
    a0 = 1 / (1 + sigma0 ** 2)
    end = a0 ** 0.5 * x0 + (1 - a0) ** 0.5 * eps
    assert max_abs(F.ddim_step(x0, x, sigma, sigma0, 0.0), end) <= 1e-6
    assert max_abs(F.tcd_step(x0, x, sigma, sigma0, 0.0, None), end) <= 1e-6
    assert max_abs(F.ddim_step(x0, x, sigma, 1.2, 1.2), F.euler_step(x0, x, sigma, 1.2)) <= 1e-6
    v = torch.randn(SHAPE, generator=gen)
    xf = torch.randn(SHAPE, generator=gen)
    assert max_abs(F.flow_euler_step(xf - 0.7 * v, xf, 0.7, 0.4), xf + (0.4 - 0.7) * v) <= 1e-6
    c_skip, c_out = F.lcm_boundary_scalings(249)
    assert math.isclose(c_skip, 0.25 / (2490 ** 2 + 0.25)) and math.isclose(c_out, 2490 / (2490 ** 2 + 0.25) ** 0.5)


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------
BAD_STEPS = [("sd-turbo", 5, "1 to 4"), ("sdxl-turbo", 0, "1 to 4"), ("sdxl-lightning", 3, "1, 2, 4 or 8"),
             ("dmd2", 2, "1 or 4"), ("hyper-sd", 1, "2, 4 or 8"), ("hyper-sd-1step-unet", 2, "1 ("),
             ("hyper-sd-unified", 9, "1 to 8"), ("lcm", 12, "1 to 8"), ("tcd", 0, "1 to 8"),
             ("pcm", 6, "2, 4, 8 or 16"), ("sd3.5-large-turbo", 8, "1 to 4"), ("flux.1-schnell", 5, "1 to 4")]


@pytest.mark.parametrize("family,steps,names", BAD_STEPS, ids=[b[0] for b in BAD_STEPS])
def test_out_of_range_steps_are_refused(family, steps, names):
    with pytest.raises(F.FamilyError, match=f"{re.escape(family)} supports steps {re.escape(names)}"):
        F.family_schedule(family, steps)
    for bad in (2.0, True, "4", None):
        with pytest.raises(F.FamilyError, match="steps must be an integer"):
            F.family_schedule(family, bad)


BAD_STRENGTH = [("sd-turbo", 4, 0.2, "from 0.25 to 1"), ("sdxl-lightning", 2, 0.4, "from 0.5 to 1"),
                ("dmd2", 4, 0.24, "from 0.25 to 1"), ("dmd2", 1, 0.9, "strength 1 only"),
                ("sdxl-lightning", 1, 0.5, "strength 1 only"), ("hyper-sd-1step-unet", 1, 0.99, "strength 1 only"),
                ("lcm", 3, 0.33, "from 0.333333 to 1"), ("tcd", 8, 0.1, "from 0.125 to 1"),
                ("pcm", 16, 0.05, "from 0.0625 to 1"), ("hyper-sd", 2, 1.5, "from 0.5 to 1"),
                ("sd3.5-large-turbo", 4, 0.0, r"in \(0, 1\]"), ("flux.1-schnell", 4, 1.01, r"in \(0, 1\]"),
                ("flux.1-schnell", 4, -0.5, r"in \(0, 1\]")]


@pytest.mark.parametrize("family,steps,strength,names", BAD_STRENGTH,
                         ids=[f"{b[0]}-N{b[1]}-s{b[2]}" for b in BAD_STRENGTH])
def test_out_of_range_strength_is_refused(family, steps, strength, names):
    """Strengths where the reference pipeline would silently run no step (or are not strengths) raise,
    naming the family's range."""
    with pytest.raises(F.FamilyError, match=f"{re.escape(family)}.*{names}"):
        F.family_schedule(family, steps, strength)
    if 0 < strength < 1:  # diffusers itself runs nothing there
        ref = family_reference(family, steps)
        timesteps, _ = family_reference_timesteps(ref, steps, strength, img2img=True)
        assert len(timesteps) == 0, (family, steps, strength, timesteps)


def test_other_refusals():
    assert issubclass(F.FamilyError, ValueError) and issubclass(F.FamilyError, samplers.TurboScheduleError)
    with pytest.raises(F.FamilyError, match="Unknown family 'turbo'.*sdxl-lightning"):
        F.family_schedule("turbo", 4)
    for bad in (-0.1, 1.5, True, "0.3"):
        with pytest.raises(F.FamilyError, match=r"tcd: gamma .* \[0, 1\]"):
            F.family_schedule("tcd", 4, gamma=bad)
    with pytest.raises(F.FamilyError, match="dmd2 does not sample with TCD"):
        F.family_schedule("dmd2", 4, gamma=0.3)
    for bad in (float("nan"), float("inf"), "1", None):
        with pytest.raises(F.FamilyError, match="strength must be a finite number"):
            F.family_schedule("lcm", 4, bad)
    with pytest.raises(F.FamilyError, match="flux.1-schnell is a family of flux models; this model is sdxl"):
        F.check_architecture("flux.1-schnell", "sdxl")
    F.check_architecture("hyper-sd", "sd1")
    F.check_architecture("dmd2", "sdxl")


def test_families_import_without_comfyui():
    """``samplers/families.py`` keeps the room's rule: torch and the standard library only."""
    code = ("import importlib.util, sys; "
            "spec = importlib.util.spec_from_file_location('comfy_turbo', 'REPO/__init__.py', "
            "submodule_search_locations=['REPO']); m = importlib.util.module_from_spec(spec); "
            "sys.modules['comfy_turbo'] = m; spec.loader.exec_module(m); import comfy_turbo.samplers.families; "
            "bad = [k for k in sys.modules if k.split('.')[0] in ('comfy', 'comfy_api', 'diffusers')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code.replace("REPO", str(REPO_ROOT))], check=True)
