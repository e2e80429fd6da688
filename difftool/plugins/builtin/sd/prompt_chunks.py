"""Prompts of any length, as A1111 reads them: 75-token chunks, each encoded on its own and concatenated.

A1111's documented behaviour, reimplemented here (diffusers truncates at 77 tokens instead):

* the prompt is parsed for emphasis and ``BREAK`` (:mod:`prompt_weights`), tokenized without special
  tokens, and cut into chunks of 75 tokens; each chunk becomes ``BOS + 75 + EOS`` (77 ids), padded
  with end-of-text, and everything after its first end-of-text becomes the tokenizer's padding token;
* a chunk that fills up while a comma sits among its last 20 tokens ends after that comma, and the
  words after it open the next chunk (A1111's "comma padding backtrack", default 20);
* ``BREAK`` ends the current chunk (padded) and starts a new one;
* a textual-inversion embedding named in the prompt takes as many places as it has vectors, and never
  straddles two chunks (one longer than a chunk starts its own and fills whole chunks, in order);
* each chunk's weights scale its own encoder output, and its mean is restored per chunk.

Every text encoder of a model gets the same chunk boundaries: they share one vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from difftool.core.errors import ParameterError
from difftool.core.task import Param
from difftool.plugins.builtin.sd.prompt_weights import BREAK_WEIGHT, parse

CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20
#: Longest prompt text (characters) a task takes: refused before any tokenizer reads it.
MAX_PROMPT_CHARS = 20_000
#: Most chunks a prompt may fill (1200 tokens; A1111 clients send a few hundred). Each chunk costs a
#: text-encoder pass and 77 more keys in every cross-attention of every step: the request's budget.
MAX_PROMPT_CHUNKS = 16


def prompt_param(name: str, **declared: Any) -> Param:
    """A prompt parameter, bounded by :data:`MAX_PROMPT_CHARS` (tokens: :func:`check_prompt_length`)."""
    return Param(name, "string", multiline=True, max_length=MAX_PROMPT_CHARS, **declared)


#: ASCII text this short fills at most :data:`MAX_PROMPT_CHUNKS` chunks (each closes after at least
#: ``CHUNK_TOKENS - COMMA_BACKTRACK`` tokens unless a ``BREAK`` closes it).
_SURELY_SHORT = MAX_PROMPT_CHUNKS * (CHUNK_TOKENS - COMMA_BACKTRACK)


@functools.cache
def counting_tokenizer() -> Any:
    """The tokenizer chunks are counted with: the same for every SD text encoder (one vocabulary)."""
    from difftool.plugins.builtin.sd.tokenizer import clip_tokenizer

    return clip_tokenizer("clip")


def prompt_tokens(*texts: str | None) -> tuple[int, int, int]:
    """The text lengths a request sends the U-Net, as (min, opt, max) in multiples of 77 (one per chunk).

    Up to three chunks share one range (one TensorRT engine for most prompts); a longer prompt widens it.
    A chunk is spare for embeddings, whose vectors may outnumber their name's tokens.
    """
    from difftool.plugins.builtin.sd.models import split_loras

    chunks = max(len(chunk_prompt(counting_tokenizer(), split_loras(text or "")[0])) for text in (*texts, ""))
    return (77, 77, 77 * max(3, chunks + 1))


def check_prompt_length(params: Mapping[str, Any], names: Sequence[str] = ("prompt", "negative_prompt")) -> None:
    """Refuse a prompt over :data:`MAX_PROMPT_CHUNKS` chunks, in one line (the preflight calls this)."""
    from difftool.plugins.builtin.sd.models import split_loras

    for name in names:
        text = params[name]
        if not text or (len(text) <= _SURELY_SHORT and text.isascii() and "BREAK" not in text):
            continue  # no need to load a tokenizer: an ASCII character is at most one token
        chunks = len(chunk_prompt(counting_tokenizer(), split_loras(str(text))[0]))
        if chunks > MAX_PROMPT_CHUNKS:
            flag = "--" + name.replace("_", "-")
            raise ParameterError(
                f"{flag} fills {chunks} chunks of {CHUNK_TOKENS} tokens, over the limit of {MAX_PROMPT_CHUNKS} "
                f"({MAX_PROMPT_CHUNKS * CHUNK_TOKENS} tokens)",
                f"shorten {flag}",
            )


@dataclass
class Chunk:
    """77 token ids (``BOS``, 75 prompt places, ``EOS``), one weight per id, and the embeddings placed in it."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    #: ``(offset in ids, embedding)``: the embedding's vectors replace the token embeddings from there.
    embeddings: list[tuple[int, Any]] = field(default_factory=list)


#: ``(token ids, position) -> (embedding, ids it spans)`` or ``(None, 0)``.
EmbeddingFinder = Callable[[Sequence[int], int], tuple[Any, int]]


def no_embeddings(ids: Sequence[int], position: int) -> tuple[Any, int]:
    return None, 0


def chunk_prompt(tokenizer: Any, prompt: str, find_embedding: EmbeddingFinder = no_embeddings) -> list[Chunk]:
    """The prompt's chunks (at least one) for ``tokenizer`` (a CLIP tokenizer)."""
    parsed = parse(prompt)
    tokenized = tokenizer([text for text, _ in parsed], truncation=False, add_special_tokens=False).input_ids
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    chunks: list[Chunk] = []
    current = Chunk()
    last_comma = -1

    def close() -> None:
        nonlocal current, last_comma
        missing = CHUNK_TOKENS - len(current.ids)
        ids = [bos, *current.ids, *[eos] * missing, eos]
        first_end = ids.index(eos)
        ids[first_end + 1 :] = [pad] * (len(ids) - first_end - 1)
        weights = [1.0, *current.weights, *[1.0] * missing, 1.0]
        embeddings = [(offset + 1, embedding) for offset, embedding in current.embeddings]
        chunks.append(Chunk(ids, weights, embeddings))
        current, last_comma = Chunk(), -1

    for ids, (_text, weight) in zip(tokenized, parsed, strict=True):
        if weight == BREAK_WEIGHT:
            close()
            continue
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                last_comma = len(current.ids)
            elif len(current.ids) == CHUNK_TOKENS and last_comma != -1 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK:
                # Full, with a comma close behind: the words after the comma move to the next chunk.
                cut = last_comma + 1
                later = [(offset - cut, e) for offset, e in current.embeddings if offset >= cut]
                moved = Chunk(current.ids[cut:], current.weights[cut:], later)  # an embedding moves with its words
                current.ids, current.weights = current.ids[:cut], current.weights[:cut]
                current.embeddings = [(offset, e) for offset, e in current.embeddings if offset < cut]
                close()
                current = moved
            if len(current.ids) == CHUNK_TOKENS:
                close()
            embedding, spans = find_embedding(ids, position)
            if embedding is None:
                current.ids.append(token)
                current.weights.append(weight)
                position += 1
                continue
            count = int(embedding.vectors)
            if len(current.ids) + count > CHUNK_TOKENS and current.ids:
                close()
            # Longer than a chunk (any length is allowed): whole chunks of its vectors, then the rest.
            pieces = [(start, min(start + CHUNK_TOKENS, count)) for start in range(0, count, CHUNK_TOKENS)]
            for index, (start, stop) in enumerate(pieces):
                if index:
                    close()
                part = embedding if len(pieces) == 1 else embedding.part(start, stop)
                current.embeddings.append((len(current.ids), part))
                current.ids += [0] * (stop - start)  # placeholders: their token embeddings become the vectors
                current.weights += [weight] * (stop - start)
            position += spans
    if current.ids or not chunks:
        close()
    return chunks
