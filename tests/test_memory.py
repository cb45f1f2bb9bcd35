"""Memory handed back by validate's ONNX Runtime sessions: the latency sessions' shared arena once the timing is
done, the check sessions' arena after every run. Outputs stay those of a plain session."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sls_deploy.backends.sessions import ShrinkingSession, release_shared_arena, timed_session

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript-exporter notice

# one 64-channel activation at 512x512: a 64 MiB buffer, above glibc's largest mmap threshold (32 MiB), so the
# arena region that holds it goes back to the OS as soon as the arena frees it
BIG = (1, 3, 512, 512)
FREED_MB = 48


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(64, 3, 3, padding=1)).eval()
    paths = []
    for i in range(2):
        path = tmp_path_factory.mktemp("arena") / f"g{i}.onnx"
        torch.onnx.export(net, (torch.rand(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["lr"], output_names=["sr"], dynamic_axes={"lr": {2: "h", 3: "w"}})
        paths.append(path)
    return paths


def _feeds():
    rng = np.random.default_rng(0)
    return ({"lr": rng.random(BIG, dtype=np.float32)}, {"lr": rng.random((1, 3, 16, 16), dtype=np.float32)})


def test_release_shared_arena_hands_the_largest_runs_buffers_back(graphs):
    big, small = _feeds()
    sessions = [timed_session(p, 1)[0] for p in graphs]
    before = [s.run(None, big)[0] for s in sessions]
    for s in sessions:  # a second round: what a timed loop leaves resident
        s.run(None, big)
    held = _rss_mb()
    for s in sessions:  # a plain small run keeps the arena's regions
        s.run(None, small)
    assert _rss_mb() > held - FREED_MB / 4
    release_shared_arena(sessions, small)
    assert _rss_mb() < held - FREED_MB
    after = [s.run(None, big)[0] for s in sessions]  # the sessions still work, with the same outputs
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_shrinking_session_keeps_less_than_a_plain_session_with_the_same_outputs(graphs):
    """Small run first (as check_shapes goes from the profile's minimum up), then three at the large size: the
    shrinking session keeps well under half of what a plain session (Polygraphy's default, an arena that keeps
    every region) keeps resident, and its outputs are the plain session's."""
    big, small = _feeds()

    def growth(sess, run):
        run(sess, small)
        base = _rss_mb()
        outs = [run(sess, big)[0] for _ in range(3)]
        return _rss_mb() - base, outs[-1]

    shrinking = ShrinkingSession(graphs[0])
    assert [i.name for i in shrinking.get_inputs()] == ["lr"] and [o.name for o in shrinking.get_outputs()] == ["sr"]
    kept, got = growth(shrinking, lambda s, feed: s.run(None, feed))
    del shrinking
    plain = ort.InferenceSession(str(graphs[0]), providers=["CPUExecutionProvider"])
    kept_plain, want = growth(plain, lambda s, feed: s.run(None, feed))
    assert kept_plain > FREED_MB and kept < kept_plain / 2, (kept, kept_plain)
    np.testing.assert_array_equal(got, want)
