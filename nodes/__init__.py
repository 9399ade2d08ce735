"""ComfyUI V3 nodes of comfy-turbo."""
from .decode import TurboVAEDecode
from .families import TurboFamilySchedule
from .fastpath import TurboFastPath
from .live import TurboLiveInput, TurboLiveOutput
from .loader import TurboCheckpointLoader
from .prompt_cache import TurboTextEncode
from .sampler import TurboEulerSampler, TurboSampler
from .scheduler import TurboScheduler

NODE_LIST = [TurboCheckpointLoader, TurboScheduler, TurboFamilySchedule, TurboEulerSampler, TurboSampler,
             TurboTextEncode, TurboFastPath, TurboVAEDecode, TurboLiveInput, TurboLiveOutput]
