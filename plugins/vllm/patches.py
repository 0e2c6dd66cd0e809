"""Tree speculation inside vLLM: the patches where vLLM has no hook, and the start-up checks.

vLLM removed its tree speculation in May 2026. :class:`~tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer`
puts it back: each row's draft is a tree of ``num_speculative_tokens`` nodes in BFS order (the
root, the row's last committed token, excluded), handed to vLLM as the row's ordinary draft
list. vLLM's scheduler therefore allocates ``1 + n`` slots exactly as for a chain, and may cut
the list (a BFS prefix of a tree is a tree). The proposer's constructor calls :func:`install`,
which checks the configuration and patches vLLM's model runner; nothing is patched otherwise.
Each patch wraps one method (the CPU runner inherits them), acts only when the runner's drafter
is the tree proposer, and gets the method through :func:`~tkernels.plugins.vllm.compat.checked_method`:
a vLLM whose method moved or changed gets a clear error, never a silent wrong patch. What a
step does with the trees (:class:`~tkernels.plugins.vllm.tree.TreeBatch`) is in
:mod:`tkernels.plugins.vllm.tree`.

Patched vLLM symbols, and why:

1. ``GPUModelRunner._prepare_inputs`` (tree positions): after vLLM's own input preparation,
   :meth:`TreeBatch.begin_step` builds the step's trees (one :class:`TreeStep`) from the
   proposer's record of each request's tree and the draft the scheduler actually scheduled, and
   overwrites the tree nodes' RoPE positions with ``num_computed + depth(i)`` (the slot mapping
   stays linear: node ``i``'s K/V goes to position ``num_computed + i``'s slot).
2. Tree mask: no vLLM symbol. Our attention backend's metadata builder
   (:mod:`tkernels.plugins.vllm.attention`) reads the step's tree rows and passes their parents
   to ``mixed_attention``, which masks each node to its ancestors.
3. ``GPUModelRunner._sample`` (verification + KV compaction): :meth:`TreeBatch.verify` in place
   of vLLM's rejection sampler (and of its sampler in steps without any draft, so that one rule
   draws every token), then the accepted path's K/V moved to contiguous positions.
4. ``GPUModelRunner._input_fits_in_drafter`` (drafting near the context limit): vLLM skips the
   drafter for the WHOLE batch when its longest sequence plus ``num_speculative_tokens`` passes
   ``max_model_len`` and schedules ``num_speculative_tokens`` zeros per row instead, which are
   no tree of ours (and the proposer, never called, would keep stale state). The tree proposer
   is a host-side drafter with no context limit of its own: it cuts each request's tree to the
   room left before ``max_model_len`` itself, so with it the drafter always runs. Any draft that
   still is not the proposer's tree is verified as a chain (lossless), never an error.
5. ``SamplingParams._validate_spec_decode`` (admission): with the tree proposer configured,
   only requests whose distribution tree verification reproduces exactly are admitted
   (temperature, top-k, top-p; no penalties, bad words, allowed tokens, min_tokens, logprobs or
   structured output; vLLM itself refuses min_p and logit bias with speculation); others are
   refused when they are submitted with :class:`UnsupportedRequestError`, a vLLM
   request-validation error, so vLLM's OpenAI server answers HTTP 400 with the message (in a
   stream: an error event with code 400). Requests are validated in the front-end process, so
   the plugin's ``register()`` installs this one in every process (only warning if it cannot:
   servers without tree speculation keep working); it does nothing unless the tree proposer is
   configured, whose :func:`install` raises if the patch could not be made.
6. ``Scheduler.update_from_output`` (per-request failure): when verification refuses a
   request's logits (NaN, +inf, no finite logit: ``NonFiniteLogitsError`` names the requests),
   the rest of the batch is verified without it and its row carries :data:`~tkernels.plugins.vllm.tree.FAILED_TOKEN`;
   in the engine process this patch finishes that request with ``FINISHED_ERROR`` through the
   set vLLM uses for its own per-request errors (the client gets an error, HTTP 500 in the
   OpenAI server) and the server serves on. Installed like patch 5.
7. ``GPUModelRunner._model_forward`` (prompt top-k, only with the proposer's ``prompt_topk``
   option): after the forward, the hidden states of the step's prompt tokens (recorded by patch
   1) go through the LM head in chunks and their top-k is recycled
   (:meth:`~tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer.recycle_prompt`); vLLM
   itself computes logits at each prompt's last position only. Without the option it passes
   the output through untouched.

Supported: greedy and temperature/top-k/top-p sampled requests; one KV-cache group; decoder
models without M-RoPE; tkernels' attention backend (``--attention-backend CUSTOM``; on CPU
``TKERNELS_VLLM_CPU_ATTENTION``); no async scheduling (vLLM turns it off for custom_class
proposers), no pipeline parallelism. Anything else is refused at start-up (or, for requests, at
submission).
"""

from __future__ import annotations

import functools
import logging
import time

import torch
from vllm.exceptions import VLLMValidationError

from tkernels.plugins.vllm.compat import CPU_ATTENTION_HINT, already_patched, checked_method, patch_method
from tkernels.plugins.vllm.tree import FAILED_TOKEN, TreeBatch, is_tree_config
from tkernels.spec import MAX_TREE_NODES

# Parameters of every patched method, as in the vLLM versions of compat.SUPPORTED_VLLM.
_RUNNER_SIGNATURES = {
    "_prepare_inputs": ("self", "scheduler_output", "num_scheduled_tokens"),
    "_sample": ("self", "logits", "spec_decode_metadata"),
    "_model_forward": ("self", "input_ids", "positions", "intermediate_tensors", "inputs_embeds", "model_kwargs"),
    "_input_fits_in_drafter": ("self", "common_attn_metadata"),
}
_VALIDATE_SIGNATURE = ("self", "speculative_config")
_UPDATE_SIGNATURE = ("self", "scheduler_output", "model_runner_output")


# --- start-up checks ----------------------------------------------------------------------------


def check_config(vllm_config) -> None:
    """Raise a clear error for a configuration tree speculation does not support."""
    problems = []
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        problems.append("async scheduling (pass async_scheduling=False / --no-async-scheduling)")
    if getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1) > 1:
        problems.append("pipeline parallelism")
    if getattr(vllm_config.model_config, "uses_mrope", False):
        problems.append("M-RoPE models")
    if vllm_config.speculative_config.num_speculative_tokens + 1 > MAX_TREE_NODES:
        problems.append(f"num_speculative_tokens > {MAX_TREE_NODES - 1} "
                        f"(tree attention holds at most {MAX_TREE_NODES} nodes with the root)")
    if problems:
        raise ValueError(f"tkernels tree speculation does not support {', '.join(problems)}")


def check_attention_backend(vllm_config) -> None:
    """Every attention layer must run tkernels' backend: only it applies the tree mask."""
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    # tkernels' backend marks its layers (TkernelsAttentionImpl.applies_tree_mask)
    others = sorted({type(layer.impl).__name__ for layer in get_layers_from_vllm_config(vllm_config, Attention).values()
                     if not getattr(layer.impl, "applies_tree_mask", False)})
    if others:
        raise ValueError(
            f"tkernels tree speculation needs tkernels' attention backend for the tree mask, but layers use {others}: "
            f"pass --attention-backend CUSTOM (on vLLM-CPU, which ignores it, {CPU_ATTENTION_HINT})"
        )


# --- the runner patches (1, 3, 4, 7) -------------------------------------------------------------


def _tree_batch(runner) -> TreeBatch | None:
    batch = getattr(getattr(runner, "drafter", None), "tree_batch", None)
    return batch if isinstance(batch, TreeBatch) else None


def install(vllm_config) -> None:
    """Check the configuration and patch vLLM's model runner (idempotent)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    check_config(vllm_config)
    install_request_validation()  # done by register() in every process; here it fails loudly if it could not be
    install_failed_request_handling()  # likewise (it acts in the engine process, where the scheduler runs)
    methods = {name: checked_method(GPUModelRunner, name, sig) for name, sig in _RUNNER_SIGNATURES.items()}
    if already_patched(GPUModelRunner, "_sample"):
        return
    prepare_inputs, sample, model_forward = methods["_prepare_inputs"], methods["_sample"], methods["_model_forward"]
    input_fits_in_drafter = methods["_input_fits_in_drafter"]

    @functools.wraps(prepare_inputs)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = prepare_inputs(self, scheduler_output, num_scheduled_tokens)
        batch = _tree_batch(self)
        if batch is not None:
            batch.begin_step(self, scheduler_output, num_scheduled_tokens)
        return result

    @functools.wraps(sample)
    def _sample(self, logits, spec_decode_metadata):
        batch = _tree_batch(self)
        if batch is None or logits is None:
            return sample(self, logits, spec_decode_metadata)
        return batch.verify(self, logits, spec_decode_metadata)

    @functools.wraps(input_fits_in_drafter)
    def _input_fits_in_drafter(self, common_attn_metadata):
        if _tree_batch(self) is None or common_attn_metadata is None:
            return input_fits_in_drafter(self, common_attn_metadata)
        return True  # patch 4: the proposer cuts each tree to the room before max_model_len

    @functools.wraps(model_forward)
    def _model_forward(self, *args, **kwargs):
        start = time.perf_counter()
        output = model_forward(self, *args, **kwargs)
        batch = _tree_batch(self)
        if batch is not None and self.drafter.prompt_topk and isinstance(output, torch.Tensor):
            if output.is_cuda:
                torch.cuda.synchronize(output.device)
            self.drafter.recycle_prompt(output, time.perf_counter() - start)
        return output

    for name, wrapper in (("_prepare_inputs", _prepare_inputs), ("_sample", _sample),
                          ("_input_fits_in_drafter", _input_fits_in_drafter), ("_model_forward", _model_forward)):
        patch_method(GPUModelRunner, name, wrapper)


# --- admission (5) and per-request failure (6): every process ------------------------------------


def unsupported_request_params(params) -> list[str]:
    """What in these SamplingParams tree verification cannot reproduce ([] if nothing)."""
    # vLLM runs beam search (use_beam_search) as one-token requests asking for 2 x beam_width
    # logprobs, without detokenizing (entrypoints/generate/beam_search): named as such, since a
    # user who asked for beam search never asked for logprobs.
    beam_search = params.logprobs is not None and params.max_tokens == 1 and not params.detokenize
    checks = (
        ("beam search (use_beam_search)", beam_search),
        ("presence/frequency/repetition penalties",
         params.presence_penalty != 0 or params.frequency_penalty != 0 or params.repetition_penalty != 1),
        ("bad_words", bool(params.bad_words)),
        ("allowed_token_ids", params.allowed_token_ids is not None),
        ("min_tokens", params.min_tokens > 0),
        ("logprobs", (params.logprobs is not None and not beam_search) or params.prompt_logprobs is not None),
        ("structured outputs (response_format, guided decoding)", params.structured_outputs is not None),
    )
    return [name for name, asked in checks if asked]


class UnsupportedRequestError(VLLMValidationError, ValueError):
    """A request tree verification cannot reproduce exactly. vLLM's own request-validation
    error, so its OpenAI server answers HTTP 400 with this message (any other exception raised
    while a request is admitted becomes an HTTP 500 with an empty message); a ValueError for
    offline callers."""


def install_failed_request_handling() -> None:
    """Patch 6: ``Scheduler.update_from_output`` finishes a request whose step failed in the
    worker (its tokens are ``[FAILED_TOKEN]``) with ``FINISHED_ERROR``, through the set vLLM uses
    for its own per-request errors (grammar compilation): the client gets an error for that
    request (HTTP 500 in vLLM's server) and the server serves on. Idempotent; inert unless the
    tree proposer is configured."""
    from vllm.v1.core.sched.scheduler import Scheduler

    update = checked_method(Scheduler, "update_from_output", _UPDATE_SIGNATURE)
    if already_patched(Scheduler, "update_from_output"):
        return

    @functools.wraps(update)
    def update_from_output(self, scheduler_output, model_runner_output):
        sampled = model_runner_output.sampled_token_ids
        if sampled and is_tree_config(self.vllm_config.speculative_config) and any(
            tokens[:1] == [FAILED_TOKEN] for tokens in sampled
        ):
            errors = getattr(self, "grammar_compile_error_reqs", None)
            if not isinstance(errors, set):
                raise RuntimeError("tkernels tree speculation: this vLLM's scheduler has no per-request error set "
                                   "(grammar_compile_error_reqs); a failed request cannot be finished alone")
            for req_id, index in model_runner_output.req_id_to_index.items():
                if index < len(sampled) and sampled[index][:1] == [FAILED_TOKEN]:
                    sampled[index] = []  # no token: as a partial prefill's row, no draft rollback
                    errors.add(req_id)  # finished with FINISHED_ERROR at the end of this update
        return update(self, scheduler_output, model_runner_output)

    patch_method(Scheduler, "update_from_output", update_from_output)


def install_request_validation() -> None:
    """Patch 5: refuse requests tree verification would not reproduce exactly (idempotent)."""
    from vllm.sampling_params import SamplingParams

    validate = checked_method(SamplingParams, "_validate_spec_decode", _VALIDATE_SIGNATURE)
    if already_patched(SamplingParams, "_validate_spec_decode"):
        return

    @functools.wraps(validate)
    def _validate_spec_decode(self, speculative_config):
        validate(self, speculative_config)
        if is_tree_config(speculative_config):
            unsupported = unsupported_request_params(self)
            if unsupported:
                raise UnsupportedRequestError(
                    f"tkernels tree speculation verifies greedy or temperature/top-k/top-p sampling only; "
                    f"this request asks for {', '.join(unsupported)} (serve it without tree speculation)"
                )

    patch_method(SamplingParams, "_validate_spec_decode", _validate_spec_decode)
    quiet_refusal_tracebacks()


# vLLM's stream generators log any exception raised while a streamed request runs with
# logger.exception (a full ERROR traceback) before sending the error event; a request refused at
# admission (UnsupportedRequestError, HTTP 400 in the event) is the client's mistake, not the
# server's, so its record becomes one WARNING line with the reason.
_STREAM_LOGGERS = ("vllm.entrypoints.openai.chat_completion.serving", "vllm.entrypoints.openai.completion.serving")


class _RefusalAsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, UnsupportedRequestError):
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.msg, record.args = "tkernels: refused a streamed request (HTTP 400 in its stream): %s", (str(error),)
            record.exc_info = record.exc_text = None
        return True


def quiet_refusal_tracebacks() -> None:
    """Install :class:`_RefusalAsWarning` on vLLM's stream generators' loggers (idempotent)."""
    for name in _STREAM_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, _RefusalAsWarning) for f in target.filters):
            target.addFilter(_RefusalAsWarning())
