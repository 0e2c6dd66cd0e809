"""Per-GPU configuration files: naming, lookup, validation.

A config file is JSON named after the device the way vLLM names its tuned configs: the CUDA
device name with spaces replaced by ``_`` (``NVIDIA_H100_80GB_HBM3.json``; every H200 variant
is ``NVIDIA_H200.json``). Lookup order for the running device:

1. ``$TKERNELS_CONFIG_DIR/<name>.json`` (override folder, e.g. the output of ``tkernels autotune``);
2. ``tkernels/configs/<name>.json`` shipped inside the package;
3. fallback: the shipped config of the nearest known GPU by SM count (then memory size),
   else no file and the built-in safe defaults. A fallback logs one warning per process.

A file that exists but is malformed, holds a wrong value or has another ``schema_version``
raises :class:`ConfigError` naming the file and the field, when it is loaded: a wrong config is
never used silently. Values checked at load: every number finite (Python's JSON reader takes
NaN and Infinity); ``sm_count`` a positive integer, ``total_memory_gb`` >= 0; every kernel
bucket's ``key`` values positive numbers and its ``config`` values launch parameters (positive
integers, ``*block*`` sizes powers of two, ``num_warps`` a power of two <= 32, the rule
:func:`launch_config` applies to a caller's override); ``budgets.default_tokens`` a positive
integer. A bucket naming a parameter its kernel does not have is reported (file and field) by
the launcher that reads it, the first place that knows the kernel's parameters.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("tkernels")

SCHEMA_VERSION = 1
ENV_CONFIG_DIR = "TKERNELS_CONFIG_DIR"
SHIPPED_DIR = Path(__file__).resolve().parent / "configs"

# Required top-level fields and their JSON types. Sections written by `tkernels autotune`.
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "device": str,
    "is_gpu": bool,
    "sm_count": int,
    "total_memory_gb": (int, float),
    "versions": dict,
    "date": str,
    "kernels": dict,
    "latency_model": dict,
    "budgets": dict,
    "tree_budgets": dict,
}


class ConfigError(ValueError):
    """A per-GPU config file is malformed or of an unsupported schema version."""


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    sm_count: int
    total_memory_gb: float
    is_gpu: bool


@dataclass
class ConfigChoice:
    """Which config applies to a device and why (shown by ``tkernels info``)."""

    path: Path | None
    reason: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def is_fallback(self) -> bool:
        return self.path is None or not self.reason.startswith(("override", "shipped"))


def device_file_name(device_name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` → ``"NVIDIA_H100_80GB_HBM3"`` (vLLM's convention)."""
    if not isinstance(device_name, str) or not device_name.strip():
        raise ValueError(f"device_name: must be a non-empty device name, got {device_name!r}")
    name = device_name.strip().replace(" ", "_")
    # vLLM folds every H200 variant (NVIDIA H200, H200 NVL, ...) into one file name.
    if "H200" in name:
        name = "NVIDIA_H200"
    return name


def detect_device() -> DeviceInfo:
    """The current CUDA device (device 0), or a CPU description when there is none."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return DeviceInfo(props.name, props.multi_processor_count, props.total_memory / 2**30, True)
    return DeviceInfo("cpu", os.cpu_count() or 1, 0.0, False)


def validate(data: Any, path: Path | str) -> dict[str, Any]:
    """Check the schema of a loaded config; raise :class:`ConfigError` naming file and field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key, typ in _FIELDS.items():
        if key not in data:
            raise ConfigError(f"{path}: missing field '{key}'")
        value = data[key]
        # bool is an int subclass: keep numeric fields from accepting true/false.
        if not isinstance(value, typ) or (typ is not bool and isinstance(value, bool)):
            raise ConfigError(f"{path}: field '{key}' must be {_type_name(typ)}, got {value!r}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ConfigError(
            f"{path}: field 'schema_version' is {data['schema_version']}, this tkernels reads "
            f"version {SCHEMA_VERSION} (re-run `tkernels autotune` to regenerate the file)"
        )
    if data["sm_count"] < 1:
        raise ConfigError(f"{path}: field 'sm_count' must be a positive integer, got {data['sm_count']!r}")
    if not (math.isfinite(data["total_memory_gb"]) and data["total_memory_gb"] >= 0):
        raise ConfigError(f"{path}: field 'total_memory_gb' must be a finite number >= 0, got {data['total_memory_gb']!r}")
    for kernel, entry in data["kernels"].items():
        buckets = entry.get("buckets") if isinstance(entry, dict) else None
        if not isinstance(buckets, list) or not all(
            isinstance(b, dict) and isinstance(b.get("key"), dict) and isinstance(b.get("config"), dict)
            for b in buckets
        ):
            raise ConfigError(
                f"{path}: field 'kernels.{kernel}.buckets' must be a list of "
                "{{\"key\": {{...}}, \"config\": {{...}}}} objects"
            )
        for i, bucket in enumerate(buckets):
            field_ = f"kernels.{kernel}.buckets[{i}]"
            for name, value in bucket["key"].items():
                if not _is_number(value) or not (math.isfinite(value) and value > 0):
                    raise ConfigError(f"{path}: field '{field_}.key.{name}' must be a positive number (a shape size), got {value!r}")
            for name, value in bucket["config"].items():
                problem = _launch_param_problem(name, value)
                if problem:
                    raise ConfigError(f"{path}: field '{field_}.config.{name}' {problem}")
    budget = data["budgets"].get("default_tokens")
    if budget is not None and (type(budget) is not int or budget < 1):
        raise ConfigError(f"{path}: field 'budgets.default_tokens' must be a positive integer, got {budget!r}")
    _check_finite(data, path, "")
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_finite(value: Any, path: Path | str, field_: str) -> None:
    """Every number under ``value`` finite; the first that is not is named by its dotted field."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, path, f"{field_}.{key}" if field_ else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_finite(item, path, f"{field_}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: field '{field_}' must be a finite number, got {value!r}")


def load(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    return validate(data, path)


def _type_name(typ: type | tuple[type, ...]) -> str:
    types = typ if isinstance(typ, tuple) else (typ,)
    return " or ".join({"int": "an integer", "float": "a number", "str": "a string",
                        "bool": "true/false", "dict": "an object"}[t.__name__] for t in types)


def _shipped() -> list[Path]:
    return sorted(SHIPPED_DIR.glob("*.json"))


_warned: set[str] = set()


def choose(device: DeviceInfo | None = None) -> ConfigChoice:
    """Pick the config for ``device`` (default: the running one), following the module docstring."""
    device = device or detect_device()
    name = device_file_name(device.name)
    override = os.environ.get(ENV_CONFIG_DIR)
    if override:
        candidate = Path(override) / f"{name}.json"
        if candidate.is_file():
            return ConfigChoice(candidate, f"override: ${ENV_CONFIG_DIR} holds {candidate.name}", load(candidate))
    candidate = SHIPPED_DIR / f"{name}.json"
    if candidate.is_file():
        return ConfigChoice(candidate, f"shipped: tkernels/configs/{candidate.name}", load(candidate))

    choice = _nearest_shipped(device) if device.is_gpu else None
    if choice is None:
        choice = ConfigChoice(None, f"fallback: no config for '{name}'; built-in safe defaults")
    if name not in _warned:
        _warned.add(name)
        hint = " (run `tkernels autotune` on this GPU for a tuned config)" if device.is_gpu else ""
        logger.warning("tkernels: %s%s", choice.reason, hint)
    return choice


def _nearest_shipped(device: DeviceInfo) -> ConfigChoice | None:
    best = None
    for path in _shipped():
        data = load(path)
        if not data["is_gpu"]:
            continue
        distance = (abs(data["sm_count"] - device.sm_count), abs(data["total_memory_gb"] - device.total_memory_gb))
        if best is None or distance < best[0]:
            best = (distance, path, data)
    if best is None:
        return None
    _, path, data = best
    return ConfigChoice(
        path, f"fallback: no config for '{device_file_name(device.name)}'; nearest known GPU by SM count is {path.name}", data
    )


@functools.lru_cache(maxsize=4)
def _current(override_dir: str | None) -> ConfigChoice:
    return choose()


def current() -> ConfigChoice:
    """The running device's config, read once per process (per value of the override folder)."""
    return _current(os.environ.get(ENV_CONFIG_DIR))


def _nearest_bucket(kernel: str, key: dict[str, float], choice: ConfigChoice) -> tuple[dict[str, Any], str]:
    """The tuned parameters of ``kernel``'s bucket nearest to ``key`` and its field name
    (``({}, "")`` without one). Nearness is the sum of |log2| distances over the bucket's numeric
    keys, so a bucket tuned for 4096 keys serves 3000 better than one tuned for 512."""
    buckets = choice.data.get("kernels", {}).get(kernel, {}).get("buckets", [])
    best, best_distance = ({}, ""), math.inf
    for i, bucket in enumerate(buckets):
        shared = [k for k in key if k in bucket["key"]]
        if not shared:
            continue
        distance = sum(abs(math.log2(max(key[k], 1)) - math.log2(max(bucket["key"][k], 1))) for k in shared)
        if distance < best_distance:
            best, best_distance = (bucket["config"], f"kernels.{kernel}.buckets[{i}].config"), distance
    return best


def kernel_config(kernel: str, key: dict[str, float], default: dict[str, Any], choice: ConfigChoice | None = None) -> dict[str, Any]:
    """Tuned launch parameters of ``kernel`` for the nearest shape bucket, else ``default``
    (nearness: see :func:`_nearest_bucket`)."""
    tuned, _ = _nearest_bucket(kernel, key, choice or current())
    return {**default, **tuned}


_WARPS = (1, 2, 4, 8, 16, 32)


def _launch_param_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is no launch parameter ``name`` (None if it is one): the one rule for files
    (:func:`validate`) and callers (:func:`launch_config`)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return f"must be a positive integer, got {value!r}"
    if "block" in name.lower() and value & (value - 1):
        return f"must be a power of two, got {value}"
    if name == "num_warps" and value not in _WARPS:
        return f"must be a power of two <= 32, got {value}"
    return None


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for host code (the smallest power of two >= ``n``; 0 for
    ``n <= 0``, as Triton's): Triton's is a constexpr function, ~2 us a call outside a kernel,
    and a launcher computes several per launch."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``triton.cdiv`` for host code (see :func:`next_power_of_2`): ``ceil(a / b)``."""
    return -(-a // b)


# launch_config's checked tuned bucket per (kernel, key, default), with the config choice it came
# from (a hit only for that same choice object): launchers ask every call, for few shapes.
_TUNED: dict[tuple, tuple[ConfigChoice, dict[str, Any]]] = {}
_TUNED_SIZE = 256


def launch_config(kernel: str, key: dict[str, float], default: dict[str, Any], override: dict | None = None,
                  choice: ConfigChoice | None = None) -> dict[str, Any]:
    """A kernel launcher's parameters: ``override`` (a caller's, e.g. autotune's candidate) over
    the GPU's tuned bucket (:func:`kernel_config`; ``choice``, default: the current GPU's) over
    ``default``, checked: only ``default``'s keys, integer values, ``*block*`` sizes powers of
    two, ``num_warps`` in 1..32 (a power of two). A bad override raises
    ``ValueError("config: ...")``; a bad tuned bucket :class:`ConfigError` naming its file and field."""
    choice = choice or current()
    memo = (kernel, tuple(key.items()), tuple(default.items()))
    try:
        hit = _TUNED.get(memo)
    except TypeError:  # unhashable values: not memoised
        memo = hit = None
    if hit is not None and hit[0] is choice:
        tuned = hit[1]
    else:
        tuned, field_ = _nearest_bucket(kernel, key, choice)
        for name, value in tuned.items():
            problem = None if name in default else f"is not a launch parameter of {kernel} (known: {sorted(default)})"
            problem = problem or _launch_param_problem(name, value)
            if problem:
                raise ConfigError(f"{choice.path}: field '{field_}.{name}' {problem}")
        if memo is not None:
            if len(_TUNED) >= _TUNED_SIZE:
                _TUNED.clear()
            _TUNED[memo] = (choice, dict(tuned))
    if not override:
        return {**default, **tuned}
    unknown = set(override) - set(default)
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)} for {kernel} (known: {sorted(default)})")
    for name, value in override.items():
        problem = _launch_param_problem(name, value)
        if problem:
            raise ValueError(f"config: {kernel} {name} {problem}")
    return {**default, **tuned, **override}
