"""Shared pieces of the parity tests (issue 3: "prove our sampling is the reference sampling").

* ``SDXL_TURBO_SCHEDULER_CONFIG`` / ``SD_TURBO_SCHEDULER_CONFIG``: the ``scheduler/scheduler_config.json``
  of the Hugging Face repos ``stabilityai/sdxl-turbo`` and ``stabilityai/sd-turbo``, as literal dicts
  (no network), and :func:`diffusers_scheduler` to build the diffusers scheduler from them with
  ``from_config`` exactly as ``DiffusionPipeline.from_pretrained`` does.
* :func:`setup_comfyui`: puts the real ComfyUI (``$COMFYUI_PATH``) on ``sys.path`` and forces CPU.
* :func:`comfy_model_sampling`: ComfyUI's own ``model_sampling`` object for the SD2.x (``SD20``) or
  ``SDXL`` model config, built in-process with no weights.
* :func:`diffusers_unet_from_comfy_config`: diffusers' ``UNet2DConditionModel`` with the architecture ComfyUI
  detected and the same weights (``comfy.utils.unet_to_diffusers``), for the model-level parity tests.
* :func:`load_repo_module`: import one of this repo's modules by path (the repo's ``nodes/`` package
  would clash with ComfyUI's top-level ``nodes.py``).
* :func:`diffusers_img2img_timesteps`: the real ``StableDiffusion(XL)Img2ImgPipeline.get_timesteps``
  called unbound on a stub holding only the scheduler.
* :func:`inject_ancestral_noise`: how we make diffusers' ``EulerAncestralDiscreteScheduler.step`` use
  the same noise tensors as our sampler's ``noise_sampler``.
* :func:`parity_record`: a pytest fixture that records each measured max error; the records are
  merged into the JSON file named by ``$COMFY_TURBO_PARITY_REPORT`` (when set) for the table in
  docs/parity.md, and attached to the test's ``user_properties`` (visible in JUnit XML).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Iterable, Sequence

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def comfyui_path() -> Path:
    """``$COMFYUI_PATH``, else the ComfyUI tree that ``scripts/env.sh`` links next to the interpreter."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env)
    beside_python = Path(sys.prefix) / "comfyui"
    if (beside_python / "comfy").is_dir():
        return beside_python
    raise RuntimeError("COMFYUI_PATH is not set: run the tests with `bash scripts/test.sh`.")


def fixtures_dir() -> Path:
    """Where ``tests/fixtures/make_models.py`` writes the random-weight checkpoints."""
    cache = os.environ.get("COMFY_TURBO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "comfy-turbo")
    return Path(cache) / "fixtures"


# --------------------------------------------------------------------------------------------
# Reference scheduler configs (Hugging Face hub, scheduler/scheduler_config.json)
# --------------------------------------------------------------------------------------------
_COMMON_SCHEDULER_FIELDS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

#: stabilityai/sdxl-turbo  scheduler/scheduler_config.json
SDXL_TURBO_SCHEDULER_CONFIG = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    **_COMMON_SCHEDULER_FIELDS,
}

#: stabilityai/sd-turbo  scheduler/scheduler_config.json
SD_TURBO_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    **_COMMON_SCHEDULER_FIELDS,
}

SCHEDULER_CONFIGS = {"sdxl-turbo": SDXL_TURBO_SCHEDULER_CONFIG, "sd-turbo": SD_TURBO_SCHEDULER_CONFIG}


# SDXL's size conditioning for the model-level tests: diffusers' time_ids and the same values as ComfyUI's
# conditioning keys.
TIME_IDS = (512, 512, 0, 0, 512, 512)  # original (h, w), crop (top, left), target (h, w)
SIZE_COND = {"width": 512, "height": 512, "crop_w": 0, "crop_h": 0, "target_width": 512, "target_height": 512}


def diffusers_scheduler(variant: str):
    """The diffusers scheduler class named by the hub config's ``_class_name``, built ``from_config``."""
    import diffusers

    config = dict(SCHEDULER_CONFIGS[variant])
    cls = getattr(diffusers, config["_class_name"])
    return cls.from_config(config)


def diffusers_img2img_timesteps(scheduler, variant: str, steps: int, strength: float):
    """diffusers' own img2img timestep selection, run on ``scheduler`` (after ``set_timesteps``).

    Calls ``StableDiffusionXLImg2ImgPipeline.get_timesteps`` (sdxl-turbo) or
    ``StableDiffusionImg2ImgPipeline.get_timesteps`` (sd-turbo) unbound on a stub object holding only
    ``scheduler``: ``init_timestep = min(int(N*strength), N)``, ``t_start = max(N - init_timestep, 0)``,
    ``timesteps = scheduler.timesteps[t_start*order:]`` and ``scheduler.set_begin_index(t_start*order)``.
    Returns ``(timesteps, num_inference_steps, t_start)``.
    """
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    pipe_cls = StableDiffusionXLImg2ImgPipeline if variant == "sdxl-turbo" else StableDiffusionImg2ImgPipeline
    stub = types.SimpleNamespace(scheduler=scheduler)
    timesteps, n = pipe_cls.get_timesteps(stub, steps, strength, "cpu")
    return timesteps, n, steps - n


# --------------------------------------------------------------------------------------------
# ComfyUI
# --------------------------------------------------------------------------------------------
_COMFY_READY = False


def setup_comfyui() -> Path:
    """Put ComfyUI first on ``sys.path`` (its ``nodes.py`` must win over this repo's ``nodes/``), the
    repo root after it (for ``import samplers``), and force ComfyUI onto the CPU."""
    global _COMFY_READY
    path = comfyui_path()
    if not (path / "comfy").is_dir():
        pytest.fail(f"ComfyUI not found at {path}: set COMFYUI_PATH to a ComfyUI checkout, or run the tests "
                    "with `bash scripts/test.sh`.")
    if _COMFY_READY:
        return path
    for p in (str(REPO_ROOT), str(path)):
        while p in sys.path:
            sys.path.remove(p)
    sys.path.insert(0, str(REPO_ROOT))
    sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)

    _COMFY_READY = True
    return path


def comfy_model_sampling(family: str):
    """ComfyUI's ``model_sampling`` for the ``SD20`` or ``SDXL`` model config, epsilon prediction.

    Built exactly as ``comfy.model_base.BaseModel.__init__`` does
    (``model_sampling(model_config, ModelType.EPS)``), without building the UNet.
    """
    setup_comfyui()
    import comfy.model_base
    import comfy.supported_models

    cls = {"sd20": comfy.supported_models.SD20, "sdxl": comfy.supported_models.SDXL}[family]
    config = cls(cls.unet_config)
    return comfy.model_base.model_sampling(config, comfy.model_base.ModelType.EPS)


class ModelSamplingStub:
    """The one thing ComfyUI's sigma nodes ask of a MODEL: ``get_model_object("model_sampling")``.

    It hands out a real ComfyUI ``model_sampling`` object, so no ComfyUI code is replaced.
    """

    def __init__(self, model_sampling):
        self.model_sampling = model_sampling

    def get_model_object(self, name):
        if name != "model_sampling":
            raise KeyError(name)
        return self.model_sampling


# --------------------------------------------------------------------------------------------
# diffusers' UNet with the weights ComfyUI loaded
# --------------------------------------------------------------------------------------------
def diffusers_unet_from_comfy_config(unet_config: dict, ldm_unet_sd: dict):
    """A diffusers ``UNet2DConditionModel`` with ComfyUI's detected architecture and the same weights.

    Architecture: block channels, res blocks and per-layer transformer depths from ComfyUI's
    ``unet_config`` (comfy/model_detection.py ``detect_unet_config``; head size 64 from the
    supported_models class). Weights: ``comfy.utils.unet_to_diffusers(unet_config)`` maps each
    diffusers key to its LDM key; every diffusers parameter must be found and every LDM key used.
    """
    import comfy.utils
    from diffusers import UNet2DConditionModel
    from diffusers.models.unets.unet_2d_blocks import get_mid_block

    cfg = unet_config
    mc, mult, nrb = cfg["model_channels"], cfg["channel_mult"], cfg["num_res_blocks"]
    levels = len(mult)
    assert len(set(nrb)) == 1, nrb
    layers = nrb[0]
    depth_in = [cfg["transformer_depth"][lvl * layers] for lvl in range(levels)]
    assert cfg["transformer_depth"] == [d for d in depth_in for _ in range(layers)]
    # transformer_depth_output is consumed from its end, first output block first (openaimodel.py)
    depth_out = list(reversed(cfg["transformer_depth_output"]))
    depth_up = [depth_out[b * (layers + 1):(b + 1) * (layers + 1)] for b in range(levels)]
    channels = [mc * m for m in mult]
    head_dim = cfg["num_head_channels"]
    assert cfg.get("num_heads", -1) == -1 and head_dim == 64
    heads = [c // head_dim for c in channels]
    kwargs = dict(
        sample_size=64, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth_in],
        up_block_types=["CrossAttnUpBlock2D" if any(d) else "UpBlock2D" for d in depth_up],
        block_out_channels=channels, layers_per_block=layers,
        transformer_layers_per_block=[max(d, 1) for d in depth_in],
        reverse_transformer_layers_per_block=[[max(x, 1) for x in d] for d in depth_up],
        attention_head_dim=heads, cross_attention_dim=cfg["context_dim"],
        use_linear_projection=cfg["use_linear_in_transformer"], flip_sin_to_cos=True, freq_shift=0,
        norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    )
    for b, d in enumerate(depth_up):  # diffusers needs one depth for all layers of an up block
        assert len(set(d)) == 1, ("asymmetric up block", b, d)
    if cfg.get("adm_in_channels"):
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=cfg["adm_in_channels"])
    with torch.device("meta"):
        unet = UNet2DConditionModel(**kwargs)
        mid_depth = cfg["transformer_depth_middle"]
        if mid_depth != kwargs["transformer_layers_per_block"][-1]:
            # diffusers ties the middle block's depth to the last down block's; the tiny SDXL has 1
            unet.mid_block = get_mid_block(
                "UNetMidBlock2DCrossAttn", temb_channels=mc * 4, in_channels=channels[-1], resnet_eps=1e-5,
                resnet_act_fn="silu", resnet_groups=32, output_scale_factor=1.0,
                transformer_layers_per_block=mid_depth, num_attention_heads=heads[-1],
                cross_attention_dim=cfg["context_dim"], dual_cross_attention=False,
                use_linear_projection=cfg["use_linear_in_transformer"], mid_block_only_cross_attention=False,
                upcast_attention=False, resnet_time_scale_shift="default", attention_type="default",
                resnet_skip_time_act=False, cross_attention_norm=None, attention_head_dim=heads[-1],
                dropout=0.0)
    key_map = comfy.utils.unet_to_diffusers(cfg)
    wanted = unet.state_dict().keys()
    missing = [k for k in wanted if key_map.get(k) not in ldm_unet_sd]
    assert not missing, missing[:10]
    new_sd = {k: ldm_unet_sd[key_map[k]].to(torch.float32) for k in wanted}
    unused = set(ldm_unet_sd) - {key_map[k] for k in wanted}
    assert not unused, sorted(unused)[:10]
    unet.load_state_dict(new_sd, strict=True, assign=True)
    return unet.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# This repo's modules
# --------------------------------------------------------------------------------------------
_PACKAGE_ALIAS = "comfy_turbo_under_test"


def load_repo_module(relpath: str):
    """Import ``relpath`` (e.g. ``"nodes/loader.py"``) from this repo as a submodule of the repo package.

    Uses the package ``comfy_turbo`` that tests/conftest.py registers for the repo root when it is
    there (so every test shares one copy of the pack's modules); otherwise registers the repo root
    as ``comfy_turbo_under_test`` (without executing its ``__init__.py``). Either way the module's
    relative imports (``from ..samplers import``) resolve inside the repo and its ``nodes`` never
    shadows ComfyUI's ``nodes.py``.
    """
    setup_comfyui()
    alias = _PACKAGE_ALIAS
    registered = sys.modules.get("comfy_turbo")  # tests/conftest.py registers the repo under this name
    if registered is not None and [str(Path(p).resolve()) for p in getattr(registered, "__path__", [])] == [
            str(REPO_ROOT)]:
        alias = "comfy_turbo"
    elif alias not in sys.modules:
        pkg = types.ModuleType(alias)
        pkg.__path__ = [str(REPO_ROOT)]
        pkg.__file__ = None
        sys.modules[alias] = pkg
    rel = Path(relpath)
    if not (REPO_ROOT / rel).exists():
        pytest.fail(f"{relpath} does not exist: the parity tests import it by path, so a renamed or moved module "
                    "must be renamed here too.")
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return importlib.import_module(".".join([alias, *parts]))


# --------------------------------------------------------------------------------------------
# Noise injection into diffusers' EulerAncestralDiscreteScheduler.step
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def inject_ancestral_noise(noises: Sequence[torch.Tensor]):
    """Make ``EulerAncestralDiscreteScheduler.step`` use ``noises[0], noises[1], ...`` in order.

    ``step`` draws its fresh noise with ``randn_tensor(model_output.shape, dtype=..., device=...,
    generator=generator)`` (diffusers/schedulers/scheduling_euler_ancestral_discrete.py), a name the
    scheduler module imported from ``diffusers.utils.torch_utils``. We rebind that module-level name
    for the duration of the block to a function that returns the next prepared tensor (checking the
    requested shape and dtype). No scheduler arithmetic is touched. ``step`` draws on every step,
    including the last one, where ``sigma_up == 0`` multiplies it away; when ``noises`` is exhausted
    zeros are returned (and counted). The yielded list records the shape of every draw.
    """
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as mod

    with inject_randn_tensor(mod, noises) as draws:
        yield draws


# --------------------------------------------------------------------------------------------
# Few-step families (samplers/families.py): each family's reference scheduler, configured as its authors'
# snippets configure it, and the reference pipeline's timestep selection
# --------------------------------------------------------------------------------------------
#: stabilityai/stable-diffusion-xl-base-1.0  scheduler/scheduler_config.json: the config the Lightning, DMD2,
#: Hyper-SD, LCM, TCD and PCM snippets start from (``X.from_config(pipe.scheduler.config, ...)``). SD1.5's
#: (runwayml/stable-diffusion-v1-5, PNDMScheduler) has the same betas, set_alpha_to_one and steps_offset.
SDXL_BASE_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    **_COMMON_SCHEDULER_FIELDS,
    "timestep_spacing": "leading",
}

#: stabilityai/stable-diffusion-3.5-large-turbo: FlowMatchEulerDiscreteScheduler, shift 3.0 (the SD3 / SD3.5
#: config; this model's own file was not found, see the team notes' families.md).
SD35_LARGE_TURBO_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}

#: black-forest-labs/FLUX.1-schnell  scheduler/scheduler_config.json
FLUX_SCHNELL_SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}

DMD2_TIMESTEPS = {4: [999, 749, 499, 249], 1: [399]}  # tianweiy/DMD2 model card
HYPER_SD_UNET_TIMESTEPS = [800]                       # ByteDance/Hyper-SD README, 1-step SDXL UNet


def family_reference(family: str, steps: int, gamma=None) -> types.SimpleNamespace:
    """The diffusers scheduler a family's authors sample with, and how their pipeline calls it.

    Returns ``scheduler``, ``pipeline`` ("sdxl", "sd3" or "flux": whose ``retrieve_timesteps`` /
    ``get_timesteps`` / latent preparation apply), ``set_timesteps`` (the keyword arguments the pipeline
    passes: ``num_inference_steps``, ``timesteps=`` or ``sigmas=``) and ``step_kwargs`` (what the
    pipeline's ``prepare_extra_step_kwargs`` passes to ``step``: ``eta`` where ``step`` takes it).
    """
    import diffusers

    base = dict(SDXL_BASE_SCHEDULER_CONFIG)
    kwargs, step_kwargs, pipeline = {"num_inference_steps": steps}, {}, "sdxl"
    if family in ("sd-turbo", "sdxl-turbo"):
        scheduler = diffusers_scheduler(family)
    elif family == "sdxl-lightning":   # ByteDance/SDXL-Lightning README
        extra = {"prediction_type": "sample"} if steps == 1 else {}
        scheduler = diffusers.EulerDiscreteScheduler.from_config(base, timestep_spacing="trailing", **extra)
    elif family in ("dmd2", "hyper-sd-1step-unet"):
        scheduler = diffusers.LCMScheduler.from_config(base)
        kwargs = {"num_inference_steps": None,
                  "timesteps": DMD2_TIMESTEPS[steps] if family == "dmd2" else HYPER_SD_UNET_TIMESTEPS}
    elif family == "hyper-sd":         # ByteDance/Hyper-SD README, N-step LoRAs; the pipeline passes eta=0.0
        scheduler = diffusers.DDIMScheduler.from_config(base, timestep_spacing="trailing")
        step_kwargs = {"eta": 0.0}
    elif family == "pcm":              # wangfuyun/PCM_Weights card
        scheduler = diffusers.DDIMScheduler.from_config(base, timestep_spacing="trailing", clip_sample=False,
                                                        set_alpha_to_one=False)
        step_kwargs = {"eta": 0.0}
    elif family == "lcm":              # latent-consistency/lcm-lora-sdxl card
        scheduler = diffusers.LCMScheduler.from_config(base)
    elif family in ("tcd", "hyper-sd-unified"):  # h1t/TCD-SDXL-LoRA card (eta 0.3); Hyper-SD README (eta 1.0)
        scheduler = diffusers.TCDScheduler.from_config(base)
        step_kwargs = {"eta": (0.3 if family == "tcd" else 1.0) if gamma is None else gamma}
    elif family == "sd3.5-large-turbo":  # StableDiffusion3Pipeline: set_timesteps(N)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(SD35_LARGE_TURBO_SCHEDULER_CONFIG)
        pipeline = "sd3"
    elif family == "flux.1-schnell":   # FluxPipeline: sigmas = linspace(1, 1/N, N), mu (unused: no dynamic shift)
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHNELL_SCHEDULER_CONFIG)
        kwargs = {"num_inference_steps": steps, "sigmas": np.linspace(1.0, 1 / steps, steps),
                  "mu": calculate_shift(4096, 256, 4096, 0.5, 1.15)}
        pipeline = "flux"
    else:
        raise KeyError(family)
    return types.SimpleNamespace(scheduler=scheduler, pipeline=pipeline, set_timesteps=kwargs,
                                 step_kwargs=step_kwargs)


def family_reference_timesteps(ref: types.SimpleNamespace, steps: int, strength: float, img2img: bool):
    """``(timesteps, t_start)`` the reference pipeline runs: its ``retrieve_timesteps`` (called for real),
    then for image-to-image its ``get_timesteps`` (``StableDiffusionXLImg2ImgPipeline``'s int rule, or
    ``StableDiffusion3Img2ImgPipeline`` / ``FluxImg2ImgPipeline``'s float rule) on a stub holding the
    scheduler, which also sets the scheduler's ``begin_index``."""
    if ref.pipeline == "sdxl":
        from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as mod

        pipe_cls = mod.StableDiffusionXLImg2ImgPipeline
    elif ref.pipeline == "sd3":
        from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_img2img as mod

        pipe_cls = mod.StableDiffusion3Img2ImgPipeline
    else:
        from diffusers.pipelines.flux import pipeline_flux_img2img as mod

        pipe_cls = mod.FluxImg2ImgPipeline
    kwargs = dict(ref.set_timesteps)
    n = kwargs.pop("num_inference_steps")
    timesteps, n = mod.retrieve_timesteps(ref.scheduler, n, "cpu", **kwargs)
    if not img2img:
        assert strength == 1.0
        return timesteps, 0
    timesteps, n_run = pipe_cls.get_timesteps(types.SimpleNamespace(scheduler=ref.scheduler), n, strength, "cpu")
    return timesteps, n - n_run


@contextlib.contextmanager
def inject_randn_tensor(module, noises: Sequence[torch.Tensor]):
    """Like :func:`inject_ancestral_noise`, for any scheduler module that draws with its module-level
    ``randn_tensor`` (``scheduling_lcm``, ``scheduling_tcd``, ...): draw k returns ``noises[k]``, zeros
    once they run out. The yielded list records the shape of every draw. A module without that name
    (it never draws) is left alone."""
    queue = list(noises)
    draws: list[tuple] = []
    if not hasattr(module, "randn_tensor"):
        yield draws
        return
    original = module.randn_tensor

    def fake_randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        draws.append(tuple(shape))
        if len(draws) <= len(queue):
            noise = queue[len(draws) - 1]
            assert tuple(noise.shape) == tuple(shape), (noise.shape, shape)
            return noise.to(device=device or "cpu", dtype=dtype or noise.dtype)
        return torch.zeros(shape, dtype=dtype, device=device or "cpu")

    module.randn_tensor = fake_randn_tensor
    try:
        yield draws
    finally:
        module.randn_tensor = original


# --------------------------------------------------------------------------------------------
# Error measures
# --------------------------------------------------------------------------------------------
def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs() / b.abs().clamp_min(1e-30)).max().item()


def max_abs_over(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    return max(max_abs(a, b) for a, b in pairs)


# --------------------------------------------------------------------------------------------
# Parity report
# --------------------------------------------------------------------------------------------
def _versions() -> dict:
    out = {"torch": torch.__version__}
    with contextlib.suppress(Exception):
        import diffusers

        out["diffusers"] = diffusers.__version__
    with contextlib.suppress(Exception):
        text = (comfyui_path() / "comfyui_version.py").read_text()
        out["comfyui"] = text.split("__version__", 1)[1].split("=", 1)[1].strip().split()[0].strip("\"'")
    return out


def write_parity_record(record: dict) -> None:
    """Merge ``record`` into ``$COMFY_TURBO_PARITY_REPORT`` (a JSON file), keyed by test and case."""
    target = os.environ.get("COMFY_TURBO_PARITY_REPORT")
    if not target:
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"records": {}}
    if path.exists():
        with contextlib.suppress(ValueError, OSError):
            data = json.loads(path.read_text())
            data.setdefault("records", {})
    data["environment"] = _versions()
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    data["records"][f"{record['test']}::{record['case']}"] = record
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@pytest.fixture
def parity_record(request):
    """``parity_record(case, max_error, tolerance, metric="max_abs", **details)`` for one measurement.

    Records go to the test's ``user_properties`` and, when ``$COMFY_TURBO_PARITY_REPORT`` is set,
    into that JSON file. Returns the record. The test still asserts on its own.
    """

    def record(case: str, max_error: float, tolerance: float, metric: str = "max_abs", **details):
        rec = {
            "test": request.node.nodeid.split("[")[0],
            "case": case,
            "metric": metric,
            "max_error": float(max_error),
            "tolerance": float(tolerance),
            "passed": bool(max_error <= tolerance),
            **details,
        }
        request.node.user_properties.append((f"parity:{case}", json.dumps(rec, sort_keys=True)))
        write_parity_record(rec)
        return rec

    return record


def markdown_table(report_path: str, grouped: bool = False) -> str:
    """The docs/parity.md table from a ``$COMFY_TURBO_PARITY_REPORT`` file.

    ``grouped``: one row per case family (the first two ``/``-parts of the case name; for
    trajectories and model runs also the txt2img/img2img part, and for trajectories the sigma
    source), with the largest error of the family.
    """
    data = json.loads(Path(report_path).read_text())
    records = sorted(data["records"].values(), key=lambda r: r["case"])
    if grouped:
        groups: dict = {}
        for rec in records:
            parts = rec["case"].split("/")
            if parts[0] == "trajectory" and len(parts) == 5:  # .../<mode>/N<n>-s<strength>/<sigma source>
                key = "/".join(parts[:3] + ["*", parts[4]])
            elif parts[0] == "model":  # model/<variant>/<sampler>/<mode>/...
                key = "/".join(parts[:4])
            else:
                key = "/".join(parts[:3] if parts[0] == "trajectory" else parts[:2])
            g = groups.setdefault(key, dict(rec, case=key, n=0, max_abs=rec.get("max_abs")))
            g["n"] += 1
            g["max_error"] = max(g["max_error"], rec["max_error"])
            g["passed"] = g["passed"] and rec["passed"]
            if rec.get("max_abs") is not None:
                g["max_abs"] = max(g.get("max_abs") or 0.0, rec["max_abs"])
        records = list(groups.values())
    esc = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    rows = ["| case | metric | max error | tolerance | ok |", "|---|---|---|---|---|"]
    for rec in records:
        extra = f" (plain max-abs {rec['max_abs']:.1e})" if rec.get("max_abs") is not None else ""
        count = f" ({rec['n']} cases)" if rec.get("n", 1) > 1 else ""
        rows.append(f"| {esc(rec['case'])}{count} | {esc(rec['metric'])} | {rec['max_error']:.1e}{extra} | "
                    f"{rec['tolerance']:.0e} | {'yes' if rec['passed'] else 'NO'} |")
    env = data.get("environment", {})
    rows.append("")
    rows.append("Measured with " + ", ".join(f"{k} {v}" for k, v in sorted(env.items())) + ".")
    return "\n".join(rows)


if __name__ == "__main__":  # python tests/parity_helpers.py REPORT.json [--grouped]  -> markdown table
    print(markdown_table(sys.argv[1], grouped="--grouped" in sys.argv[2:]))
