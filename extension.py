"""The V3 extension object ComfyUI asks for: the list of our nodes."""
from comfy_api.latest import ComfyExtension, io

from .nodes import NODE_LIST


class TurboExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)
