import hashlib
import random

import pytest

from fedmq.broker.contract import codec
from fedmq.broker.contract.chunking import PART_OVERHEAD, Reassembler, ReassemblyLimits, split
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


def _charge(*sizes: int) -> int:
    """Bytes the reassembler charges for held chunks of these data sizes (independent formula)."""
    return sum(n + PART_OVERHEAD for n in sizes)


def test_missing_chunk_expires_after_ttl_without_a_new_chunk():
    clock = Clock()
    r = Reassembler(ReassemblyLimits(ttl_s=10), clock)
    chunks = split(blob(5000), 1000)
    for c in chunks[:-1]:
        assert r.add(c, "s") is None
    assert r.in_flight == 1 and r.reserved_bytes == _charge(1000, 1000, 1000, 1000)
    clock.t = 9
    assert r.expire() == 0  # idle 9 s < TTL
    clock.t = 10.5
    assert r.expire() == 1  # the timer, not a new chunk, drops it
    assert r.in_flight == 0 and r.reserved_bytes == 0 and r.expired == 1
    assert r.take_freed() == _charge(1000, 1000, 1000, 1000) and r.take_freed() == 0
    # the last chunk alone now starts a new (incomplete) blob rather than completing a stale one
    assert r.add(chunks[-1], "s") is None and r.in_flight == 1


def test_ttl_counts_from_the_last_chunk():
    clock = Clock()
    r = Reassembler(ReassemblyLimits(ttl_s=10), clock)
    data = blob(3000)
    chunks = split(data, 1000)
    for i, c in enumerate(chunks):
        clock.t = 8.0 * i  # a slow link: 16 s in total, never 10 s between chunks
        out = r.add(c, "s")
    assert out == data


def test_corrupted_chunk_fails_hash_and_its_redeliveries_are_dropped():
    data = blob(4000)
    chunks = split(data, 1000)
    bad = Chunk(chunks[2].blob_id, 2, 4, 2000, 4000, chunks[2].sha256, b"\xff" * 1000)
    r = Reassembler()
    for c in chunks[:2] + [bad]:
        r.add(c, "s")
    with pytest.raises(ChunkError) as e:
        r.add(chunks[3], "s")
    assert e.value.reason == "chunk_hash"
    assert r.reserved_bytes == 0 and r.in_flight == 0
    with pytest.raises(ChunkError) as e:
        r.add(chunks[0], "s")
    assert e.value.reason == "chunk_dropped" and r.in_flight == 0


def test_inconsistent_chunks_rejected():
    chunks = split(blob(4000), 1000)
    r = Reassembler()
    r.add(chunks[0], "s")
    liar = Chunk(chunks[1].blob_id, 1, 4, 1000, 9999, chunks[1].sha256, chunks[1].data)
    with pytest.raises(ChunkError) as e:
        r.add(liar, "s")
    assert e.value.reason == "chunk_inconsistent"
    r = Reassembler()
    r.add(chunks[0], "s")
    outside = Chunk(chunks[1].blob_id, 1, 4, 3500, 4000, chunks[1].sha256, chunks[1].data)
    with pytest.raises(ChunkError) as e:
        r.add(outside, "s")
    assert e.value.reason == "chunk_offset"


def test_data_is_placed_by_offset_whatever_the_chunk_sizes():
    data = blob(10_000, 5)
    rng = random.Random(3)
    cuts = sorted(rng.sample(range(1, 10_000), 12))
    bounds = [0, *cuts, 10_000]
    digest = hashlib.sha256(data).digest()
    chunks = [Chunk("ab" * 8, i, len(bounds) - 1, a, 10_000, digest, data[a:b])
              for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    rng.shuffle(chunks)
    r = Reassembler()
    out = [r.add(c, "s") for c in chunks]
    assert out[-1] == data and all(x is None for x in out[:-1])


@pytest.mark.parametrize("offset, length", [(500, 1000), (1500, 600), (0, 1001), (999, 2)])
def test_overlapping_ranges_are_refused_by_offset(offset, length):
    data = blob(4000)
    chunks = split(data, 1000)
    r = Reassembler()
    r.add(chunks[0], "s")
    r.add(chunks[1], "s")
    overlap = Chunk(chunks[0].blob_id, 3, 4, offset, 4000, chunks[0].sha256, data[offset:offset + length])
    with pytest.raises(ChunkError) as e:
        r.add(overlap, "s")
    assert e.value.reason == "chunk_offset"
    assert r.reserved_bytes == 0  # the blob was refused as a whole


def test_memory_is_charged_as_bytes_arrive_not_by_declared_size():
    r = Reassembler()
    assert r.add(Chunk("01" * 8, 0, 2, 0, 256 << 20, b"\0" * 32, b"x" * 100), "s") is None
    assert r.reserved_bytes == _charge(100) and r.sender_bytes("s") == _charge(100)


def test_per_sender_blob_count_and_byte_budget():
    lim = ReassemblyLimits(max_blob_bytes=10_000, max_source_bytes=3_000, max_total_bytes=100_000,
                           max_blobs=50, max_blobs_per_source=2)
    r = Reassembler(lim)
    with pytest.raises(ChunkError) as e:
        r.add(Chunk("11" * 8, 0, 2, 0, 10_001, b"\0" * 32, b"x"), "s")
    assert e.value.reason == "chunk_too_large"
    r.add(Chunk("01" * 8, 0, 4, 0, 10_000, b"\0" * 32, b"x" * 1000), "s")
    r.add(Chunk("02" * 8, 0, 4, 0, 10_000, b"\0" * 32, b"x" * 1000), "s")
    with pytest.raises(ChunkError) as e:
        r.add(Chunk("03" * 8, 0, 2, 0, 100, b"\0" * 32, b"x"), "s")
    assert e.value.reason == "chunk_flood"
    # the sender's byte budget: 2 x 1128 charged, another 1128 would pass 3000
    with pytest.raises(ChunkError) as e:
        r.add(Chunk("01" * 8, 1, 4, 1000, 10_000, b"\0" * 32, b"x" * 1000), "s")
    assert e.value.reason == "chunk_budget"
    assert r.sender_bytes("s") == _charge(1000) and r.in_flight == 1  # the refused blob went
    # another sender is not affected
    data = blob(2500)
    assert [x for x in (r.add(c, "t") for c in split(data, 1000)) if x] == [data]


def test_total_budget_and_blobs_in_flight():
    lim = ReassemblyLimits(max_blob_bytes=10_000, max_source_bytes=10_000, max_total_bytes=2_500,
                           max_blobs=3, max_blobs_per_source=4)
    r = Reassembler(lim)
    r.add(Chunk("01" * 8, 0, 4, 0, 10_000, b"\0" * 32, b"x" * 1000), "a")
    r.add(Chunk("02" * 8, 0, 4, 0, 10_000, b"\0" * 32, b"x" * 1000), "b")
    with pytest.raises(ChunkError) as e:
        r.add(Chunk("03" * 8, 0, 4, 0, 10_000, b"\0" * 32, b"x" * 1000), "c")
    assert e.value.reason == "chunk_memory"
    r.add(Chunk("04" * 8, 0, 4, 0, 10_000, b"\0" * 32, b"x"), "c")
    with pytest.raises(ChunkError) as e:
        r.add(Chunk("05" * 8, 0, 4, 0, 10_000, b"\0" * 32, b"x"), "d")
    assert e.value.reason == "chunk_flood"
    assert r.in_flight == 3 and r.reserved_bytes == _charge(1000, 1000, 1)


def test_for_fleet_gives_every_sender_a_full_share():
    model = 4 << 20
    lim = ReassemblyLimits.for_fleet(model, 10)
    assert lim.max_blob_bytes >= model + model // 4  # a raw update with its envelope fits
    assert lim.max_source_bytes >= 2 * lim.max_blob_bytes
    assert lim.max_total_bytes >= 11 * lim.max_source_bytes
    assert lim.max_blobs >= 11 * lim.max_blobs_per_source
    with pytest.raises(ValueError):
        ReassemblyLimits.for_fleet(model, 0)
    with pytest.raises(ValueError):
        ReassemblyLimits(max_total_bytes=0)


def test_attacker_declaring_256_mib_blobs_cannot_fail_an_honest_upload():
    """Issue 12: two ~100-byte chunks declaring 256 MiB each, re-sent with new ids, starved the fleet."""
    clock = Clock()
    r = Reassembler(ReassemblyLimits(ttl_s=120), clock)  # the defaults: 256 MiB blobs allowed
    honest = [blob(300_000, s) for s in range(3)]
    pieces = [split(h, 4096) for h in honest]
    attacker_refused = 0
    done = []
    for step in range(max(len(p) for p in pieces)):
        clock.t = step * 0.01
        for j in range(20):  # 20 fake blobs per honest chunk, each declaring 256 MiB
            try:
                r.add(Chunk(f"{step:08x}{j:08x}", 0, 2, 0, 256 << 20, b"\0" * 32, b"z" * 100), "agents/evil/update",
                      sender="evil")
            except ChunkError:
                attacker_refused += 1
        for i, p in enumerate(pieces):
            if step < len(p):
                out = r.add(p[step], f"agents/h{i}/update", sender=f"h{i}")
                if out is not None:
                    done.append(out)
    assert sorted(done) == sorted(honest)
    assert attacker_refused > 0 and r.sender_bytes("evil") <= _charge(*[100] * 4)


def test_attacker_filling_its_byte_budget_with_real_data_cannot_fail_an_honest_upload():
    lim = ReassemblyLimits.for_fleet(100_000, 2)
    r = Reassembler(lim)
    evil_refused = set()
    for i in range(200):
        try:
            r.add(Chunk(f"{i:016x}", 0, 100, 0, lim.max_blob_bytes, b"\0" * 32, b"e" * 4000), "evil", sender="evil")
        except ChunkError as e:
            evil_refused.add(e.reason)
        for k in range(1, 30):
            try:
                r.add(Chunk(f"{i:016x}", k, 100, 4000 * k, lim.max_blob_bytes, b"\0" * 32, b"e" * 4000), "evil",
                      sender="evil")
            except ChunkError as e:
                evil_refused.add(e.reason)
    assert r.sender_bytes("evil") <= lim.max_source_bytes and evil_refused
    data = blob(lim.max_blob_bytes, 9)
    assert [x for x in (r.add(c, "honest") for c in split(data, 8192)) if x] == [data]


def test_refused_ids_are_forgotten_after_the_ttl():
    clock = Clock()
    r = Reassembler(ReassemblyLimits(ttl_s=10, max_blob_bytes=1000, max_source_bytes=2000, max_total_bytes=4000),
                    clock)
    c = Chunk("aa" * 8, 0, 2, 0, 5000, b"\0" * 32, b"x")
    with pytest.raises(ChunkError) as e:
        r.add(c, "s")
    assert e.value.reason == "chunk_too_large"
    with pytest.raises(ChunkError) as e:
        r.add(c, "s")
    assert e.value.reason == "chunk_dropped"
    clock.t = 11
    r.expire()
    with pytest.raises(ChunkError) as e:
        r.add(c, "s")
    assert e.value.reason == "chunk_too_large"


def test_thousands_of_hostile_chunks_stay_bounded():
    lim = ReassemblyLimits(max_blob_bytes=1 << 20, max_source_bytes=1 << 20, max_total_bytes=4 << 20, max_blobs=8,
                           max_blobs_per_source=8)
    r = Reassembler(lim)
    rejected = 0
    for i in range(5000):
        c = Chunk(f"{i:032x}", 0, 1000, 0, 1 << 20, b"\0" * 32, b"y" * 100)
        try:
            r.add(c, f"s{i % 50}")
        except ChunkError:
            rejected += 1
    assert r.reserved_bytes <= lim.max_total_bytes
    assert r.in_flight <= 8 and rejected >= 4992


RSS_SCRIPT = r"""
import gc, os, sys
from fedmq.broker.contract.chunking import Chunk, Reassembler, ReassemblyLimits, release_memory

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

clock = [0.0]
r = Reassembler(ReassemblyLimits(ttl_s=10, max_source_bytes=64 << 20), lambda: clock[0])
piece = os.urandom(60_000)
release_memory()
before = rss()
for s in range(8):  # 8 senders x 25 MB of never-completed blobs
    for b in range(2):
        for i in range(210):
            r.add(Chunk(f"{s:08x}{b:08x}", i, 1000, i * 60_000, 60_000_000, b"\0" * 32, piece), f"s{s}")
peak = rss()
held = r.reserved_bytes
clock[0] = 11.0
r.expire()
gc.collect()
release_memory()
after = rss()
print(before, peak, after, held, r.reserved_bytes)
"""


def test_expired_memory_goes_back_to_the_os(tmp_path):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    before, peak, after, held, left = map(int, out.stdout.split())
    assert held >= 200_000_000 and left == 0
    assert peak - before >= 180_000_000  # the data really was resident
    assert after - before <= 16 * 1024 * 1024, (before, peak, after)  # back within 16 MiB
