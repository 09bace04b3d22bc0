"""How much a thread encoding images stalls the main thread (the GIL): why batch/encoding.py uses processes.

    python bench/gil_probe.py

One JSON line per format and image (1024x1024 noise and a smooth gradient): how many images the second thread
encoded with worker.output.images.encode_image in 3 s, the main thread's longest gap, and the share of its time spent in
gaps over 5 ms while it does small Python steps, as the batch runner's kernel-launch loop does.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worker.output.images import encode_image  # after the path: the script runs from anywhere

SIDE = 1024


def images() -> dict[str, Image.Image]:
    noise = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    smooth = np.stack([x % 256, y % 256, (x + y) // 8 % 256], -1).astype(np.uint8)
    return {"noise": Image.fromarray(noise, "RGB"), "smooth": Image.fromarray(smooth, "RGB")}


def probe(output_format: str, image: Image.Image, seconds: float = 3.0) -> dict[str, float]:
    stop = threading.Event()
    encoded = [0]

    def encode() -> None:
        while not stop.is_set():
            encode_image(image, output_format, 95, 1, "a prompt\nSteps: 20")
            encoded[0] += 1

    gaps = []
    thread = threading.Thread(target=encode)
    thread.start()
    end = last = time.perf_counter()
    end += seconds
    while time.perf_counter() < end:
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        sum(range(200))  # a little Python work between the probes
    stop.set()
    thread.join()
    gaps.sort()
    stalled = sum(gap for gap in gaps if gap > 0.005)
    return {
        "encodes": encoded[0],
        "max_gap_ms": round(gaps[-1] * 1e3, 2),
        "share_of_time_in_gaps_over_5ms": round(stalled / seconds, 3),
    }


def main() -> None:
    for output_format in ("png", "jpeg", "webp"):
        for name, image in images().items():
            print(json.dumps({"format": output_format, "image": name, **probe(output_format, image)}), flush=True)


if __name__ == "__main__":
    main()
