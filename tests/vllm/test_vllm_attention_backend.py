"""tkernels' vLLM attention backend: registration, validation, one step by hand, and the engine."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 32, 16, 80


@pytest.fixture
def clean_registry(monkeypatch):
    """Registry overrides made by a test are undone after it."""
    from vllm.v1.attention.backends import registry

    monkeypatch.setattr(registry, "_ATTN_OVERRIDES", dict(registry._ATTN_OVERRIDES))
    return registry


def test_register_attention_backend_sets_custom_only_by_default(clean_registry, monkeypatch):
    from tkernels.plugins.vllm import BACKEND_PATH, register_attention_backend
    from tkernels.plugins.vllm.attention import TkernelsAttentionBackend

    monkeypatch.delenv("TKERNELS_VLLM_CPU_TEST_BACKEND", raising=False)
    register_attention_backend()
    register_attention_backend()  # idempotent: vLLM calls plugins once per process, tests may call again
    enum = clean_registry.AttentionBackendEnum
    assert enum.CUSTOM.get_class() is TkernelsAttentionBackend
    assert enum.CUSTOM.get_path() == BACKEND_PATH
    assert not enum.CPU_ATTN.is_overridden()
    assert enum[TkernelsAttentionBackend.get_name()] is enum.CUSTOM  # how vLLM's Attention layer looks it up


def test_cpu_test_mode_replaces_cpu_attn_and_needs_the_interpreter(clean_registry, monkeypatch):
    import triton

    from tkernels.plugins.vllm import BACKEND_PATH, register_attention_backend

    monkeypatch.setenv("TKERNELS_VLLM_CPU_TEST_BACKEND", "1")
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        register_attention_backend()
    assert not clean_registry.AttentionBackendEnum.CPU_ATTN.is_overridden()
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    register_attention_backend()
    assert clean_registry.AttentionBackendEnum.CPU_ATTN.get_path() == BACKEND_PATH


def _validate(**overrides):
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backend import AttentionType

    from tkernels.plugins.vllm.attention import TkernelsAttentionBackend

    args = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16, use_mla=False,
                has_sink=False, use_sparse=False, use_mm_prefix=False, use_per_head_quant_scales=False,
                device_capability=DeviceCapability(9, 0), attn_type=AttentionType.DECODER, has_sliding_window=True)
    return TkernelsAttentionBackend.validate_configuration(**{**args, **overrides})


def test_validate_configuration_accepts_what_the_kernel_runs_and_names_the_rest():
    from vllm.v1.attention.backend import AttentionType

    assert _validate() == []
    assert _validate(dtype=torch.float16, block_size=1, head_size=16) == []
    assert _validate(head_size=512) == ["head_size not supported"]
    assert _validate(kv_cache_dtype="fp8") == ["kv_cache_dtype not supported"]
    assert _validate(has_sink=True) == ["attention sinks not supported"]
    encoder = AttentionType.ENCODER_ONLY
    assert _validate(attn_type=encoder) == [f"attention type {encoder} not supported"]


def test_without_gpu_or_interpreter_the_backend_is_refused_clearly(monkeypatch):
    import triton

    from tkernels.plugins.vllm.attention import TkernelsAttentionImpl

    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (reason,) = _validate()
    assert "needs a CUDA or ROCm device" in reason
    with pytest.raises(RuntimeError, match="needs a CUDA or ROCm device"):
        TkernelsAttentionImpl(NUM_HEADS, HEAD_DIM, 0.1, NUM_KV_HEADS, None, None, "auto")


@pytest.mark.parametrize("unsupported, match", [
    (dict(alibi_slopes=[0.5] * NUM_HEADS), "ALiBi"),
    (dict(sinks=torch.zeros(NUM_HEADS)), "attention sinks"),
    (dict(attn_type="encoder_only"), "attention type"),
    (dict(kv_cache_dtype="fp8"), "KV cache dtype fp8"),
    (dict(chunk_lookback=8), "chunked local attention"),
])
def test_unsupported_layer_options_are_rejected(unsupported, match):
    from tkernels.plugins.vllm.attention import TkernelsAttentionImpl

    args = dict(num_heads=NUM_HEADS, head_size=HEAD_DIM, scale=0.1, num_kv_heads=NUM_KV_HEADS, alibi_slopes=None,
                sliding_window=None, kv_cache_dtype="auto")
    with pytest.raises(NotImplementedError, match=match):
        TkernelsAttentionImpl(**{**args, **unsupported})


@pytest.fixture(scope="module")
def vllm_config():
    from vllm.config import ModelConfig, VllmConfig

    from tkernels.models import tiny_llama_dir

    return VllmConfig(model_config=ModelConfig(model=str(tiny_llama_dir()), skip_tokenizer_init=True, seed=0))


def _kv_cache(layout: str, dtype: torch.dtype, rng: torch.Generator) -> torch.Tensor:
    """vLLM's logical per-layer cache [blocks, kv_heads, block_size, 2*D] in a given physical order."""
    if layout == "NHD":  # physical [blocks, block_size, kv_heads, 2*D] (vLLM's LBNHC)
        physical = torch.randn(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, 2 * HEAD_DIM, generator=rng)
        return physical.to(dtype).transpose(1, 2)
    return torch.randn(NUM_BLOCKS, NUM_KV_HEADS, BLOCK_SIZE, 2 * HEAD_DIM, generator=rng).to(dtype)  # LBHNC


@pytest.mark.parametrize("cpu_attention, dtype, layout", [
    ("", torch.float32, "HND"), ("", torch.float16, "NHD"), ("torch", torch.float32, "HND"),
    ("torch", torch.float16, "NHD"), ("native", torch.bfloat16, "NHD"), ("native", torch.float32, "HND"),
    ("compiled", torch.float32, "NHD"), ("compiled", torch.bfloat16, "HND"), ("compiled", torch.float16, "NHD"),
], ids=["kernel-fp32", "kernel-fp16", "torch-fp32", "torch-fp16", "native-bf16", "native-fp32", "compiled-fp32",
        "compiled-bf16", "compiled-fp16"])
def test_one_step_matches_the_reference(vllm_config, rng, dtype, layout, cpu_attention, monkeypatch):
    """Builder plans a mixed batch once for two layers (global, and windowed + softcap); each layer
    writes its new K/V into vLLM's cache and attends; outputs match the torch reference. For the
    Triton kernel (under the interpreter here), TKERNELS_VLLM_CPU_ATTENTION=torch, whose builder
    builds the torch path's plan and nothing else, =compiled: the compiled CPU path (fp32, bf16;
    the torch path for fp16), and =native: vLLM-CPU's kernel for the bf16 global layer, the
    compiled path where it does not apply (window and softcap, fp32)."""
    import tkernels.plugins.vllm.attention as backend

    monkeypatch.delenv("TKERNELS_VLLM_CPU_TEST_BACKEND", raising=False)
    monkeypatch.setenv("TKERNELS_VLLM_CPU_ATTENTION", cpu_attention)
    if cpu_attention:
        monkeypatch.setattr(backend, "plan_mixed_attention", None)  # not called: the forward does not use it
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from tkernels.attention import mixed_attention_reference
    from tkernels.plugins.vllm.attention import TkernelsAttentionBackend

    vllm_config.compilation_config.static_forward_context.clear()
    options = {"global": {}, "local": dict(per_layer_sliding_window=24, logits_soft_cap=20.0)}
    with set_current_vllm_config(vllm_config):
        layers = {
            name: Attention(NUM_HEADS, HEAD_DIM, HEAD_DIM ** -0.5, NUM_KV_HEADS, prefix=name,
                            attn_backend=TkernelsAttentionBackend, **opts)
            for name, opts in options.items()
        }
    for layer in layers.values():
        layer.kv_cache = _kv_cache(layout, dtype, rng)
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_DIM, dtype=dtype)
    builder = TkernelsAttentionBackend.get_builder_cls()(spec, list(layers), vllm_config, torch.device("cpu"))

    # A prefill chunk over a cached prefix (prefill tiles), a first chunk, decodes across block
    # boundaries, an idle request, then 3 padding tokens (slot -1) the step must not touch.
    query_lens = torch.tensor([70, 5, 1, 0, 1])
    seq_lens = torch.tensor([110, 5, 33, 17, 200])
    num_tokens, padding = int(query_lens.sum()), 3
    block_table = torch.randperm(NUM_BLOCKS, generator=rng)[: 5 * 13].view(5, 13).to(torch.int32)
    token_req = torch.repeat_interleave(torch.arange(5), query_lens)
    position = seq_lens[token_req] - query_lens[token_req] + torch.cat([torch.arange(n) for n in query_lens])
    slots = block_table[token_req, position // BLOCK_SIZE].long() * BLOCK_SIZE + position % BLOCK_SIZE
    slot_mapping = torch.cat([slots, torch.full((padding,), -1)])
    query_start_loc = torch.cat([torch.zeros(1, dtype=torch.long), query_lens.cumsum(0)]).to(torch.int32)
    metadata = builder.build(0, CommonAttentionMetadata(
        query_start_loc=query_start_loc, query_start_loc_cpu=query_start_loc, seq_lens=seq_lens.to(torch.int32),
        num_reqs=5, num_actual_tokens=num_tokens + padding, max_query_len=70, max_seq_len=200,
        block_table_tensor=block_table, slot_mapping=slot_mapping,
    ))
    assert set(metadata.plans) == {None, 24}  # one plan per window, shared by the layers using it
    compiled = cpu_attention in ("compiled", "native") and dtype in (torch.float32, torch.bfloat16)
    plan_type = backend.CompiledAttentionPlan if compiled else backend.TorchAttentionPlan if cpu_attention \
        else backend.MixedAttentionPlan
    from tkernels.plugins.vllm.cpu_attention import native_unavailable_reason

    # The native op is built into vLLM-CPU's AVX-512 library only (an AVX2 host loads one without it).
    native = cpu_attention == "native" and native_unavailable_reason(dtype, None) is None
    assert isinstance(metadata.plans[None], backend.NativeCpuPlan if native else plan_type)
    assert isinstance(metadata.plans[24], plan_type)

    for name, layer in layers.items():
        q = torch.randn(num_tokens + padding, NUM_HEADS, HEAD_DIM, generator=rng).to(dtype)
        k, v = (torch.randn(num_tokens + padding, NUM_KV_HEADS, HEAD_DIM, generator=rng).to(dtype) for _ in range(2))
        layer.impl.do_kv_cache_update(layer, k, v, layer.kv_cache, slot_mapping)
        k_cache, v_cache = layer.kv_cache.transpose(1, 2).split(HEAD_DIM, dim=-1)
        assert torch.equal(k_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE], k[:num_tokens])
        assert torch.equal(v_cache[slots // BLOCK_SIZE, slots % BLOCK_SIZE], v[:num_tokens])

        out = torch.full_like(q, float("nan"))
        layer.impl.forward(layer, q, k, v, layer.kv_cache, metadata, out)
        opts = options[name]
        expected = mixed_attention_reference(
            q[:num_tokens], k_cache, v_cache, block_table, query_start_loc, seq_lens.to(torch.int32),
            HEAD_DIM ** -0.5, window=opts.get("per_layer_sliding_window"), softcap=opts.get("logits_soft_cap"),
        )
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(out[:num_tokens], expected, atol=tol, rtol=tol)
        assert out[num_tokens:].isnan().all()  # padding rows are left alone


def _generate(tkernels: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TKERNELS_VLLM_CPU_TEST_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    runner = Path(__file__).with_name("_attention_runner.py")
    out = subprocess.run([sys.executable, str(runner), *(["--tkernels"] if tkernels else [])],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_engine_greedy_tokens_match_vllm_cpu_attention():
    """The CPU engine with tkernels' backend in CPU_ATTN's place (kernel under the interpreter)
    generates the same greedy tokens, with the same log-probabilities at every prompt and
    generated position, as vLLM's own CPU attention, on chunked prefills mixed with decodes."""
    from tkernels.attention.plan import DEFAULT_CONFIG
    from tkernels.models import tiny_llama_dir

    tiny_llama_dir()  # build before the two engines race for it
    with ThreadPoolExecutor(2) as pool:
        ours, theirs = pool.map(_generate, [True, False])
    assert ours["impls"] == ["TkernelsAttentionImpl"] and theirs["impls"] == ["CPUAttentionBackendImpl"]
    steps = ours["query_lens"]
    assert any(max(lens) > DEFAULT_CONFIG["decode_max_q"] and 1 in lens for lens in steps)  # prefill tiles + decodes
    assert ours["token_ids"] == theirs["token_ids"]
    # fp32 kernels agree to ~1e-6; a 20% error in the softmax scale moves these by ~1e-2.
    for mine, reference in zip(ours["logprobs"], theirs["logprobs"]):
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(reference), atol=1e-4, rtol=0)
