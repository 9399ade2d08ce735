"""Turbo scheduler: diffusers' trailing timesteps, looked up in the model's own sigma table."""
from __future__ import annotations

import torch

from comfy_api.latest import io

from ..samplers import SPACINGS, TurboScheduleError, turbo_sigmas
from .errors import TurboError


def turbo_model_sigmas(model, steps: int, strength: float = 1.0, spacing: str = "trailing") -> torch.Tensor:
    model_sampling = model.get_model_object("model_sampling")
    try:
        return turbo_sigmas(model_sampling.sigma, steps, strength, spacing)
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
                "as diffusers' img2img does. 'stability' spacing reproduces the built-in SDTurboScheduler."),
            inputs=[
                io.Model.Input("model", tooltip="The Turbo model whose sigma table the timesteps index."),
                io.Int.Input("steps", default=1, min=1, max=4,
                             tooltip="Number of timesteps on the full schedule: 1 to 4."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1.0 for text-to-image. Image-to-image runs the last "
                                       "int(steps*strength) steps, which must be at least 1."),
                io.Combo.Input("spacing", options=list(SPACINGS), default="trailing",
                               tooltip="'trailing': diffusers' reference (999, 749, 499, 249). 'stability': "
                                       "999, 899, 799, 699 as ComfyUI's SDTurboScheduler, denoise in tenths."),
            ],
            outputs=[io.Sigmas.Output(tooltip="Sigmas ending in 0, for a Turbo sampler or SamplerCustom.")],
        )

    @classmethod
    def execute(cls, model, steps, strength=1.0, spacing="trailing") -> io.NodeOutput:
        return io.NodeOutput(turbo_model_sigmas(model, steps, strength, spacing))
