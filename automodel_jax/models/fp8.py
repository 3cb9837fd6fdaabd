"""FP8 matmuls with per-tensor current ("tensorwise") scaling: E4M3 activations and weights forward, E5M2 output
gradients backward (Transformer Engine's HYBRID format; NeMo Automodel's `tensorwise` torchao recipe).

Each operand is scaled by scale = amax(|x|) / max(fp8 dtype) (448 for E4M3, 57344 for E5M2), computed from the
tensor itself in the same step, and quantized (x / scale, clipped, cast). The FP8 operands are then dotted directly,
accumulating in the GEMM and writing the compute dtype, and the output is multiplied by the two scales (Flax's
`fp8_scaled_dot_general` order). On Hopper that dot is one cuBLASLt FP8 GEMM with the scales folded in. The other
order, dequantize then dot in bf16, relies on XLA's GEMM rewriter to spot the pattern, and with jax 0.11.2 the Triton
GEMM fusion takes the dot first: a bf16 GEMM, no faster (H200, `bench/fp8_gemm.py`, BENCHMARKS.md). Elsewhere the
same program is an exact emulation of FP8 inputs with a higher-precision accumulator. The quantize/scale arithmetic is
Flax's (`flax.linen.fp8_ops`); only the current-scaling dot is written here.
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


def scaled_dot(a: jax.Array, a_scale: jax.Array, b: jax.Array, b_scale: jax.Array, dtype) -> jax.Array:
    """a [..., k] @ b [k, n] of two FP8 arrays, written in `dtype` and multiplied by a_scale * b_scale (float32
    scalars, applied in `dtype` as the dequantize does): the dequantized operands' product, one FP8 GEMM on Hopper."""
    return jnp.dot(a, b, preferred_element_type=dtype) * (a_scale * b_scale).astype(dtype)


@jax.custom_vjp
def fp8_dot(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [..., in] @ kernel [in, out] -> [..., out] in x.dtype, both operands E4M3 with tensorwise scaling; the
    backward quantizes the output gradient to E5M2 and computes dx = g @ kernel^T and dkernel = x^T @ g from the
    saved E4M3 operands. kernel must already be in x.dtype (the compute dtype)."""
    return _fp8_dot_fwd(x, kernel)[0]


def _fp8_dot_fwd(x, kernel):
    (qx, sx), (qk, sk) = quantize(x, E4M3), quantize(kernel, E4M3)
    y = scaled_dot(qx, sx, qk, sk, x.dtype)
    return y, (qx, sx, qk, sk)  # the FP8 operands are the residuals: a quarter of float32 (half of bf16) memory


def _fp8_dot_bwd(residuals, g):
    qx, sx, qk, sk = residuals
    qg, sg = quantize(g, E5M2)
    dx = scaled_dot(qg, sg, qk.T, sk, g.dtype)
    # 2-D, as cuBLASLt takes it
    dkernel = scaled_dot(qx.reshape(-1, qx.shape[-1]).T, sx, qg.reshape(-1, qg.shape[-1]), sg, g.dtype)
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
