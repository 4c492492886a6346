"""Pages of the paged KV cache: a free list, handed out and taken back as requests grow and finish."""
from __future__ import annotations


class OutOfPagesError(RuntimeError):
    """More KV pages were asked for than are free."""


class PageAllocator:
    """Pages 0 .. num_pages - 1; the first `reserved` are never handed out (page 0 holds the rows of
    the padding requests that fill a CUDA graph's fixed batch)."""

    def __init__(self, num_pages: int, reserved: int = 1):
        if num_pages <= reserved:
            raise ValueError(f"num_pages ({num_pages}) must exceed the {reserved} reserved page(s)")
        self.num_pages, self.reserved = num_pages, reserved
        self._free = list(range(num_pages - 1, reserved - 1, -1))  # pop() gives the lowest page first
        self._used: set = set()
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def capacity(self) -> int:
        return self.num_pages - self.reserved

    def allocate(self, n: int) -> list:
        if n < 0:
            raise ValueError(f"allocate: n must be >= 0, got {n}")
        if n > len(self._free):
            raise OutOfPagesError(f"KV cache exhausted: {n} page(s) asked for, {len(self._free)} of "
                                  f"{self.capacity} free; lower --max-batch or raise the cache size")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        self.peak_used = max(self.peak_used, len(self._used))
        return pages

    def free(self, pages) -> None:
        for p in pages:
            if p not in self._used:
                raise ValueError(f"free: page {p} is not allocated")
            self._used.remove(p)
            self._free.append(p)


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)
