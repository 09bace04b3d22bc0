"""Prompts for SDXL: A1111 syntax (weights, BREAK, prompt editing), no 77-token limit, exact for short prompts.

``encoding.PromptEncoder`` runs the stages and owns their state; its result is ``encoded.EncodedPrompts``.
Stages in the order a prompt flows: ``texts`` (the four fields per encoder side, the joint edit schedule) with
``schedule`` (one text's prompt editing and alternation) -> ``cache`` (the byte-bounded result cache, keyed with
``encoder_state``: placement and PEFT adapters) -> ``vocabulary`` (tokenizing, with ``syntax``: attention weights,
BREAK; ``chunks``: 77-token chunks) -> ``encoders`` (running the text encoders over ``slots``, the tokenizer / encoder
pairs, with ``weighting`` and ``graphs``: CUDA graphs) -> ``describe`` (metadata). ``stepping`` is the denoising-loop
callback that switches an edited prompt's conditioning.
"""
