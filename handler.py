"""The image's entry point and the RunPod Hub's ``handler.py``: the same worker as ``python -m worker``.

Before the worker starts, a deployment that asks for compilation (``COMPILE``, ``COMPILE_VAE``) has its
prerequisites checked (:func:`worker.generation.acceleration.check_compile_prerequisites`): an image without a C
compiler stops at once with a configuration error instead of serving eagerly. Only then is torch imported early; without
compilation nothing is imported here that ``python -m worker`` would not import at the same point.
"""

from __future__ import annotations

import logging
import sys

from core.errors import ConfigurationError
from core.settings import WORKER, load_settings
from worker.__main__ import main


def check_speedups() -> None:
    try:
        settings = load_settings(command=WORKER)
    except ConfigurationError:
        return  # main() reports it, with its exit status
    if settings.compile == "off" and not settings.compile_vae:
        return
    logging.basicConfig(level=settings.log_level or "INFO", format="%(asctime)s %(levelname)s %(message)s")
    from worker.generation.acceleration import check_compile_prerequisites

    try:
        check_compile_prerequisites(settings)
    except ConfigurationError as error:
        print(error, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_speedups()
    main()
