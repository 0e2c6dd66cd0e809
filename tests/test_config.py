"""Per-GPU config lookup: naming, override folder, shipped files, fallback, bad files."""

import json
import logging
import re

import pytest

from tkernels import config
from tkernels.config import ConfigError, DeviceInfo

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", 132, 79.1, True)


def make_config(device: DeviceInfo, **overrides) -> dict:
    data = {
        "schema_version": config.SCHEMA_VERSION,
        "device": device.name,
        "is_gpu": device.is_gpu,
        "sm_count": device.sm_count,
        "total_memory_gb": device.total_memory_gb,
        "versions": {"tkernels": "0.1.0", "triton": "3.6.0", "torch": "2.11.0"},
        "date": "2026-11-26",
        "kernels": {"mixed_attention": {"buckets": [
            {"key": {"kv_len": 512}, "config": {"BLOCK_N": 32}},
            {"key": {"kv_len": 4096}, "config": {"BLOCK_N": 128}},
        ]}},
        "latency_model": {},
        "budgets": {},
        "tree_budgets": {},
    }
    data.update(overrides)
    return data


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    folder = tmp_path / "shipped"
    folder.mkdir()
    monkeypatch.setattr(config, "SHIPPED_DIR", folder)
    monkeypatch.delenv(config.ENV_CONFIG_DIR, raising=False)
    monkeypatch.setattr(config, "_warned", set())
    return folder


def write(folder, device, data):
    path = folder / f"{config.device_file_name(device.name)}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA_H100_80GB_HBM3"),
    ("NVIDIA H200", "NVIDIA_H200"),
    ("NVIDIA H200 NVL", "NVIDIA_H200"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA_A100-SXM4-80GB"),
])
def test_device_file_name_follows_vllm(name, expected):
    assert config.device_file_name(name) == expected


def test_device_file_name_rejects_empty():
    with pytest.raises(ValueError, match="device_name"):
        config.device_file_name(" ")


def test_known_gpu_uses_shipped_file(shipped):
    path = write(shipped, H100, make_config(H100))
    choice = config.choose(H100)
    assert choice.path == path and choice.reason.startswith("shipped") and not choice.is_fallback


def test_override_folder_wins(shipped, tmp_path, monkeypatch):
    write(shipped, H100, make_config(H100))
    override = tmp_path / "override"
    override.mkdir()
    path = write(override, H100, make_config(H100, date="2027-01-01"))
    monkeypatch.setenv(config.ENV_CONFIG_DIR, str(override))
    choice = config.choose(H100)
    assert choice.path == path and choice.data["date"] == "2027-01-01"


def test_unknown_gpu_falls_back_to_nearest_with_one_warning(shipped, caplog):
    write(shipped, H100, make_config(H100))
    h800 = DeviceInfo("NVIDIA H800", 132, 79.6, True)
    with caplog.at_level(logging.WARNING, logger="tkernels"):
        first = config.choose(h800)
        second = config.choose(h800)
    assert first.is_fallback and first.path.name == "NVIDIA_H100_80GB_HBM3.json"
    assert second.path == first.path
    assert len([r for r in caplog.records if "fallback" in r.getMessage()]) == 1


def test_no_shipped_config_gives_builtin_defaults(shipped):
    choice = config.choose(DeviceInfo("NVIDIA L4", 58, 22.0, True))
    assert choice.path is None and choice.data == {} and "defaults" in choice.reason
    assert config.kernel_config("mixed_attention", {"kv_len": 100}, {"BLOCK_N": 64}, choice) == {"BLOCK_N": 64}


def test_kernel_config_picks_nearest_bucket(shipped):
    write(shipped, H100, make_config(H100))
    choice = config.choose(H100)
    assert config.kernel_config("mixed_attention", {"kv_len": 3000}, {"BLOCK_N": 64, "num_warps": 4}, choice) == {
        "BLOCK_N": 128, "num_warps": 4}
    assert config.kernel_config("mixed_attention", {"kv_len": 600}, {"BLOCK_N": 64}, choice)["BLOCK_N"] == 32


def test_malformed_json_names_the_file(shipped):
    path = shipped / "NVIDIA_H100_80GB_HBM3.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="NVIDIA_H100_80GB_HBM3.json: not valid JSON"):
        config.choose(H100)


@pytest.mark.parametrize("field, value, message", [
    ("schema_version", 2, "field 'schema_version' is 2"),
    ("sm_count", "many", "field 'sm_count' must be an integer"),
    ("is_gpu", 1, "field 'is_gpu' must be true/false"),
    ("kernels", {"mixed_attention": {"buckets": [{"config": {}}]}}, "kernels.mixed_attention.buckets"),
])
def test_wrong_field_names_file_and_field(shipped, field, value, message):
    write(shipped, H100, make_config(H100, **{field: value}))
    with pytest.raises(ConfigError, match=message):
        config.choose(H100)


def test_missing_field_is_named(shipped):
    data = make_config(H100)
    del data["latency_model"]
    write(shipped, H100, data)
    with pytest.raises(ConfigError, match="missing field 'latency_model'"):
        config.choose(H100)


def test_shipped_configs_are_valid():
    for path in sorted(config.SHIPPED_DIR.glob("*.json")):
        config.load(path)


def _bucket(key, cfg):
    return {"verify": {"buckets": [{"key": key, "config": cfg}]}}


@pytest.mark.parametrize("field, value, message", [
    # issue 14 item 9: each of these passed validation and failed later (or was used)
    ("kernels", _bucket({"vocab": "big"}, {"block_v": 1024}), r"kernels\.verify\.buckets\[0\]\.key\.vocab"),
    ("kernels", _bucket({"vocab": float("nan")}, {"block_v": 1024}), r"kernels\.verify\.buckets\[0\]\.key\.vocab"),
    ("kernels", _bucket({"vocab": 1000}, {"block_v": 100}), r"kernels\.verify\.buckets\[0\]\.config\.block_v.*power of two"),
    ("kernels", _bucket({"vocab": 1000}, {"num_warps": 3}), r"kernels\.verify\.buckets\[0\]\.config\.num_warps"),
    ("kernels", _bucket({"vocab": 1000}, {"num_warps": 4.0}), r"kernels\.verify\.buckets\[0\]\.config\.num_warps"),
    ("kernels", _bucket({"vocab": 1000}, {"block_v": True}), r"kernels\.verify\.buckets\[0\]\.config\.block_v"),
    ("sm_count", -4, "field 'sm_count' must be a positive integer"),
    ("sm_count", 0, "field 'sm_count' must be a positive integer"),
    ("total_memory_gb", float("nan"), "field 'total_memory_gb' must be a finite number >= 0"),
    ("total_memory_gb", -1.0, "field 'total_memory_gb' must be a finite number >= 0"),
    ("latency_model", {"kv_gbps": float("inf")}, r"field 'latency_model\.kv_gbps' must be a finite number"),
    ("budgets", {"default_tokens": 0}, r"field 'budgets\.default_tokens' must be a positive integer"),
    ("budgets", {"per_slo_ms": {"20": float("nan")}}, r"field 'budgets\.per_slo_ms\.20' must be a finite number"),
])
def test_wrong_values_fail_at_load_naming_file_and_field(shipped, field, value, message):
    path = write(shipped, H100, make_config(H100, **{field: value}))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: .*{message}"):
        config.load(path)
    with pytest.raises(ConfigError, match=message):
        config.choose(H100)


def test_unknown_tuned_key_names_the_file(shipped):
    """A bucket may only hold the kernel's launch parameters; the error names the file."""
    path = write(shipped, H100, make_config(H100, kernels=_bucket({"vocab": 1000}, {"block_q": 16})))
    choice = config.choose(H100)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: field 'kernels\.verify\.buckets\[0\]\.config\.block_q'"):
        config.launch_config("verify", {"vocab": 1000}, {"block_v": 4096, "num_warps": 8}, choice=choice)


def test_device_file_name_refuses_a_non_string():
    for bad in (5, None, "  "):
        with pytest.raises(ValueError, match=r"^device_name\b"):
            config.device_file_name(bad)


def test_launch_config_memo_follows_the_choice_and_hands_out_fresh_dicts():
    """launch_config memoises the checked tuned bucket per (kernel, key, default) and config
    choice: another choice gets its own bucket, a bad bucket raises on every call, overrides
    still apply and are checked, and the caller's dict is its own."""
    default = {"block_v": 4096, "num_warps": 8}
    a = config.ConfigChoice(None, "a", {"kernels": {"verify": {"buckets": [{"key": {"vocab": 1000}, "config": {"block_v": 512}}]}}})
    b = config.ConfigChoice(None, "b", {})
    got = config.launch_config("verify", {"vocab": 1000}, default, choice=a)
    assert got == {"block_v": 512, "num_warps": 8}
    got["block_v"] = 1  # the caller's own dict
    assert config.launch_config("verify", {"vocab": 1000}, default, choice=a) == {"block_v": 512, "num_warps": 8}
    assert config.launch_config("verify", {"vocab": 1000}, default, choice=b) == default
    assert config.launch_config("verify", {"vocab": 1000}, default, {"num_warps": 2}, choice=a) == {"block_v": 512, "num_warps": 2}
    with pytest.raises(ValueError, match="config: verify num_warps"):
        config.launch_config("verify", {"vocab": 1000}, default, {"num_warps": 3}, choice=a)
    bad = config.ConfigChoice(None, "bad", {"kernels": {"verify": {"buckets": [{"key": {"vocab": 1000}, "config": {"block_v": 3}}]}}})
    for _ in range(2):
        with pytest.raises(ConfigError, match="block_v"):
            config.launch_config("verify", {"vocab": 1000}, default, choice=bad)
