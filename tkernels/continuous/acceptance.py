"""Continuous speculative acceptance: trajectory log-ratios and first-rejection counts.

A diffusion head draws a continuous token by a chain of Gaussian reverse transitions
``x_{t-1} ~ N(mu(x_t, t, z), sigma_t^2 I)``. For a trajectory drawn by the draft, the log of the
target-to-draft ratio of joint trajectory densities is (the shared prior on ``x_T`` cancels)

    sum_s sum_d [(x - mu_q)^2 - (x - mu_p)^2] / (2 sigma_s^2)
  = sum_s sum_d (mu_p - mu_q) * (2x - mu_p - mu_q) / (2 sigma_s^2)

where ``x = x_{t-1}`` is the point reached at reverse step ``s``. The factored form is used in
both the kernel and the reference: it has no cancellation between two large squares.

Two kernels: :func:`trajectory_log_ratio` (rows x steps x dims -> one fp32 per row) and
:func:`first_rejection` (log-ratios and uniforms over a speculation window -> number of draft
tokens accepted per row). Each has a plain-PyTorch reference beside it. The first reads every
trajectory (the C1 benchmark's cost): its launch parameters (:data:`DEFAULT_CONFIG`) are tuned
per row size (bucket key ``elements`` = steps x dims) by ``tkernels autotune``; the second reads
one float per token and keeps fixed ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tkernels.checks import in_unit_interval, integer, require
from tkernels.config import launch_config as _launch_config
from tkernels.registry import gpu_compile_check

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# trajectory_log_ratio: columns per chunk, elements per program (rows x columns), warps.
DEFAULT_CONFIG = {"block_k": 512, "block_elements": 2048, "num_warps": 4}


def search_space(dry_run: bool, quick: bool) -> list[dict[str, int]]:
    """The trajectory_log_ratio configs ``tkernels autotune`` tries over :data:`DEFAULT_CONFIG`."""
    if dry_run:
        return [{"block_k": 8, "block_elements": 32}, {"block_k": 16, "num_warps": 2}]
    return [{"block_k": k, "block_elements": e, "num_warps": w} for k in (256, 512, 1024) for e in (1024, 2048, 4096)
            for w in ((4,) if quick else (4, 8)) if e >= k]


def launch_config(elements: int, config: dict | None = None) -> dict:
    """trajectory_log_ratio's launch parameters for rows of ``elements`` = steps x dims:
    ``config`` over the GPU's tuned bucket over :data:`DEFAULT_CONFIG`."""
    integer("elements", elements, minimum=1)
    return _launch_config("trajectory_log_ratio", {"elements": elements}, DEFAULT_CONFIG, config)


def _max_tile(device: torch.device, gpu_elements: int = DEFAULT_CONFIG["block_elements"]) -> int:
    # Elements per program: a register budget on a GPU; under the CPU interpreter a program's
    # cost is mostly fixed overhead, so few large programs run much faster.
    return gpu_elements if device.type == "cuda" else 1 << 16


def _tiles(rows: int, elements: int, device: torch.device, cfg: dict) -> tuple[int, int]:
    """trajectory_log_ratio's (rows, columns) per program."""
    block_k = min(triton.next_power_of_2(elements), cfg["block_k"])
    return max(1, min(triton.next_power_of_2(rows), _max_tile(device, cfg["block_elements"]) // block_k)), block_k


def trajectory_launch(dtype: str, elements: int, cfg: dict, candidate: bool = False):
    """What trajectory_log_ratio compiles on a GPU for rows of ``elements`` under ``cfg``."""
    from tkernels.registry import Launch

    block_n, block_k = _tiles(1 << 14, elements, torch.device("cuda"), cfg)
    return Launch(f"{dtype} {block_n}x{block_k} w{cfg['num_warps']}", dict(BLOCK_N=block_n, BLOCK_K=block_k),
                  types={name: f"*{dtype}" for name in ("x_ptr", "mu_p_ptr", "mu_q_ptr")},
                  options={"num_warps": cfg["num_warps"]}, candidate=candidate)


def _trajectory_launches(shared_limit):
    """What trajectory_log_ratio compiles by default (compile check, tkernels.registry): each
    input dtype at C1's 100 x 16 and a toy's 10 x 2 elements per row (autotune's candidates:
    :mod:`tkernels.autotune.candidates`)."""
    for dtype in ("fp32", "fp16", "bf16"):
        for elements in (1600, 20):
            yield trajectory_launch(dtype, elements, DEFAULT_CONFIG)


@gpu_compile_check(
    {
        "x_ptr": "*fp16", "mu_p_ptr": "*fp16", "mu_q_ptr": "*fp16", "sigma_ptr": "*fp32", "out_ptr": "*fp32",
        "rows": "i32", "n_steps": "i32", "n_dims": "i32",
        "x_sn": "i64", "x_ss": "i64", "x_sd": "i64",
        "p_sn": "i64", "p_ss": "i64", "p_sd": "i64",
        "q_sn": "i64", "q_ss": "i64", "q_sd": "i64",
    },
    _trajectory_launches,
    BLOCK_N=4,
    BLOCK_K=512,
)
@triton.jit
def _trajectory_log_ratio_kernel(
    x_ptr, mu_p_ptr, mu_q_ptr, sigma_ptr, out_ptr,
    rows, n_steps, n_dims,
    x_sn, x_ss, x_sd,
    p_sn, p_ss, p_sd,
    q_sn, q_ss, q_sd,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # A program owns BLOCK_N rows (tokens) and walks their flattened (step, dim) axis in chunks
    # of BLOCK_K: a row is a few thousand elements at MAR sizes (100 steps x 16 dims) and a few
    # dozen in toys, so one tile shape serves both by trading rows for columns, and the
    # reduction stays in registers with no atomics.
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < rows
    n64 = n.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, n_steps * n_dims, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        s = k // n_dims
        d = k % n_dims
        k_ok = s < n_steps
        mask = n_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + n64[:, None] * x_sn + (s * x_ss + d * x_sd)[None, :], mask=mask, other=0.0)
        mp = tl.load(mu_p_ptr + n64[:, None] * p_sn + (s * p_ss + d * p_sd)[None, :], mask=mask, other=0.0)
        mq = tl.load(mu_q_ptr + n64[:, None] * q_sn + (s * q_ss + d * q_sd)[None, :], mask=mask, other=0.0)
        sigma = tl.load(sigma_ptr + s, mask=k_ok, other=1.0)
        x = x.to(tl.float32)
        mp = mp.to(tl.float32)
        mq = mq.to(tl.float32)
        half_precision = 0.5 / (sigma * sigma)
        acc += (mp - mq) * (2.0 * x - mp - mq) * half_precision[None, :]
    tl.store(out_ptr + n, tl.sum(acc, axis=1), mask=n_ok)


def _check_float_tensors(layout: str, **tensors: torch.Tensor) -> None:
    """Each tensor is a float torch.Tensor of the dims ``layout`` names, on the first one's device."""
    dims = layout.count(",") + 1
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name} must be [{layout}], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be fp16, bf16, fp32 or fp64, got {t.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def _check_trajectories(x: torch.Tensor, mu_p: torch.Tensor, mu_q: torch.Tensor, sigma: torch.Tensor) -> None:
    _check_float_tensors("rows, steps, dims", x=x, mu_p=mu_p, mu_q=mu_q)
    for name, t in (("mu_p", mu_p), ("mu_q", mu_q)):
        if t.shape != x.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but x has {tuple(x.shape)} (rows, steps, dims must match)")
    if not isinstance(sigma, torch.Tensor) or sigma.dim() != 1 or sigma.shape[0] != x.shape[1]:
        got = tuple(sigma.shape) if isinstance(sigma, torch.Tensor) else type(sigma).__name__
        raise ValueError(f"sigma must be a 1-D tensor of {x.shape[1]} per-step stds (one per step of x), got {got}")
    if sigma.device != x.device:
        raise ValueError(f"sigma is on {sigma.device} but x is on {x.device}")
    if not sigma.dtype.is_floating_point:
        raise ValueError(f"sigma must be floating point, got {sigma.dtype}")
    if sigma.numel() and not bool((sigma > 0).all() and torch.isfinite(sigma).all()):
        raise ValueError("sigma must be finite and > 0 at every step (a zero-variance step has no density)")


def trajectory_log_ratio(x: torch.Tensor, mu_p: torch.Tensor, mu_q: torch.Tensor, sigma: torch.Tensor,
                         config: dict | None = None) -> torch.Tensor:
    """``log p(x_{0:T}) - log q(x_{0:T})`` per row, for Gaussian reverse chains sharing ``sigma``.

    ``x``, ``mu_p``, ``mu_q``: ``[rows, steps, dims]`` (fp16/bf16/fp32, any strides): the point
    reached at each reverse step and the target / draft means of that transition. ``sigma``:
    ``[steps]`` positive per-step stds. ``config``: launch parameters overriding the tuned ones
    (:func:`launch_config`). Returns fp32 ``[rows]``.
    """
    _check_trajectories(x, mu_p, mu_q, sigma)
    rows, steps, dims = x.shape
    out = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return out
    if steps == 0 or dims == 0:
        return out.zero_()
    cfg = launch_config(steps * dims, config)  # rows of at least one element
    sigma = sigma.to(torch.float32).contiguous()
    block_n, block_k = _tiles(rows, steps * dims, x.device, cfg)
    _trajectory_log_ratio_kernel[(triton.cdiv(rows, block_n),)](
        x, mu_p, mu_q, sigma, out, rows, steps, dims,
        *x.stride(), *mu_p.stride(), *mu_q.stride(),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=cfg["num_warps"],
    )
    return out


def trajectory_log_ratio_reference(x: torch.Tensor, mu_p: torch.Tensor, mu_q: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch :func:`trajectory_log_ratio` (same validation, fp32 math)."""
    _check_trajectories(x, mu_p, mu_q, sigma)
    x, mu_p, mu_q = x.float(), mu_p.float(), mu_q.float()
    half_precision = 0.5 / sigma.float().square()
    return ((mu_p - mu_q) * (2 * x - mu_p - mu_q) * half_precision[None, :, None]).sum(dim=(1, 2))


def _first_rejection_tiles(rows: int, window: int, device: torch.device) -> tuple[int, int]:
    block_w = min(triton.next_power_of_2(window), 64)
    return max(1, min(triton.next_power_of_2(rows), _max_tile(device) // block_w)), block_w


def _first_rejection_launches(shared_limit):
    """What first_rejection compiles on a GPU: fp32/fp16/bf16 windows of 64 and 8 tokens."""
    from tkernels.registry import Launch

    for dtype in ("fp32", "fp16", "bf16"):
        for window in (64, 8):
            block_b, block_w = _first_rejection_tiles(1 << 14, window, torch.device("cuda"))
            yield Launch(f"{dtype} {block_b}x{block_w}", dict(BLOCK_B=block_b, BLOCK_W=block_w),
                         types={"log_ratio_ptr": f"*{dtype}", "uniform_ptr": f"*{dtype}"})


@gpu_compile_check(
    {"log_ratio_ptr": "*fp32", "uniform_ptr": "*fp32", "out_ptr": "*i32", "rows": "i32", "window": "i32",
     "lr_sb": "i64", "lr_sw": "i64", "u_sb": "i64", "u_sw": "i64"},
    _first_rejection_launches,
    BLOCK_B=16,
    BLOCK_W=32,
)
@triton.jit
def _first_rejection_kernel(
    log_ratio_ptr, uniform_ptr, out_ptr, rows, window,
    lr_sb, lr_sw, u_sb, u_sw,
    BLOCK_B: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    # Draft token j is accepted iff u_j < min(1, exp(log_ratio_j)), i.e. log(u_j) < log_ratio_j
    # (u = 0 always accepts, NaN ratios reject). The answer is the first j that fails, or window.
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < rows
    b64 = b.to(tl.int64)
    first = tl.full((BLOCK_B,), 0, dtype=tl.int32) + window
    for w0 in range(0, window, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        mask = b_ok[:, None] & (w < window)[None, :]
        lr = tl.load(log_ratio_ptr + b64[:, None] * lr_sb + w[None, :] * lr_sw, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(uniform_ptr + b64[:, None] * u_sb + w[None, :] * u_sw, mask=mask, other=0.5).to(tl.float32)
        accept = tl.log(u) < lr
        rejected_at = tl.where(mask & (accept == 0), w[None, :], window)
        first = tl.minimum(first, tl.min(rejected_at, axis=1))
    tl.store(out_ptr + b, first, mask=b_ok)


def _check_window(log_ratio: torch.Tensor, uniforms: torch.Tensor) -> None:
    _check_float_tensors("rows, window", log_ratio=log_ratio, uniforms=uniforms)
    if uniforms.shape != log_ratio.shape:
        raise ValueError(f"uniforms has shape {tuple(uniforms.shape)} but log_ratio has {tuple(log_ratio.shape)}")
    require(in_unit_interval("uniforms", uniforms))


def first_rejection(log_ratio: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Number of draft tokens accepted per row: the index of the first rejection in the window.

    ``log_ratio``: ``[rows, window]`` per-token ``log p/q`` (NaN rejects); ``uniforms``: same
    shape, in ``[0, 1)`` (checked: NaN, negative or >= 1 values raise). Token j is accepted with probability ``min(1, exp(log_ratio[j]))``; returns int32
    ``[rows]`` in ``[0, window]`` (``window`` when every token is accepted).
    """
    _check_window(log_ratio, uniforms)
    rows, window = log_ratio.shape
    out = torch.empty(rows, dtype=torch.int32, device=log_ratio.device)
    if rows == 0:
        return out
    if window == 0:
        return out.zero_()
    block_b, block_w = _first_rejection_tiles(rows, window, log_ratio.device)
    _first_rejection_kernel[(triton.cdiv(rows, block_b),)](
        log_ratio, uniforms, out, rows, window, *log_ratio.stride(), *uniforms.stride(),
        BLOCK_B=block_b, BLOCK_W=block_w,
    )
    return out


def first_rejection_reference(log_ratio: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch :func:`first_rejection`."""
    _check_window(log_ratio, uniforms)
    rows, window = log_ratio.shape
    rejected = ~(uniforms.float().log() < log_ratio.float())
    index = torch.arange(window + 1, device=log_ratio.device).expand(rows, window + 1)
    rejected = torch.cat([rejected, rejected.new_ones(rows, 1)], dim=1)  # a sentinel at `window`
    return torch.where(rejected, index, window).amin(dim=1).to(torch.int32)
