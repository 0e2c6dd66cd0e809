"""A kernel the interpreter runs but GPU codegen rejects: tl.dot needs K >= 16.

Used by tests/test_compile_check.py to show the compile check fails on such a kernel.
"""


import triton
import triton.language as tl

from tkernels.registry import gpu_compile_check


@gpu_compile_check({"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"}, M=16, N=16, K=8)
@triton.jit
def small_k_dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))
