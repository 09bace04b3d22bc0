"""How much a thread encoding images stalls the main thread (the GIL): why batch/encoding.py uses processes.

python bench/gil_probe.py  ->  one JSON line per format and image: the main thread's longest gap and the share of
its time spent in gaps over 5 ms while a second thread encodes 1024x1024 images with worker.images.encode_image.
"""

import json
import sys
import threading
import time

import numpy as np
from PIL import Image

sys.path.insert(0, ".")
from worker.images import encode_image

rng = np.random.default_rng(0)
noise = Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8), "RGB")
y, x = np.mgrid[0:1024, 0:1024]
smooth = Image.fromarray(np.stack([x % 256, y % 256, (x + y) // 8 % 256], -1).astype(np.uint8), "RGB")


def probe(fmt, image, seconds=3.0):
    stop = threading.Event()
    count = [0]

    def encode():
        while not stop.is_set():
            encode_image(image, fmt, 95, 1, "a prompt\nSteps: 20")
            count[0] += 1

    gaps = []
    t = threading.Thread(target=encode)
    t.start()
    end = time.perf_counter() + seconds
    last = time.perf_counter()
    while time.perf_counter() < end:
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        sum(range(200))  # a little Python work, as a launch loop does
    stop.set()
    t.join()
    gaps = sorted(gaps)
    over5 = sum(g for g in gaps if g > 0.005)
    return {
        "format": fmt,
        "image": "noise" if image is noise else "smooth",
        "encodes": count[0],
        "max_gap_ms": round(gaps[-1] * 1e3, 2),
        "p999_gap_ms": round(gaps[int(len(gaps) * 0.999)] * 1e3, 3),
        "share_of_time_in_gaps_over_5ms": round(over5 / seconds, 3),
    }


for fmt in ("png", "jpeg", "webp"):
    for image in (noise, smooth):
        print(json.dumps(probe(fmt, image)))
