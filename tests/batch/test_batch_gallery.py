"""``python -m batch gallery``: a static contact sheet of a run, checked in a real headless Chromium.

A small real batch on the dev model (a LoRA, two images of one line, a JPEG and a WebP, a prompt that is markup, an
invalid line, a line the engine refuses), then its gallery opened from file:// as a user opens it: thumbnails that
decoded, the failed lines with their errors, the filter, paging, and the prompt that is markup shown as text. One
browser for the whole module. Chromium comes from Debian's packages (``.ci/run`` installs it); without it the browser
tests skip and say so.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from batch_testing import read_json, write_jsonl

from batch.cli import main
from batch.exit_codes import EXIT_INVALID_LINES, EXIT_OK, EXIT_USAGE
from batch.gallery import embed_json, item_seconds

PIXELS = {"width": 64, "height": 64, "num_inference_steps": 1, "guidance_scale": 1.0}
# Markup in a prompt: were it parsed as HTML it would end the data block, add an element and run its handler.
INJECTION = "</script><img src=x onerror=\"window.__injected=1;alert('injected')\"><b id=bold>lighthouse</b> <!--"
LINES: list[dict[str, Any] | str] = [
    {
        "id": "harbour",
        "prompt": "a quiet harbour at dusk, lanterns",
        **PIXELS,
        "seed": 1,
        "loras": [{"name": "dev-style", "scale": 0.8}],
    },
    {"id": "fox", "prompt": "a red fox in fresh snow", **PIXELS, "seed": 2, "num_images": 2},
    {"id": "inject", "prompt": INJECTION, **PIXELS, "seed": 3},
    json.dumps({"id": "too-wide", "prompt": "a wide meadow", **PIXELS, "width": 65}) + "\n",  # invalid line
    {"id": "no-lora", "prompt": "a windmill in a field", **PIXELS, "loras": [{"name": "nope", "scale": 1.0}]},
    {"id": "city", "prompt": "an isometric city block", **PIXELS, "seed": 6, "output_format": "jpeg"},
    {"id": "cat", "prompt": "a cat on a windowsill", **PIXELS, "seed": 7, "output_format": "webp"},
]
DONE_LINES = {1: 1, 2: 2, 3: 1, 6: 1, 7: 1}  # line -> images
FAILED_LINES = (4, 5)


def embedded_data(index: Path) -> dict[str, Any]:
    """The JSON block of the page, as the page's own script reads it."""
    block = re.search(r'<script type="application/json" id="gallery-data">(.*?)</script>', index.read_text(), re.S)
    assert block is not None
    return json.loads(block.group(1))


@pytest.fixture(scope="module")
def gallery_run(dev_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The batch, run in process on the dev model with a dev LoRA, and its gallery written by the CLI."""
    from batch.execute import run_shard
    from batch.options import LocalEngineOptions, RunOptions
    from core.settings import load_settings
    from model_build.dev_lora import random_lora, save_diffusers_lora
    from worker.generation.engine import Engine

    root = tmp_path_factory.mktemp("gallery")
    source = write_jsonl(root / "jobs.jsonl", LINES)
    out = root / "out"
    engine = Engine(dev_model_dir, settings=load_settings({"LORA_DIR": str(root / "loras")}))
    # A dev LoRA shaped from the engine's own pipeline (UNet only): seconds cheaper than loading the model again.
    save_diffusers_lora(random_lora(engine.pipe, components=("unet",)), root / "loras" / "dev-style.safetensors")
    summary = run_shard(RunOptions(source, out, progress=False), LocalEngineOptions(encode_workers=0, engine=engine))
    assert summary.exit_code == EXIT_INVALID_LINES and summary.made == 5 and summary.failed == 1, summary
    assert main(["gallery", str(out)]) == EXIT_OK
    return {"root": root, "out": out, "source": source, "index": out / "index.html"}


def test_the_gallery_describes_the_current_input_and_reuses_its_thumbnails(
    gallery_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    shutil.copytree(gallery_run["out"], out)
    data = embedded_data(out / "index.html")
    assert [entry["line"] for entry in data["entries"]] == list(range(1, 8))
    assert data["counts"] == {"done": 5, "failed": 2, "remaining": 0}
    thumbs = sorted((out / "_gallery" / "thumbs").iterdir())
    assert len(thumbs) == sum(DONE_LINES.values())
    for thumb in thumbs:  # small JPEGs, not copies of the images
        assert thumb.read_bytes()[:3] == b"\xff\xd8\xff" and thumb.stat().st_size < 10_000
    # The markup prompt is data: the page holds exactly its two script blocks' ends, and JSON.parse gets it back.
    page = (out / "index.html").read_text()
    assert page.count("</script>") == 2 and INJECTION not in page
    assert data["entries"][2]["prompt"] == INJECTION
    assert json.loads(embed_json({"p": INJECTION + "\u2028&"})) == {"p": INJECTION + "\u2028&"}

    # Edit the input as status and merge see it: line 6 removed, the fox line changed under its id.
    edited = [dict(line) if isinstance(line, dict) else line for line in LINES]
    edited[1]["prompt"] = "a grey wolf in fresh snow"
    del edited[5]
    source = write_jsonl(tmp_path / "edited.jsonl", edited)
    capsys.readouterr()
    assert main(["gallery", str(out), "--input", str(source)]) == EXIT_OK
    assert "0 new thumbnails" in capsys.readouterr().out  # the unchanged images' thumbnails were kept
    data = embedded_data(out / "index.html")
    states = {entry["line"]: (entry["id"], entry["state"]) for entry in data["entries"]}
    assert states == {
        1: ("harbour", "done"),
        2: ("fox", "failed"),
        3: ("inject", "done"),
        4: ("too-wide", "failed"),
        5: ("no-lora", "failed"),
        6: ("cat", "done"),  # line 7 before the edit
    }
    fox = data["entries"][1]
    assert fox["error"]["kind"] == "changed_line" and fox["prompt"] == "a grey wolf in fresh snow"
    assert fox["images"] == []
    # Thumbnails no card names any more (the removed city line, the changed fox line) are gone.
    assert len(list((out / "_gallery" / "thumbs").iterdir())) == 3


def test_bad_gallery_arguments_exit_2_with_a_message(
    gallery_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["gallery", str(gallery_run["out"]), "--page-size", "0"]) == EXIT_USAGE
    assert "--page-size 0" in capsys.readouterr().err
    assert main(["gallery", str(tmp_path)]) == EXIT_USAGE  # no run wrote there
    assert "run.json is missing" in capsys.readouterr().err
    assert main(["gallery", str(tmp_path / "nowhere")]) == EXIT_USAGE
    assert "not a batch output folder" in capsys.readouterr().err


def test_an_items_time_is_its_total_when_recorded_else_the_sum_of_its_stages() -> None:
    assert item_seconds({"timings": {"denoising_s": 1.25, "vae_decode_s": 0.5}}) == 1.75
    assert item_seconds({"timings": {"denoising_s": 1.25, "total_s": 2.0}}) == 2.0
    assert item_seconds({}) is None


# -- in the browser --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    executable = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None or not os.access(executable, os.X_OK):
        pytest.skip(
            f"no chromium ({executable or 'none on PATH'}; Debian: apt-get install chromium, which .ci/run does; "
            "or set CHROMIUM): browser tests skipped"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (requirements-dev.txt) is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


class Visit:
    """A page opened from file://, with everything it did recorded: dialogs, errors, every URL it requested."""

    def __init__(self, browser, index: Path) -> None:
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.goto(index.as_uri())
        self.page.wait_for_function("[...document.images].every((image) => image.complete)")

    def lines(self) -> list[int]:
        return [
            int(line) for line in self.page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.line)")
        ]

    def card_text(self, line: int) -> str:
        return self.page.inner_text(f'.card[data-line="{line}"]')

    def filter(self, text: str) -> list[int]:
        self.page.fill("#filter", text)
        return self.lines()


def test_the_page_opens_from_file_with_every_thumbnail_decoded_and_the_failed_lines_explained(
    browser, gallery_run: dict[str, Any]
) -> None:
    out = gallery_run["out"]
    visit = Visit(browser, gallery_run["index"])
    page = visit.page
    assert visit.lines() == list(range(1, 8))
    # Every thumbnail decoded, at its own size (64 px images are never enlarged into bigger files).
    sizes = page.eval_on_selector_all(".thumbs img", "images => images.map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[64, 64]] * sum(DONE_LINES.values())
    for line, images in DONE_LINES.items():
        assert page.locator(f'.card[data-line="{line}"] .thumbs img').count() == images
        assert page.get_attribute(f'.card[data-line="{line}"]', "data-state") == "done"
    # Nothing but the page's own files was requested: no server, no network.
    assert visit.requests and all(url.startswith("file://") for url in visit.requests), visit.requests
    thumbs = {(out / "_gallery" / "thumbs" / name).as_uri() for name in os.listdir(out / "_gallery" / "thumbs")}
    assert set(visit.requests) == {gallery_run["index"].as_uri(), *thumbs}
    assert visit.errors == [] and visit.dialogs == []
    # A card says what made it: prompt, seed, size, steps, scheduler, LoRAs, time; and links the full image.
    harbour = visit.card_text(1)
    for text in ("a quiet harbour at dusk, lanterns", "seed\n1", "64×64", "DDIM", "dev-style:0.8", " s"):
        assert text in harbour, (text, harbour)
    assert "seeds\n2, 3" in visit.card_text(2)  # image k of a line has seed + k
    assert page.get_attribute('.card[data-line="6"] .thumbs a', "href") == "images/city-0.jpg"
    summary = page.inner_text("#summary")
    assert "7 lines" in summary and "5 done" in summary and "2 failed" in summary and "6 images" in summary

    # The failed lines, each with the text of its error file: an invalid line and an engine refusal.
    for line in FAILED_LINES:
        assert page.get_attribute(f'.card[data-line="{line}"]', "data-state") == "failed"
        error = read_json(out / "errors" / f"line-{line:08d}.json")
        assert error["error"] in page.inner_text(f'.card[data-line="{line}"] .error')
    assert "multiple of 8" in visit.card_text(4) and '"width": 65' in visit.card_text(4)  # the line as written
    assert "no LoRA named 'nope'" in visit.card_text(5)

    # The markup prompt is shown as text: no handler ran, no element was made from it, the data block is whole.
    assert page.inner_text('.card[data-line="3"] .prompt') == INJECTION
    assert page.evaluate("window.__injected") is None
    assert page.evaluate("document.querySelectorAll('[onerror], #bold').length") == 0
    page.close()


def test_filtering_by_text_and_by_state(browser, gallery_run: dict[str, Any]) -> None:
    visit = Visit(browser, gallery_run["index"])
    assert visit.filter("windmill") == [5]
    assert visit.filter("FOX snow") == [2]  # every word, any case
    assert visit.filter("dev-style:0.8") == [1]  # LoRAs too
    assert visit.filter("multiple of 8") == [4]  # and error texts
    assert visit.filter("no such words") == []
    assert visit.page.is_visible("#empty")
    assert visit.filter("") == list(range(1, 8))
    visit.page.select_option("#state", "failed")
    assert visit.lines() == list(FAILED_LINES)
    visit.page.select_option("#state", "done")
    assert visit.lines() == sorted(DONE_LINES)
    assert visit.errors == [] and visit.dialogs == []
    visit.page.close()


def test_paging_with_a_small_page_size(browser, gallery_run: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(gallery_run["out"], out)
    assert main(["gallery", str(out), "--page-size", "2"]) == EXIT_OK
    visit = Visit(browser, out / "index.html")
    page = visit.page
    assert visit.lines() == [1, 2] and page.inner_text("#page-info") == "page 1 of 4 · 1–2 of 7"
    assert page.is_disabled("#prev")
    page.click("#next")
    assert visit.lines() == [3, 4] and page.inner_text("#page-info") == "page 2 of 4 · 3–4 of 7"
    page.wait_for_function("[...document.images].every((image) => image.complete && image.naturalWidth > 0)")
    page.keyboard.press("ArrowRight")
    page.click("#next")
    assert visit.lines() == [7] and page.is_disabled("#next")
    page.click("#prev")
    assert visit.lines() == [5, 6]
    # A filter pages its matches from the first page.
    assert visit.filter("a") == [1, 2] and page.inner_text("#page-info").startswith("page 1 of ")
    assert visit.filter("snow") == [2] and page.inner_text("#page-info") == "page 1 of 1 · 1–1 of 1"
    assert visit.errors == [] and visit.dialogs == []
    page.close()


def test_a_screenshot_shows_the_thumbnails(browser, gallery_run: dict[str, Any], tmp_path: Path) -> None:
    """What a person sees: each thumbnail's box on the screenshot holds that thumbnail's picture, not a blank or
    broken-image box (the dev model's noise has thousands of colours; the page's own chrome has a handful)."""
    from PIL import Image, ImageChops, ImageStat

    visit = Visit(browser, gallery_run["index"])
    shot = tmp_path / "gallery.png"
    visit.page.screenshot(path=str(shot), full_page=True)
    boxes = visit.page.eval_on_selector_all(
        ".thumbs img",
        "images => images.map(i => { const r = i.getBoundingClientRect();"
        " return [r.left + scrollX, r.top + scrollY, r.right + scrollX, r.bottom + scrollY, i.getAttribute('src')]; })",
    )
    visit.page.close()
    screen = Image.open(shot).convert("RGB")
    page_colours = len(screen.getcolors(maxcolors=1 << 24))
    assert len(boxes) == sum(DONE_LINES.values())
    for left, top, right, bottom, src in boxes:
        box = (math.ceil(left), math.ceil(top), math.floor(right), math.floor(bottom))  # whole pixels of the image
        assert box[2] - box[0] > 64, box  # scaled to the card, not a broken-image icon
        crop = screen.crop(box)
        assert len(crop.getcolors(maxcolors=1 << 24)) > 1000, (src, "too few colours: blank or broken")
        # The picture in the box is that thumbnail: brought back to the thumbnail's size, it is near it, and far
        # from another thumbnail (measured: about 5 against about 60, of 255).
        own = Image.open(gallery_run["out"] / src).convert("RGB")
        other_src = next(other[4] for other in boxes if other[4] != src)
        other = Image.open(gallery_run["out"] / other_src).convert("RGB")
        shown = crop.resize(own.size, Image.Resampling.BOX)
        near = sum(ImageStat.Stat(ImageChops.difference(shown, own)).mean) / 3
        far = sum(ImageStat.Stat(ImageChops.difference(shown, other)).mean) / 3
        assert near < 10 and far > 4 * near, (src, near, far)
    assert page_colours > 1000
