"""comfy-turbo: SD-Turbo and SDXL-Turbo, first-class in ComfyUI.

ComfyUI imports this package from custom_nodes/ and awaits ``comfy_entrypoint``. ComfyUI itself is
imported only there, so ``samplers`` stays importable (and testable) without it. ``web/`` holds the
frontend extension (the Turbo Live panel), which ComfyUI serves under /extensions/<this folder>/.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .extension import TurboExtension
    from .live import server as live_server
    live_server.register()
    return TurboExtension()
