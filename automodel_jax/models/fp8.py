"""FP8 matmuls with per-tensor current ("tensorwise") scaling: E4M3 activations and weights forward, E5M2 output
gradients backward (Transformer Engine's HYBRID format; NeMo Automodel's `tensorwise` torchao recipe).

Each operand is scaled by scale = amax(|x|) / max(fp8 dtype) (448 for E4M3, 57344 for E5M2), computed from the
tensor itself in the same step, quantized (x / scale, clipped, cast), then dequantized (cast back, times scale) right
before a dot in the compute dtype. On Hopper XLA's GEMM rewriter turns dequantize -> dot into one cuBLASLt FP8 GEMM
with the scales as its alpha; elsewhere the same program is an exact emulation of FP8 inputs with a higher-precision
accumulator. The quantize/dequantize/scale arithmetic is Flax's (`flax.linen.fp8_ops`), which Flax ships for its
delayed-scaling `Fp8DotGeneralOp`; only the current-scaling dot is written here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.linen import fp8_ops

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
# NVIDIA compute capability from which GPUs have FP8 tensor cores (Ada 8.9, Hopper 9.0, Blackwell 10.0).
MIN_COMPUTE_CAPABILITY = 8.9


def tensorwise_scale(x: jax.Array, q_dtype) -> jax.Array:
    """amax(|x|) / max(q_dtype) as a float32 scalar; 1 when x is all zeros or amax is not finite (Flax's
    `compute_scale`, from Transformer Engine's update_fp8_metas)."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    return fp8_ops.compute_scale(amax, jnp.float32(1.0), fp8_ops.get_fp8_max(q_dtype, jnp.float32))


def quantize(x: jax.Array, q_dtype) -> tuple[jax.Array, jax.Array]:
    """(x / scale clipped to +-max(q_dtype) and cast to q_dtype, scale) with the tensorwise scale; the division is
    done in float32, so no value overflows before the clip."""
    scale = tensorwise_scale(x, q_dtype)
    return fp8_ops.quantize(x, q_dtype, scale, jnp.float32), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """q cast to `dtype` times scale (also in `dtype`): the inverse of `quantize` up to FP8 rounding."""
    return fp8_ops.dequantize(q, dtype, scale)


@jax.custom_vjp
def fp8_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] @ kernel [in, out] -> [..., out] in x.dtype, both operands E4M3 with tensorwise scaling; the
    backward quantizes the output gradient to E5M2 and computes dx = g @ kernel^T and dkernel = x^T @ g from the
    saved E4M3 operands. kernel must already be in x.dtype (the compute dtype)."""
    return _fp8_dot_fwd(x, kernel)[0]


def _fp8_dot_fwd(x, kernel):
    (qx, sx), (qk, sk) = quantize(x, E4M3), quantize(kernel, E4M3)
    y = jnp.dot(dequantize(qx, sx, x.dtype), dequantize(qk, sk, x.dtype))
    return y, (qx, sx, qk, sk)  # the FP8 operands are the residuals: a quarter of float32 (half of bf16) memory


def _fp8_dot_bwd(residuals, g):
    qx, sx, qk, sk = residuals
    qg, sg = quantize(g, E5M2)
    dtype = g.dtype
    g_, x_, k_ = dequantize(qg, sg, dtype), dequantize(qx, sx, dtype), dequantize(qk, sk, dtype)
    dx = jnp.dot(g_, k_.T)
    dkernel = jnp.dot(x_.reshape(-1, x_.shape[-1]).T, g_.reshape(-1, g_.shape[-1]))  # 2-D, as cuBLASLt takes it
    return dx, dkernel


fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


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
