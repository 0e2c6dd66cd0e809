"""On SGLang's CPU engine, NGRAM's verify mask follows the attention backend (tkernels.plugins.sglang.cpu)."""

import pytest

pytestmark = pytest.mark.sglang


@pytest.fixture
def ngram_worker(monkeypatch):
    from sglang.srt.speculative import ngram_worker

    monkeypatch.setattr(ngram_worker, "_is_cpu", True)  # as SGLANG_USE_CPU_ENGINE=1 sets it at import
    return ngram_worker


def test_triton_layout_backends_get_the_full_mask(ngram_worker):
    from tkernels.plugins.sglang.cpu import use_triton_verify_mask

    for name in ("tkernels", "triton"):
        ngram_worker._is_cpu = True
        use_triton_verify_mask(name)
        assert ngram_worker._is_cpu is False  # NGRAM builds n x (prefix + n) blocks, as off CPU


def test_amx_backend_keeps_the_compact_mask(ngram_worker):
    from tkernels.plugins.sglang.cpu import use_triton_verify_mask

    use_triton_verify_mask("intel_amx")
    assert ngram_worker._is_cpu is True


def test_backends_without_tree_masks_are_refused_at_start(ngram_worker):
    from tkernels.plugins.sglang.cpu import use_triton_verify_mask

    for name in ("torch_native", None):
        with pytest.raises(ValueError, match="--attention-backend tkernels"):
            use_triton_verify_mask(name)
    assert ngram_worker._is_cpu is True
