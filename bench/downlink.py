"""Compressed downlink (issue 14, point 5): raw vs int8 (vs f16) globals on the real pipeline.

    python bench/downlink.py watch  [--seeds 3] [--downlinks raw,int8,f16]
    python bench/downlink.py fmnist [--seeds 3] [--downlinks raw,int8]
    python bench/downlink.py report          # (re)writes the "Compressed downlink" section of bench/RESULTS.md

Each run is a ``fedmq-aggregator simulate`` fleet (Mosquitto, the aggregator process, one process per
agent training with TFLite) with ``[train] downlink`` set in the aggregator's config. What the agents
download is measured on the wire: every agent connects to the broker through a byte-counting TCP
relay (this process) that parses the MQTT packets the broker sends to it and sums their sizes by
topic: ``global`` (+ chunks, the keyframe), ``delta`` (+ chunks), ``model`` (+ chunks, the artifact,
once) and everything else (announcements, receipts, statuses). Accuracy is the aggregator's own
held-out ``eval_accuracy`` (history.jsonl) after a fixed number of rounds.

Results are appended to runs/downlink/results.jsonl (one line per run); ``report`` turns them into
the section.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
from common import machine, now  # noqa: E402

log = logging.getLogger(__name__)
OUT = ROOT / "runs" / "downlink"
SECTION = "## Compressed downlink"

#: (a) the watch data, one agent per subject 1-8: the Makefile's DEMO_ARGS (~80 % at 60 rounds)
WATCH = dict(dataset="watch", rounds=60, epochs=1, lr=0.1, lr_decay=0.97, baseline=False,
             strategy={"name": "fedavgm", "server": {"momentum": 0.9, "lr": 0.3}})
#: (b) Fashion-MNIST, the FedAvg paper's 2NN on the pathological 2-shards-per-client split, scaled to 10 agents
FMNIST = dict(dataset="fashion-mnist", partition="shards", agents=10, model="zoo:2nn", flatten=True, rounds=40,
              epochs=1, batch_size=10, lr=0.05, lr_decay=0.98, strategy={"name": "fedavg"}, baseline=False,
              deadline_s=600)
SETTINGS = {"watch": WATCH, "fmnist": FMNIST}


# -- the byte-counting relay -------------------------------------------------------------------------------
def _varint(buf: bytes | bytearray, i: int) -> tuple[int, int] | None:
    """(value, next index) of the MQTT variable byte integer at ``i``; None when incomplete."""
    v, mult = 0, 1
    for k in range(4):
        if i + k >= len(buf):
            return None
        b = buf[i + k]
        v += (b & 0x7F) * mult
        if not b & 0x80:
            return v, i + k + 1
        mult *= 128
    raise ValueError("malformed MQTT remaining length")


def category(topic: str) -> str:
    """keyframe / delta / model / other for a topic under <prefix>/<fleet>/."""
    m = re.match(r"^[^/]+/[^/]+/(global|delta|model)(/chunk/\d+)?$", topic)
    return {"global": "keyframe"}.get(m.group(1), m.group(1)) if m else "other"


@dataclass
class Link:
    """What the broker sent one client connection: bytes and messages per category."""
    client_id: str = ""
    bytes: Counter = field(default_factory=Counter)
    messages: Counter = field(default_factory=Counter)
    sizes: dict = field(default_factory=lambda: defaultdict(list))  # category -> packet sizes (plain topics only)

    def feed_down(self, buf: bytearray) -> None:
        """Consume every complete packet at the front of ``buf`` (broker -> client)."""
        while buf:
            r = _varint(buf, 1)
            if r is None:
                return
            length, start = r
            end = start + length
            if len(buf) < end:
                return
            cat = "other"
            if buf[0] >> 4 == 3:  # PUBLISH
                tlen = int.from_bytes(buf[start:start + 2], "big")
                topic = bytes(buf[start + 2:start + 2 + tlen]).decode("utf-8", "replace")
                cat = category(topic)
                if "/chunk/" not in topic:
                    self.sizes[cat].append(end)
            self.bytes[cat] += end
            self.bytes["total"] += end
            self.messages[cat] += 1
            del buf[:end]

    def feed_up_first(self, pkt: bytes) -> None:
        """The client id from the CONNECT packet (MQTT 3.1.1 or 5)."""
        try:
            _, i = _varint(pkt, 1)
            i += 2 + int.from_bytes(pkt[i:i + 2], "big")  # protocol name
            level = pkt[i]
            i += 4  # level, flags, keep-alive
            if level == 5:
                plen, i = _varint(pkt, i)
                i += plen
            n = int.from_bytes(pkt[i:i + 2], "big")
            self.client_id = pkt[i + 2:i + 2 + n].decode("utf-8", "replace")
        except Exception:  # an odd first packet: the connection stays anonymous
            self.client_id = self.client_id or "?"


class Relay:
    """A TCP relay on a free loopback port to the broker, counting what the broker sends each client."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.links: list[Link] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            link = Link()
            with self._lock:
                self.links.append(link)
            threading.Thread(target=self._pipe, args=(c, u, link, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(u, c, link, False), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, link: Link, up: bool) -> None:
        buf = bytearray()
        first = up
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
                if up:
                    if first:
                        buf += data
                        r = _varint(buf, 1)
                        if r is not None and len(buf) >= r[0] + r[1]:
                            link.feed_up_first(bytes(buf[:r[0] + r[1]]))
                            first = False
                            buf.clear()
                else:
                    buf += data
                    link.feed_down(buf)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def per_client(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        with self._lock:
            for ln in self.links:
                d = out.setdefault(ln.client_id or "?", {"bytes": Counter(), "messages": Counter(),
                                                         "sizes": defaultdict(list), "connections": 0})
                d["bytes"].update(ln.bytes)
                d["messages"].update(ln.messages)
                for k, v in ln.sizes.items():
                    d["sizes"][k] += v
                d["connections"] += 1
        return out

    def close(self) -> None:
        self._stop = True
        self.sock.close()


# -- one run ----------------------------------------------------------------------------------------------
def run_one(setting: str, downlink: str, seed: int, rounds: int | None) -> dict:
    import fedmq.aggregator.simulate as sim

    conf = dict(SETTINGS[setting])
    if rounds:
        conf["rounds"] = rounds
    run_dir = OUT / f"{setting}-{downlink}-s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a left-over state_dir would resume its checkpoint
    relay: list[Relay] = []
    orig = sim.write_toml

    def write_toml(path, table):  # the aggregator gets the downlink; the agents connect through the relay
        path = Path(path)
        if path.name == "aggregator.toml":
            table = {**table, "train": {**table["train"], "downlink": downlink}}
        elif "agent" in table:
            b = table["broker"]
            if not relay:
                relay.append(Relay(b["host"], b["port"]))
            table = {**table, "broker": {**b, "host": "127.0.0.1", "port": relay[0].port}}
        return orig(path, table)

    sim.write_toml = write_toml
    t0 = time.time()
    try:
        s = sim.Simulation(sim.SimConfig(seed=seed, **conf), run_dir, progress=False).run()
    finally:
        sim.write_toml = orig
        if relay:
            relay[0].close()
    wall = time.time() - t0
    hist = [json.loads(x) for x in (run_dir / "state" / "history.jsonl").read_text().splitlines()]
    done = [h for h in hist if h["outcome"] == "aggregated"]
    acc = [h.get("eval_accuracy", float("nan")) for h in done]
    clients = {k: v for k, v in relay[0].per_client().items() if k.startswith("agent-")} if relay else {}
    logs = {p.stem: p.read_text(errors="replace") for p in (run_dir / "logs").glob("agent-*.log")}
    agg_log = (run_dir / "logs" / "aggregator.log").read_text(errors="replace")
    n, R = len(clients), len(done)
    per = lambda cat: sum(c["bytes"][cat] for c in clients.values()) / max(1, n)  # noqa: E731
    kf_sizes = sorted({x for c in clients.values() for x in c["sizes"].get("keyframe", [])})
    d_sizes = sorted({x for c in clients.values() for x in c["sizes"].get("delta", [])})
    row = dict(setting=setting, downlink=downlink, seed=seed, rounds=R, agents=n, wall_s=round(wall, 1),
               final_accuracy=acc[-1] if acc else None, best_accuracy=max(acc) if acc else None,
               last5_accuracy=float(np.mean(acc[-5:])) if acc else None,
               outcomes=Counter(h["outcome"] for h in hist),
               # what one agent downloaded over the run, by category (mean over agents)
               keyframe_bytes=per("keyframe"), delta_bytes=per("delta"), model_bytes=per("model"),
               other_bytes=per("other"), total_bytes=per("total"),
               keyframes_per_agent=sum(len(c["sizes"].get("keyframe", [])) for c in clients.values()) / max(1, n),
               deltas_per_agent=sum(len(c["sizes"].get("delta", [])) for c in clients.values()) / max(1, n),
               keyframe_msg_sizes=[min(kf_sizes), max(kf_sizes)] if kf_sizes else None,
               delta_msg_sizes=[min(d_sizes), max(d_sizes)] if d_sizes else None,
               connections=sum(c["connections"] for c in clients.values()),
               fallbacks=sum(t.count("fetching the full global") for t in logs.values()),
               bad_delta=sum(t.count("bad_delta") for t in logs.values()) + agg_log.count("bad_delta"),
               summary_seconds=s.get("seconds"))
    row["downlink_bytes_per_round"] = (row["keyframe_bytes"] + row["delta_bytes"]) / max(1, R)
    return row


# -- the section --------------------------------------------------------------------------------------------
def _rows() -> list[dict]:
    p = OUT / "results.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def report() -> str:
    rows = _rows()
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(r["setting"], r["downlink"], r["seed"])] = r
    lines = [SECTION, "", f"`python bench/downlink.py watch|fmnist` then `report` — {now()}; machine: {machine()}", ""]
    for setting, label in (("watch", "watch data, 8 agents (one per subject 1-8, held out 9-10), FedAvgM 0.9 server lr "
                                     "0.3, E=1, B=16, lr 0.1 decay 0.97 (DEMO_ARGS)"),
                           ("fmnist", "Fashion-MNIST 2NN, 10 agents, 2 shards per agent (non-IID), FedAvg, E=1, B=10, "
                                      "lr 0.05 decay 0.98, all agents every round")):
        rs = [r for k, r in sorted(latest.items()) if k[0] == setting]
        if not rs:
            continue
        lines += [f"### {label}, {rs[0]['rounds']} rounds", "",
                  "| downlink | seed | final acc | mean acc last 5 | best acc | keyframes / deltas fetched per agent "
                  "| keyframe msg B | delta msg B | global bytes per device per round | all bytes to a device per "
                  "round | fallbacks / bad_delta | wall s |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|"]
        for r in rs:
            rng = lambda v: "—" if not v else (f"{v[0]:,}" if v[0] == v[1] else f"{v[0]:,}-{v[1]:,}")  # noqa: E731
            lines.append(f"| {r['downlink']} | {r['seed']} | {r['final_accuracy']:.4f} | {r['last5_accuracy']:.4f} "
                         f"| {r['best_accuracy']:.4f} | {r['keyframes_per_agent']:.1f} / {r['deltas_per_agent']:.1f} "
                         f"| {rng(r['keyframe_msg_sizes'])} | {rng(r['delta_msg_sizes'])} "
                         f"| {r['downlink_bytes_per_round']:,.0f} | {r['total_bytes'] / r['rounds']:,.0f} "
                         f"| {r['fallbacks']} / {r['bad_delta']} | {r['wall_s']:.0f} |")
        lines.append("")
        raw = {r["seed"]: r for r in rs if r["downlink"] == "raw"}
        for enc in ("f16", "int8"):
            pairs = [(raw[r["seed"]], r) for r in rs if r["downlink"] == enc and r["seed"] in raw]
            if not pairs:
                continue
            dfin = [100 * (c["final_accuracy"] - b["final_accuracy"]) for b, c in pairs]
            d5 = [100 * (c["last5_accuracy"] - b["last5_accuracy"]) for b, c in pairs]
            ratio = [b["downlink_bytes_per_round"] / c["downlink_bytes_per_round"] for b, c in pairs]
            steady = [b["keyframe_msg_sizes"][1] / c["delta_msg_sizes"][1] for b, c in pairs if c["delta_msg_sizes"]]
            tot = [(b["total_bytes"] - b["model_bytes"]) / (c["total_bytes"] - c["model_bytes"]) for b, c in pairs]
            lines.append(f"- **{enc} vs raw** (seeds {', '.join(str(b['seed']) for b, _ in pairs)}): final accuracy "
                         f"difference {', '.join(f'{x:+.2f}' for x in dfin)} points (mean {np.mean(dfin):+.2f}); "
                         f"last-5-rounds mean {np.mean(d5):+.2f}; global bytes per device per round "
                         f"{np.mean(ratio):.2f}x fewer over the whole run (the first global is a keyframe for "
                         f"everyone), {np.mean(steady):.2f}x per round once a device holds a global (keyframe "
                         f"message / delta message); everything the broker sent an agent except the one-time "
                         f"model artifact: {np.mean(tot):.2f}x fewer")
        lines.append("")
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    p = ROOT / "bench" / "RESULTS.md"
    old = p.read_text()
    i = old.find("\n" + SECTION + "\n")
    if i < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        j = old.find("\n## ", i + 1)
        new = old[:i + 1] + text + (old[j:] if j >= 0 else "")
    p.write_text(new)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=[*SETTINGS, "report"])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-offset", type=int, default=0)
    ap.add_argument("--downlinks", default="raw,int8")
    ap.add_argument("--rounds", type=int, default=0, help="override the setting's rounds")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.what == "report":
        text = report()
        print(text)
        write_section(text)
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for seed in range(args.seed_offset, args.seed_offset + args.seeds):
        for dl in args.downlinks.split(","):
            row = run_one(args.what, dl, seed, args.rounds or None)
            print(json.dumps(row), flush=True)
            with open(OUT / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
