"""The SGLang versions tkernels' SGLang hooks were written against (they patch internals by name)."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version as installed_version

SUPPORTED_SGLANG = ">=0.5.23,<0.6"


def _release(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of '0.5.23', '0.5.23.post1', '0.5.24rc0', '0.6'."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise RuntimeError(f"tkernels: cannot parse the SGLang version {version!r}")
    major, minor, patch = match.groups(default="0")
    return int(major), int(minor), int(patch)


def require_supported_sglang(version: str | None = None) -> str:
    """Return SGLang's version, or raise a clear RuntimeError outside the supported range.

    Call it before registering any hook. The version comes from the package metadata, so this
    does not import SGLang (tens of seconds).
    """
    if version is None:
        try:
            version = installed_version("sglang")
        except PackageNotFoundError:
            raise RuntimeError(
                f"tkernels: SGLang is not installed (tkernels' SGLang hooks need sglang{SUPPORTED_SGLANG})"
            ) from None
    low, high = (_release(bound.lstrip("<>=")) for bound in SUPPORTED_SGLANG.split(","))
    if not low <= _release(version) < high:
        raise RuntimeError(
            f"tkernels: SGLang {version} is not supported by this tkernels release "
            f"(supported: sglang{SUPPORTED_SGLANG}); the scheduler/attention/speculation internals "
            "its hooks patch may have moved. Install a supported SGLang or disable the plugin "
            "with SGLANG_PLUGINS set to a list without 'tkernels'."
        )
    return version
