"""IP-Adapters per job (see :mod:`.manager`): names resolved to h94/IP-Adapter-layout files and checked against the
served UNet and an image encoder that fits (:mod:`.files`, headers and JSON only), adapters and encoders loaded once
and kept in an LRU (:mod:`.cache`), the reference images encoded (:mod:`.image_prompt`), and the adapters' attention
processors put into the UNet for the job's base calls only (:mod:`.install`).

Nothing is imported here, so :mod:`.files` (no torch) stays light for its importers.
"""
