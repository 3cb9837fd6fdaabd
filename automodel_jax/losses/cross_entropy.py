"""Cross-entropy of a language-model head, fused with the lm_head matmul (NeMo Automodel loss semantics).

The caller sums token losses here and divides by the global number of target tokens itself, so micro-batches and data
parallel ranks combine exactly. Logits are hidden @ kernel in the input dtype with float32 accumulation, optionally
soft-capped (Gemma 2), then log-softmaxed in float32, as Hugging Face computes its loss on upcast logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from automodel_jax.losses.chunked import chunked_linear_cross_entropy
from automodel_jax.losses.common import logits_loss
from automodel_jax.losses.pallas import pallas_linear_cross_entropy

IMPLS = ("naive", "chunked", "pallas")
# Per impl: tokens per chunk ("chunked") or vocabulary columns per backward slab ("pallas").
DEFAULT_CHUNK_SIZE = {"chunked": 2048, "pallas": 16384}


def linear_cross_entropy(hidden, kernel, labels, *, impl: str = "chunked", chunk_size: int | None = None,
                         ignore_index: int = -100, logit_softcap: float | None = None
                         ) -> tuple[jax.Array, jax.Array]:
    """Sum of token cross-entropies of softcap(hidden @ kernel) and the number of tokens it covers.

    hidden [N, H] in the compute dtype (bf16 or f32); kernel [H, V] is the lm_head as [in, out] (pass embedding.T when
    tied), cast to hidden's dtype; labels [N] are integers in [0, V) or ignore_index. Returns (float32 sum of the
    losses of tokens whose label != ignore_index, int32 count of those tokens).

    impl: "naive" materialises the [N, V] float32 logits (the reference); "chunked" (pure XLA, any backend, the
    fastest on an H200) holds [chunk_size, V] logits at a time and needs three matmuls for loss and both gradients;
    "pallas" (fused GPU kernel, interpreted elsewhere) never writes logits, holds [N, chunk_size] dlogits in the
    backward and so needs the least memory, at the price of a fourth matmul. chunk_size=None takes
    DEFAULT_CHUNK_SIZE[impl] (tokens for "chunked", vocabulary columns for "pallas"; "naive" ignores it).
    """
    _check_args(hidden, kernel, labels, impl, chunk_size, logit_softcap)
    labels = labels.astype(jnp.int32)
    kernel = kernel.astype(hidden.dtype)  # hidden's dtype is the compute dtype (e.g. float32 params, bf16 compute)
    cap = None if logit_softcap is None else float(logit_softcap)
    if impl == "naive":
        logits = jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)
        return logits_loss(logits, labels, ignore_index, cap)[2]
    chunk_size = DEFAULT_CHUNK_SIZE[impl] if chunk_size is None else chunk_size
    fused = chunked_linear_cross_entropy if impl == "chunked" else pallas_linear_cross_entropy
    return fused(hidden, kernel, labels, chunk_size=chunk_size, ignore_index=ignore_index, logit_softcap=cap)


def _check_args(hidden, kernel, labels, impl, chunk_size, logit_softcap) -> None:
    if impl not in IMPLS:
        raise ValueError(f"linear_cross_entropy: impl={impl!r} is not one of {IMPLS}")
    if jnp.ndim(hidden) != 2 or jnp.ndim(kernel) != 2 or jnp.ndim(labels) != 1:
        raise ValueError(f"linear_cross_entropy: expected hidden [N, H], kernel [H, V], labels [N]; got shapes "
                         f"{jnp.shape(hidden)}, {jnp.shape(kernel)}, {jnp.shape(labels)} (flatten batch and sequence)")
    (n, h), (h_kernel, v) = hidden.shape, kernel.shape
    if h != h_kernel or labels.shape[0] != n:
        raise ValueError(f"linear_cross_entropy: shapes do not line up: hidden {hidden.shape}, kernel {kernel.shape}, "
                         f"labels {labels.shape} (kernel is [in, out]: pass embedding.T for tied embeddings)")
    if n == 0 or h == 0 or v == 0:
        raise ValueError(f"linear_cross_entropy: empty input: hidden {hidden.shape}, kernel {kernel.shape}")
    if not (jnp.issubdtype(hidden.dtype, jnp.floating) and jnp.issubdtype(kernel.dtype, jnp.floating)):
        raise TypeError(f"linear_cross_entropy: hidden ({hidden.dtype}) and kernel ({kernel.dtype}) must be floating "
                        f"point arrays")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"linear_cross_entropy: labels must be integers, got {labels.dtype}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"linear_cross_entropy: chunk_size={chunk_size!r} must be a positive int or None")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"linear_cross_entropy: logit_softcap={logit_softcap!r} must be positive or None")
