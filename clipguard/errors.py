"""Exceptions with a one-line message meant for the user.

The CLI turns every :class:`ClipguardError` into that line on stderr and exit code 2.
"""

from __future__ import annotations


class ClipguardError(Exception):
    """Base class: ``str(error)`` is a one-line, user-facing reason."""


class InputError(ClipguardError):
    """Bad user input: a missing path, a folder that is not an image set, a mismatched file."""


class UnsafeModelError(ClipguardError):
    """A checkpoint that clipguard refuses to load because loading it could run code."""


class ModelLoadError(ClipguardError):
    """A checkpoint that is corrupt, truncated, or does not fit the architecture."""


class PluginError(ClipguardError):
    """A plugin that failed to import, registered a duplicate name, or is unknown."""
