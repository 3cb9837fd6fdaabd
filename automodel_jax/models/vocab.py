"""Which token ids a model can embed: ids outside its embedding table must never be fed to it.

XLA's gather fills out-of-bounds reads with NaN (`jnp.take`'s default mode), so an id >= vocab_size would not fail:
it would silently turn its row's activations, and then the loss or the generated text, into NaN.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping


def check_token_ids(ids: Mapping[str, int], vocab_size: int, fix: str, exempt: Iterable[int] = ()) -> None:
    """ValueError naming the first of `ids` ({what it is: token id}) outside [0, vocab_size), the embedding table's
    rows, followed by `fix`. Ids in `exempt` (tokens the model replaces before its embedding lookup) pass."""
    exempt = set(exempt)
    for what, token in ids.items():
        if token not in exempt and not 0 <= int(token) < vocab_size:
            raise ValueError(f"{what} has token id {token}, outside the model's embedding table (vocab_size "
                             f"{vocab_size}, ids 0..{vocab_size - 1}); {fix}")


def substituted_token_ids(config) -> tuple[int, ...]:
    """Ids a model swaps for another before its embedding lookup, so they may lie outside the table: Gemma 3's image
    token (`image_token_index`, embedded as id 0 and then overwritten by image features, as in HF)."""
    index = getattr(config, "image_token_index", None)
    return () if index is None else (index,)
