"""``python -m worker``: the RunPod serverless worker.

Locally, as the RunPod SDK defines: ``--test_input '{"input": {...}}'`` (or ./test_input.json) runs one
job and exits, ``--rp_serve_api --rp_api_port 8000`` serves /runsync, /run and /status on loopback.
"""

from __future__ import annotations

import logging
import os

import runpod

from worker.handler import handler, start_engine


def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(message)s")
    start_engine()
    runpod.serverless.start({"handler": handler})


if __name__ == "__main__":
    main()
