"""Linear cross-entropy on the Pallas kernels of automodel_jax.kernels.linear_cross_entropy.

Forward: one kernel launch yields each row's logsumexp and target logit; the logits never reach device memory.
Backward: a lax.scan over vocabulary slabs of chunk_size columns recomputes each slab's logits inside the kernel and
writes only dlogits [N, chunk_size] (in the compute dtype); cuBLAS (XLA dots) then does dH += dlogits @ W_slab^T in
float32 and dW_slab = H^T @ dlogits. Those two products have no epilogue to fuse, so the vendor GEMM is the fastest way
to run them, and a slab's dW is written once rather than accumulated across token blocks with atomics.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from automodel_jax.kernels.linear_cross_entropy import BlockConfig, logit_grads, logit_stats
from automodel_jax.losses.common import masked_loss_sum


def pallas_linear_cross_entropy(hidden, kernel, labels, *, chunk_size: int, ignore_index: int,
                                logit_softcap: float | None, config: BlockConfig | None = None,
                                interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """(loss sum float32, token count int32); chunk_size is the backward's vocabulary slab width.

    config picks the kernel tiles (default: by dtype); interpret=None runs the kernels interpreted off-GPU.
    """
    return _pallas_loss(chunk_size, ignore_index, logit_softcap, config, interpret)(hidden, kernel, labels)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["hidden", "kernel", "labels", "lse"],
                   meta_fields=["want_dh", "want_dw"])
@dataclasses.dataclass(frozen=True)
class _Residuals:
    hidden: jax.Array
    kernel: jax.Array
    labels: jax.Array
    lse: jax.Array
    want_dh: bool
    want_dw: bool


@functools.lru_cache(maxsize=None)
def _pallas_loss(chunk_size: int, ignore_index: int, cap: float | None, config: BlockConfig | None,
                 interpret: bool | None):
    stats = functools.partial(logit_stats, cap=cap, config=config, interpret=interpret)
    grads = functools.partial(logit_grads, cap=cap, config=config, interpret=interpret)

    def forward(hidden, kernel, labels):
        lse, target = stats(hidden, kernel, labels)
        return masked_loss_sum(lse, target, labels != ignore_index), lse

    @jax.custom_vjp
    def loss(hidden, kernel, labels):
        return forward(hidden, kernel, labels)[0]

    def fwd(hidden, kernel, labels):
        out, lse = forward(hidden.value, kernel.value, labels.value)
        return out, _Residuals(hidden.value, kernel.value, labels.value, lse, hidden.perturbed, kernel.perturbed)

    def bwd(res: _Residuals, cotangents):
        cotangent = cotangents[0]  # the count is an integer: its cotangent is always a symbolic zero
        hidden, kernel = res.hidden, res.kernel
        scale = jnp.where(res.labels != ignore_index, cotangent, 0.0).astype(jnp.float32)

        def slab(start, width, carry):
            dh, dw = carry
            w_slab = lax.dynamic_slice_in_dim(kernel, start, width, axis=1)
            dlogits = grads(hidden, w_slab, res.labels - start, res.lse, scale)
            if res.want_dh:
                dh = dh + jnp.dot(dlogits, w_slab.T, preferred_element_type=jnp.float32)
            if res.want_dw:
                dw_slab = jnp.dot(hidden.T, dlogits, preferred_element_type=jnp.float32).astype(kernel.dtype)
                dw = lax.dynamic_update_slice_in_dim(dw, dw_slab, start, axis=1)
            return dh, dw

        vocab = kernel.shape[1]
        width = min(chunk_size, vocab)
        full_slabs = vocab // width
        carry = (jnp.zeros(hidden.shape, jnp.float32) if res.want_dh else None,
                 jnp.zeros_like(kernel) if res.want_dw else None)
        carry = lax.scan(lambda c, start: (slab(start, width, c), None), carry, jnp.arange(full_slabs) * width)[0]
        if vocab % width:
            carry = slab(full_slabs * width, vocab % width, carry)
        dh, dw = carry
        return (None if dh is None else dh.astype(hidden.dtype)), dw, None

    loss.defvjp(fwd, bwd, symbolic_zeros=True)
    return loss
