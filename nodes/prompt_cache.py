"""Turbo Text Encode: CLIPTextEncode with a memo of recent prompts.

A graph that switches between prompts (A, B, A, ...) re-runs core CLIP Text Encode each time it goes
back: ComfyUI 0.3.75's classic cache keeps one output per node, and 0.33's default RAM-pressure cache,
which can keep earlier outputs, by default releases every output the current prompt does not use after
each node (its inactive headroom defaults to all of the machine's RAM, capped at 128 GB). bench/prompt_memo.py measured
it (bench/results/prompt-memo/): A/B/A/B with core CLIPTextEncode re-encoded 6 of 6 repeats on 0.3.75,
on 0.33 by default and on 0.33 with --cache-classic, about 1.8 s each on the CPU; this node answered each
repeat from its memo in under 2 ms. Where the executor does reuse an output (an unchanged prompt, or
``--cache-lru 50`` on 0.33, which reused 6 of 6) the node does not run at all, so the memo costs nothing.
So the memo stays, on both. It remembers the last ``CACHE_SIZE`` encodings, keyed by the text encoder's
identity and state:

* the ``cond_stage_model`` object (held weakly, so a reloaded checkpoint never matches),
* its patcher's ``patches_uuid``: ComfyUI gives a patcher a new uuid whenever patches (a LoRA)
  are added, and clones with the same patches share it (comfy/model_patcher.py),
* ``layer_idx`` (CLIP Set Last Layer), the tokenizer options and plain-valued object patches
  (ComfyUI 0.33 sets ``manual_cast_dtype`` on every CLIP),
* the text.

CLIPs carrying hooks or other object patches are encoded every time, never cached.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

from comfy_api.latest import io

from .errors import TurboError

CACHE_SIZE = 32
# Object patches with such values are part of the key (ComfyUI 0.33 sets ``manual_cast_dtype`` on
# every CLIP); any other object patch (a replaced module or function) makes the CLIP uncacheable.
_PLAIN_VALUES = (torch.dtype, str, int, float, bool, type(None))
_cache: "OrderedDict[tuple, tuple[weakref.ref, list]]" = OrderedDict()
stats = {"hits": 0, "misses": 0, "uncacheable": 0}


def cache_key(clip, text: str) -> tuple | None:
    """The memo key of (clip, text), or None when this CLIP's output must not be cached."""
    patcher = clip.patcher
    if getattr(patcher, "forced_hooks", None) is not None or getattr(clip, "use_clip_schedule", False):
        return None
    object_patches = getattr(patcher, "object_patches", None) or {}
    if not all(isinstance(v, _PLAIN_VALUES) for v in object_patches.values()):
        return None
    objects = tuple(sorted((k, repr(v)) for k, v in object_patches.items()))
    options = tuple(sorted((k, repr(v)) for k, v in getattr(clip, "tokenizer_options", {}).items()))
    return (id(clip.cond_stage_model), str(patcher.patches_uuid), clip.layer_idx, objects, options, text)


def _copy(conditioning: list) -> list:
    """New lists and option dicts around the same tensors, so a caller's edits never reach the memo."""
    return [[emb, dict(opts)] for emb, opts in conditioning]


def encode(clip, text: str) -> list:
    """What core CLIPTextEncode returns (``clip.encode_from_tokens_scheduled(clip.tokenize(text))``), memoised."""
    if clip is None:
        raise TurboError("The CLIP input is empty: the checkpoint has no text encoder. Connect a 'Load CLIP' node.")
    key = cache_key(clip, text)
    if key is None:
        stats["uncacheable"] += 1
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))
    entry = _cache.get(key)
    if entry is not None and entry[0]() is clip.cond_stage_model:
        _cache.move_to_end(key)
        stats["hits"] += 1
        return _copy(entry[1])
    stats["misses"] += 1
    conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    _cache[key] = (weakref.ref(clip.cond_stage_model), _copy(conditioning))
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return conditioning


def clear() -> None:
    _cache.clear()
    for k in stats:
        stats[k] = 0


class TurboTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TurboTextEncode",
            display_name="Turbo Text Encode (cached)",
            category="sampling/turbo",
            description=(
                "Encodes a prompt exactly like CLIP Text Encode, and remembers the last "
                f"{CACHE_SIZE} prompts per text encoder (and LoRA / CLIP-skip state), so switching back to an "
                "earlier prompt costs no text-encoder pass."),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP output of the Turbo checkpoint (LoRA-patched CLIPs work; "
                                              "a new LoRA or strength is a new cache entry)."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt. Turbo models use no negative prompt."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The encoded prompt, for Turbo Sampler or ControlNet Apply.")],
        )

    @classmethod
    def execute(cls, clip, text) -> io.NodeOutput:
        return io.NodeOutput(encode(clip, text))
