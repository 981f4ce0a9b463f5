"""The installed release's version (one lookup for `--version` and the build_info metrics)."""

from __future__ import annotations


def release() -> str | None:
    """The edgetune package's version, or None when the project is not installed (run scripts/install)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgetune")
    except PackageNotFoundError:
        return None
