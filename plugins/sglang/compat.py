"""The SGLang versions tkernels' SGLang hooks were written against (they patch internals by name)."""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version

from tkernels.plugins.compat import require_supported

SUPPORTED_SGLANG = ">=0.5.23,<0.6"


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
    return require_supported("SGLang", version, SUPPORTED_SGLANG,
                             "disable the plugin with SGLANG_PLUGINS set to a list without 'tkernels'")


# The plugin's features (``$TKERNELS_SGLANG``) and its attention backend's name.
ENV_FEATURES = "TKERNELS_SGLANG"
FEATURES = ("budget", "token_recycling")
BACKEND_NAME = "tkernels"


def selected_features() -> tuple[str, ...]:
    """The features named in ``$TKERNELS_SGLANG`` (comma-separated); ValueError on unknown names."""
    names = tuple(n.strip() for n in os.environ.get(ENV_FEATURES, "").split(",") if n.strip())
    unknown = sorted(set(names) - set(FEATURES))
    if unknown:
        raise ValueError(f"${ENV_FEATURES}: unknown features {unknown}; known: {', '.join(FEATURES)}")
    return names
