"""ComfyUI V3 nodes of comfy-turbo."""
from .loader import TurboCheckpointLoader
from .sampler import TurboEulerSampler, TurboSampler
from .scheduler import TurboScheduler

NODE_LIST = [TurboCheckpointLoader, TurboScheduler, TurboEulerSampler, TurboSampler]
