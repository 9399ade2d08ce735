#!/usr/bin/env bash
# The fleet benchmark: throughput with 1 and 2 workers, the queue's overhead per prompt, the time to
# recover from a ComfyUI outage, a partition and a worker kill, and the live gateway's cost per frame, on
# this machine (a private RabbitMQ, two workers with their own ComfyUI, HAProxy). Provisions the cached environment
# if needed; arguments go to bench/scale_bench.py (--help). Results land in bench/results/scale/;
# with --page docs/scale.md the run also writes its figures into the Scale out page.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$COMFY_TURBO_PY" bench/scale_bench.py "$@"
