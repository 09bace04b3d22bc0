"""Textual-inversion embeddings (see :mod:`.manager`): SDXL embedding files under ``EMBEDDINGS_DIR`` found by name
(:mod:`.folders`), named in prompts as A1111 and ComfyUI name them (:mod:`.names`), read and checked (:mod:`.files`),
and added to both text encoders with diffusers' loader on first use (:mod:`.tokens`).

Nothing is imported here, so :mod:`.names` and :mod:`.folders` (no torch) stay light for their importers.
"""
