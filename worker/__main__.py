"""``python -m worker``: the RunPod serverless worker.

Locally, as the RunPod SDK defines: ``--test_input '{"input": {...}}'`` (or ./test_input.json) runs one
job and exits, ``--rp_serve_api --rp_api_port 8000`` serves /runsync, /run and /status on loopback.
"""

from __future__ import annotations

import logging
import sys

import runpod

from core.errors import ConfigurationError
from core.settings import load_settings
from worker.handler import Worker
from worker.model_location import apply_volume_caches


def main() -> None:
    try:
        settings = load_settings()
    except ConfigurationError as error:
        print(error, file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=settings.log_level or "INFO", format="%(asctime)s %(levelname)s %(message)s")
    apply_volume_caches()  # compile (and later Hub) caches on the network volume when one is mounted
    worker = Worker(settings)
    worker.start()
    runpod.serverless.start({"handler": worker.handle})


if __name__ == "__main__":
    main()
