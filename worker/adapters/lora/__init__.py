"""LoRAs per job (see :mod:`.manager`): names resolved to files (:mod:`.sources`), files checked and converted
(:mod:`.files`), adapters kept in an LRU (:mod:`.cache`), activated in peft's layers (:mod:`.layers`) or merged
into the UNet's weights and restored bit for bit (:mod:`.fusion`).

Nothing is imported here, so :mod:`.sources` (names and settings, no torch) stays light for its importers.
"""
