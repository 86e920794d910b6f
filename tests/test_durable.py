"""fedmq.broker.storage.atomic_write: the one durable file replace (checkpoints, outbox, residual, model cache)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from fedmq.broker import storage
from fedmq.broker.storage import atomic_write


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_content_replaced_and_directories_created(tmp_path):
    p = tmp_path / "a" / "b" / "state.bin"
    atomic_write(p, b"first")
    assert p.read_bytes() == b"first"
    atomic_write(p, memoryview(b"second, longer than the first"))
    assert p.read_bytes() == b"second, longer than the first"
    assert sorted(x.name for x in p.parent.iterdir()) == ["state.bin"]  # no temporary file left


def test_secret_mode_is_0600_and_never_wider(tmp_path):
    old = os.umask(0)  # a permissive umask must not widen a secret
    try:
        p = atomic_write(tmp_path / "client.key", b"k", mode=0o600)
    finally:
        os.umask(old)
    assert _mode(p) == 0o600


def test_mode_of_the_replaced_file_is_kept(tmp_path):
    p = tmp_path / "passwd"
    p.write_bytes(b"old")
    os.chmod(p, 0o640)
    atomic_write(p, b"new")
    assert _mode(p) == 0o640 and p.read_bytes() == b"new"
    q = atomic_write(tmp_path / "fresh.json", b"{}")
    assert _mode(q) == 0o644


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.npz"
    atomic_write(p, b"good")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", boom)
    with pytest.raises(OSError, match="No space"):
        atomic_write(p, b"torn")
    monkeypatch.undo()
    assert p.read_bytes() == b"good"
    assert [x.name for x in tmp_path.iterdir()] == ["checkpoint.npz"]


def test_rename_is_what_makes_it_visible(tmp_path, monkeypatch):
    """The target never holds partial data: until os.replace, only a temporary file exists."""
    p = tmp_path / "model.tflite"
    seen = []
    real = storage.os.replace

    def spy(src, dst):
        seen.append((os.path.exists(dst), open(src, "rb").read()))
        real(src, dst)

    monkeypatch.setattr(storage.os, "replace", spy)
    atomic_write(p, b"x" * 10_000)
    assert seen == [(False, b"x" * 10_000)]


def test_every_former_copy_uses_it(tmp_path):
    """The outbox, the error-feedback residual and the checkpoint go through the one helper."""
    from fedmq.aggregator.state import Checkpoint
    from fedmq.edge_agent.compress import ErrorFeedback
    from fedmq.edge_agent.outbox import Outbox, OutboxKey

    ob = Outbox(tmp_path / "outbox")
    key = OutboxKey("aa" * 8, "cd" * 32, 3, 2)
    ob.put(key, b"payload")
    assert ob.get(key) == b"payload" and [x.name for x in (tmp_path / "outbox").iterdir()] == [key.filename()]
    ef = ErrorFeedback(tmp_path / "residual.npz")
    r = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    ef.save(r)
    np.testing.assert_array_equal(ef.load(["w"], [(2, 3)])["w"], r["w"])
    Checkpoint(1, 0, "m", {"w": r["w"]}, {}).save(tmp_path / "ck.npz")
    assert Checkpoint.load(tmp_path / "ck.npz").weights["w"].tolist() == r["w"].tolist()
    names = {x.name for x in tmp_path.iterdir()}
    assert names == {"outbox", "residual.npz", "ck.npz"}


def test_no_other_module_writes_through_its_own_rename():
    """One helper: no fedmq module outside storage.py renames temporary files into place itself."""
    import fedmq.aggregator
    import fedmq.broker
    import fedmq.edge_agent

    offenders = []
    for pkg in (fedmq.broker, fedmq.edge_agent, fedmq.aggregator):
        root = os.path.dirname(pkg.__file__)
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith(".py") and f != "storage.py":
                    text = open(os.path.join(dirpath, f)).read()
                    if "os.replace(" in text or ".replace(path)" in text or "tmp.replace(" in text:
                        offenders.append(os.path.join(dirpath, f))
    assert offenders == []
