import hashlib
import random

import pytest

from fedmq.broker.contract import codec
from fedmq.broker.contract.chunking import Reassembler, ReassemblyLimits, split
from fedmq.broker.contract.messages import Chunk
from fedmq.broker.errors import ChunkError


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def test_split_sizes_and_metadata():
    data = blob(10_001)
    chunks = split(data, 1000)
    assert len(chunks) == 11
    assert all(c.total == 11 and c.size == 10_001 for c in chunks)
    assert bytes(chunks[-1].data) == data[10_000:]
    assert bytes(chunks[0].sha256) == hashlib.sha256(data).digest()
    assert b"".join(bytes(c.data) for c in chunks) == data


def test_any_order_with_duplicates_reassembles_once():
    data = blob(50_000, 1)
    chunks = split(data, 777)
    order = chunks + chunks[::3]
    random.Random(2).shuffle(order)
    r = Reassembler()
    results = [r.add(codec.decode(codec.encode(c)), "src") for c in order]
    done = [x for x in results if x is not None]
    assert done == [data]
    assert r.duplicates == len(chunks[::3])
    assert r.in_flight == 0 and r.reserved_bytes == 0
    # a late redelivery after completion is ignored, not a new blob
    assert r.add(chunks[0], "src") is None and r.in_flight == 0


def test_same_blob_id_from_two_sources_is_two_blobs():
    a, b = blob(3000, 1), blob(3000, 2)
    ca, cb = split(a, 1000, "aa" * 8), split(b, 1000, "aa" * 8)
    r = Reassembler()
    out = [r.add(c, "A") for c in ca] + [r.add(c, "B") for c in cb]
    assert [x for x in out if x] == [a, b]


def test_missing_chunk_expires_after_ttl():
    clock = Clock()
    r = Reassembler(ReassemblyLimits(ttl_s=10), clock)
    chunks = split(blob(5000), 1000)
    for c in chunks[:-1]:
        assert r.add(c, "s") is None
    assert r.in_flight == 1 and r.reserved_bytes == 5000
    clock.t = 11
    assert r.expire() == 1
    assert r.in_flight == 0 and r.reserved_bytes == 0 and r.expired == 1
    # the last chunk alone now starts a new (incomplete) blob rather than completing a stale one
    assert r.add(chunks[-1], "s") is None


def test_corrupted_chunk_fails_hash():
    data = blob(4000)
    chunks = split(data, 1000)
    bad = Chunk(chunks[2].blob_id, 2, 4, 2000, 4000, chunks[2].sha256, b"\xff" * 1000)
    r = Reassembler()
    for c in chunks[:2] + [bad]:
        r.add(c, "s")
    with pytest.raises(ChunkError) as e:
        r.add(chunks[3], "s")
    assert e.value.reason == "chunk_hash"
    assert r.reserved_bytes == 0


def test_inconsistent_chunks_rejected():
    chunks = split(blob(4000), 1000)
    r = Reassembler()
    r.add(chunks[0], "s")
    liar = Chunk(chunks[1].blob_id, 1, 4, 1000, 9999, chunks[1].sha256, chunks[1].data)
    with pytest.raises(ChunkError) as e:
        r.add(liar, "s")
    assert e.value.reason == "chunk_inconsistent"
    outside = Chunk(chunks[1].blob_id, 1, 4, 3500, 4000, chunks[1].sha256, chunks[1].data)
    with pytest.raises(ChunkError):
        r.add(outside, "s")


def test_memory_bounds_hold_under_flood():
    lim = ReassemblyLimits(max_blob_bytes=10_000, max_total_bytes=25_000, max_blobs=5, max_blobs_per_source=2)
    r = Reassembler(lim)
    huge = Chunk("11" * 8, 0, 2, 0, 10_001, b"\0" * 32, b"x")
    with pytest.raises(ChunkError) as e:
        r.add(huge, "s")
    assert e.value.reason == "chunk_too_large"
    # per-source bound
    r.add(Chunk("01" * 8, 0, 2, 0, 10_000, b"\0" * 32, b"x"), "s")
    r.add(Chunk("02" * 8, 0, 2, 0, 10_000, b"\0" * 32, b"x"), "s")
    with pytest.raises(ChunkError) as e:
        r.add(Chunk("03" * 8, 0, 2, 0, 100, b"\0" * 32, b"x"), "s")
    assert e.value.reason == "chunk_flood"
    # total reserved bytes bound: 20k reserved, another 10k would pass 25k
    with pytest.raises(ChunkError) as e:
        r.add(Chunk("04" * 8, 0, 2, 0, 10_000, b"\0" * 32, b"x"), "t")
    assert e.value.reason == "chunk_memory"
    assert r.reserved_bytes == 20_000
    # blobs-in-flight bound
    for i, src in enumerate("uvw"):
        if i < 1:
            r.add(Chunk(f"{i + 5:02d}" * 8, 0, 2, 0, 10, b"\0" * 32, b"x"), src)
    r.add(Chunk("07" * 8, 0, 2, 0, 10, b"\0" * 32, b"x"), "v")
    r.add(Chunk("08" * 8, 0, 2, 0, 10, b"\0" * 32, b"x"), "w")
    with pytest.raises(ChunkError) as e:
        r.add(Chunk("09" * 8, 0, 2, 0, 10, b"\0" * 32, b"x"), "z")
    assert e.value.reason == "chunk_flood"
    assert r.in_flight == 5


def test_thousands_of_hostile_chunks_stay_bounded():
    lim = ReassemblyLimits(max_blob_bytes=1 << 20, max_total_bytes=4 << 20, max_blobs=8, max_blobs_per_source=8)
    r = Reassembler(lim)
    rejected = 0
    for i in range(5000):
        c = Chunk(f"{i:032x}", 0, 1000, 0, 1 << 20, b"\0" * 32, b"y" * 100)
        try:
            r.add(c, f"s{i % 50}")
        except ChunkError:
            rejected += 1
    assert r.reserved_bytes <= lim.max_total_bytes
    assert r.in_flight <= 4 and rejected >= 4996
