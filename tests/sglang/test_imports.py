"""What tkernels' SGLang hooks will target exists and imports in the SGLang environment (no GPU)."""

import pkgutil

import pytest

pytestmark = pytest.mark.sglang

# HookRegistry targets and registration points (SERVERS.md), resolved the way HookRegistry does.
HOOK_TARGETS = [
    "sglang.srt.managers.scheduler.Scheduler.get_prefill_adder_class",
    "sglang.srt.managers.scheduler.Scheduler.init_chunked_prefill",
    "sglang.srt.speculative.spec_info.SpeculativeAlgorithm.create_worker",
    "sglang.srt.layers.attention.triton_backend.TritonAttnBackend._forward_extend_kernel",
    "sglang.srt.managers.schedule_policy.PrefillAdder",
    "sglang.srt.speculative.ngram_worker.NGRAMWorker._prepare_draft_tokens",
    "sglang.srt.speculative.ngram_worker.NGRAMWorker.forward_batch_generation",
    "sglang.srt.speculative.eagle_utils.eagle_sample",
    "sglang.srt.layers.attention.attention_registry.register_attention_backend",
    "sglang.srt.arg_groups.choices.add_attention_backend_choices",
    "sglang.srt.layers.attention.triton_backend.TritonAttnBackend",
    "sglang.srt.plugins.hook_registry.HookRegistry.register",
]


def test_server_args_cli_parsing():
    from sglang.srt.server_args import prepare_server_args

    args = prepare_server_args([
        "--model-path", "dummy", "--attention-backend", "triton", "--enable-mixed-chunk",
        "--chunked-prefill-size", "512", "--speculative-algorithm", "NGRAM",
        "--speculative-num-draft-tokens", "8",
    ])
    assert (args.model_path, args.attention_backend, args.enable_mixed_chunk) == ("dummy", "triton", True)
    assert (args.chunked_prefill_size, args.speculative_algorithm, args.speculative_num_draft_tokens) == (512, "NGRAM", 8)


@pytest.mark.parametrize("target", HOOK_TARGETS)
def test_hook_target_resolves(target):
    assert callable(pkgutil.resolve_name(target))
