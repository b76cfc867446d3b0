"""The package's version, read once from its installed metadata (pyproject.toml's `version`)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("pixtral-exl2")
except PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0+unknown"
