"""Fetch an SDXL single-file checkpoint, convert it into a verified Diffusers folder, check that folder.

``python -m model_build --help`` for the command line. One module, one job:

* ``source``: fetch what the user named (local path, ``hf://owner/repo/file@<commit>``, https URL; sha256 pin);
* ``checkpoint``: refuse what must not or cannot be converted, say what a file is, stream its tensors;
* ``single_file``: the only caller of diffusers' single-file conversion code, one component at a time;
* ``completeness``: prove the reloaded pipeline holds exactly the checkpoint's tensors;
* ``convert``: the atomic, locked orchestration (``convert``, ``ensure_converted``);
* ``manifest``: ``manifest.json`` and ``verify``;
* ``layout``, ``architectures``, ``dev_model``: key names, shipped configs, the built-in dev model.
"""
