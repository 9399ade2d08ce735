"""comfy-turbo: SD-Turbo and SDXL-Turbo, first-class in ComfyUI.

ComfyUI imports this package from custom_nodes/ and awaits ``comfy_entrypoint``. ComfyUI itself is
imported only there, so ``samplers`` stays importable (and testable) without it.
"""


async def comfy_entrypoint():
    from .extension import TurboExtension
    return TurboExtension()
