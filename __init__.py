"""comfy-turbo: SD-Turbo and SDXL-Turbo, first-class in ComfyUI.

ComfyUI imports this package from custom_nodes/ and awaits ``comfy_entrypoint``. ComfyUI itself is
imported only there, so ``samplers`` stays importable (and testable) without it. ``web/`` holds the
frontend extension (the Turbo Live panel), which ComfyUI serves under /extensions/<this folder>/.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .extension import TurboExtension
    from .live import server as live_server
    from .nodes import ksampler_names
    ksampler_names.register()            # turbo_trailing, turbo_euler(_ancestral) for KSampler & co.
    live_server.register()               # the Turbo Live routes
    return TurboExtension()
