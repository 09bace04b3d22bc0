"""``gallery``: a static contact sheet of a run, ``<out>/index.html``, to look at a run's images and failures.

One line of the current input is one card, in line order: its thumbnails, prompt, seed, LoRAs, scheduler, size
and time, or its error. The run is described as ``status`` and ``merge`` describe it (batch/report.py reads the
input): lines removed since are not shown, an item whose line was changed under its id is failed.

The page works opened from the file system, with no server and nothing from the network: the data is embedded in
the page (browsers refuse ``fetch()`` of local files), the script and styles are inline, and the images are small
JPEG thumbnails under ``<out>/_gallery/thumbs/`` (a 5,000-image run must not make the browser decode 5,000 full
images; a page shows ``--page-size`` cards at a time). Every string from the input is data, never markup: it is
embedded as JSON with ``<``, ``>`` and ``&`` escaped (no ``</script>`` can end the data block) and the page puts it
into the document with ``textContent`` only.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batch.atomic import write_atomic
from batch.claims import ClaimBook
from batch.jobs import Job, Shard, load_shard, read_raw_lines
from batch.outputs import OutputDir
from batch.records import ErrorRecord, Sidecar, changed_line_message
from batch.report import _input_of  # the input as status and merge read it: --input, else the run's own
from core.errors import ConfigurationError

GALLERY_FOLDER = "_gallery"  # starts with "_": never an item id, so never taken for a sidecar or an image
TEMPLATE = Path(__file__).with_name("gallery.html")
DEFAULT_PAGE_SIZE = 100
THUMB_SIDE = 256  # px, the longer side; cards show them at most this wide, so sharp on a 1x screen
THUMB_QUALITY = 82
IMAGE_NAME = re.compile(r"images/[A-Za-z0-9][A-Za-z0-9._-]*")
RAW_LINE_CHARS = 2_000  # of an invalid line, shown as it was written: enough to recognise it

ProgressCallback = Callable[[int, int], None]


def thumbnail_name(sha256: str) -> str:
    """Named by the image's content (from its sidecar): a remade image gets a new thumbnail, an unchanged one is
    reused by the next build, so rebuilding the gallery of a large run costs only its new images."""
    return f"{GALLERY_FOLDER}/thumbs/{sha256[:32]}.jpg"


def make_thumbnail(source: Path, side: int = THUMB_SIDE, quality: int = THUMB_QUALITY) -> bytes:
    """A JPEG of ``source`` at most ``side`` pixels on its longer side (never enlarged)."""
    from PIL import Image

    with Image.open(source) as image:
        image.draft("RGB", (side, side))  # JPEG sources decode at 1/2..1/8 scale: much less work
        thumb = image.convert("RGB")
    thumb.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    thumb.save(buffer, "JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def item_seconds(generation: Mapping[str, Any]) -> float | None:
    """The item's pipeline-call time from its sidecar's ``generation``: the recorded total when there is one (an
    endpoint's worker reports it), else the sum of the stages' timings (the local engine's); None when nothing was
    recorded."""
    timings = generation.get("timings") or {}
    if isinstance(timings.get("total_s"), int | float):
        return round(timings["total_s"], 3)
    values = [value for value in timings.values() if isinstance(value, int | float)]
    return round(sum(values), 3) if values else None


def _request_fields(request: dict[str, Any]) -> dict[str, Any]:
    loras = request.get("loras") or []
    return {
        "prompt": request.get("prompt") or "",
        "negative_prompt": request.get("negative_prompt") or "",
        "prompt_2": request.get("prompt_2") or "",
        "scheduler": request.get("scheduler"),
        "steps": request.get("num_inference_steps"),
        "guidance": request.get("guidance_scale"),
        "width": request.get("width"),
        "height": request.get("height"),
        "num_images": request.get("num_images"),
        "loras": [f"{lora.get('name')}:{lora.get('scale', 1.0):g}" for lora in loras if isinstance(lora, dict)],
        "img2img": bool(request.get("image_url")),
    }


def _done_entry(job: Job, sidecar: Sidecar, thumbs: dict[str, Path]) -> dict[str, Any]:
    metadata = sidecar.metadata
    entry = {"state": "done", **_request_fields(sidecar.request)}
    # img2img follows its input's size unless the line gave one: the metadata has what was made.
    entry["width"] = metadata.get("width", entry["width"])
    entry["height"] = metadata.get("height", entry["height"])
    entry["seed"] = sidecar.seed
    entry["seconds"] = item_seconds(sidecar.generation)
    entry["call_images"] = (sidecar.generation.get("batch") or {}).get("images_in_call")
    entry["images"] = []
    for image in sidecar.images:
        digest = image.sha256 or hashlib.sha256(f"{image.file_name}:{image.size}".encode()).hexdigest()
        name = thumbnail_name(digest)
        thumbs[name] = Path(image.file_name)
        # The page links the image by this name: only the runner's own pattern, never a URL a sidecar could carry.
        link = image.file_name if IMAGE_NAME.fullmatch(image.file_name) else None
        entry["images"].append({"file": link, "thumb": name, "seed": image.seed})
    return entry


def _failed_job_entry(job: Job, outputs: OutputDir, changed: bool) -> dict[str, Any]:
    request = job.request.model_dump(mode="json")
    entry = {"state": "failed", **_request_fields(request), "seed": job.request.seed, "images": []}
    if changed:
        record = outputs.read_error(job.line)
        if record is None or record.kind != "changed_line" or record.id != job.id:
            # The run writes this error file when it meets the changed line; until then, the same words.
            record = ErrorRecord(
                line=job.line, id=job.id, kind="changed_line", error=changed_line_message(job.id), retriable=False
            )
    else:
        record = outputs.current_failure(job)
    entry["error"] = {
        "kind": record.kind if record else None,
        "code": record.code if record else None,
        "message": record.error if record else "",
        "retriable": record.retriable if record else None,
        "attempts": record.attempts if record else None,
    }
    return entry


def _raw_lines(source: Path, numbers: set[int]) -> dict[int, str]:
    """The text of the given lines, as written (cut), so an invalid line can be recognised on the page."""
    if not numbers:
        return {}
    texts = {}
    for raw in read_raw_lines(source):
        if raw.number in numbers:
            texts[raw.number] = raw.text[:RAW_LINE_CHARS].decode("utf-8", errors="replace")
            if len(texts) == len(numbers):
                break
    return texts


def collect_entries(
    outputs: OutputDir, source: Path
) -> tuple[list[dict[str, Any]], dict[str, Path], dict[str, Any] | None]:
    """One entry per line of the current input, in line order; the thumbnails they need (name -> image path);
    the model of the first done item."""
    everything = load_shard(source, Shard(0, 1))
    claims = ClaimBook(outputs.claims, outputs.tmp)
    entries: list[dict[str, Any]] = []
    thumbs: dict[str, Path] = {}
    model = None
    for job in everything.jobs:
        state = outputs.item_state(job, repair=False)
        if state.done:
            entry = _done_entry(job, state.sidecar, thumbs)
            model = model or state.sidecar.metadata.get("model")
        elif state.changed or outputs.current_failure(job) is not None:
            entry = _failed_job_entry(job, outputs, state.changed)
        else:
            running = claims.holder(job.id) is not None
            entry = {
                "state": "running" if running else "remaining",
                **_request_fields(job.request.model_dump(mode="json")),
            }
            entry.update(seed=job.request.seed, images=[])
        entries.append({"line": job.line, "id": job.id, **entry})
    texts = _raw_lines(source, {invalid.line for invalid in everything.invalid})
    for invalid in everything.invalid:
        # The current input's own verdict, not a possibly older error file: it is what the next run writes.
        error = {"kind": invalid.kind, "code": None, "message": invalid.message, "retriable": False}
        entries.append(
            {"line": invalid.line, "id": invalid.id, "state": "failed", "images": [], "error": error}
            | {"raw": texts.get(invalid.line, "")}
        )
    entries.sort(key=lambda entry: entry["line"])
    return entries, thumbs, model


def write_thumbnails(
    outputs: OutputDir,
    wanted: dict[str, Path],
    side: int,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[int, dict[str, str]]:
    """Make the thumbnails that do not exist yet (in parallel: Pillow decodes and resizes without the GIL) and
    remove those no entry names any more; returns (how many were made, {name: error} for images that would not
    decode)."""
    folder = outputs.root / GALLERY_FOLDER / "thumbs"
    folder.mkdir(parents=True, exist_ok=True)
    outputs.tmp.mkdir(parents=True, exist_ok=True)
    missing = [(name, image) for name, image in wanted.items() if not (outputs.root / name).is_file()]
    errors: dict[str, str] = {}

    def make(item: tuple[str, Path]) -> tuple[str, str | None]:
        name, image = item
        try:
            data = make_thumbnail(outputs.root / image, side)
        except (OSError, ValueError) as error:  # Pillow's "cannot identify image file", a truncated file
            return name, f"{image}: {error}"
        write_atomic(outputs.root / name, data, outputs.tmp, durable=False)  # remade if lost: no fsync
        return name, None

    done = 0
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for name, error in pool.map(make, missing):
            done += 1
            if error is not None:
                errors[name] = error
            if progress is not None:
                progress(done, len(missing))
    keep = {Path(name).name for name in wanted}
    for path in folder.glob("*.jpg"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
    return len(missing) - len(errors), errors


def embed_json(value: Any) -> str:
    """JSON for a ``<script type="application/json">`` block: no ``<``, ``>`` or ``&`` survives, so no text of a
    prompt (``</script>``, ``<!--``) can end the block or start markup; JSON.parse reads the escapes back."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028")):
        text = text.replace(char, escape)
    return text.replace("\u2029", "\\u2029")


def render_page(data: dict[str, Any], title: str) -> str:
    template = TEMPLATE.read_text("utf-8")
    # The page's Content-Security-Policy allows its own script by hash and nothing else: no inline event
    # handler, no other script, no network. A second wall behind the escaping, should it ever fail.
    script = re.search(r"<script>(.*?)</script>", template, re.DOTALL)
    if script is None:
        raise RuntimeError(f"{TEMPLATE} has no inline <script> block")
    digest = base64.b64encode(hashlib.sha256(script.group(1).encode("utf-8")).digest()).decode("ascii")
    values = {"TITLE": html.escape(title), "DATA": embed_json(data), "SCRIPT_HASH": f"sha256-{digest}"}
    # One pass, so a value that happens to contain a placeholder's name is never substituted again.
    return re.sub(r"__GALLERY_(TITLE|DATA|SCRIPT_HASH)__", lambda match: values[match.group(1)], template)


def build_gallery(
    out: Path,
    source: Path | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    thumb_side: int = THUMB_SIDE,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Write ``<out>/index.html`` and its thumbnails for the current input (``source``, else the run's own).

    Returns what the page shows: counts per state, images, thumbnails made and images that would not decode.
    """
    if page_size < 1:
        raise ConfigurationError(f"--page-size {page_size}: must be at least 1")
    if not 16 <= thumb_side <= 1024:
        raise ConfigurationError(f"--thumb-size {thumb_side}: must be 16..1024 pixels")
    started = time.monotonic()
    outputs = OutputDir(out)
    source = _input_of(outputs, source)
    entries, thumbs, model = collect_entries(outputs, source)
    try:
        made, thumb_errors = write_thumbnails(outputs, thumbs, thumb_side, workers, progress)
        for entry in entries:
            for image in entry["images"]:
                if image["thumb"] in thumb_errors:
                    image["thumb_error"] = thumb_errors[image["thumb"]]
                    image["thumb"] = None
        counts = {state: sum(entry["state"] == state for entry in entries) for state in ("done", "failed")}
        counts["remaining"] = len(entries) - counts["done"] - counts["failed"]
        data = {
            "input": str(source),
            "out": str(outputs.root.resolve()),
            "model": model,
            "built_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "page_size": page_size,
            "thumb_side": thumb_side,
            "counts": counts,
            "entries": entries,
        }
        index = outputs.root / "index.html"
        page = render_page(data, f"{outputs.root.resolve().name}: batch gallery")
        write_atomic(index, page.encode("utf-8"), outputs.tmp, durable=False)
    except OSError as error:
        raise ConfigurationError(
            f"cannot write the gallery into {outputs.root} ({error.strerror or error}); "
            "run it where the output folder is writable"
        ) from None
    return {
        "index": str(index),
        "input": str(source),
        "lines": len(entries),
        **counts,
        "images": sum(len(entry["images"]) for entry in entries),
        "thumbnails_made": made,
        "thumbnail_errors": sorted(thumb_errors.values()),
        "seconds": round(time.monotonic() - started, 3),
    }
