"""Prompts as A1111 users write them: 75-token chunks, BREAK, embeddings by name, <lora:NAME:WEIGHT>."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from difftool.app import api
from difftool.core.errors import ModelError, ParameterError
from difftool.core.images import read_metadata, save_image
from difftool.plugins.builtin.sd import loader, pipeline
from difftool.plugins.builtin.sd.embeddings import load_embedding
from difftool.plugins.builtin.sd.models import split_loras
from difftool.plugins.builtin.sd.prompt_chunks import chunk_prompt
from difftool.plugins.builtin.sd.tokenizer import clip_tokenizer

from . import tiny

CLIP = clip_tokenizer("clip")
BOS, EOS = CLIP.bos_token_id, CLIP.eos_token_id
CAT, DOG, COMMA = (CLIP(w, add_special_tokens=False).input_ids[0] for w in ("cat", "dog", ","))


def test_a_long_prompt_is_cut_into_75_token_chunks_each_with_bos_and_eos() -> None:
    chunks = chunk_prompt(CLIP, " ".join(["cat"] * 80))
    assert [len(c.ids) for c in chunks] == [77, 77]
    assert chunks[0].ids == [BOS, *[CAT] * 75, EOS]
    assert chunks[1].ids == [BOS, *[CAT] * 5, *[EOS] * 71]


def test_a_full_chunk_ends_after_a_comma_within_its_last_20_tokens() -> None:
    chunks = chunk_prompt(CLIP, " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10))
    assert chunks[0].ids[1:72] == [*[CAT] * 70, COMMA] and chunks[0].ids[72:] == [EOS] * 5
    assert chunks[1].ids[1:12] == [DOG] * 10 + [EOS]
    far = chunk_prompt(CLIP, " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 40))  # comma 25 back: no move
    assert far[0].ids[1:76] == [*[CAT] * 50, COMMA, *[DOG] * 24] and far[1].ids[1:17] == [DOG] * 16


def test_break_starts_a_new_chunk_and_weights_cross_chunk_boundaries() -> None:
    chunks = chunk_prompt(CLIP, "a cat BREAK a dog")
    assert len(chunks) == 2 and chunks[0].ids[2] == CAT and chunks[0].ids[3] == EOS and chunks[1].ids[2] == DOG
    heavy = chunk_prompt(CLIP, "(" + " ".join(["cat"] * 80) + ":1.2)")
    assert heavy[0].weights[1:76] == [pytest.approx(1.2)] * 75 and heavy[1].weights[1:6] == [pytest.approx(1.2)] * 5
    assert heavy[1].weights[6:] == [1.0] * 71


def test_openclip_chunks_pad_after_their_first_end_of_text() -> None:
    openclip = clip_tokenizer("openclip")
    [chunk] = chunk_prompt(openclip, "a cat")
    plain = openclip("a cat", padding="max_length", max_length=77).input_ids  # what diffusers sends
    assert chunk.ids == plain and chunk.ids[4:] == [openclip.pad_token_id] * 73
    assert chunk_prompt(CLIP, "")[0].ids == [BOS, *[EOS] * 76]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return loader.load_sd_model(tiny.save_folder(tiny.components(seed=3), tmp_path_factory.mktemp("m") / "m"))


def test_long_prompts_are_read_whole_and_a_short_negative_is_padded_with_the_empty_prompt(model) -> None:
    words = " ".join(["cat"] * 80)
    zebra = pipeline.encode_prompt(model, words + " zebra", "")
    horse = pipeline.encode_prompt(model, words + " horse", "")
    a, b = zebra.cond["encoder_hidden_states"], horse.cond["encoder_hidden_states"]
    assert a.shape[1] == 154
    assert torch.equal(a[:, :77], b[:, :77]) and not torch.allclose(a[:, 77:], b[:, 77:])  # the 81st word counts
    empty = pipeline.encode_prompt(model, "", "").cond["encoder_hidden_states"]
    negative = zebra.uncond["encoder_hidden_states"]
    assert negative.shape == a.shape and torch.equal(negative[:, 77:], empty) and torch.equal(negative[:, :77], empty)


def write_embedding(path: Path, vectors: torch.Tensor, a1111_pt: bool = False) -> Path:
    if a1111_pt:
        torch.save({"string_to_param": {"*": torch.nn.Parameter(vectors)}, "name": path.stem, "step": 10}, path)
    else:
        from safetensors.torch import save_file

        save_file({"emb_params": vectors.contiguous()}, str(path))
    return path


def test_an_embedding_changes_the_conditioning_only_from_where_its_name_appears(model, tmp_path: Path) -> None:
    path = write_embedding(
        tmp_path / "mystyle.safetensors", torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    )
    embedding = load_embedding(path)
    with_name = pipeline.encode_prompt(model, "a photo in mystyle now", "", embeddings=[embedding])
    without = pipeline.encode_prompt(model, "a photo in mystyle now", "")
    x, y = with_name.cond["encoder_hidden_states"], without.cond["encoder_hidden_states"]
    [chunk] = chunk_prompt(
        CLIP,
        "a photo in mystyle now",
        lambda ids, pos: (
            (embedding, 2) if ids[pos : pos + 2] == CLIP("mystyle", add_special_tokens=False).input_ids else (None, 0)
        ),
    )  # noqa: E501
    offset = chunk.embeddings[0][0]
    assert offset == 4 and chunk.ids[4:6] == [0, 0]  # two vectors where the two name tokens were
    assert torch.equal(x[:, :offset], y[:, :offset])  # CLIP attends causally: nothing before the name moves
    assert not torch.allclose(x[:, offset:], y[:, offset:])
    other = pipeline.encode_prompt(model, "a photo of a cat", "", embeddings=[embedding]).cond["encoder_hidden_states"]
    plain = pipeline.encode_prompt(model, "a photo of a cat", "").cond["encoder_hidden_states"]
    assert torch.equal(other, plain)  # not named: no effect


def test_embeddings_are_found_by_name_in_the_model_roots_and_recorded(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "root"
    (root / "embeddings").mkdir(parents=True)
    write_embedding(root / "embeddings" / "mystyle.safetensors", torch.randn(3, 32))
    write_embedding(root / "embeddings" / "legacy.pt", torch.randn(1, 32), a1111_pt=True)
    monkeypatch.setenv("DIFFTOOL_MODELS", str(root))
    folder = tiny.save_folder(tiny.components(seed=3), tmp_path / "m")
    common = {"model": str(folder), "width": 16, "height": 16, "steps": 2, "seed": 4, "dtype": "fp32"}
    named = api.run("generate", prompt="a cat, mystyle", **common)
    assert named.record["ti_hashes"].startswith("mystyle: ")
    monkeypatch.setenv("DIFFTOOL_MODELS", str(tmp_path / "elsewhere"))  # no embeddings: "mystyle" is words
    plain = api.run("generate", prompt="a cat, mystyle", **common)
    assert "ti_hashes" not in plain.record
    assert not np.array_equal(np.asarray(named.images[0]), np.asarray(plain.images[0]))
    monkeypatch.setenv("DIFFTOOL_MODELS", str(root))
    out = save_image(named.images[0], tmp_path / "o.png", named.record)
    assert read_metadata(out)["parameters"]["TI hashes"].startswith("mystyle: ")
    with pytest.raises(ModelError, match="pickle"):
        api.run("generate", prompt="legacy art", **common)
    assert (
        api.run("generate", prompt="legacy art", allow_pickle=True, **common).record["ti_hashes"].startswith("legacy")
    )


def test_lora_tags_in_the_prompt_apply_the_named_lora_and_leave_the_text(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("peft")
    from .test_lora import make_lora

    assert split_loras("a cat <lora:ink:0.5>, dusk <lora:b>") == ("a cat , dusk ", [("ink", 0.5), ("b", 1.0)])
    parts = tiny.components(seed=6)
    root = tmp_path / "root"
    (root / "models" / "Lora").mkdir(parents=True)
    lora = make_lora(parts["unet"], root / "models" / "Lora" / "ink.safetensors")
    folder = tiny.save_folder(parts, tmp_path / "m")
    monkeypatch.setenv("DIFFTOOL_MODELS", str(root))
    common = {"model": str(folder), "width": 16, "height": 16, "steps": 2, "seed": 4, "dtype": "fp32"}
    tagged = api.run("generate", prompt="a cat <lora:ink:0.5>", **common)
    flagged = api.run("generate", prompt="a cat ", lora=f"{lora}:0.5", **common)
    assert np.array_equal(np.asarray(tagged.images[0]), np.asarray(flagged.images[0]))
    assert tagged.record["lora_hashes"].startswith("ink: ") and tagged.record["prompt"] == "a cat <lora:ink:0.5>"
    with pytest.raises(ParameterError, match="LoRA 'nope'"):
        api.run("generate", prompt="a cat <lora:nope:1>", **common)


def test_an_embedding_moved_by_the_comma_backtrack_goes_with_its_words() -> None:
    class Vectors:
        vectors = 2

    name = CLIP("mystyle", add_special_tokens=False).input_ids

    def find(ids, position):
        return (Vectors, len(name)) if list(ids[position : position + len(name)]) == name else (None, 0)

    chunks = chunk_prompt(CLIP, " ".join(["cat"] * 60) + ", " + " ".join(["cat"] * 12) + " mystyle dog", find)
    assert chunks[0].embeddings == [] and chunks[0].ids[62:] == [EOS] * 15  # ends after the comma
    [(offset, embedding)] = chunks[1].embeddings
    assert embedding is Vectors and chunks[1].ids[offset : offset + 2] == [0, 0] and chunks[1].ids[offset + 2] == DOG


def test_round_and_square_brackets_nest_independently_as_in_a1111() -> None:
    from difftool.plugins.builtin.sd.prompt_weights import parse

    parsed = parse("(a [b) c]")
    assert [t for t, _ in parsed] == ["a ", "b", " c"]
    assert [w for _, w in parsed] == [pytest.approx(1.1), pytest.approx(1.0), pytest.approx(1 / 1.1)]


def test_a_padded_negative_is_recorded_as_a1111s_pad_conds(tmp_path: Path) -> None:
    folder = tiny.save_folder(tiny.components(seed=3), tmp_path / "m")
    common = {"model": str(folder), "width": 16, "height": 16, "steps": 1, "seed": 4, "dtype": "fp32"}
    long = api.run("generate", prompt=" ".join(["cat"] * 80), **common)
    short = api.run("generate", prompt="a cat", **common)
    assert long.record["pad_conds"] is True and "pad_conds" not in short.record


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e999"])
def test_a_lora_weight_that_is_not_finite_is_refused_before_any_model_loads(weight: str, tmp_path: Path) -> None:
    """Issue 29 item 17: ``<lora:x:nan>`` (or ``--lora x:nan``) fused NaN into every weight, then the run
    blamed the checkpoint ("NaN in the U-Net")."""
    from difftool.plugins.builtin.sd.lora import LoraSpec, parse_lora

    with pytest.raises(ParameterError, match=rf"<lora:ink:{weight}>: the weight is not a finite number"):
        split_loras(f"a cat <lora:ink:{weight}>")
    lora = tmp_path / "ink.safetensors"
    lora.write_bytes(b"")
    with pytest.raises(ParameterError, match=rf"--lora .*ink.safetensors:{weight}: weight {weight} is not a finite"):
        parse_lora(f"{lora}:{weight}")
    assert parse_lora(f"{lora}:0.5").specs == (LoraSpec(str(lora), 0.5),)


def test_an_embedding_with_nan_vectors_is_named_not_blamed_on_the_vae(tmp_path: Path) -> None:
    """Issue 29 item 17: NaN vectors made every image NaN, reported as "the VAE produced NaN"."""
    bad = torch.randn(2, 32)
    bad[1, 3] = float("nan")
    path = write_embedding(tmp_path / "broken.safetensors", bad)
    with pytest.raises(ModelError, match=r"embedding broken.safetensors holds NaN or Inf values; re-download"):
        load_embedding(path)
    inf = write_embedding(tmp_path / "inf.pt", torch.full((1, 32), float("inf")), a1111_pt=True)
    with pytest.raises(ModelError, match=r"embedding inf.pt holds NaN or Inf"):
        load_embedding(inf, allow_pickle=True)


def test_an_embedding_longer_than_a_chunk_fills_chunks_in_order(model, tmp_path: Path) -> None:
    """Issue 29 item 17: an embedding of more than 75 vectors (the docs promise any length) made an 83-id
    chunk, and the text encoder failed ("expected sequence of length 77"), blamed on the plugin."""
    vectors = torch.randn(80, 32)
    embedding = load_embedding(write_embedding(tmp_path / "longstyle.safetensors", vectors))
    name = CLIP("longstyle", add_special_tokens=False).input_ids

    def find(ids, position):
        return (embedding, len(name)) if list(ids[position : position + len(name)]) == name else (None, 0)

    chunks = chunk_prompt(CLIP, "a longstyle cat", find)
    assert [len(c.ids) for c in chunks] == [77, 77, 77]  # it starts a chunk of its own, as any that does not fit
    assert chunks[0].embeddings == [] and chunks[0].ids[2] == EOS
    [(first_at, first)], [(second_at, second)] = chunks[1].embeddings, chunks[2].embeddings
    assert (first_at, first.vectors, second_at, second.vectors) == (1, 75, 1, 5) and chunks[2].ids[6] == CAT
    assert torch.equal(torch.cat([first.by_width[32], second.by_width[32]]), vectors)
    encoded = pipeline.encode_prompt(model, "a longstyle cat", "", embeddings=[embedding])
    assert encoded.cond["encoder_hidden_states"].shape[1] == 3 * 77
