"""A growable key/value cache for decoding.

Keys and values live in buffers with spare capacity that doubles when full, so appending ``T`` tokens
one at a time costs ``O(T)`` copies in total rather than the ``O(T^2)`` of re-concatenating. The cache
stays grouped-query shaped: ``(B, H_kv, length, D)``.
"""

from __future__ import annotations

from torch import Tensor


class KVCache:
    """Keys ``(B, H_kv, T, D)`` and values ``(B, H_kv, T, Dv)``; ``window`` keeps only the last tokens."""

    def __init__(self, window: int | None = None) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self._start = 0
        self._end = 0
        #: tokens seen in total (positions), even those a window has dropped
        self.seen = 0

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def keys(self) -> Tensor:
        if self._k is None:
            raise RuntimeError("the cache is empty")
        return self._k[:, :, self._start : self._end]

    @property
    def values(self) -> Tensor:
        if self._v is None:
            raise RuntimeError("the cache is empty")
        return self._v[:, :, self._start : self._end]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k (B, H_kv, T, D)``, ``v (B, H_kv, T, Dv)``; returns the cached keys and values."""
        t = k.shape[2]
        if self._k is None:
            cap = max(16, 2 * t) if self.window is None else max(2 * self.window, t + self.window)
            self._k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            self._v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
        assert self._v is not None
        if self._end + t > self._k.shape[2]:
            keep = len(self) if self.window is None else min(len(self), self.window)
            live_k = self._k[:, :, self._end - keep : self._end]
            live_v = self._v[:, :, self._end - keep : self._end]
            cap = max(2 * (keep + t), 16) if self.window is None else max(2 * self.window, keep + t + self.window)
            new_k = k.new_empty(k.shape[0], k.shape[1], cap, k.shape[3])
            new_v = v.new_empty(v.shape[0], v.shape[1], cap, v.shape[3])
            new_k[:, :, :keep] = live_k
            new_v[:, :, :keep] = live_v
            self._k, self._v, self._start, self._end = new_k, new_v, 0, keep
        self._k[:, :, self._end : self._end + t] = k
        self._v[:, :, self._end : self._end + t] = v
        self._end += t
        self.seen += t
        if self.window is not None and len(self) > self.window:
            self._start = self._end - self.window
        return self.keys, self.values

    def nbytes(self) -> int:
        """Bytes held by the live part of the cache."""
        if self._k is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
