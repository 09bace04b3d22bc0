"""Prompts for SDXL: A1111 syntax (weights, BREAK, prompt editing), no 77-token limit, exact for short prompts.

One module per stage: ``schedule`` (prompt editing and alternation) -> ``syntax`` (attention weights, BREAK) ->
``chunks`` (tokens into 77-token chunks) -> ``encoding`` (``PromptEncoder``, ``EncodedPrompts``), with ``weighting``
(token weights on hidden states), ``cache`` (the byte-bounded result cache), ``graphs`` (CUDA graphs of the text
encoders) and ``stepping`` (the denoising-loop callback that switches an edited prompt's conditioning).
"""
