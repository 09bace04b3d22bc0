"""Third-party log lines a user of this project cannot act on, dropped at each command's start, each with its reason.

Only exact, known messages are dropped (by the logger that emits them and a piece of their text); every other
warning of every library still shows.
"""

from __future__ import annotations

import logging

# (logger, text in the message, why nobody can act on it)
UNACTIONABLE = (
    (
        "transformers.utils.import_utils",
        "requires torchvision (not installed)",
        "importing diffusers' SDXL pipelines resolves CLIP/Siglip image processors that SDXL never runs; transformers "
        "falls back to its PIL processors by itself, and installing torchvision (~600 MB) would change nothing",
    ),
)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def drop_unactionable_warnings() -> None:
    """Attach the filters (idempotent). A logger's own filters see every record it emits, imported yet or not."""
    for name, text, _reason in UNACTIONABLE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
            logger.addFilter(_DropMessage(text))
