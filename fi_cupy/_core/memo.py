"""Pure functions of plain arguments, memoised: plan() runs every decode step with the same options, and
checking them again costs more than a dict lookup."""
from __future__ import annotations

import functools

import numpy as np

_immutable: dict = {int: True, float: True, bool: True, str: True, bytes: True, type(None): True}
_known: set = set(_immutable)  # the types found immutable so far: one C-level superset test a call


def _is_immutable(t: type) -> bool:
    """Whether values of type t never change once made: the scalars above, numpy scalars and dtypes,
    torch dtypes and frozen dataclasses (ours: DType, TileShape, AttentionVariant)."""
    got = _immutable.get(t)
    if got is None:
        params = getattr(t, "__dataclass_params__", None)
        got = _immutable[t] = bool(params is not None and params.frozen or issubclass(t, (np.generic, np.dtype))
                                   or (t.__module__ == "torch" and t.__name__ == "dtype"))
        if got:
            _known.add(t)
    return got


def of_plain_args(fn, size: int = 256):
    """fn memoised for calls whose arguments are all immutable values (_is_immutable), keyed by value and
    type (so True is not 1); any other call (a 0-d tensor given as a scale, a list) runs fn. An exception
    is raised again each call, never remembered. The cache is emptied when full."""
    cache: dict = {}

    @functools.wraps(fn)
    def memoised(*args, **kw):
        values = args + tuple(kw.values()) if kw else args
        types = tuple(map(type, values))
        if not _known.issuperset(types) and not all(map(_is_immutable, types)):
            return fn(*args, **kw)
        key = (values, types, tuple(kw)) if kw else (values, types)
        try:
            return cache[key]
        except KeyError:
            pass
        except TypeError:  # a frozen dataclass holding something unhashable
            return fn(*args, **kw)
        got = fn(*args, **kw)
        if len(cache) >= size:
            cache.clear()
        cache[key] = got
        return got

    memoised.cache_clear = cache.clear
    return memoised
