"""The RunPod worker and the generation engine it shares with ``batch``.

Data flows one way through its groups: :mod:`.request` (schema, input images) -> :mod:`.generation` (the engine,
its stages, schedulers, compilation) with :mod:`.prompting` and :mod:`.adapters` -> :mod:`.output` (encoded images,
PNG text, delivery as data URIs or uploads). :mod:`.model` finds, loads and places the pipeline. The entry points
(:mod:`.handler`, :mod:`.run_job`, ``python -m worker``) sit at the top.
"""
