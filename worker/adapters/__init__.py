"""Adapters: what a job adds to the loaded model for its own images, and takes away after it.

One subpackage per kind (:mod:`.lora` today; embeddings, ControlNet and IP-Adapter next). Each kind has a manager
the engine owns, with one call per job: ``activate(request items) -> list of what was applied`` (typed records for
the metadata), which makes exactly those active and everything else inactive, so nothing one job asks for reaches
the next. Loading, caching and the layer-level mechanics stay inside the kind's package.
"""
