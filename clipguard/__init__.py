"""clipguard: audit CLIP models for backdoors and purify them with class-wise prompts."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clipguard")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"
