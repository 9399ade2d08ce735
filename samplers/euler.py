"""The CFG-free Euler / Euler-ancestral loop used by SD-Turbo and SDXL-Turbo.

One denoiser evaluation per step and no classifier-free guidance. With ``eta=1`` each step is
diffusers' ``EulerAncestralDiscreteScheduler.step`` (sdxl-turbo's scheduler); with ``eta=0`` it
is ``EulerDiscreteScheduler.step`` with ``s_churn=0`` (sd-turbo's). The function has
k-diffusion's sampler signature, so ComfyUI's ``KSAMPLER`` can drive it.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

NOISE_SCALES = ("diffusers", "comfy")
SEED_RANGE = 2 ** 64  # torch generators take seeds 0 .. 2**64 - 1, the seed inputs' range
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into the deterministic target ``sigma_down`` and fresh noise ``sigma_up``.

    k-diffusion's ``get_ancestral_step``; at eta=1 it equals diffusers' EulerAncestral
    ``sigma_up = sqrt(s_to² (s_from² - s_to²) / s_from²)``, ``sigma_down = sqrt(s_to² - sigma_up²)``.
    """
    sigma_from, sigma_to = float(sigma_from), float(sigma_to)
    if not eta or sigma_to == 0.0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    sigma_down = math.sqrt(max(sigma_to ** 2 - sigma_up ** 2, 0.0))
    return sigma_down, sigma_up


def seeded_noise_sampler(x: torch.Tensor, seed: Optional[int]) -> NoiseSampler:
    """Fresh Gaussian noise per step from a generator seeded with ``seed + 1`` (modulo 2**64).

    The offset keeps the ancestral noise independent of the initial noise, which ComfyUI draws
    from ``seed`` itself (newer ComfyUI applies the same offset on the CPU). The largest seed,
    2**64 - 1, wraps to 0 instead of overflowing the generator.
    """
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed((int(seed) + 1) % SEED_RANGE)
    return lambda sigma, sigma_next: torch.randn(
        x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)


@torch.no_grad()
def sample_turbo_euler(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                       callback: Optional[Callable[[dict], None]] = None, disable: Optional[bool] = None,
                       eta: float = 1.0, s_noise: float = 1.0,
                       noise_sampler: Optional[NoiseSampler] = None) -> torch.Tensor:
    """Run ``len(sigmas) - 1`` CFG-free Euler(-ancestral) steps; ``model(x, sigma)`` returns x0.

    ``x`` is the already-noised latent at ``sigmas[0]``. Each step calls ``model`` exactly once.
    ``callback`` receives k-diffusion's dict (x, i, sigma, sigma_hat, denoised) after each call,
    which is where ComfyUI updates the progress bar, draws previews and honours Cancel.
    """
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None:
        noise_sampler = seeded_noise_sampler(x, extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0.0:
            x = denoised
            continue
        derivative = (x - denoised) / sigma
        x = x + derivative * (sigma_down - sigma)
        if sigma_up > 0.0:
            x = x + noise_sampler(sigma, sigma_next) * (s_noise * sigma_up)
    return x
