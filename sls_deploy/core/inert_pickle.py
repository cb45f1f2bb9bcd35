"""A ``torch.save`` checkpoint whose pickle holds objects, read without running any of its code.

``torch.load(weights_only=True)`` refuses any pickled object; some formats hold objects beside the tensors
(Torch-Pruning's ``tp.state_dict`` pickles every module's ``__dict__``, child modules included). Here such a
pickle is read with an unpickler that never imports a named class or calls a named function: tensors are
rebuilt from the archive's raw storages by this module's own code, a few plain containers are what they say,
and every other class becomes an inert ``Opaque`` record (its name and the data the pickle gave it). So the
tensors and plain values can be taken out, and nothing in the file is ever executed.

``top_level_class`` looks at the pickle's opcodes only (nothing is built) to say whether the whole file is one
pickled object (``torch.save(model)``), which is refused before any reading.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch

from sls_deploy.core.errors import CheckpointError

# storages of the legacy typed classes torch.save names (torch/storage.py), by class name
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_PLAIN = {("collections", "OrderedDict"): collections.OrderedDict, ("builtins", "set"): set,
          ("builtins", "frozenset"): frozenset, ("builtins", "tuple"): tuple, ("builtins", "list"): list,
          ("builtins", "dict"): dict, ("torch", "Size"): torch.Size}
_CONTAINERS = {"collections OrderedDict", "builtins dict"}  # a top-level object that is a state dict


class Opaque:
    """An object of a class that was never imported: ``name`` (module and class, as the pickle says), ``args``
    and ``state`` (what the pickle would have passed to it)."""

    name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Storage:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *_) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("a tensor without storage")
    return torch.as_strided(storage, tuple(size), tuple(stride), int(offset)).clone()


def _rebuild_parameter(data, *_) -> Any:
    return data


_FUNCTIONS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
              ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
              ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter}


class _InertUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol 2's names
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[(module, name)]
        if (module, name) in _PLAIN:
            return _PLAIN[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (Opaque,), {"name": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise pickle.UnpicklingError("an unknown persistent id")
        dtype, key = pid[1].dtype, str(pid[2])
        raw = self.archive.read(f"{self.prefix}data/{key}")
        return torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def _archive(path: Path) -> tuple[zipfile.ZipFile, str]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"cannot read {path}: not a torch.save archive (corrupt, truncated, or the legacy "
                              f"non-zip format?): {e}") from None
    pkl = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pkl:
        raise CheckpointError(f"cannot read {path}: a zip file without the data.pkl of a torch.save archive")
    prefix = pkl[0][: -len("data.pkl")]
    order = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in archive.namelist() else "little"
    if order != "little":
        raise CheckpointError(f"cannot read {path}: a {order[:10]}-endian archive")
    return archive, prefix


def pickle_bytes(path: str | os.PathLike) -> bytes:
    """The pickle of a ``torch.save`` archive (one-line CheckpointError if the file is none)."""
    archive, prefix = _archive(Path(path))
    with archive:
        return archive.read(prefix + "data.pkl")


def top_level_class(data: bytes) -> str | None:
    """The class of the pickle's top-level object when it is an object ("module.Class"), else None (a dict,
    list, ...): read from the opcodes alone, nothing built. Raises ValueError on a malformed pickle."""
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                continue
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                strings.append(str(arg))
                continue
            if op.name == "GLOBAL":
                name = str(arg)
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = f"{strings[-2]} {strings[-1]}"
            else:
                return None
            return None if name in _CONTAINERS else name.replace(" ", ".")
    except Exception as e:  # pickletools raises ValueError and others on a malformed stream
        raise ValueError(str(e) or type(e).__name__) from None
    return None


def load_inert(path: str | os.PathLike) -> Any:
    """The archive's object, objects of named classes as ``Opaque`` records (see the module's docstring)."""
    path = Path(path)
    archive, prefix = _archive(path)
    with archive:
        try:
            return _InertUnpickler(archive.read(prefix + "data.pkl"), archive, prefix).load()
        except Exception as e:  # a malformed pickle raises many types; all mean the same to a user
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot read {path}: a malformed torch.save archive ({first})") from None
