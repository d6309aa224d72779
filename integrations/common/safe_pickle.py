"""Reading the official pickle formats without running code from the file.

``pickle.load`` executes whatever a file's ``__reduce__`` entries name, so a crafted
``dictionary.pkl`` or CIFAR batch could run arbitrary commands. :func:`restricted_load` admits
only the builtin containers and scalars (``dict``, ``list``, ``tuple``, ``set``, ``str``,
``bytes``, ``int``, ``float``, ``bool``, ``None``: pickle builds these without calling any
global, except ``bytes`` that Python 3 wrote in protocols 0 - 2, rebuilt by a latin1-only
stand-in for ``_codecs.encode``) and, when ``allow_numpy`` is set, numpy's array and scalar
reconstruction (the only callables a CIFAR-10 python batch or a pickled numpy value needs; they
build arrays from raw bytes and call nothing else). Any other global is refused with :class:`UnsafePickleError`,
before it is called.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

# Module-qualified names of the callables that rebuild numpy arrays / dtypes / scalars.
# numpy >= 2 pickles from ``numpy._core``; files written by numpy 1.x name ``numpy.core``.
# Pickle protocol 5 (Python 3.14's default, any Python's ``protocol=5``) stores a contiguous array
# as its raw buffer, rebuilt by ``numeric._frombuffer`` (``np.frombuffer`` and a reshape); older
# protocols by ``multiarray._reconstruct`` and the array's ``__setstate__``.
_NUMPY_GLOBALS = {
    (f"{package}.{module}", name)
    for package in ("numpy.core", "numpy._core")
    for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype")}

# Builtins that some writers emit through find_class (e.g. protocol 0/1 sets, or ``copyreg``'s
# object rebuild of a plain container); they construct containers and call nothing else.
_BUILTIN_GLOBALS = {("builtins", n) for n in ("set", "frozenset", "bytearray", "complex", "slice")} | {
    ("__builtin__", n) for n in ("set", "frozenset", "bytearray", "complex", "slice")}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global this reader does not admit (it is never imported or called)."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 calls it for a ``bytes`` value in protocols 0 - 2 (which have
    no bytes opcode): the string's code points as bytes, and no other codec."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"refused to call _codecs.encode with {encoding!r}: only the latin1 encoding of "
                                "bytes values is allowed in this file")
    return text.encode("latin1")


class _Restricted(pickle.Unpickler):
    def __init__(self, file, *, allow_numpy: bool, encoding: str):
        super().__init__(file, encoding=encoding)
        self.allow_numpy = allow_numpy

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) in _BUILTIN_GLOBALS or (self.allow_numpy and (module, name) in _NUMPY_GLOBALS):
            return super().find_class(module, name)
        raise UnsafePickleError(f"refused to load global {module}.{name}: only builtin containers and scalars"
                                f"{' and numpy arrays' if self.allow_numpy else ''} are allowed in this file")


def restricted_loads(data: bytes, *, allow_numpy: bool = False, encoding: str = "ASCII") -> Any:
    """:func:`pickle.loads` that admits only builtin containers/scalars (and numpy arrays if allowed)."""
    return _Restricted(io.BytesIO(data), allow_numpy=allow_numpy, encoding=encoding).load()


def restricted_load(path: str | os.PathLike, *, allow_numpy: bool = False, encoding: str = "ASCII") -> Any:
    """Load a pickle file with :func:`restricted_loads`. ``encoding="bytes"`` reads Python 2 pickles
    (CIFAR-10 python batches) with byte-string keys."""
    with open(Path(path), "rb") as f:
        return _Restricted(f, allow_numpy=allow_numpy, encoding=encoding).load()
