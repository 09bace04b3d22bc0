"""Textual-inversion embeddings (worker/adapters/embeddings) on the dev model, against diffusers itself.

The reference is a second pipeline into which diffusers' own ``load_textual_inversion`` put the same vectors under
a token of its own (``<ref>``), encoded by diffusers' ``encode_prompt`` or, for A1111 syntax, by a prompt encoder
that knows nothing of embeddings (the path that equals ``encode_prompt``). The dev model's encoders are 32 and 64
wide, so the dev embeddings are too (read from the model's configs).

Pooled output: the reference encoders are told their real end-of-text id, as the worker does once it adds tokens
(transformers' legacy ``eos_token_id: 2`` reads the pooled vector at the largest id, an embedding's; SDXL, kohya's
trainer, A1111 and ComfyUI read it at end-of-text). The test shows both that the fix is needed and what it gives.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from core.errors import EmbeddingFailed
from model_build.dev_embedding import model_widths, write_dev_embedding
from tests.support.dev_pipes import load_dev_pipe, one_torch_thread
from worker.adapters.embeddings import tokens
from worker.adapters.embeddings.manager import EmbeddingManager, token_targets
from worker.adapters.embeddings.names import NameFinder, fold
from worker.prompting.chunks import chunk_weighted_tokens
from worker.prompting.encoding import PromptEncoder

TENSORS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def widths(dev_model_dir: Path) -> dict[str, int]:
    return model_widths(dev_model_dir)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, widths: dict[str, int]) -> Path:
    """An EMBEDDINGS_DIR with two good dev embeddings and one file of each kind that must be refused."""
    root = tmp_path_factory.mktemp("embeddings")
    write_dev_embedding(root / "dev-style.safetensors", widths, vectors=4, seed=1)
    write_dev_embedding(root / "styles" / "OneVec.safetensors", widths, vectors=1, seed=2)
    write_dev_embedding(root / "bad.safetensors", widths, vectors=2, seed=5)  # a word CLIP's vocabulary has
    write_dev_embedding(root / "old-sd15.safetensors", sd15=True)
    write_dev_embedding(root / "wide.safetensors", {"clip_l": 768, "clip_g": widths["clip_g"]})
    (root / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    (root / "pickled.pt").write_bytes(b"\x80\x04\x95 never opened")
    write_dev_embedding(root / "Dup.safetensors", widths, seed=3)
    write_dev_embedding(root / "more" / "dup.safetensors", widths, seed=4)
    return root


def with_embeddings(pipe, roots: tuple[Path, ...]) -> tuple[PromptEncoder, EmbeddingManager]:
    """A prompt encoder wired as the worker wires it (worker.generation.prompt_encoders)."""
    encoder = PromptEncoder(pipe)
    manager = EmbeddingManager(token_targets(pipe), roots, encoder.vocabulary_changed)
    encoder.use_embedding_names(manager)
    return encoder, manager


@pytest.fixture(scope="module")
def ours(dev_model_dir: Path, root: Path) -> SimpleNamespace:
    pipe = load_dev_pipe(dev_model_dir)
    encoder, manager = with_embeddings(pipe, (root,))
    return SimpleNamespace(pipe=pipe, encoder=encoder, manager=manager)


@pytest.fixture(scope="module")
def reference(dev_model_dir: Path, root: Path) -> SimpleNamespace:
    """diffusers' own loader: dev-style as <ref>, OneVec as <one>, bad as <bad>, in both encoders, end-of-text
    pooling."""
    pipe = load_dev_pipe(dev_model_dir)
    for name, token in (
        ("dev-style.safetensors", "<ref>"),
        ("styles/OneVec.safetensors", "<one>"),
        ("bad.safetensors", "<bad>"),
    ):
        state_dict = load_file(root / name)
        pipe.load_textual_inversion(
            state_dict["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            state_dict["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
    pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id
    return SimpleNamespace(pipe=pipe, encoder=PromptEncoder(pipe, cache_bytes=0))


@pytest.fixture(scope="module")
def plain(dev_model_dir: Path) -> PromptEncoder:
    """A fresh worker's encoder, never touched by an embedding."""
    return PromptEncoder(load_dev_pipe(dev_model_dir), cache_bytes=0)


def assert_same(ours, theirs) -> None:
    for name in TENSORS:
        mine, reference = getattr(ours, name), getattr(theirs, name)
        assert torch.equal(mine, reference), f"{name} differs by {(mine - reference).abs().max()}"


def diffusers_encode(pipe, prompt: str, negative_prompt: str) -> SimpleNamespace:
    tensors = pipe.encode_prompt(prompt, do_classifier_free_guidance=True, negative_prompt=negative_prompt)
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    return SimpleNamespace(**dict(zip(names, tensors, strict=True)))


# ---- against diffusers ----------------------------------------------------------------------------------------------


def test_an_embedding_encodes_as_diffusers_load_textual_inversion_does(ours, reference, plain) -> None:
    encoded = ours.encoder.encode("a photo of dev-style", negative_prompt="blurry, dev-style")
    assert_same(encoded, diffusers_encode(reference.pipe, "a photo of <ref>", "blurry, <ref>"))
    as_text = plain.encode("a photo of dev-style", negative_prompt="blurry, dev-style")
    assert not torch.equal(encoded.prompt_embeds, as_text.prompt_embeds)  # the name is no longer 8 tokens of text
    (entry,) = encoded.info["embeddings"]
    assert entry["name"] == "dev-style" and entry["vectors"] == 4 and len(entry["sha256"]) == 64


def test_the_pooled_vector_is_read_at_end_of_text(ours, reference) -> None:
    encoded = ours.encoder.encode("dev-style portrait", negative_prompt="")
    pipe = reference.pipe
    text = pipe.maybe_convert_prompt("<ref> portrait", pipe.tokenizer_2)
    ids = pipe.tokenizer_2(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder_2(ids, output_hidden_states=True).last_hidden_state
        eos = int((ids[0] == pipe.tokenizer_2.eos_token_id).nonzero()[0])
        by_hand = pipe.text_encoder_2.text_projection(hidden[:, eos])
    assert torch.allclose(encoded.pooled_prompt_embeds, by_hand, rtol=0, atol=1e-6)
    # What transformers' legacy rule reads instead: the largest id, an embedding's vector (the hidden states agree).
    model = pipe.text_encoder_2.text_model
    model.eos_token_id = 2
    try:
        legacy = diffusers_encode(pipe, "<ref> portrait", "")
    finally:
        model.eos_token_id = pipe.tokenizer_2.eos_token_id
    assert torch.equal(legacy.prompt_embeds, encoded.prompt_embeds)
    assert not torch.equal(legacy.pooled_prompt_embeds, encoded.pooled_prompt_embeds)


@pytest.mark.parametrize(
    ("text", "as_reference", "used"),
    [
        ("a (dev-style:1.2) photo", "a (<ref>:1.2) photo", ["dev-style"]),  # A1111's weight on every vector
        ("embedding:dev-style, a photo", "<ref>, a photo", ["dev-style"]),  # ComfyUI's form
        ("embedding:OneVec.safetensors photo", "<one> photo", ["OneVec"]),  # ComfyUI's, with the file's suffix
        ("dev-style.safetensors photo", "<ref>.safetensors photo", ["dev-style"]),  # bare: the suffix is text
        ("a bad photo, badger, bad-hands", "a <bad> photo, badger, <bad>-hands", ["bad"]),  # a vocabulary word
        ("DEV-STYLE photo, onevec", "<ref> photo, <one>", ["dev-style", "OneVec"]),  # any case; any subfolder
        ("[dev-style] BREAK [embedding:OneVec]", "[<ref>] BREAK [<one>]", ["dev-style", "OneVec"]),
        ("dev-style2 and dev-style_b", "<ref>2 and <ref>_b", ["dev-style"]),  # a digit or "_" ends a CLIP word
        ("a xdev-style photo, dev-styles", "a xdev-style photo, dev-styles", []),  # inside a word: text (A1111)
        ("a photo of nothing-here", "a photo of nothing-here", []),  # no such embedding: text
    ],
)
def test_prompts_name_embeddings_as_a1111_and_comfyui_do(
    ours, reference, text: str, as_reference: str, used: list[str]
) -> None:
    encoded = ours.encoder.encode(text, negative_prompt="lowres")
    assert_same(encoded, reference.encoder.encode(as_reference, negative_prompt="lowres"))
    assert [entry["name"] for entry in encoded.info["embeddings"]] == used


def test_an_edited_prompt_lists_the_embeddings_of_every_segment(ours, reference) -> None:
    encoded = ours.encoder.encode("a [dev-style:onevec:0.5] photo", negative_prompt="", steps=4)
    assert {entry["name"] for entry in encoded.info["embeddings"]} == {"dev-style", "OneVec"}
    late = reference.encoder.encode("a [<ref>:<one>:0.5] photo", negative_prompt="", steps=4)
    assert torch.equal(encoded.at_step(3).prompt_embeds, late.at_step(3).prompt_embeds)


# ---- reproducibility ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "a photo of a cat, badge, badger, styles",
        "<ti-1> and <TI-2>_1 written out",  # the private tokens' spelling: text, whatever is loaded
        "an embedding: a vector, embedding:",
        "dev BREAK style " * 40,
    ],
)
def test_texts_without_embeddings_give_a_fresh_workers_tokens_and_tensors(ours, plain, text: str) -> None:
    ours.encoder.encode("dev-style, onevec")  # loaded (no-op when an earlier test loaded them)
    assert len(ours.pipe.tokenizer) > len(plain.pipe.tokenizer)
    for index in (0, 1):
        assert ours.encoder.tokenize(text, index).input_ids == plain.tokenize(text, index).input_ids
    assert_same(ours.encoder.encode(text, negative_prompt=text), plain.encode(text, negative_prompt=text))


def test_an_embedding_that_would_cross_a_chunk_end_starts_the_next_chunk(ours, reference) -> None:
    text = "a " * 73 + "dev-style, a house"
    rows = ours.encoder.tokenize(text, 0).input_ids
    first_vector = ours.pipe.tokenizer.eos_token_id + 1  # added ids follow the vocabulary
    assert rows[0][1:74] == [rows[0][1]] * 73 and rows[0][74] == ours.pipe.tokenizer.eos_token_id  # 73 tokens, end
    assert all(token >= first_vector for token in rows[1][1:5])  # the 4 vectors, together
    assert_same(ours.encoder.encode(text), reference.encoder.encode("a " * 73 + "BREAK <ref>, a house"))


def test_the_chunker_keeps_an_embeddings_vectors_together() -> None:
    """Pure chunking: tokens 100..103 are one embedding (101-103 continue it)."""
    chunks = chunk_weighted_tokens(
        [([1] * 73 + [100, 101, 102, 103, 5], 1.0)],
        bos_token_id=9,
        eos_token_id=8,
        pad_token_id=0,
        comma_token_id=7,
        later_vector_ids=frozenset({101, 102, 103}),
    )
    assert chunks.input_ids[0][1:75] == [1] * 73 + [8] and chunks.input_ids[1][1:7] == [100, 101, 102, 103, 5, 8]
    whole = chunk_weighted_tokens(
        [([1] * 75 + [100, 101], 1.0)], bos_token_id=9, eos_token_id=8, pad_token_id=0, comma_token_id=7
    )
    assert whole.input_ids[1][1:3] == [100, 101]  # starting exactly at the boundary: nothing moves


# ---- refusals: clear, naming the file, nothing loaded ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("old-sd15", ["'old-sd15'", "old-sd15.safetensors", "an SD 1.x embedding", "768-wide", "clip_l and clip_g"]),
        ("wide", ["wide.safetensors", "clip_l vectors are 768 wide", "text_encoder takes 32"]),
        ("broken", ["broken.safetensors", "not a valid .safetensors file"]),
        ("pickled", ["pickled.pt", "pickle file", "never opened", "convert it to .safetensors"]),
        ("dup", ["2 embedding files", "Dup.safetensors", "rename all but one"]),
        ("embedding:nowhere", ["'embedding:nowhere'", "no embedding named 'nowhere'", "available: ", "dev-style"]),
    ],
)
def test_a_file_that_is_no_sdxl_embedding_is_refused_by_name(ours, plain, word: str, expected: list[str]) -> None:
    sizes = [len(ours.pipe.tokenizer), len(ours.pipe.tokenizer_2)]
    with pytest.raises(EmbeddingFailed) as caught:
        ours.encoder.encode("a photo", negative_prompt=f"lowres, {word}")
    message = str(caught.value)
    assert message.startswith("embedding: negative_prompt: "), message
    for part in expected:
        assert part in message, message
    assert [len(ours.pipe.tokenizer), len(ours.pipe.tokenizer_2)] == sizes
    assert_same(
        ours.encoder.encode("a photo", negative_prompt="lowres"), plain.encode("a photo", negative_prompt="lowres")
    )


def test_nothing_stays_half_loaded_when_the_second_encoder_fails(
    dev_model_dir: Path, root: Path, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = load_dev_pipe(dev_model_dir)
    encoder, manager = with_embeddings(pipe, (root,))
    before = [(len(t), e.get_input_embeddings().weight.clone()) for t, e in pipe_pairs(pipe)]
    real, calls = tokens._LOADER.load_textual_inversion, []

    def second_fails(vectors, token, tokenizer, text_encoder):
        calls.append(token)
        if len(calls) == 2:
            raise RuntimeError("simulated failure in text_encoder_2")
        return real(vectors, token=token, tokenizer=tokenizer, text_encoder=text_encoder)

    monkeypatch.setattr(tokens._LOADER, "load_textual_inversion", second_fails)
    with pytest.raises(RuntimeError, match="simulated"):
        encoder.encode("a dev-style photo")
    for (size, weight), (tokenizer, text_encoder) in zip(before, pipe_pairs(pipe), strict=True):
        assert len(tokenizer) == size and torch.equal(text_encoder.get_input_embeddings().weight, weight)
    assert manager.loaded == {}
    monkeypatch.undo()
    assert_same(encoder.encode("a dev-style photo"), reference.encoder.encode("a <ref> photo"))


def pipe_pairs(pipe) -> list[tuple]:
    return [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]


# ---- files that change; a refiner with its own encoder --------------------------------------------------------------


def test_a_rewritten_file_is_read_again_and_a_removed_one_is_text_again(
    dev_model_dir: Path, widths: dict[str, int], plain, tmp_path: Path
) -> None:
    pipe = load_dev_pipe(dev_model_dir)
    encoder, manager = with_embeddings(pipe, (tmp_path,))
    assert encoder.encode("a swap").info["embeddings"] == []  # no such file yet
    write_dev_embedding(tmp_path / "swap.safetensors", widths, seed=1)
    manager.refresh()
    first = encoder.encode("a swap")
    old_token = manager.loaded["swap"].token
    write_dev_embedding(tmp_path / "swap.safetensors", widths, seed=2)  # same size, new vectors
    manager.refresh()
    assert old_token not in pipe.tokenizer.added_tokens_encoder  # unloaded
    second = encoder.encode("a swap")
    assert not torch.equal(first.prompt_embeds, second.prompt_embeds)
    fresh_encoder, _ = with_embeddings(load_dev_pipe(dev_model_dir), (tmp_path,))
    assert_same(second, fresh_encoder.encode("a swap"))
    (tmp_path / "swap.safetensors").unlink()
    manager.refresh()
    gone = encoder.encode("a swap")
    assert gone.info["embeddings"] == [] and torch.equal(gone.prompt_embeds, plain.encode("a swap").prompt_embeds)


def test_a_refiner_with_its_own_bigg_encoder_gets_the_clip_g_vectors(dev_model_dir: Path, root: Path) -> None:
    pipe = load_dev_pipe(dev_model_dir)
    refiner = SimpleNamespace(
        text_encoder_2=copy.deepcopy(pipe.text_encoder_2), tokenizer_2=copy.deepcopy(pipe.tokenizer_2)
    )
    targets = token_targets(pipe, refiner)
    assert [target.part for target in targets] == ["clip_l", "clip_g", "clip_g"]
    manager = EmbeddingManager(targets, (root,), lambda: None)
    _, used = manager.rewrite("a onevec photo", "prompt")
    assert list(used) == ["OneVec"]
    token = manager.loaded["onevec"].token
    clip_g = load_file(root / "styles" / "OneVec.safetensors")["clip_g"]
    for tokenizer, encoder in ((pipe.tokenizer_2, pipe.text_encoder_2), (refiner.tokenizer_2, refiner.text_encoder_2)):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)]
        assert torch.equal(row, clip_g[0].to(row.dtype))


# ---- names, without a model -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("easynegative, bad-hands-5", ["easynegative", "bad-hands-5"]),
        ("(EasyNegative:1.2)", ["easynegative"]),
        ("veryeasynegative easynegatives", []),
        ("bad-hands-55 bad-hands-5x", ["bad-hands-5", "bad-hands-5"]),  # digits are CLIP words of their own
        ("bad-hands-5-x", ["bad-hands-5"]),
        ("-bad-hands-5 bad", ["bad-hands-5", "bad"]),  # punctuation then a letter: two CLIP words
        ("embedding:easynegative x", ["easynegative"]),
        ("xembedding:easynegative", ["easynegative"]),  # no explicit prefix there, but ":" ends a word
        ("an embedding: easynegative", ["easynegative"]),
        ("embedding:easynegative.pt, x", ["easynegative"]),
    ],
)
def test_names_are_found_where_clip_makes_them_whole_words(text: str, found: list[str]) -> None:
    finder = NameFinder([fold(name) for name in ("easynegative", "bad-hands-5", "bad")])
    assert [match.key for match in finder.find(text)] == found


def test_comfyuis_file_suffix_belongs_to_the_explicit_name() -> None:
    finder = NameFinder([fold("easynegative")])
    (match,) = finder.find("embedding:EasyNegative.safetensors, x")
    assert (match.start, match.end, match.word) == (0, len("embedding:EasyNegative.safetensors"), "EasyNegative")
    (bare,) = finder.find("easynegative.safetensors")
    assert bare.end == len("easynegative")  # a bare name is A1111's: what follows it stays text
