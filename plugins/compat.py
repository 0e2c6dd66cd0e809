"""Version guards shared by the server adapters: they patch internals by name, so each adapter
states the release range it was written against and refuses others loudly."""

from __future__ import annotations

import re


def release(version: str, server: str) -> tuple[int, int, int]:
    """(major, minor, patch) of '0.5.23', '0.5.23.post1', '0.33.1+cu130', '0.6'."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise RuntimeError(f"tkernels: cannot parse the {server} version {version!r}")
    major, minor, patch = match.groups(default="0")
    return int(major), int(minor), int(patch)


def require_supported(server: str, version: str, supported: str, disable_hint: str) -> str:
    """Return ``version`` if it lies in ``supported`` (``">=A.B[.C],<D.E[.F]"``), else raise."""
    low, high = (release(bound.lstrip("<>="), server) for bound in supported.split(","))
    if not low <= release(version, server) < high:
        raise RuntimeError(
            f"tkernels: {server} {version} is not supported by this tkernels release "
            f"(supported: {server.lower()}{supported}); the internals tkernels' {server} adapters patch may have "
            f"moved. Install a supported {server} or {disable_hint}."
        )
    return version
