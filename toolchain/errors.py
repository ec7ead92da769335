"""User-facing failures of apq.

Every failure a user can cause (bad file, unknown target, unreachable board, impossible
constraints) is one of these types. The CLI catches :class:`ApqError` once and prints
``apq: error: <message>`` on one line with exit code 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class ApqError(Exception):
    """Base of all user-facing errors; the message must fit on one line."""

    exit_code: int = 2


class InvalidInputError(ApqError):
    """A file or argument the user passed is missing, unreadable or malformed."""


class UnsupportedModelError(ApqError):
    """The ONNX model cannot be imported (not ONNX, corrupt, or unsupported ops)."""


class UnknownTargetError(ApqError):
    """The target name is not in the registry."""


class ArtifactError(ApqError):
    """A .apq artifact is corrupt, tampered with, unsafe or built for another target."""


class DeviceUnreachableError(ApqError):
    """An RPC tracker, board or emulator cannot be reached."""


class ConstraintError(ApqError):
    """Search constraints that no candidate can satisfy."""


class DatasetError(ApqError):
    """A dataset is missing or not laid out as expected."""
