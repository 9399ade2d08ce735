#!/usr/bin/env python3
"""Does Turbo Text Encode's prompt memo still save text-encoder passes? Measured on a real ComfyUI.

A graph that switches between two prompts (A, B, A, B, ...) runs once with core CLIP Text Encode and once
with Turbo Text Encode, on the tiny test checkpoint at 64 px. For each run and each encode node the bench
records whether the executor reused its cached output (``execution_cached``), and otherwise how long the
node took: a memo hit takes no text-encoder pass, so it is far shorter than an encode.

ComfyUI 0.3.75 keeps one output per node (classic caching), so going back to A re-encodes with the core
node. ComfyUI 0.33 defaults to RAM-pressure caching, which can keep earlier outputs but by default
releases the ones the current prompt does not use; ``--cache-classic`` and ``--cache-lru N`` are its
other modes. Run it on each:

    source scripts/env.sh && "$COMFY_TURBO_PY" bench/prompt_memo.py --out bench/results/prompt-memo/0.3.75-default.json
    export COMFYUI_PATH=<0.33 checkout> && source scripts/env.sh               # that checkout's environment
    "$COMFY_TURBO_PY" bench/prompt_memo.py --out bench/results/prompt-memo/0.33-default.json
    "$COMFY_TURBO_PY" bench/prompt_memo.py --server-args=--cache-classic --out ...  # and "--cache-lru 50"
    "$COMFY_TURBO_PY" bench/prompt_memo.py --render bench/results/prompt-memo  # the table, README.md there

The committed results are in bench/results/prompt-memo/.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
import models  # noqa: E402
from comfy_host import ComfyHost, default_comfyui_path  # noqa: E402
from workflow_utils import load_api  # noqa: E402

ENCODE_NODE = "2"
TEXTS = ("a lighthouse on a cliff at dusk, oil painting", "a red fox in fresh snow, golden hour")


def graph(encoder: str, text: str) -> dict:
    """The live txt2img twin at 64 px with a PreviewImage, its prompt encoded by ``encoder``."""
    prompt = copy.deepcopy(load_api("turbo_live_txt2img_api.json"))
    prompt["1"]["inputs"]["ckpt_name"] = "sd-turbo-tiny.safetensors"
    prompt["15"]["inputs"]["vae_name"] = "taesd"
    prompt["3"]["inputs"].update(width=64, height=64)
    prompt["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
    prompt[ENCODE_NODE] = {"class_type": encoder, "inputs": {"clip": ["1", 1], "text": text}}
    return prompt


def run_sequence(host: ComfyHost, encoder: str, rounds: int) -> list[dict]:
    """A, B, A, B, ... with ``encoder``; per prompt whether the encode node was cached, else its seconds."""
    rows = []
    for i in range(2 * rounds):
        # A per-encoder suffix: the two encoders never share the executor's cache.
        text = f"{TEXTS[i % 2]} ({encoder})"
        result = host.run(graph(encoder, text), timeout=600)
        if result.status != "success":
            raise RuntimeError(f"{encoder} prompt {i} failed: {result.error}")
        cached = {node for event in result.events if event["type"] == "execution_cached"
                  for node in event["data"].get("nodes", [])}
        node_seconds = result.node_seconds()
        seconds = node_seconds.get(ENCODE_NODE)
        rows.append({"prompt": "AB"[i % 2], "cached_by_executor": ENCODE_NODE in cached,
                     "node_ms": None if seconds is None else round(seconds * 1000, 2),
                     "other_nodes_ms": {node: round(s * 1000, 1) for node, s in node_seconds.items()
                                        if node != ENCODE_NODE}})
    return rows


def summarise(rows: list[dict]) -> dict:
    repeats = rows[2:]                                    # every later prompt was seen before
    executed = [r["node_ms"] for r in repeats if not r["cached_by_executor"] and r["node_ms"] is not None]
    return {"first_encode_ms": rows[0]["node_ms"], "repeats": len(repeats),
            "repeats_cached_by_executor": sum(r["cached_by_executor"] for r in repeats),
            "repeats_executed": len(executed),
            "repeat_node_ms_median": round(statistics.median(executed), 2) if executed else None}


def markdown(folder: Path) -> str:
    """The table of every result file in ``folder``."""
    rows = ["| ComfyUI | server args | encoder | repeats reused by the executor | repeats run | first encode | "
            "median repeat |", "|---|---|---|---|---|---|---|"]
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        for encoder, row in data["summary"].items():
            rows.append(f"| {data['comfyui_version']} | {data['server_args'] or '(default)'} | {encoder} | "
                        f"{row['repeats_cached_by_executor']} of {row['repeats']} | {row['repeats_executed']} | "
                        f"{row['first_encode_ms']:.0f} ms | "
                        f"{'–' if row['repeat_node_ms_median'] is None else str(row['repeat_node_ms_median']) + ' ms'} |")
    intro = ("# Turbo Text Encode's memo against the executor's cache\n\n"
             "`bench/prompt_memo.py`: prompts A, B, A, B, ... (4 pairs) through the live txt2img graph at 64 px on\n"
             "the tiny SD-Turbo stand-in (its text encoder is full size), 2-core AMD EPYC, CPU. A repeat is every\n"
             "prompt after the first two: the executor could reuse its encoding, or the memo answer it.\n\n")
    return intro + "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="A/B pairs per encoder")
    parser.add_argument("--server-args", default="", help="extra ComfyUI arguments, e.g. --cache-classic")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--render", type=Path, metavar="FOLDER",
                        help="only write FOLDER/README.md, the table of the JSON files in FOLDER")
    args = parser.parse_args(argv)
    if args.render:
        (args.render / "README.md").write_text(markdown(args.render))
        return 0
    comfyui = default_comfyui_path()
    models_dir = models.ensure("tiny", ["sd-turbo"], str(comfyui))
    with tempfile.TemporaryDirectory(prefix="prompt-memo-") as base:
        host = ComfyHost(Path(base), comfyui, extra_args=tuple(args.server_args.split()))
        for path in models_dir.rglob("*.safetensors"):
            host.install_model(path, path.parent.name)
        with host:
            version = host.get_json("/system_stats")["system"].get("comfyui_version")
            host.run(graph("CLIPTextEncode", "warm-up"), timeout=600)      # models loaded once
            runs = {encoder: run_sequence(host, encoder, args.rounds)
                    for encoder in ("CLIPTextEncode", "TurboTextEncode")}
    results = {"comfyui_version": version, "server_args": args.server_args, "machine": platform.processor() or
               platform.machine(), "runs": runs, "summary": {k: summarise(v) for k, v in runs.items()}}
    print(json.dumps(results["summary"], indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
