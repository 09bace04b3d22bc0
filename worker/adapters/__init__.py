"""Adapters: what a job adds to the loaded model for its own images, and takes away after it.

One subpackage per kind (:mod:`.lora`, :mod:`.controlnet`, :mod:`.embeddings`; IP-Adapter next). LoRAs and
ControlNets have a manager the engine owns, with one call per job: ``activate(request items) -> list of what was
applied`` (typed records for the metadata), which makes exactly those active and everything else inactive, so
nothing one job asks for reaches the next. Embeddings are named inside the prompts instead: their manager rewrites
prompt text for the prompt encoders and loads a file on first use; loaded embeddings stay, under private tokens no
other text can reach. Loading, caching and the layer-level mechanics stay inside the kind's package.
"""
