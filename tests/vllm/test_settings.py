"""tkernels' vLLM settings are checked when vLLM builds its configuration, before any engine starts."""

import json
import re

import pytest

pytestmark = pytest.mark.vllm

TREE = "tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer"
FORM = '{"slo_ms": <TBT SLO in ms, > 0>'


@pytest.fixture(scope="module")
def engine_config():
    from vllm.engine.arg_utils import EngineArgs

    from tkernels.models import tiny_llama_dir
    from tkernels.plugins.vllm.settings import install_config_check

    install_config_check()  # what the plugin's register() does in every vLLM process
    model = str(tiny_llama_dir())
    return lambda **kwargs: EngineArgs(model=model, max_model_len=256, **kwargs).create_engine_config()


@pytest.mark.parametrize(
    "additional,message",
    [
        ({"tkernels_sched": 50}, f"additional_config['tkernels_sched']: expected an object {FORM}"),
        ({"tkernels_sched": {"slo": 5}}, "additional_config['tkernels_sched']: unknown keys ['slo']; expected"),
        ({"tkernels_sched": {"slo_ms": -1}}, "additional_config['tkernels_sched']: slo_ms: must be a positive number"),
        ({"tkernels_sched": {"tile": 1.5}}, "additional_config['tkernels_sched']: tile: must be a positive integer"),
        ({"tkernels_sched": {"margin": 1}}, "additional_config['tkernels_sched']: margin: must be in [0, 1)"),
        ({"tkernels_sched": {"max_wait_ms": -1}},
         "additional_config['tkernels_sched']: max_wait_ms: must be a non-negative number of milliseconds"),
        ({"tkernels_sched": {"tile": 512}}, "--max-num-batched-tokens (256) must be at least the scheduler's tile"),
        ({"tkernels_tree": {"size": "big"}}, "additional_config['tkernels_tree']: expected {\"size\": \"per_batch\""),
        ({"tkernels_tree": "fixed"}, "additional_config['tkernels_tree']: expected an object"),
        ({"tkernels_sced": {}}, "additional_config: unknown tkernels keys ['tkernels_sced']; known: 'tkernels_sched'"),
    ],
)
def test_malformed_additional_config_is_refused_naming_the_key(engine_config, additional, message):
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        engine_config(additional_config=additional, max_num_batched_tokens=256)
    assert "TypeError" not in str(caught.value)


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("TKERNELS_TBT_SLO_MS", "fast", r"\$TKERNELS_TBT_SLO_MS: must be a number of milliseconds, got 'fast'"),
        ("TKERNELS_TBT_SLO_MS", "-5", r"\$TKERNELS_TBT_SLO_MS: must be a positive number of milliseconds, got '-5'"),
        ("TKERNELS_MAX_WAIT_MS", "soon", r"\$TKERNELS_MAX_WAIT_MS: must be a number of milliseconds, got 'soon'"),
        ("TKERNELS_MAX_WAIT_MS", "-5", r"\$TKERNELS_MAX_WAIT_MS: must be a non-negative number of milliseconds, "
                                       r"got '-5'.*\(e.g. TKERNELS_MAX_WAIT_MS=500\)"),
        ("TKERNELS_CONFIG_DIR", "/nonexistent/tkernels", r"\$TKERNELS_CONFIG_DIR: expected a folder"),
        ("TKERNELS_VLLM_CPU_TEST_BACKEND", "yes", "TKERNELS_VLLM_CPU_TEST_BACKEND must be one of"),
        ("TKERNELS_VLLM_CPU_ATTENTION", "yes", "TKERNELS_VLLM_CPU_ATTENTION must be one of"),
    ],
)
def test_malformed_environment_is_refused_naming_the_variable(engine_config, monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        engine_config()


def test_tree_proposer_configuration_is_checked_before_the_engine_starts(engine_config):
    spec = {"method": "custom_class", "model": TREE, "num_speculative_tokens": 100_000}
    with pytest.raises(ValueError, match="tkernels tree speculation does not support num_speculative_tokens >"):
        engine_config(speculative_config=spec)


def test_malformed_per_gpu_config_is_refused_in_the_front_end(engine_config, monkeypatch, tmp_path):
    """Issue 22 item 2: a malformed file in $TKERNELS_CONFIG_DIR stopped the workers ~90 s later,
    with vLLM's misleading "The class constructor must accept VllmConfig as argument"."""
    from tkernels.config import SCHEMA_VERSION

    shipped = {"schema_version": SCHEMA_VERSION, "device": "NVIDIA H100 80GB HBM3", "is_gpu": True, "sm_count": 132,
               "total_memory_gb": 80, "versions": {}, "date": "2026-12-06", "kernels": {}, "latency_model": {},
               "budgets": {}, "tree_budgets": {}}
    (tmp_path / "Good_GPU.json").write_text(json.dumps(shipped))
    monkeypatch.setenv("TKERNELS_CONFIG_DIR", str(tmp_path))
    engine_config()  # a valid folder passes
    (tmp_path / "NVIDIA_H100_80GB_HBM3.json").write_text(json.dumps({**shipped, "sm_count": -3}))
    with pytest.raises(ValueError, match=r"\$TKERNELS_CONFIG_DIR: \S*NVIDIA_H100_80GB_HBM3.json: field 'sm_count'"):
        engine_config()
    (tmp_path / "NVIDIA_H100_80GB_HBM3.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"NVIDIA_H100_80GB_HBM3.json: not valid JSON"):
        engine_config()


def test_tree_proposer_without_tree_attention_is_refused_in_the_front_end(engine_config, monkeypatch):
    """Issue 22 items 2 and 4: the tree proposer without tkernels' attention failed ~84 s later at
    model load; on vLLM-CPU the message says exactly which variable to set."""
    spec = {"method": "custom_class", "model": TREE, "num_speculative_tokens": 4}
    for name in ("TKERNELS_VLLM_CPU_ATTENTION", "TKERNELS_VLLM_CPU_TEST_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"vLLM-CPU .* set TKERNELS_VLLM_CPU_ATTENTION=native .*=torch"):
        engine_config(speculative_config=spec)
    for name, value in (("TKERNELS_VLLM_CPU_ATTENTION", "native"), ("TKERNELS_VLLM_CPU_ATTENTION", "compiled"),
                        ("TKERNELS_VLLM_CPU_ATTENTION", "torch"),
                        ("TKERNELS_VLLM_CPU_ATTENTION", "reference"),
                        ("TKERNELS_VLLM_CPU_TEST_BACKEND", "reference")):
        with monkeypatch.context() as env:
            env.setenv(name, value)  # the user-facing name, and the older one (still read)
            engine_config(speculative_config=spec)


@pytest.mark.parametrize("env,mode", [
    ({"TKERNELS_VLLM_CPU_ATTENTION": "native"}, "native"),
    ({"TKERNELS_VLLM_CPU_ATTENTION": "torch"}, "torch"),
    ({"TKERNELS_VLLM_CPU_ATTENTION": "compiled"}, "compiled"),
    ({"TKERNELS_VLLM_CPU_ATTENTION": "reference"}, "reference"),
    ({"TKERNELS_VLLM_CPU_ATTENTION": "interpreter"}, "1"),
    ({"TKERNELS_VLLM_CPU_TEST_BACKEND": "1"}, "1"),  # the older name, still read
    ({"TKERNELS_VLLM_CPU_ATTENTION": "reference", "TKERNELS_VLLM_CPU_TEST_BACKEND": "reference"}, "reference"),
    ({}, None),
    ({"TKERNELS_VLLM_CPU_ATTENTION": "1"}, "TKERNELS_VLLM_CPU_ATTENTION must be one of"),
    ({"TKERNELS_VLLM_CPU_ATTENTION": "interpreter", "TKERNELS_VLLM_CPU_TEST_BACKEND": "reference"}, "disagree"),
    ({"TKERNELS_VLLM_CPU_ATTENTION": "torch", "TKERNELS_VLLM_CPU_TEST_BACKEND": "reference"}, "disagree"),
])
def test_cpu_attention_variable_and_its_older_name(monkeypatch, env, mode):
    from tkernels.plugins.vllm import cpu_test_mode

    for name in ("TKERNELS_VLLM_CPU_ATTENTION", "TKERNELS_VLLM_CPU_TEST_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if mode in (None, "1", "reference", "torch", "compiled", "native"):
        assert cpu_test_mode() == mode
    else:
        with pytest.raises(ValueError, match=mode):
            cpu_test_mode()


def test_well_formed_settings_pass(engine_config, monkeypatch):
    monkeypatch.setenv("TKERNELS_VLLM_CPU_ATTENTION", "reference")  # vLLM-CPU: the tree proposer's attention
    monkeypatch.setenv("TKERNELS_TBT_SLO_MS", "50")
    config = engine_config(
        scheduler_cls="tkernels.plugins.vllm.scheduler.DecodeMaximalScheduler",
        additional_config={"tkernels_sched": {"margin": 0.2, "tile": 32, "max_wait_ms": 200}, "tkernels_tree": {"size": "fixed"},
                           "other_plugin": 1},
        speculative_config={"method": "custom_class", "model": TREE, "num_speculative_tokens": 4},
    )
    assert json.loads(json.dumps(config.additional_config))["tkernels_sched"] == {"margin": 0.2, "tile": 32,
                                                                                  "max_wait_ms": 200}


def test_the_tree_drafters_are_tkernels_drafter_methods():
    """settings.py keeps its own list (it is read before torch loads); it must be TreeDrafter's."""
    from tkernels.plugins.vllm.settings import TREE_DRAFTERS
    from tkernels.spec.drafters import DRAFTERS

    assert TREE_DRAFTERS == DRAFTERS
