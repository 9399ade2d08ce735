"""API-format workflows and the overrides a client applies to them: seed, prompt text, size."""
from __future__ import annotations

import copy
import json
from pathlib import Path

SEED_INPUTS = ("seed", "noise_seed")
TEXT_ENCODERS = ("TurboTextEncode", "CLIPTextEncode")
SIZE_NODES = ("EmptyLatentImage", "EmptySD3LatentImage", "TurboLiveInput")


class WorkflowError(ValueError):
    pass


def load(path: str | Path) -> dict:
    """An API-format workflow from a file; a UI-format one is refused with how to export the right one."""
    try:
        workflow = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise WorkflowError(f"{path}: not a readable JSON file ({e})") from None
    if isinstance(workflow, dict) and "nodes" in workflow and "links" in workflow:
        raise WorkflowError(f"{path} is a UI workflow (what Save writes). Queue the API format: in ComfyUI use "
                            "Workflow > Export (API), or take the file from workflows/api/.")
    if not isinstance(workflow, dict) or not all(isinstance(n, dict) and "class_type" in n for n in workflow.values()):
        raise WorkflowError(f"{path} is not an API-format workflow (a JSON object of nodes with class_type)")
    return workflow


def positive_encoders(workflow: dict) -> list[str]:
    """Ids of the text-encode nodes that feed a 'positive' input (or all of them if none is wired so)."""
    encoders = [nid for nid, node in workflow.items() if node["class_type"] in TEXT_ENCODERS]
    positive = {node["inputs"]["positive"][0] for node in workflow.values()
                if isinstance(node.get("inputs", {}).get("positive"), list)}
    wired = [nid for nid in encoders if nid in positive]
    if wired or len(encoders) <= 1:
        return wired or encoders
    raise WorkflowError("the workflow has several text encoders and none feeds a 'positive' input directly, so "
                        "which one holds the prompt is unclear: set the text in the workflow instead")


def apply_overrides(workflow: dict, seed: int | None = None, prompt: str | None = None,
                    width: int | None = None, height: int | None = None) -> dict:
    """A copy of ``workflow`` with the given seed, positive prompt text and image size set everywhere they apply."""
    out = copy.deepcopy(workflow)
    changed = {"seed": 0, "prompt": 0, "size": 0}
    for node in out.values():
        inputs = node.setdefault("inputs", {})
        if seed is not None:
            for name in SEED_INPUTS:
                if name in inputs and not isinstance(inputs[name], list):
                    inputs[name] = seed
                    changed["seed"] += 1
        if node["class_type"] in SIZE_NODES:
            for name, value in (("width", width), ("height", height)):
                if value is not None and name in inputs:
                    inputs[name] = value
                    changed["size"] += 1
    if prompt is not None:
        for nid in positive_encoders(out):
            out[nid]["inputs"]["text"] = prompt
            changed["prompt"] += 1
    for what, value in (("seed", seed), ("prompt", prompt), ("size", width or height)):
        if value is not None and not changed[what]:
            raise WorkflowError(f"the workflow has nowhere to put the {what} override")
    return out
