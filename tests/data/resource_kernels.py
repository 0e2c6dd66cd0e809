"""A kernel that compiles but spills registers: tests/test_compile_check.py shows the compile
check reads ptxas's report and fails on it."""

import triton
import triton.language as tl

from tkernels.registry import Launch, gpu_compile_check


def _one(label, **constexprs):
    return lambda shared_limit: [Launch(label, constexprs, options={"num_warps": 1})]


@gpu_compile_check({"x_ptr": "*fp32", "y_ptr": "*fp32"}, _one("8192 fp32 values in one warp", BLOCK=8192), BLOCK=16)
@triton.jit
def spilling_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # 8192 values held across a reduction by 32 threads: 256 registers each, past the 255 there are.
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, x / tl.sum(x, 0))
