"""Exceptions of attnzoo."""

from __future__ import annotations

from collections.abc import Sequence


class UnsupportedError(NotImplementedError):
    """A mechanism was asked for a capability it does not declare.

    The message names the mechanism, the capability, and the mechanisms that do support it.
    """

    def __init__(self, mechanism: str, capability: str, supported_by: Sequence[str] = ()):
        self.mechanism = mechanism
        self.capability = capability
        self.supported_by = tuple(sorted(supported_by))
        who = ", ".join(self.supported_by) if self.supported_by else "no registered mechanism"
        super().__init__(
            f"mechanism {mechanism!r} does not support {capability!r}; "
            f"mechanisms that do: {who} (see `attnzoo list` and `attnzoo info {mechanism}`)"
        )
