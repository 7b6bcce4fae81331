"""Run one benchmark row in a fresh Python process and read back its result.

Why: peak memory and step time of a training mode are only comparable when each mode starts from an empty
process (no allocator cache or model left over from the previous mode). The worker prints one line
``RESULT <json>``; everything else it writes is its log.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

RESULT_PREFIX = "RESULT "


def run_worker(script: str, mode: str, flags: list[str], threads: int) -> dict:
    """``python <script> --worker <mode> <flags>`` with ``threads`` OpenMP threads; its ``RESULT`` as a dict."""
    command = [sys.executable, os.path.abspath(script), "--worker", mode, *flags]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if result.returncode != 0 or not lines:
        sys.stderr.write(result.stderr[-5000:])
        raise SystemExit(f"the {mode} worker failed (exit {result.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX):])
