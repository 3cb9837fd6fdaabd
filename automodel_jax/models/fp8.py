"""FP8 matmuls: E4M3 activations and weights forward, E5M2 output gradients backward (Transformer Engine's HYBRID
format), with one scale per tensor chosen by one of two recipes:

- tensorwise (current scaling; NeMo Automodel's `tensorwise` torchao recipe): scale = amax(|x|) / max(fp8 dtype)
  (448 for E4M3, 57344 for E5M2) from the tensor itself, in the same step (`fp8_dot`);
- delayed (Transformer Engine's DelayedScaling, margin 0, amax_compute_algo "max"): scale = max(amax history) /
  max(fp8 dtype) from the amaxes of the previous steps, so the scale is known before the tensor is; values beyond it
  saturate at +-max (`fp8_dot_delayed`). Each layer keeps an amax history float32 [3, L] (rows: input, kernel,
  output gradient; `AMAX_ROWS`); every call returns the history rolled by one with this step's amaxes in slot 0
  (Flax's `compute_amax_history`), as the "gradient" of the history (Flax's overwrite-with-gradient trick: the output
  gradient's amax is only known in the backward).

Each operand is quantized (x / scale, clipped, cast). The FP8 operands are then dotted directly, accumulating in the
GEMM and writing the compute dtype, and the output is multiplied by the two scales (Flax's `fp8_scaled_dot_general`
order): on Hopper one cuBLASLt FP8 GEMM with the scales folded in. The other order, dequantize then dot in bf16,
relies on XLA's GEMM rewriter to spot the pattern, and with jax 0.11.2 the Triton GEMM fusion takes the dot first: a
bf16 GEMM, no faster (H200, BENCHMARKS.md). Elsewhere the same program is an exact emulation of FP8 inputs with a
higher-precision accumulator. The quantize/scale/history arithmetic is Flax's (`flax.linen.fp8_ops`, which Flax ships
for its own delayed-scaling `Fp8DotGeneralOp`); only the two dots and their gradients are written here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.linen import fp8_ops

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
# NVIDIA compute capability from which GPUs have FP8 tensor cores (Ada 8.9, Hopper 9.0, Blackwell 10.0).
MIN_COMPUTE_CAPABILITY = 8.9
# The rows of a delayed-scaling amax history [3, L] and the FP8 format each tensor is quantized to.
AMAX_ROWS = ("input", "kernel", "output_grad")
ROW_DTYPES = (E4M3, E4M3, E5M2)


def amax(x: jax.Array) -> jax.Array:
    """max(|x|) as a float32 scalar."""
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def scale_from_amax(amax_value: jax.Array, q_dtype) -> jax.Array:
    """amax / max(q_dtype) as a float32 scalar; 1 when amax is 0 or not finite (Flax's `compute_scale`, from
    Transformer Engine's update_fp8_metas, margin 0)."""
    return fp8_ops.compute_scale(amax_value, jnp.float32(1.0), fp8_ops.get_fp8_max(q_dtype, jnp.float32))


def tensorwise_scale(x: jax.Array, q_dtype) -> jax.Array:
    """The current (tensorwise) scale of x: amax(|x|) / max(q_dtype), float32 scalar (1 for all zeros)."""
    return scale_from_amax(amax(x), q_dtype)


def delayed_scale(history: jax.Array, current_amax: jax.Array, q_dtype) -> jax.Array:
    """The delayed scale from one amax history row [L] (float32): max(history) / max(q_dtype) (Transformer Engine's
    DelayedScaling with amax_compute_algo="max", margin 0). A history of zeros (the first step) takes the tensor's
    `current_amax` instead, so the first step is scaled like a tensorwise one rather than by 1."""
    recorded = jnp.max(history)
    return scale_from_amax(jnp.where(recorded > 0, recorded, current_amax), q_dtype)


def roll_history(history: jax.Array, amaxes: jax.Array) -> jax.Array:
    """history [3, L] rolled by one step with `amaxes` [3] (this step's, float32) written into slot 0 (Flax's
    `compute_amax_history` on each row): the last L amaxes, the newest first, the others in cyclic order."""
    return jax.vmap(fp8_ops.compute_amax_history)(amaxes.astype(history.dtype), history)


def new_amax_history(amax_history_len: int) -> jax.Array:
    """A fresh amax history: float32 zeros [3, amax_history_len] (rows `AMAX_ROWS`)."""
    return jnp.zeros((len(AMAX_ROWS), amax_history_len), jnp.float32)


def quantize(x: jax.Array, q_dtype, scale: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(x / scale clipped to +-max(q_dtype) and cast to q_dtype, scale); `scale` defaults to the tensorwise one. The
    division is done in float32, so no value overflows before the clip."""
    scale = tensorwise_scale(x, q_dtype) if scale is None else scale
    return fp8_ops.quantize(x, q_dtype, scale, jnp.float32), scale


def scaled_dot(a: jax.Array, a_scale: jax.Array, b: jax.Array, b_scale: jax.Array, dtype) -> jax.Array:
    """a [..., k] @ b [k, n] of two FP8 arrays, written in `dtype` and multiplied by a_scale * b_scale (float32
    scalars, applied in `dtype` as a dequantize would): the dequantized operands' product, one FP8 GEMM on Hopper."""
    return jnp.dot(a, b, preferred_element_type=dtype) * (a_scale * b_scale).astype(dtype)


def _dot_fwd(x, kernel, sx, sk):
    """y = x @ kernel from E4M3 operands scaled by sx and sk; the FP8 operands are the residuals (a quarter of
    float32, half of bf16 memory)."""
    (qx, sx), (qk, sk) = quantize(x, E4M3, sx), quantize(kernel, E4M3, sk)
    return scaled_dot(qx, sx, qk, sk, x.dtype), (qx, sx, qk, sk)


def _dot_bwd(residuals, g, sg):
    """(dx, dkernel) = (g @ kernel^T, x^T @ g) with g in E5M2 scaled by sg and the saved E4M3 operands."""
    qx, sx, qk, sk = residuals
    qg, sg = quantize(g, E5M2, sg)
    dx = scaled_dot(qg, sg, qk.T, sk, g.dtype)
    # 2-D, as cuBLASLt takes it
    dkernel = scaled_dot(qx.reshape(-1, qx.shape[-1]).T, sx, qg.reshape(-1, qg.shape[-1]), sg, g.dtype)
    return dx, dkernel


@jax.custom_vjp
def fp8_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] @ kernel [in, out] -> [..., out] in x.dtype, both operands E4M3 with tensorwise scaling; the
    backward quantizes the output gradient to E5M2 (its own tensorwise scale) and computes dx = g @ kernel^T and
    dkernel = x^T @ g from the saved E4M3 operands. kernel must already be in x.dtype (the compute dtype)."""
    return _tensorwise_fwd(x, kernel)[0]


def _tensorwise_fwd(x, kernel):
    return _dot_fwd(x, kernel, tensorwise_scale(x, E4M3), tensorwise_scale(kernel, E4M3))


def _tensorwise_bwd(residuals, g):
    return _dot_bwd(residuals, g, tensorwise_scale(g, E5M2))


fp8_dot.defvjp(_tensorwise_fwd, _tensorwise_bwd)


@jax.custom_vjp
def fp8_dot_delayed(x: jax.Array, kernel: jax.Array, amax_history: jax.Array) -> jax.Array:
    """x [..., in] @ kernel [in, out] -> [..., out] in x.dtype as `fp8_dot`, scaled by delayed scaling from
    `amax_history` float32 [3, L] (rows `AMAX_ROWS`; see `delayed_scale`). Forward only (evaluation), the history is
    only read. Under differentiation the history's "gradient" is not a gradient but the next history:
    `roll_history(amax_history, [amax(x), amax(kernel), amax(g)])`; the caller writes it back (and, when it sums
    several calls' cotangents, must take their maximum instead: every call of one step rolls the same history)."""
    return _delayed_fwd(x, kernel, amax_history)[0]


def _delayed_fwd(x, kernel, amax_history):
    amax_x, amax_k = amax(x), amax(kernel)
    y, residuals = _dot_fwd(x, kernel, delayed_scale(amax_history[0], amax_x, E4M3),
                            delayed_scale(amax_history[1], amax_k, E4M3))
    return y, (residuals, amax_history, amax_x, amax_k)


def _delayed_bwd(saved, g):
    residuals, amax_history, amax_x, amax_k = saved
    amax_g = amax(g)
    dx, dkernel = _dot_bwd(residuals, g, delayed_scale(amax_history[2], amax_g, E5M2))
    return dx, dkernel, roll_history(amax_history, jnp.stack([amax_x, amax_k, amax_g]))


fp8_dot_delayed.defvjp(_delayed_fwd, _delayed_bwd)


def fp8_unsupported(device: jax.Device) -> str | None:
    """Why `device` has no FP8 matmuls (None when it has): CPUs and TPUs have none, NVIDIA GPUs from compute
    capability 8.9 on do."""
    if device.platform != "gpu":
        return f"{device.platform} devices have no FP8 matmuls"
    capability = getattr(device, "compute_capability", None)
    if capability is None or float(capability) < MIN_COMPUTE_CAPABILITY:
        return (f"{device.device_kind} (compute capability {capability}) has no FP8 matmuls; they need "
                f"{MIN_COMPUTE_CAPABILITY} or newer")
    return None
