"""Matmul FLOPs of a lowered program, read from its StableHLO text, for the run planner's step-time estimate.

Why not XLA's own count: `Lowered.cost_analysis()` is None on GPUs (jax's PJRT C-API backends), and the compiled
program's count leaves out the matmuls that became cuBLAS calls; both count a loop's body once. Here every
`stablehlo.dot_general` counts 2 x (output elements) x (contracted size), a `func.call` counts its callee once per call
and a `stablehlo.while` its body once per trip when the trip count is a constant bound (jax's `scan` and `fori_loop`:
`compare LT, %iterArg, %c` against `constant dense<N>`), else once. Library calls (cuDNN attention) and elementwise work
are not counted.
"""
from __future__ import annotations

import math
import re

_FUNC = re.compile(r"^\s*func\.func\s+(?:public\s+|private\s+)?@([\w.$-]+)\(")
_CALL = re.compile(r"func\.call\s+@([\w.$-]+)\(")
_DOT = re.compile(r"stablehlo\.dot_general\s+.*?contracting_dims\s*=\s*\[([\d, ]*)\]\s*x.*:\s*\(tensor<([^>]*)>,"
                  r".*->\s*tensor<([^>]*)>")
_WHILE = re.compile(r"stablehlo\.while\(")
_CONST = re.compile(r"(%[\w#]+)\s*=\s*stablehlo\.constant\s+dense<(\d+)>\s*:\s*tensor<i(?:32|64)>")
_COMPARE_LT = re.compile(r"stablehlo\.compare\s+LT,\s*%[\w#]+,\s*(%[\w#]+)")


def _dims(tensor_type: str) -> list[int]:
    """[8, 16] of "8x16xf32" (a scalar "f32" gives [])."""
    return [int(d) for d in tensor_type.split("x")[:-1]]


def _dot_flops(line: str) -> float:
    match = _DOT.search(line)
    if match is None:
        return 0.0
    contracting = [int(d) for d in match.group(1).replace(" ", "").split(",") if d]
    lhs, out = _dims(match.group(2)), _dims(match.group(3))
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracting)


def _trip_count(lines: list[str], start: int) -> int:
    """The constant trip count of the while loop whose `cond` region starts after line `start` (1 if not found)."""
    constants, end = {}, min(len(lines), start + 12)
    for line in lines[start + 1:end]:
        if "} do {" in line:
            break
        if (const := _CONST.search(line)) is not None:
            constants[const.group(1)] = int(const.group(2))
        if (compare := _COMPARE_LT.search(line)) is not None and compare.group(1) in constants:
            return max(1, constants[compare.group(1)])
    return 1


def matmul_flops(stablehlo: str) -> float:
    """Matmul FLOPs of one run of the program `stablehlo` (`jax.stages.Lowered.as_text()`), loops by their trip
    counts and calls by their call counts (see the module docstring): global FLOPs, before any partitioning."""
    lines = stablehlo.splitlines()
    own: dict[str, float] = {}  # a function's dot FLOPs, each scaled by the trips of its enclosing loops
    calls: dict[str, dict[str, int]] = {}  # a function's callees and how many times one run calls each
    name, loops = None, []  # loops: (indentation of the while line, trips) of the open while loops
    for i, line in enumerate(lines):
        if (func := _FUNC.match(line)) is not None:
            name, loops = func.group(1), []
            own[name], calls[name] = 0.0, {}
            continue
        if name is None:
            continue
        indent = len(line) - len(line.lstrip())
        while loops and indent <= loops[-1][0] and line.lstrip().startswith("}") and "do {" not in line:
            loops.pop()
        trips = math.prod(t for _, t in loops)
        if _WHILE.search(line):
            loops.append((indent, _trip_count(lines, i)))
        elif (call := _CALL.search(line)) is not None:
            calls[name][call.group(1)] = calls[name].get(call.group(1), 0) + trips
        elif "stablehlo.dot_general" in line:
            own[name] += trips * _dot_flops(line)
    total: dict[str, float] = {}

    def flops_of(function: str, depth: int = 0) -> float:
        if function not in total:
            total[function] = own.get(function, 0.0) + sum(
                count * flops_of(callee, depth + 1) for callee, count in calls.get(function, {}).items()
                if depth < 64)
        return total[function]
    return flops_of("main") if "main" in own else 0.0
