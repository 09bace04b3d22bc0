"""ControlNets per job (see :mod:`.manager`): names resolved to converted folders and checked against the served
UNet (:mod:`.folders`), nets loaded once and kept in an LRU (:mod:`.cache`), control images fitted to the output and
preprocessed (:mod:`.preprocess`, :mod:`.canny`).

Nothing is imported here, so :mod:`.folders` (JSON only, no torch) stays light for its importers.
"""
