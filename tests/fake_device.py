"""A fake accelerator for CPU tests: tensors that say they live on another device and hold real CPU data.

``to_fake(model)`` puts a model's parameters and buffers there. While ``FakeDevice()`` (a dispatch mode) is active
every op is checked as a GPU would check it: a fake tensor meeting an ordinary CPU tensor of one or more
dimensions raises "device mismatch" (0-dim CPU tensors mix freely, as CPU scalars do with CUDA tensors; copies
and ``.to()`` cross devices; CPU index tensors may index, as on CUDA). Factories asked for the fake device
(``torch.zeros(n, device=model_device(model))``) and ``.to(that device)`` make fake tensors; ``.cpu()`` gives an
ordinary one, and ``.numpy()`` of a fake tensor fails as it does on CUDA. Everything computes real values on the
CPU, so a whole training step runs, and code that hard-codes ``torch.zeros(n)`` next to the model's tensors fails
here exactly where it would fail on a GPU.

The fake tensors report device ``meta`` (autograd runs meta work on the calling thread, as CPU work). Inside the
mode ``.to("meta")`` therefore means the fake device, so ``pruning.macs`` counts MACs by a real forward pass.
"""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

FAKE = torch.device("meta")
aten = torch.ops.aten
CROSS = {aten.copy_.default, aten._to_copy.default, aten.copy.default, aten._copy_from.default,
         aten._copy_from_and_resize.default}
INDEXED = {aten.index.Tensor: "indices", aten.index_put_.default: "indices", aten.index_put.default: "indices",
           aten._index_put_impl_.default: "indices"}


class DeviceMismatch(RuntimeError):
    pass


class FakeTensor(torch.Tensor):
    """A CPU tensor (``elem``) that reports the fake device."""

    @staticmethod
    def __new__(cls, elem, requires_grad=None):
        if isinstance(elem, FakeTensor):  # nn.Parameter's deepcopy calls type(param)(data, requires_grad)
            elem = elem.elem
        r = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=FAKE,
            requires_grad=elem.requires_grad if requires_grad is None else requires_grad)
        r.elem = elem
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self):
        return f"FakeTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _to_fake_device(kwargs) -> bool:
    d = kwargs.get("device")
    return d is not None and torch.device(d).type == FAKE.type


def _plain(t):
    return t.elem if isinstance(t, FakeTensor) else t


def _run(func, args, kwargs):
    tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    fake = any(isinstance(t, FakeTensor) for t in tensors)
    if fake and func not in CROSS:
        checked = tensors
        if func in INDEXED:  # CPU index tensors are accepted on CUDA too
            idx = args[1] if len(args) > 1 else kwargs.get(INDEXED[func])
            skip = {id(t) for t in pytree.tree_leaves(idx) if isinstance(t, torch.Tensor)}
            checked = [t for t in tensors if id(t) not in skip]
        bad = [t for t in checked if not isinstance(t, FakeTensor) and t.dim() > 0]
        if bad:
            raise DeviceMismatch(f"device mismatch in {func}: a {tuple(bad[0].shape)} tensor on {bad[0].device} meets "
                                 f"tensors on the model's device ({FAKE})")
    to_fake = _to_fake_device(kwargs)
    if to_fake:
        kwargs = {**kwargs, "device": torch.device("cpu")}
    out = func(*pytree.tree_map(_plain, args), **pytree.tree_map(_plain, kwargs))
    if func is aten._to_copy.default and "device" in kwargs and not to_fake:
        return out  # .to(cpu) / .cpu(): an ordinary tensor
    if func._schema.name.endswith("_") and args and isinstance(args[0], FakeTensor):
        return args[0]  # in place: the same tensor object
    if "out" in kwargs and isinstance(kwargs["out"], FakeTensor):
        return kwargs["out"]
    if fake or to_fake:
        return pytree.tree_map(lambda t: FakeTensor(t) if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor)
                               else t, out)
    return out


class FakeDevice(TorchDispatchMode):
    """Every op of the block runs through the checks above (factories included). ``torch.tensor`` and
    ``torch.as_tensor`` with ``device=`` the fake device build their data on the CPU first (they allocate below
    the dispatch modes, which would give an empty real meta tensor)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})

    def __enter__(self):
        self._saved = torch.tensor, torch.as_tensor
        for name, real in zip(("tensor", "as_tensor"), self._saved):
            setattr(torch, name, _building_on_cpu(real))
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor, torch.as_tensor = self._saved
        return super().__exit__(*exc)


def _building_on_cpu(real):
    def make(data, *args, device=None, **kwargs):
        if device is not None and torch.device(device).type == FAKE.type:
            if isinstance(data, FakeTensor):
                return data if kwargs.get("dtype") in (None, data.dtype) else data.to(kwargs["dtype"])
            return real(data, *args, **kwargs).to(FAKE)
        return real(data, *args, device=device, **kwargs)

    return make


def to_fake(model: torch.nn.Module) -> torch.nn.Module:
    """The model's parameters and buffers on the fake device (in place; returns the model)."""
    return model._apply(lambda t: t if isinstance(t, FakeTensor) else FakeTensor(t))


def is_fake(t) -> bool:
    return isinstance(t, FakeTensor)
