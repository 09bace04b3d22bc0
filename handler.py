"""The image's entry point (its CMD) and the RunPod Hub's ``handler.py``: the same worker as ``python -m worker``.

The Hub's publishing guide looks for a ``handler.py`` at the repository's root; the worker itself lives in
``worker/`` (``worker/__main__.py``: settings, the compile check, the engine, then the RunPod SDK's loop).
"""

from worker.__main__ import main

if __name__ == "__main__":
    main()
