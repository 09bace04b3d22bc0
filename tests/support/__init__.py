"""Helpers shared by the tests and the benchmarks (never imported by the production packages).

``lora_synth``: random LoRAs for a given SDXL pipeline, written as real diffusers and Kohya files.
"""
