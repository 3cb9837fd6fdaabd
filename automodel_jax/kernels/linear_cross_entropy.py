"""Pallas (Triton) tiles of the fused lm_head + cross-entropy loss.

Each program of a pallas_call owns one [block_n, block_v] tile of the logits `hidden @ kernel`: it runs the matmul over
the hidden dimension in steps of block_k (float32 accumulation) and consumes the tile on-chip, so no [N, V] array ever
reaches device memory. `logit_stats` reduces each tile to a per-row partial logsumexp and target logit (combined in
XLA, a [V / block_v, N] array); `logit_grads` turns a tile into dlogits = (softmax - onehot) * scale for the backward.
Tiles are visited in groups of `group_n` token blocks so that the kernel columns a wave of programs reads stay in L2.
Ragged N, V and H are handled by masked loads and stores. On a non-GPU backend the kernels run in interpret mode.
jax 0.11 warns that the Pallas Triton backend is deprecated (Mosaic GPU is its successor); it still compiles and runs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Tile shape and Triton launch parameters (block sizes must be powers of two, as Triton requires)."""

    block_n: int = 128
    block_v: int = 256
    block_k: int = 64
    group_n: int = 8
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_k"):
            size = getattr(self, name)
            if not isinstance(size, int) or size < 16 or size & (size - 1):
                raise ValueError(f"BlockConfig.{name}={size!r} must be a power of two >= 16 (a Triton dot tile)")
        for name in ("group_n", "num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockConfig.{name}={value!r} must be a positive int")


def default_block_config(dtype) -> BlockConfig:
    """Tiles sized for an H100/H200: 16-bit operands take wide tiles; float32 ones need half the shared memory."""
    if jnp.dtype(dtype).itemsize >= 4:
        return BlockConfig(block_n=64, block_v=128, block_k=32, group_n=8, num_warps=4, num_stages=2)
    return BlockConfig()


def softcap(logits: jax.Array, cap: float | None) -> jax.Array:
    """Gemma-2 logit soft-capping, cap * tanh(logits / cap); identity when cap is None."""
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def logit_grad(capped, lse, is_target, scale, cap: float | None) -> jax.Array:
    """d(scale * (lse - capped[target])) / d(raw logits) for float32 capped logits of one block of rows."""
    grad = jnp.exp(capped - lse[:, None]) - is_target.astype(jnp.float32)
    if cap is not None:
        grad = grad * (1.0 - jnp.square(capped / cap))
    return grad * scale[:, None]


def _use_interpret(interpret: bool | None) -> bool:
    return jax.default_backend() != "gpu" if interpret is None else interpret


@dataclasses.dataclass(frozen=True)
class _Grid:
    """Static sizes of one launch: rows n, columns v (of this kernel slab), hidden h, and the tiling."""

    n: int
    v: int
    h: int
    cfg: BlockConfig

    @property
    def blocks_n(self) -> int:
        return pl.cdiv(self.n, self.cfg.block_n)

    @property
    def blocks_v(self) -> int:
        return pl.cdiv(self.v, self.cfg.block_v)

    def tile(self):
        """(row block, column block) of this program; group_n row blocks sweep the columns together."""
        group_size = self.cfg.group_n * self.blocks_v
        pid = pl.program_id(0)
        first_row_block = lax.div(pid, group_size) * self.cfg.group_n
        rows_in_group = jnp.minimum(self.blocks_n - first_row_block, self.cfg.group_n)
        local = lax.rem(pid, group_size)
        return first_row_block + lax.rem(local, rows_in_group), lax.div(local, rows_in_group)

    def row_mask(self, rows):
        return rows < self.n if self.n % self.cfg.block_n else None

    def col_mask(self, cols):
        return cols < self.v if self.v % self.cfg.block_v else None


def _outer_and(row_mask, col_mask):
    """Elementwise AND of a row and a column mask, either of which may be None (all true)."""
    if row_mask is None and col_mask is None:
        return None
    if row_mask is None:
        return col_mask[None, :]
    if col_mask is None:
        return row_mask[:, None]
    return row_mask[:, None] & col_mask[None, :]


def _load(ref, mask, other=0):
    return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=other)


def _tile_logits(h_ref, w_ref, row0, col0, grid: _Grid) -> jax.Array:
    """float32 [block_n, block_v] tile of hidden @ kernel, the hidden dimension consumed block_k at a time."""
    cfg = grid.cfg
    row_mask = grid.row_mask(row0 + jnp.arange(cfg.block_n))
    col_mask = grid.col_mask(col0 + jnp.arange(cfg.block_v))
    k_ragged = grid.h % cfg.block_k != 0

    def step(k, acc):
        k0 = pl.multiple_of(k * cfg.block_k, cfg.block_k)
        k_mask = (k0 + jnp.arange(cfg.block_k)) < grid.h if k_ragged else None
        h = _load(h_ref.at[pl.ds(row0, cfg.block_n), pl.ds(k0, cfg.block_k)], _outer_and(row_mask, k_mask))
        w = _load(w_ref.at[pl.ds(k0, cfg.block_k), pl.ds(col0, cfg.block_v)], _outer_and(k_mask, col_mask))
        # HIGHEST keeps float32 operands in full float32 (Triton's default would be TF32); no effect on bf16.
        return acc + jnp.dot(h, w, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)

    init = jnp.zeros((cfg.block_n, cfg.block_v), jnp.float32)
    return lax.fori_loop(0, pl.cdiv(grid.h, cfg.block_k), step, init)


def _tile_origin(grid: _Grid):
    """This program's tile: vocabulary block j, first row and column, the rows' in-bounds mask, the column ids."""
    cfg = grid.cfg
    i, j = grid.tile()
    row0 = pl.multiple_of(i * cfg.block_n, cfg.block_n)
    col0 = pl.multiple_of(j * cfg.block_v, cfg.block_v)
    return j, row0, col0, grid.row_mask(row0 + jnp.arange(cfg.block_n)), col0 + jnp.arange(cfg.block_v)


def _stats_kernel(h_ref, w_ref, labels_ref, lse_ref, target_ref, *, grid: _Grid, cap):
    cfg = grid.cfg
    j, row0, col0, row_mask, cols = _tile_origin(grid)
    logits = softcap(_tile_logits(h_ref, w_ref, row0, col0, grid), cap)
    col_mask = grid.col_mask(cols)
    if col_mask is not None:
        logits = jnp.where(col_mask[None, :], logits, -jnp.inf)
    # Every tile starts below V, so each row has a finite maximum.
    row_max = jnp.max(logits, axis=1)
    lse = row_max + jnp.log(jnp.sum(jnp.exp(logits - row_max[:, None]), axis=1))
    labels = _load(labels_ref.at[pl.ds(row0, cfg.block_n)], row_mask, other=-1)
    target = jnp.sum(jnp.where(cols[None, :] == labels[:, None], logits, 0.0), axis=1)
    plgpu.store(lse_ref.at[j, pl.ds(row0, cfg.block_n)], lse, mask=row_mask)
    plgpu.store(target_ref.at[j, pl.ds(row0, cfg.block_n)], target, mask=row_mask)


def _grads_kernel(h_ref, w_ref, labels_ref, lse_ref, scale_ref, out_ref, *, grid: _Grid, cap):
    cfg = grid.cfg
    _, row0, col0, row_mask, cols = _tile_origin(grid)
    rows = pl.ds(row0, cfg.block_n)
    capped = softcap(_tile_logits(h_ref, w_ref, row0, col0, grid), cap)
    labels = _load(labels_ref.at[rows], row_mask, other=-1)
    lse = _load(lse_ref.at[rows], row_mask)
    scale = _load(scale_ref.at[rows], row_mask)
    grad = logit_grad(capped, lse, cols[None, :] == labels[:, None], scale, cap)
    mask = _outer_and(row_mask, grid.col_mask(cols))
    plgpu.store(out_ref.at[rows, pl.ds(col0, cfg.block_v)], grad.astype(out_ref.dtype), mask=mask)


def _launch(kernel_fn, grid: _Grid, out_shape, name: str, interpret: bool | None):
    return pl.pallas_call(
        kernel_fn,
        out_shape=out_shape,
        grid=(grid.blocks_n * grid.blocks_v,),
        interpret=_use_interpret(interpret),
        compiler_params=plgpu.CompilerParams(num_warps=grid.cfg.num_warps, num_stages=grid.cfg.num_stages),
        name=name,
    )


def logit_stats(hidden, kernel, labels, *, cap: float | None = None, config: BlockConfig | None = None,
                interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-row float32 logsumexp and target logit of softcap(hidden @ kernel), never materialising the logits.

    hidden [N, H], kernel [H, V] of one dtype, labels [N] int32 (a label outside [0, V) gives target logit 0).
    """
    n, h = hidden.shape
    grid = _Grid(n=n, v=kernel.shape[1], h=h, cfg=config or default_block_config(hidden.dtype))
    parts = jax.ShapeDtypeStruct((grid.blocks_v, n), jnp.float32)
    call = _launch(functools.partial(_stats_kernel, grid=grid, cap=cap), grid, (parts, parts), "lce_stats", interpret)
    lse_parts, target_parts = call(hidden, kernel, labels.astype(jnp.int32))
    return jax.nn.logsumexp(lse_parts, axis=0), jnp.sum(target_parts, axis=0)


def logit_grads(hidden, kernel, labels, lse, scale, *, cap: float | None = None, config: BlockConfig | None = None,
                interpret: bool | None = None) -> jax.Array:
    """dlogits [N, V] in hidden's dtype: (softmax - onehot(labels)) * scale[:, None], through the softcap.

    Meant for a vocabulary slab `kernel` [H, C] of the lm_head with labels shifted to it (labels - slab start), so the
    caller bounds the output to [N, C]. lse [N] is the full-vocabulary logsumexp, scale [N] float32 (0 drops a row).
    """
    n, h = hidden.shape
    grid = _Grid(n=n, v=kernel.shape[1], h=h, cfg=config or default_block_config(hidden.dtype))
    out = jax.ShapeDtypeStruct((n, grid.v), hidden.dtype)
    call = _launch(functools.partial(_grads_kernel, grid=grid, cap=cap), grid, out, "lce_grads", interpret)
    return call(hidden, kernel, labels.astype(jnp.int32), lse.astype(jnp.float32), scale.astype(jnp.float32))
