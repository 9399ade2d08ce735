"""Soak and concurrency over HTTP on the tiny SD-Turbo-shaped model (slow; still run by .ci/run)."""
from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid

import psutil
import pytest

from workflow_utils import SD_TURBO, txt2img

pytestmark = pytest.mark.slow

SUBJECTS = ["fox", "lighthouse", "teapot", "castle", "robot", "owl", "canyon", "violin", "tram", "orchid"]
STYLES = ["watercolor", "photo", "ink sketch", "oil painting", "pixel art", "3d render", "charcoal"]


TEXT_EVERY = 4   # prompts per text: the seed changes every prompt, the text every 4th (the full-size text
                 # encoder is half of a prompt's time on 2 cores; 50 new texts still exercise it)


def varied_prompt(i: int, seed: int | None = None) -> dict:
    t = i // TEXT_EVERY
    text = f"a {STYLES[t % len(STYLES)]} of a {SUBJECTS[(t * 7) % len(SUBJECTS)]}, variation {t}"
    return txt2img(SD_TURBO, width=64, height=64, seed=seed if seed is not None else 10_000 + i,
                   prefix=f"soak/p{i:03d}", text=text)


def test_soak_200_prompts(host, record_property):
    server = psutil.Process(host.process.pid)
    first = varied_prompt(0)
    digests, rss, seconds = {}, [], []
    for i in range(200):
        t = time.monotonic()
        result = host.run(first if i == 199 else varied_prompt(i), timeout=300)
        seconds.append(time.monotonic() - t)
        assert result.status == "success", (i, result.error)
        (image,) = result.images()
        digests[i] = hashlib.sha256(host.view(image)).hexdigest()
        rss.append(server.memory_info().rss)
    warm = rss[19]
    growth = max(rss[20:]) / warm - 1
    figures = {"prompts": 200, "rss_after_warmup_mb": round(warm / 2**20), "rss_end_mb": round(rss[-1] / 2**20),
               "rss_max_growth_pct": round(100 * growth, 2), "median_s": round(sorted(seconds)[100], 3)}
    record_property("soak", json.dumps(figures))
    print("soak", json.dumps(figures))
    assert growth <= 0.05, figures
    assert digests[199] == digests[0]            # same seed and prompt -> identical PNG bytes
    assert len(set(digests.values())) == 199     # every other prompt/seed gave its own image


def test_ten_clients_five_prompts_each(host, record_property):
    clients, results, errors = 10, {}, []
    lock = threading.Lock()

    def client(c: int):
        try:
            client_id = uuid.uuid4().hex
            ws = host.connect(client_id=client_id)
            mine = {}
            for p in range(5):
                prompt = varied_prompt(100 + 5 * c + p)
                prompt["7"]["inputs"]["filename_prefix"] = f"concurrency/c{c}-p{p}"
                mine[host.post_prompt(prompt, client_id=client_id)["prompt_id"]] = (c, p)
            pending, deadline = set(mine), time.monotonic() + 900
            while pending and time.monotonic() < deadline:
                ws.settimeout(5)
                try:
                    message = ws.recv()
                except Exception:
                    continue
                if not isinstance(message, str):
                    continue
                event = json.loads(message)
                data = event.get("data") or {}
                if data.get("prompt_id") in pending and (
                        event["type"] in ("execution_success", "execution_error", "execution_interrupted")):
                    pending.discard(data["prompt_id"])
            ws.close()
            with lock:
                for prompt_id, owner in mine.items():
                    results[prompt_id] = (owner, host.wait_history(prompt_id))
            assert not pending, f"client {c} never heard back about {pending}"
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    t = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - t
    assert not errors, errors
    assert len(results) == clients * 5
    for prompt_id, ((c, p), history) in results.items():
        assert history["status"]["status_str"] == "success", (prompt_id, history["status"])
        (image,) = [img for out in history["outputs"].values() for img in out["images"]]
        assert image["filename"].startswith(f"c{c}-p{p}_")       # each result belongs to its own prompt
        assert image["subfolder"] == "concurrency"
    figures = {"clients": clients, "prompts": clients * 5, "completed": len(results), "seconds": round(elapsed, 1)}
    record_property("concurrency", json.dumps(figures))
    print("concurrency", json.dumps(figures))
