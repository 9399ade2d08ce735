"""Turbo scheduler: diffusers' trailing timesteps, looked up in the model's own sigma table."""
from __future__ import annotations

import torch

from comfy_api.latest import io

from ..samplers import SPACINGS, STRENGTH_MODES, TurboScheduleError, turbo_sigmas
from .errors import TurboError


def turbo_model_sigmas(model, steps: int, strength: float = 1.0, spacing: str = "trailing",
                       strength_mode: str = "diffusers") -> torch.Tensor:
    model_sampling = model.get_model_object("model_sampling")
    try:
        return turbo_sigmas(model_sampling.sigma, steps, strength, spacing, strength_mode)
    except TurboScheduleError as e:
        raise TurboError(str(e)) from None


class TurboScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TurboScheduler",
            display_name="Turbo Scheduler (trailing)",
            category="sampling/turbo",
            description=(
                "Sigmas for 1-4 step SD-Turbo / SDXL-Turbo sampling at diffusers' trailing timesteps "
                "(4 steps: 999, 749, 499, 249). Strength < 1 runs the last int(steps*strength) of them, "
                "as diffusers' img2img does, or with strength_mode 'exact' always all steps, starting at the "
                "timestep strength selects. 'stability' spacing reproduces the built-in SDTurboScheduler."),
            inputs=[
                io.Model.Input("model", tooltip="The Turbo model whose sigma table the timesteps index."),
                io.Int.Input("steps", default=1, min=1, max=4,
                             tooltip="Number of timesteps on the full schedule: 1 to 4."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1.0 for text-to-image. Image-to-image: how much of the image is "
                                       "redrawn (see strength_mode)."),
                io.Combo.Input("spacing", options=list(SPACINGS), default="trailing",
                               tooltip="'trailing': diffusers' reference (999, 749, 499, 249). 'stability': "
                                       "999, 899, 799, 699 as ComfyUI's SDTurboScheduler, denoise in tenths."),
                io.Combo.Input("strength_mode", options=list(STRENGTH_MODES), default="diffusers", optional=True,
                               tooltip="'diffusers': the reference, the last int(steps*strength) steps (at 1-2 "
                                       "steps strength moves in big jumps, and below 1/steps nothing runs). "
                                       "'exact': always all steps, trailing-spaced below the timestep strength "
                                       "selects (steps 2, strength 0.3: t=299, 149)."),
            ],
            outputs=[io.Sigmas.Output(tooltip="Sigmas ending in 0, for a Turbo sampler or SamplerCustom.")],
        )

    @classmethod
    def execute(cls, model, steps, strength=1.0, spacing="trailing", strength_mode="diffusers") -> io.NodeOutput:
        return io.NodeOutput(turbo_model_sigmas(model, steps, strength, spacing, strength_mode))
