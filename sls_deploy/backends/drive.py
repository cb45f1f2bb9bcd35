"""Drive an exported graph through a runner: image, clip and step graphs, told apart by the ExportSpec alone.

A *runner* is Polygraphy's interface: ``activate()``, ``infer(feed_dict) -> {output name: array}``,
``deactivate()`` and ``get_input_metadata()`` ({input: (dtype, shape)}). Polygraphy's ``TrtRunner`` (a TensorRT
engine) and ``OnnxrtRunner`` (ONNX Runtime) both are one, so the same driver runs an engine and its ONNX
reference, and ONNX Runtime can stand in for TensorRT where there is no GPU.

The graph's kind comes from the spec and the input ranks, never from the model:

- **step** graph (``spec.recurrent`` not empty, e.g. StreamVSR's (prev_lr, lr, hidden) -> (sr, hidden_out)):
  run once per frame. The one input not in ``recurrent`` gets frame t. Each recurrent input gets, from the
  second step on, the value the mapping names: an output of step t-1 (hidden <- hidden_out) or an input of step
  t-1 (prev_lr <- lr). At the first step an input fed from an input takes that input's first value (prev_lr =
  the first frame) and one fed from an output takes zeros (the zero hidden state), sized from the runner's
  input metadata, its dynamic dimensions matched to the frame input's by their ``dynamic_axes`` names.
- **clip** graph (first input of rank 5, (N, T, C, H, W)): run on windows of the graph's T frames (T fixed at
  export; a dynamic T runs the whole clip at once). A clip longer than T is covered by consecutive windows; when
  T does not divide it, the last window is the clip's last T frames, of which only the frames not produced yet
  are kept.
- **image** graph (one input of rank 4): ``run_image`` on one batch; ``run_clip`` runs every frame of a clip.

Outputs are copied: runners may reuse their output buffers between ``infer`` calls (Polygraphy's TrtRunner
does), and a step graph's state output is fed back into the same runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from sls_deploy.core.errors import UsageError, ValidationError

IMAGE, CLIP, STEP = "image", "clip", "step"


class Runner(Protocol):
    """What Polygraphy's runners provide (and what a stand-in needs)."""

    def activate(self) -> None: ...

    def infer(self, feed_dict: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]: ...

    def deactivate(self) -> None: ...

    def get_input_metadata(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class InputInfo:
    """One graph input as the runner reports it: numpy dtype, and per dimension an int (fixed) or the dynamic
    dimension's name (ONNX Runtime's "height") or None (TensorRT's -1)."""

    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    def fixed(self, axis: int) -> int | None:
        d = self.shape[axis]
        return d if isinstance(d, int) else None


def _np_dtype(dtype: Any) -> np.dtype:
    """A numpy dtype from Polygraphy's DataType (what its runners report) or anything numpy understands."""
    try:
        from polygraphy.datatype import DataType, DataTypeEntry

        if isinstance(dtype, DataTypeEntry):
            return np.dtype(DataType.to_dtype(dtype, "numpy"))
    except ImportError:  # pragma: no cover - polygraphy is a dependency
        pass
    return np.dtype(dtype)


def _dim(d: Any) -> int | str | None:
    if isinstance(d, (int, np.integer)) and not isinstance(d, bool):
        return int(d) if d >= 0 else None
    return d if isinstance(d, str) else None


def input_info(runner: Runner) -> dict[str, InputInfo]:
    """{input: InputInfo} from ``runner.get_input_metadata()`` (the runner must be active)."""
    try:
        meta = runner.get_input_metadata(use_numpy_dtypes=False)  # Polygraphy: DataType, not the deprecated numpy
    except TypeError:  # a runner whose get_input_metadata takes no arguments
        meta = runner.get_input_metadata()
    return {name: InputInfo(_np_dtype(m.dtype), tuple(_dim(d) for d in (m.shape or ())))
            for name, m in meta.items()}


def graph_kind(spec, info: Mapping[str, InputInfo]) -> str:
    """"step" (recurrent inputs), "clip" (a rank-5 first input) or "image" (one rank-4 input)."""
    if spec.recurrent:
        return STEP
    first = spec.input_names[0]
    if first not in info:
        raise ValidationError(f"the graph has no input '{first}' (inputs: {', '.join(info) or 'none'})")
    if len(spec.input_names) != 1:
        raise UsageError(f"a graph with inputs {', '.join(spec.input_names)} and no recurrent mapping is neither an "
                         "image, a clip nor a step graph")
    rank = info[first].rank
    if rank == 5:
        return CLIP
    if rank == 4:
        return IMAGE
    raise UsageError(f"graph input '{first}' has rank {rank}: expected 4 (N,C,H,W) or 5 (N,T,C,H,W)")


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _infer(runner: Runner, feed: Mapping[str, np.ndarray], info: Mapping[str, InputInfo]) -> dict[str, np.ndarray]:
    """One ``infer`` with every input cast to the graph's dtype (FP16-I/O graphs take float16) and contiguous;
    the outputs copied (the runner may reuse its buffers)."""
    cast = {k: np.ascontiguousarray(v, dtype=info[k].dtype if k in info else v.dtype) for k, v in feed.items()}
    return {k: np.array(v, copy=True) for k, v in runner.infer(cast).items()}


def _output(res: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in res:
        raise ValidationError(f"the graph has no output '{name}' (outputs: {', '.join(res) or 'none'})")
    return np.asarray(res[name], dtype=np.float32)


def run_image(runner: Runner, spec, lr: Any, info: Mapping[str, InputInfo] | None = None) -> np.ndarray:
    """One run of a single-input graph: ``lr`` (a batch) -> its first output as float32."""
    info = input_info(runner) if info is None else info
    return _output(_infer(runner, {spec.input_names[0]: _array(lr)}, info), spec.output_names[0])


def run_clip(runner: Runner, spec, lr_clip: Any, info: Mapping[str, InputInfo] | None = None) -> np.ndarray:
    """An LR clip (N, T, C, h, w) -> the graph's first output per frame, stacked: (N, T, C', H, W) float32."""
    x = _array(lr_clip)
    if x.ndim != 5:
        raise UsageError(f"run_clip takes a clip (N, T, C, H, W), not an array of shape {x.shape}")
    info = input_info(runner) if info is None else info
    kind = graph_kind(spec, info)
    if kind == STEP:
        return _run_steps(runner, spec, x, info)
    if kind == IMAGE:
        return np.stack([run_image(runner, spec, x[:, t], info) for t in range(x.shape[1])], axis=1)
    return _run_windows(runner, spec, x, info)


def _run_windows(runner: Runner, spec, x: np.ndarray, info: Mapping[str, InputInfo]) -> np.ndarray:
    name = spec.input_names[0]
    t, window = x.shape[1], info[name].fixed(1) or x.shape[1]
    if t < window:
        raise ValidationError(f"the clip graph takes {window} frames per run; the clip has only {t}")
    starts = list(range(0, t - window + 1, window))
    if starts[-1] + window < t:
        starts.append(t - window)  # the tail: the last `window` frames, overlapping the previous window
    parts, done = [], 0
    for s in starts:
        out = run_image(runner, spec, x[:, s:s + window], info)
        parts.append(out[:, done - s:])
        done = s + window
    return np.concatenate(parts, axis=1)


def frame_input(spec) -> str:
    """The one input of a step graph that is not fed back (the current frame)."""
    names = [n for n in spec.input_names if n not in spec.recurrent]
    if len(names) != 1:
        raise UsageError(f"a step graph needs exactly one per-frame input, not {names}")
    return names[0]


def _zero_state(name: str, spec, info: Mapping[str, InputInfo], frame_name: str, frame: np.ndarray) -> np.ndarray:
    """Zeros of input ``name``'s shape: fixed dimensions from the runner, dynamic ones from the frame input's
    dimension of the same dynamic-axis name (a hidden state's H/W are the frame's H/W)."""
    if name not in info:
        raise ValidationError(f"the graph has no input '{name}' (inputs: {', '.join(info) or 'none'})")
    by_label = {label: frame.shape[axis] for axis, label in spec.dynamic_axes.get(frame_name, {}).items()}
    for axis, d in enumerate(info[frame_name].shape if frame_name in info else ()):
        if isinstance(d, str):
            by_label.setdefault(d, frame.shape[axis])
    labels = spec.dynamic_axes.get(name, {})
    dims = []
    for axis, d in enumerate(info[name].shape):
        if isinstance(d, int):
            dims.append(d)
            continue
        label = labels.get(axis, d if isinstance(d, str) else None)
        if label not in by_label:
            raise ValidationError(f"cannot size the initial '{name}': its dimension {axis} is dynamic and names no "
                                  f"dynamic axis of '{frame_name}'")
        dims.append(by_label[label])
    return np.zeros(dims, dtype=info[name].dtype)


def initial_state(spec, info: Mapping[str, InputInfo], frame0: np.ndarray) -> dict[str, np.ndarray]:
    """The recurrent inputs at the first step: the named input's first value, or zeros for an output's."""
    frame_name = frame_input(spec)
    state = {}
    for name, src in spec.recurrent.items():
        if src == frame_name:
            state[name] = frame0
        elif src in spec.output_names:
            state[name] = _zero_state(name, spec, info, frame_name, frame0)
        else:
            raise UsageError(f"recurrent input '{name}' is fed from '{src}', which is neither the frame input "
                             f"'{frame_name}' nor an output ({', '.join(spec.output_names)})")
    return state


def _run_steps(runner: Runner, spec, x: np.ndarray, info: Mapping[str, InputInfo]) -> np.ndarray:
    frame_name = frame_input(spec)
    state = initial_state(spec, info, x[:, 0])
    frames = []
    for t in range(x.shape[1]):
        feed = {n: x[:, t] if n == frame_name else state[n] for n in spec.input_names}
        res = _infer(runner, feed, info)
        frames.append(_output(res, spec.output_names[0]))
        state = {n: res[src] if src in res else feed[src] for n, src in spec.recurrent.items()}
    return np.stack(frames, axis=1)


class FrameStream:
    """A video through a graph one frame at a time, in bounded memory: ``push(frame)`` (N, C, h, w) returns the
    SR frames ready so far; ``finish()`` the rest. A step graph gives one frame per frame, its state carried; a
    clip graph of T frames runs every T frames, and at the end once more on the last T frames for a tail shorter
    than T (only the frames not produced yet are returned); an image graph gives one frame per frame."""

    def __init__(self, runner: Runner, spec):
        self.runner, self.spec = runner, spec
        self.info = input_info(runner)
        self.kind = graph_kind(spec, self.info)
        self.window = self.info[spec.input_names[0]].fixed(1) if self.kind == CLIP else None
        self.state: dict[str, np.ndarray] | None = None
        self.pending: list[np.ndarray] = []  # clip graph: frames not run yet
        self.recent: list[np.ndarray] = []  # clip graph: the last T frames (for the tail window)
        self.seen = 0

    def push(self, frame: Any) -> list[np.ndarray]:
        x = _array(frame)
        self.seen += 1
        if self.kind == IMAGE:
            return [run_image(self.runner, self.spec, x, self.info)]
        if self.kind == STEP:
            name = frame_input(self.spec)
            if self.state is None:
                self.state = initial_state(self.spec, self.info, x)
            feed = {n: x if n == name else self.state[n] for n in self.spec.input_names}
            res = _infer(self.runner, feed, self.info)
            self.state = {n: res[src] if src in res else feed[src] for n, src in self.spec.recurrent.items()}
            return [_output(res, self.spec.output_names[0])]
        if self.window is None:
            raise UsageError("a clip graph with a dynamic frame count cannot stream; export it with a fixed T")
        self.pending.append(x)
        self.recent = (self.recent + [x])[-self.window:]
        if len(self.pending) < self.window:
            return []
        out = run_image(self.runner, self.spec, np.stack(self.pending, axis=1), self.info)
        self.pending = []
        return [out[:, t] for t in range(self.window)]

    def finish(self) -> list[np.ndarray]:
        """The frames still owed: a clip graph's tail, run on the video's last T frames."""
        left = len(self.pending)
        if self.kind != CLIP or left == 0:
            return []
        if self.seen < self.window:
            raise ValidationError(f"the clip graph takes {self.window} frames per run; the video has only "
                                  f"{self.seen}")
        out = run_image(self.runner, self.spec, np.stack(self.recent, axis=1), self.info)
        self.pending = []
        return [out[:, t] for t in range(self.window - left, self.window)]


def example_feed(spec, example: Any, info: Mapping[str, InputInfo] | None = None) -> dict[str, np.ndarray]:
    """The adapter's ``example_input`` (one tensor or a tuple, in ``spec.input_names`` order) as a feed dict,
    cast to the graph's input dtypes when ``info`` is given (for timing one graph run)."""
    args: Sequence[Any] = example if isinstance(example, (tuple, list)) else (example,)
    if len(args) != len(spec.input_names):
        raise UsageError(f"the graph has inputs {', '.join(spec.input_names)}, the example {len(args)} tensor(s)")
    feed = {n: _array(a) for n, a in zip(spec.input_names, args)}
    if info:
        feed = {n: np.ascontiguousarray(a, dtype=info[n].dtype if n in info else a.dtype) for n, a in feed.items()}
    return feed


def clip_infer(runner: Runner, spec) -> Callable[[Any], np.ndarray]:
    """``lr_clip -> sr_clip`` over an active runner (its metadata read once)."""
    info = input_info(runner)
    return lambda lr: run_clip(runner, spec, lr, info)


def image_infer(runner: Runner, spec) -> Callable[[Any], np.ndarray]:
    """``lr -> sr`` of an image graph over an active runner (its metadata read once)."""
    info = input_info(runner)
    return lambda lr: run_image(runner, spec, lr, info)
