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


def test_well_formed_settings_pass(engine_config, monkeypatch):
    monkeypatch.setenv("TKERNELS_TBT_SLO_MS", "50")
    config = engine_config(
        scheduler_cls="tkernels.plugins.vllm.scheduler.DecodeMaximalScheduler",
        additional_config={"tkernels_sched": {"margin": 0.2, "tile": 32, "max_wait_ms": 200}, "tkernels_tree": {"size": "fixed"},
                           "other_plugin": 1},
        speculative_config={"method": "custom_class", "model": TREE, "num_speculative_tokens": 4},
    )
    assert json.loads(json.dumps(config.additional_config))["tkernels_sched"] == {"margin": 0.2, "tile": 32,
                                                                                  "max_wait_ms": 200}
