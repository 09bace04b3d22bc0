"""The official RunPod SDXL worker's own sample payloads (runpod-workers/worker-sdxl), as its clients send them."""

from __future__ import annotations

# test_input.json of the official repository.
OFFICIAL_TEST_INPUT = {
    "prompt": "A majestic steampunk dragon soaring through a cloudy sky, intricate clockwork details, golden hour "
    "lighting, highly detailed",
    "negative_prompt": "blurry, low quality, deformed, ugly, text, watermark, signature",
    "height": 1024,
    "width": 1024,
    "num_inference_steps": 25,
    "refiner_inference_steps": 50,
    "guidance_scale": 7.5,
    "strength": 0.3,
    "high_noise_frac": 0.8,
    "seed": 42,
    "scheduler": "K_EULER",
    "num_images": 1,
    "image_url": None,
}
# .runpod/tests.json of the official repository (the RunPod Hub's test).
OFFICIAL_HUB_TEST = {
    **OFFICIAL_TEST_INPUT,
    "prompt": "a majestic steampunk dragon soaring through a cloudy sky, intricate clockwork details, golden hour "
    "lighting, highly detailed",
    "negative_prompt": "blurry, very low quality, deformed, ugly, text, watermark, signature,",
    "seed": 1337,
}


def shrunk_for_the_cpu(payload: dict) -> dict:
    """The payload at 256² with 2 base and 4 refiner steps (the dev model on 2 cores); every other field as sent."""
    return {**payload, "height": 256, "width": 256, "num_inference_steps": 2, "refiner_inference_steps": 4}
