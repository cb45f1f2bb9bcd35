"""Training batches from a ``torch.utils.data`` pipeline: drawn in the main process, made in worker processes.

Every batch is *drawn* in the main process from one seeded ``torch.Generator`` (which images, where, which
flip, which kernel seed: a few integers), and only that description goes to a worker, which decodes the
pixels, crops, augments and degrades them (``build``). What a worker returns depends on the description alone,
never on the worker's own RNG, on how many workers there are or on which one ran it; so a seed gives the same
batches with 0 or 8 workers. The stream's ``state`` is the generator's state after the last batch handed out
(batches drawn ahead for prefetching do not count), so a checkpoint taken at step k resumes at exactly the
batch k+1 of an uninterrupted run.

Nothing but the descriptions and the batches in flight lives in the main process; a worker holds one decoded
image (or clip window) at a time plus a byte-bounded cache (``DecodedCache``) that keeps small data sets
decoded (the shipped photos) and is just a bounded LRU on large ones.
"""

from __future__ import annotations

import os
import signal
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from sls_deploy.core.errors import DataError

DECODED_CACHE_BYTES = 512 * 2**20  # decoded pixels kept, in all the processes of one stream together
MAX_AUTO_WORKERS = 4
Spec = Any  # what ``draw`` returns and ``build`` takes: picklable, small


class DecodedCache:
    """Decoded arrays by key, least recently used first out once they hold more than ``limit`` bytes; an
    array larger than the limit is not kept."""

    def __init__(self, limit: int = DECODED_CACHE_BYTES):
        self.limit = int(limit)
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, key: Hashable, load: Callable[[], np.ndarray]) -> np.ndarray:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = load()
        if 0 < value.nbytes <= self.limit:
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.limit:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.nbytes
        return value

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __getstate__(self):  # a worker started by spawn starts empty
        return {"limit": self.limit}

    def __setstate__(self, state):
        self.__init__(state["limit"])


def resolve_workers(setting: int | str | None, decoded_bytes: int) -> int:
    """Worker processes for a data set whose decoded pixels take ``decoded_bytes``: an int is used as is;
    ``auto`` (or None) is 0 (decode in the training process, the cache holds everything) when the set fits
    the decoded cache, else one per spare core of this process's share of the machine, at most 4."""
    if setting is None or setting == "auto":
        if decoded_bytes <= DECODED_CACHE_BYTES:
            return 0
        share = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        return max(1, min(MAX_AUTO_WORKERS, share - 1))
    try:
        n = int(setting)
    except (TypeError, ValueError):
        raise DataError(f"data workers must be 'auto' or a count >= 0, not {str(setting)[:20]!r}") from None
    if n < 0 or n > 256:
        raise DataError(f"data workers must be 'auto' or a count 0..256, not {n}")
    return n


class _Described(Dataset):
    """Map-style dataset whose index *is* the batch: (description, generator state after it)."""

    def __init__(self, build: Callable[[Spec], tuple[torch.Tensor, torch.Tensor]]):
        self.build = build

    def __getitem__(self, item):
        spec, state = item
        try:
            lr, hr = self.build(spec)
        except DataError as e:  # carried back as a value: the main process raises it as one line
            return {"error": str(e), "state": state}
        return {"lr": lr, "hr": hr, "state": state}

    def __len__(self) -> int:  # never asked for: the index stream is endless
        raise TypeError("an endless stream of batches has no length")


class _Descriptions:
    """The endless index stream: each batch's description drawn from a generator started at ``state``."""

    def __init__(self, draw: Callable[[torch.Generator], Spec], state: torch.Tensor):
        self.draw, self.state = draw, state

    def __iter__(self) -> Iterator[tuple[Spec, torch.Tensor]]:
        g = torch.Generator()
        g.set_state(self.state.clone())
        while True:
            spec = self.draw(g)
            yield spec, g.get_state()


def _worker_start(worker_id: int) -> None:
    """Ctrl-C belongs to the training process (it saves a checkpoint and stops the workers); the decoded
    cache is shared out between the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    info = get_worker_info()
    cache = getattr(getattr(info.dataset, "build", None), "cache", None)
    if isinstance(cache, DecodedCache):
        cache.limit = cache.limit // max(1, info.num_workers)


class BatchStream:
    """Batches ``build(draw(generator))``, made by ``workers`` worker processes (0: in this process), in
    draw order; ``state``/``set_state`` give and take the generator state after the last batch handed out."""

    def __init__(self, draw: Callable[[torch.Generator], Spec], build: Callable[[Spec], tuple[torch.Tensor, torch.Tensor]],
                 seed: int, workers: int = 0):
        self.draw, self.build, self.workers = draw, build, int(workers)
        self._state = torch.Generator().manual_seed(seed).get_state()
        self._iter: Iterator | None = None
        self.pin_memory = False

    def state(self) -> torch.Tensor:
        return self._state.clone()

    def set_state(self, state: torch.Tensor) -> None:
        self.close()
        self._state = state.clone()

    def use_device(self, device: torch.device | str) -> None:
        """Pin the batches' memory when the model trains on CUDA (faster copies); nothing on other devices."""
        pin = torch.device(device).type == "cuda"
        if pin != self.pin_memory:
            self.close()  # the next batch starts a loader with the new setting, from the same state
            self.pin_memory = pin

    def _start(self) -> Iterator:
        w = self.workers
        loader = DataLoader(_Described(self.build), batch_size=None, sampler=_Descriptions(self.draw, self._state),
                            num_workers=w, pin_memory=self.pin_memory, collate_fn=_identity,
                            worker_init_fn=_worker_start if w else None, prefetch_factor=2 if w else None,
                            generator=torch.Generator().manual_seed(0))  # the global RNG is never touched
        return iter(loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None:
            self._iter = self._start()
        try:
            item = next(self._iter)
        except RuntimeError as e:  # a worker killed (out of memory, a signal): the loader cannot go on
            self.close()
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if "DataLoader worker" in first:
                raise DataError(f"a data loader worker stopped: {first[:200]} (fewer data.workers in the recipe "
                                "need less memory)") from None
            raise
        except BaseException:
            self.close()
            raise
        if "error" in item:
            self.close()
            raise DataError(item["error"])
        self._state = item["state"]
        return item["lr"], item["hr"]

    def close(self) -> None:
        """Stop the workers (dropping the loader's iterator shuts them down); the state is kept."""
        self._iter = None

    def __del__(self):
        self.close()


def _identity(x):
    return x


class _Mapped(Dataset):
    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def __getitem__(self, item):
        try:
            return {"value": self.fn(item)}
        except DataError as e:
            return {"error": str(e)}

    def __len__(self) -> int:
        raise TypeError("items come from the sampler")


def ordered_map(fn: Callable[[Any], Any], items: list, workers: int = 0) -> Iterator[Any]:
    """``fn(item)`` for every item, in order, computed by ``workers`` loader processes (0: here); a DataError
    raised by ``fn`` in a worker is raised here with its one-line message."""
    loader = DataLoader(_Mapped(fn), batch_size=None, sampler=items, num_workers=workers, collate_fn=_identity,
                        worker_init_fn=_worker_start if workers else None, prefetch_factor=2 if workers else None,
                        generator=torch.Generator().manual_seed(0))
    for out in loader:
        if "error" in out:
            raise DataError(out["error"])
        yield out["value"]
