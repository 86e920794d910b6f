"""The aggregator service: round control over MQTT, checkpoints, metrics, final export.

One thread runs the protocol and the network (the client is pumped: ``MqttClient(own_thread=False)``):
it reads a small batch of messages, decodes and validates each (fedmq.broker.transport.receiver), feeds
updates to the round controller, closes rounds, checkpoints, republishes the global model and opens
the next round. A backlog waits in the broker's queue for the aggregator, not in this process, and no
message is handed between threads. See docs/architecture.md.

Outages: the service starts before its broker is reachable and never exits because the broker is
away. The retained state it owns (its service status, model, global, round) is republished after
every (re)connect, and a publish that fails marks it for the next attempt instead of raising into
the round logic; rounds time out by their own policy meanwhile. Only refused credentials end it
(``AuthError``: exit code 3, which systemd is told not to restart).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np

from fedmq.broker import __version__
from fedmq.broker.contract import codec
from fedmq.broker.contract.chunking import ReassemblyLimits
from fedmq.broker.contract.messages import (
    GlobalModel,
    Receipt,
    RoundAnnouncement,
    RoundMetrics,
    ServiceStatus,
    Status,
    TrainConfig,
    Update,
)
from fedmq.broker.contract.tensors import Compression
from fedmq.broker.contract.topics import Channel
from fedmq.broker.errors import FedmqError
from fedmq.broker.transport.client import AckToken, MqttClient, Will
from fedmq.broker.transport.publisher import Publisher
from fedmq.broker.transport.receiver import Receiver

from .config import AggregatorConfig
from .fleet import FleetTable
from .journal import RoundJournal, boot_id
from .limits import AgentLimiter, agent_of
from .model_store import ServedModel, export_final, load_or_export
from .ratelog import BoundedLog
from .rounds import RoundController
from .state import Checkpoint, HistoryLog
from .strategies import build_strategy
from .telemetry import Telemetry

log = logging.getLogger(__name__)

#: the broker's count of messages it dropped (full per-client queues): a loss no receipt can hide
SYS_DROPPED = "$SYS/broker/publish/messages/dropped"
#: refusals whose cause can go away: the same update counts if re-sent into its round later
RETRY_REASONS = frozenset({"no_open_round", "future"})
#: a step handles messages for at most this long before its timers and round checks run
STEP_SLICE_S = 0.25
#: handled messages per group commit (one fdatasync of the journal, then their acknowledgements and receipts);
#: fewer when nothing more is readable (the broker's in-flight window, 100-1,000, is exhausted or the stream
#: paused) or the step slice ends. Bench: bench/intake.py --mqtt --journal fsync
JOURNAL_GROUP = 256


def load_eval(cfg: AggregatorConfig):
    """The server-side held-out set of ``[eval]``, or None."""
    from fedmq.aggregator.datasets import Dataset, DatasetMissing, load_fashion_mnist, load_watch
    from fedmq.broker.errors import ConfigError

    e = cfg.eval
    if not e.dataset:
        return None
    try:
        if e.dataset == "watch":
            d = load_watch()
            d = d.subset(np.isin(d.groups, e.groups or [9, 10]))
        elif e.dataset == "fashion-mnist":
            d = load_fashion_mnist("test")
        elif e.dataset.startswith("npz:"):
            with np.load(e.dataset[4:], allow_pickle=False) as z:
                d = Dataset(z["x"], z["y"])
        else:
            raise ConfigError(f"eval.dataset = {e.dataset!r}: use watch, fashion-mnist or npz:/path.npz")
    except (DatasetMissing, FileNotFoundError, KeyError) as err:
        raise ConfigError(f"eval.dataset = {e.dataset!r}: {err}") from None
    if e.max_examples:
        d = d.subset(np.arange(len(d.y)) < e.max_examples)
    return d


@dataclass
class RunSummary:
    rounds_done: int
    global_round: int
    history: list[dict]


class AggregatorService:
    def __init__(self, cfg: AggregatorConfig, client: MqttClient | None = None,
                 served: ServedModel | None = None, switch_strategy: bool = False) -> None:
        self.cfg = cfg
        #: allow a restart with another strategy than the checkpoint's (its state then starts fresh)
        self.switch_strategy = switch_strategy
        self._switched_from: str | None = None  # recorded in the next history row
        self.topics = cfg.broker.topics()
        self.state_dir = cfg.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # our own client admits messages as paho reads them: a flooder's messages are dropped by its
        # rate limit before they take a place in the inbox (and the read batch) the honest fleet shares
        self.run_id = ""  # set by _restore: from the checkpoint, or new for a fresh state_dir
        # pumped client: [service] read_batch (64 updates, ~1 MB for sensor1d) and rcvbuf_bytes (4 MiB kernel buffer)
        # manual_ack: a message is acknowledged to the broker once handled (an accepted update: once in the
        # round's journal), so what this process read but did not handle before dying is redelivered
        mqtt_cfg = cfg.broker.mqtt(cfg.service.id, resume_session=True, read_batch=cfg.service.read_batch,
                                   rcvbuf=cfg.service.rcvbuf_bytes, manual_ack=True)
        # the last will marks us offline (retained); its run id is filled in once known (start)
        self.client = client or MqttClient(mqtt_cfg, on_message=self._admit, own_thread=False)
        self._admits = client is None
        self._limited: dict[str, int] = {}  # agent -> messages dropped by its rate limit (in _admit)
        self._limited_total = 0
        self._limited_seen: dict[str, int] = {}
        self._limited_counted = 0
        self._limited_last: dict[str, int] = {}  # per-agent counts at the last quarantine check
        self.quarantined: dict[str, float] = {}  # agent -> monotonic time its quarantine ends
        self._per_agent: set[str] = set()  # agents subscribed one by one while a quarantine is on
        self._known: set[str] = set()  # every agent that sent a valid status (bounded by the ACL's users)
        self.stop_event = threading.Event()
        self.telemetry = Telemetry()
        self.round_rejects: Counter[str] = Counter()
        self.receiver = Receiver(self.topics, on_reject=self._count_reject)
        self.broker_dropped: int | None = None  # $SYS/broker/publish/messages/dropped, when the broker tells
        self.strategy = build_strategy(cfg.strategy)
        self.bounded_log = BoundedLog(log, cfg.limits.log_interval_s)
        self.controller = RoundController(self.strategy, cfg.rounds, self.bounded_log)
        self.limiter: AgentLimiter | None = None  # sized from the model at start()
        self.internal_errors = 0
        self._next_tick = 0.0
        self._next_summary = 0.0
        self.online: set[str] = set()  # ids whose last status is not offline (one shared str per id)
        #: every known device, for the operator (status CLI, /api/fleet, dashboard) and for exclusion
        self.fleet = FleetTable(cfg.rounds.exclude_after)
        self.http = None  # StatusServer when [service] http_port is set
        self.started = time.time()
        self._bytes_sent: dict[int, int] = {}  # round -> bytes of its global/delta publishes (dashboard)
        self._next_fleet_save = 0.0
        self.served: ServedModel | None = served  # None: export (or load from the cache) at start
        self.history: list[dict] = []
        self.global_weights: dict[str, np.ndarray] = {}
        self.global_round = 0
        self.next_round = 1
        self.publisher: Publisher | None = None
        self._evaluator = None
        self._eval = None
        self._done = False
        self._plots = None  # PlotWriter, made at the first closed round
        self._delta = None  # the GlobalDelta of the last aggregated round ([train] downlink = f16/int8)
        self._republish = threading.Event()
        self._republish.set()  # the first connection publishes everything we own
        self._next_republish = 0.0
        #: (topic, mid, waiter) of the retained state _republish_state handed over; checked by _check_tracked
        self._tracked: list = []
        self._tracked_until = 0.0
        self._guarded: tuple[str, ...] = ()
        self.foreign_writes = 0
        self._scanned = False  # stale chunk topics of an earlier process cleared (once, at first connect)
        self.quorum_to_publish: tuple[int, float] | None = None
        #: the open round's journal ([service] journal; None = off): a restart goes on with the round
        self.journal: RoundJournal | None = (RoundJournal(self.state_dir / "round.journal", cfg.service.journal)
                                             if cfg.service.journal != "off" else None)
        self.journal_errors = 0
        self._fresh_run = False
        self._backlog_due = False  # a resumed round is not polled before its session's backlog is read
        self._backlog_until = 0.0
        #: after a resumed start: the marker that ends the re-read of the retained statuses (None = not needed)
        self._presence_nonce: bytes | None = None
        self._presence_until = 0.0  # when the re-read is given up (0: not asked yet)
        #: QoS 1 messages handled since the last commit (acknowledged by _commit; not their payloads)
        self._unacked: list[AckToken] = []
        self._receipts: list[tuple[str, bytes]] = []  # receipts of those messages (sent by _commit)

    # -- bookkeeping -------------------------------------------------------------------------------
    def _count_reject(self, reason: str) -> None:
        self.round_rejects[reason] += 1
        self.telemetry.rejected.labels(reason).inc()

    def _internal(self, what: str, exc: BaseException) -> None:
        """The last line of defence: an unexpected exception is counted and logged, never fatal."""
        self.internal_errors += 1
        self._count_reject("internal")
        self.bounded_log.internal(what, exc)

    def _admit(self, m) -> None:
        """As paho reads a message: the per-agent rate limit, then the inbox (never blocks)."""
        lim = self.limiter
        if lim is not None:
            agent = agent_of(m.topic, self.topics.base)
            if agent is not None and not lim.allow(agent, len(m.payload)):
                self._limited[agent] = self._limited.get(agent, 0) + 1
                self._limited_total += 1
                self.client.ack(m)  # dropped for good (counted): it must not hold a place in the broker's window
                return
        try:
            self.client.inbox.put_nowait(m)
        except queue.Full:
            self.client.ack(m)
            self.client.dropped += 1
            if self.client.dropped == 1 or self.client.dropped % 1000 == 0:
                log.warning("inbox full: dropped %d messages so far", self.client.dropped)

    def _count_limited(self, summary: bool) -> None:
        """Count what the rate limit dropped in _admit; with ``summary``, log one line per agent."""
        total = self._limited_total
        new = total - self._limited_counted
        if new:
            self._limited_counted = total
            self.round_rejects["rate_limited"] += new
            self.telemetry.rejected.labels("rate_limited").inc(new)
        if summary:
            now = dict(self._limited)
            over = {a: n - self._limited_seen.get(a, 0) for a, n in now.items() if n != self._limited_seen.get(a, 0)}
            self._limited_seen = now
            if over:
                top = dict(sorted(over.items(), key=lambda kv: -kv[1])[:20])
                log.warning("rate limited (messages dropped before decoding) since the last summary: %s", top)

    def _quarantine(self, mono: float) -> None:
        """Unsubscribe a flooding agent: the broker then drops its messages instead of sending them here.

        MQTT cannot exclude one topic from a wildcard, so while any agent is quarantined the aggregator
        subscribes to the update and status topics of every other known agent one by one (and a new
        agent is subscribed when it is next seen); the wildcards come back when the quarantine ends.
        """
        lc = self.cfg.limits
        now = dict(self._limited)
        if lc.quarantine_msgs_per_s > 0:
            for a, n in now.items():
                if a not in self.quarantined and n - self._limited_last.get(a, 0) >= lc.quarantine_msgs_per_s:
                    self.quarantined[a] = mono + lc.quarantine_s
                    log.warning("agent %s quarantined for %.0fs: over its rate limit by >= %.0f messages/s; its "
                                "topics are no longer subscribed (see docs/operations.md for a broker-level block)",
                                a, lc.quarantine_s, lc.quarantine_msgs_per_s)
        self._limited_last = now
        for a in [a for a, until in self.quarantined.items() if mono >= until]:
            del self.quarantined[a]
            log.warning("agent %s: quarantine over", a)
        t = self.topics
        if self.quarantined:
            wanted = {a for a in self._known if a not in self.quarantined}
            if self.controller.current is not None:
                wanted |= {a for a in self.controller.current.asked if a not in self.quarantined}
            # wait=False: the SUBACKs come behind the flood in the same stream; waiting for them here held
            # the protocol thread (and every round) for ~10 s at a flood's start (tests/test_attacks.py);
            # paho's thread checks them (a refusal is logged)
            for a in sorted(wanted - self._per_agent):
                self.client.subscribe(t.update(a), qos=1, wait=False)
                self.client.subscribe(t.status(a), qos=1, wait=False)
                self._per_agent.add(a)
            if self._wildcards:
                self.client.unsubscribe(t.all_updates())
                self.client.unsubscribe(t.all_statuses())
                self._wildcards = False
            for a in sorted(self._per_agent & set(self.quarantined)):
                self.client.unsubscribe(t.update(a))
                self.client.unsubscribe(t.status(a))
                self._per_agent.discard(a)
        elif not self._wildcards:
            self.client.subscribe(t.all_updates(), qos=1, wait=False)
            self.client.subscribe(t.all_statuses(), qos=1, wait=False, retain_handling=1)
            self._wildcards = True
            for a in sorted(self._per_agent):
                self.client.unsubscribe(t.update(a))
                self.client.unsubscribe(t.status(a))
            self._per_agent.clear()

    def _size_reassembly(self, asked: int) -> None:
        """Chunk reassembly sized for the model and the fleet (every sender's full share fits), or [limits]."""
        lc = self.cfg.limits
        model_bytes = sum(int(a.nbytes) for a in self.global_weights.values())
        n = max(asked, len(self._known), 1)
        lim = ReassemblyLimits.for_fleet(model_bytes, n, ttl_s=lc.reassembly_ttl_s)
        if lc.reassembly_blob_bytes or lc.reassembly_total_bytes:
            blob = lc.reassembly_blob_bytes or lim.max_blob_bytes
            total = lc.reassembly_total_bytes or lim.max_total_bytes
            lim = ReassemblyLimits(max_blob_bytes=blob, max_source_bytes=max(lim.max_source_bytes, 2 * blob),
                                   max_total_bytes=max(total, blob), max_blobs=lim.max_blobs,
                                   max_blobs_per_source=lim.max_blobs_per_source, ttl_s=lc.reassembly_ttl_s)
        self.receiver.reassembler.limits = lim

    def _make_limiter(self) -> AgentLimiter | None:
        lc = self.cfg.limits
        if not lc.enabled:
            return None
        model_bytes = sum(int(a.nbytes) for a in self.global_weights.values())
        burst = lc.bytes_burst or max(8 << 20, 3 * model_bytes)
        rate = lc.bytes_per_s or burst / 10
        return AgentLimiter(lc.msgs_per_s, lc.msgs_burst, rate, burst)

    @property
    def checkpoint_path(self) -> Path:
        return self.state_dir / "checkpoint.npz"

    def _restore(self) -> None:
        ck = Checkpoint.load(self.checkpoint_path)
        self.history_log = HistoryLog(self.state_dir)
        if ck is None or ck.model_id != self.served.model_id:
            if ck is not None:
                log.warning("checkpoint is for model %s, serving %s: starting fresh", ck.model_id[:12],
                            self.served.model_id[:12])
            self.global_weights = self.served.initial_weights()
            self.history = self.history_log.restore(None)
            self.run_id = uuid.uuid4().hex[:16]
            self._fresh_run = True  # a journal of this run's first round may name the run (_resume_round)
            log.info("new run %s", self.run_id)
            return
        self.run_id = ck.run or uuid.uuid4().hex[:16]  # a checkpoint from before run ids: name its run now
        self.global_weights = ck.weights
        self.global_round = ck.global_round
        self.next_round = ck.next_round
        self.history = self.history_log.restore(ck)  # rows the checkpoint counts, once each
        mine, theirs = self._strategy_info(), ck.strategy_info
        if theirs and (theirs.get("name"), theirs.get("server")) != (mine["name"], mine["server"]):
            was = f"{theirs.get('name')} (server optimizer {theirs.get('server')})"
            now = f"{mine['name']} (server optimizer {mine['server']})"
            if not self.switch_strategy:
                from fedmq.broker.errors import ConfigError

                raise ConfigError(f"the checkpoint in {self.state_dir} was made by strategy {was}, the config asks "
                                  f"for {now}: their state does not carry over. Restore [strategy], or restart with "
                                  "--switch-strategy to start the new strategy's state fresh (the switch is "
                                  "recorded in the history)")
            log.warning("strategy switched from %s to %s (--switch-strategy): the new strategy starts with fresh "
                        "state; the global weights carry over", was, now)
            self._switched_from = was
        else:
            self.strategy.load_state_dict(ck.strategy)
        log.info("resumed from checkpoint: next round %d, global model of round %d", self.next_round,
                 self.global_round)

    def _checkpoint(self) -> None:
        self.history_log.sync(self.history)  # append + fsync first: restore drops a row whose checkpoint is missing
        Checkpoint(self.next_round, self.global_round, self.served.model_id, self.global_weights,
                   self.strategy.state_dict(), self.history[-1] if self.history else None,
                   run=self.run_id, strategy_info=self._strategy_info()).save(self.checkpoint_path)

    def _strategy_info(self) -> dict:
        """Which strategy this is (recorded in the checkpoint and every history row)."""
        return {"name": self.strategy.name, "server": self.strategy.server.name,
                "table": dict(self.cfg.strategy)}  # the [strategy] table as configured (TOML: JSON-able)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.served is None:
            self.served = load_or_export(self.cfg.model, self.state_dir / "models", prox=self.cfg.train.mu > 0)
        self._restore()
        self.limiter = self._make_limiter()
        self._size_reassembly(0)
        done = sum(1 for h in self.history if h["outcome"] == "aggregated")
        if self.cfg.rounds.rounds and done >= self.cfg.rounds.rounds:
            log.info("the checkpoint already holds %d aggregated rounds: nothing to do", done)
            self._done = True
        self._eval = load_eval(self.cfg)
        if self._eval is not None:
            from fedmq.edge_agent.trainer import TFLiteTrainer

            self._evaluator = TFLiteTrainer(self.served.artifact, self.served.model_id)
        self.fleet.load(self.fleet_path)
        if self._resume_round():
            self._backlog_due = True
            self._backlog_until = time.monotonic() + self.cfg.service.publish_timeout_s
            if self._admits and self.client.cfg.protocol == "5" and self.client.cfg.session_expiry > 0:
                # the round goes on: what the fleet sent while we were down waits in our session (QoS 1).
                # Its status subscription gets no retained copies (Retain Handling 1): who is online is
                # asked once the round is over (_scan_presence), before the next round picks agents
                self.client.cfg.clean_start = False
                self._presence_nonce = f"presence-{uuid.uuid4().hex}".encode()
        port = self.cfg.service.http_port or self.cfg.service.prometheus_port
        if port:
            from .http_api import StatusServer

            self.http = StatusServer(self.telemetry.registry, self.status_doc, self.fleet.snapshot,
                                     lambda: not self.stop_event.is_set() and not self._done)
            self.http_port = self.http.start(port if port > 0 else 0,
                                             self.cfg.service.http_addr or self.cfg.service.prometheus_addr)
        t = self.topics
        if self._admits:  # our own client: a last will that marks this run's service offline
            self.client.set_will(Will(t.service(), codec.encode(self._service_status("offline"))))
        self.client.on_connected = lambda reconnect: self._republish.set()
        self.client.subscribe(t.all_updates(), qos=1)  # remembered: made on every (re)connect
        # retained statuses only for a new subscription: a resumed session queued the changes instead (and
        # the agents' presence re-sync follows our "online"), so a reconnect is not 10,000 statuses again
        self.client.subscribe(t.all_statuses(), qos=1, retain_handling=1)
        self.client.subscribe(SYS_DROPPED, qos=0)  # Mosquitto's drop counter (refused by other brokers: logged)
        # our own retained topics, to notice anyone else writing them (a leaked password, a bad ACL): the
        # agents refuse what we did not sign, and we put our state back (No Local: our own writes stay away)
        self._guarded = (t.model(), t.global_(), t.round(), t.service(), t.delta())
        for topic in self._guarded:
            self.client.subscribe(topic, qos=1, no_local=True)
        self.foreign_writes = 0
        self._wildcards = True
        signer = None
        if self.cfg.service.signing_key:
            from fedmq.broker.contract.signing import Signer

            signer = Signer.from_file(self.cfg.service.signing_key)
            log.info("model, global, round and service messages are signed (key %s)", signer.key_id)
        else:
            log.warning("[service] signing_key is not set: model and global messages are not signed; agents "
                        "that hold trusted keys will refuse them")
        self.publisher = Publisher(self.client, t, signer)
        self.client.start()  # returns at once: the broker may not be up yet (step() waits for it)
        log.info("aggregator up: run %s, model %s, global round %d, fleet %s", self.run_id, self.served.model_id[:12],
                 self.global_round, t.fleet)

    def _service_status(self, state: str) -> ServiceStatus:
        c = self.controller.current
        return ServiceStatus(self.cfg.service.id, state, time.time(), self.run_id,
                             self.served.model_id if self.served else "", self.global_round,
                             c.ann.round if c is not None else 0, __version__)

    def _publish_retained(self, topic: str, msg) -> bool:
        """Publish a retained message we own; on failure mark all retained state for republishing."""
        if not self.client.connected:
            self._republish.set()  # published when the connection is back
            return False
        try:
            self.publisher.publish(topic, msg, retain=True, timeout=self.cfg.service.publish_timeout_s)
            return True
        except FedmqError as e:
            log.warning("publishing %s failed (%s); retried after the next (re)connect or in a few seconds",
                        topic, e)
            self._republish.set()
            return False

    def _publish_global(self) -> None:
        self._publish_retained(self.topics.global_(), GlobalModel(self.global_round, self.served.model_id,
                                                                  self.global_weights, time.time(), run=self.run_id))

    def _publish_service(self, state: str = "online") -> None:
        self._publish_retained(self.topics.service(), self._service_status(state))

    def stop(self) -> None:
        self.stop_event.set()

    def run(self, max_seconds: float | None = None) -> RunSummary:
        """Serve until the configured number of rounds, the target metric, a stop() or max_seconds."""
        self.start()
        t_end = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not self.stop_event.is_set() and not self._done:
                if t_end is not None and time.monotonic() > t_end:
                    break
                if self.client.fatal is not None:  # credentials refused: retrying cannot help
                    log.error("the broker refused our credentials (%s): stopping; fix or restore the aggregator's "
                              "password, then start it again (exit code 3: systemd does not restart it)",
                              self.client.fatal)
                    raise self.client.fatal
                try:
                    self.step(timeout=0.05)
                except Exception as e:  # noqa: BLE001 - the loop must outlive any one step
                    self._internal("running a protocol step", e)
        finally:
            self.shutdown()
        return RunSummary(len(self.history), self.global_round, self.history)

    def shutdown(self) -> None:
        if self.controller.current is not None:
            log.info("stopping mid-round %d: %s", self.controller.current.ann.round,
                     "a restart takes it back from its journal" if self.journal is not None and self.journal.active
                     else "after a restart its agents re-send from their outboxes")
        if self.client.connected and self.publisher is not None:  # a clean stop sends no will: say it ourselves
            try:  # briefly: a broker that stopped answering must not hold up a SIGTERM (systemd, supervisors)
                self.publisher.publish(self.topics.service(), self._service_status("done" if self._done else "offline"),
                                       retain=True, timeout=min(3.0, self.cfg.service.publish_timeout_s))
            except Exception as e:  # noqa: BLE001 - stopping anyway
                log.warning("could not publish our offline status before stopping: %s", e)
        self.client.close()
        self._save_fleet()  # before the plots' last redraw (up to seconds): a kill meanwhile keeps the table
        if self._plots is not None:
            self._plots.close()
        if self.http is not None:
            self.http.close()

    # -- the protocol step -----------------------------------------------------------------------------
    def step(self, timeout: float = 0.05) -> None:
        self._check_tracked()
        if self._republish.is_set() and self.client.connected and time.monotonic() >= self._next_republish:
            self._republish.clear()  # after a (re)connect: the broker may have lost retained state
            self._republish_state()
        m = self.client.get(timeout=timeout)
        end = time.monotonic() + STEP_SLICE_S  # a steady stream must not hold off the round's checks
        while m is not None:
            try:
                self._handle(m.topic, m.payload, m.retain)
            except Exception as e:  # noqa: BLE001 - one message never ends the service
                self._internal(f"handling a message on {m.topic[:200]!r}", e)
            if time.monotonic() >= end:
                self._handled(m, commit=False)
                break
            if self._everyone_in():
                self._handled(m, commit=False)
                break  # everyone asked is in: close now, not after the statuses and copies still streaming in
            self._handled(m)
            m = self.client.get(timeout=0)
        self._commit()  # nothing more to read now (or the slice is over): what was handled is answered
        if self._backlog_due and self.client.connected and (m is None or time.monotonic() > self._backlog_until
                                                             or self._everyone_in()):
            self._backlog_due = False  # a resumed round: what waited in our session has been read (or a stream
            # that never pauses: then its policy applies after publish_timeout_s, as to any round)
        self._tick()
        self._count_limited(summary=False)
        now = time.time()
        c = self.controller
        if c.current is None:
            self._maybe_open(now)
            return
        if self._backlog_due:
            return  # its deadline may have passed while we were down: first read what the session kept
        state = c.poll(now)
        if state == "close":
            self._close_round(now)
        elif state == "timeout":
            ann = c.extend(now)
            if ann is not None:
                self._journal_append(b"D", msgpack.packb(ann.deadline))
                self._journal_sync()  # on disk before any agent hears of the new deadline
                self._publish_retained(self.topics.round(), ann)
            else:
                r = c.abandon()
                self._fleet_close(r)
                metrics, values = self._record(r, None, now, "abandoned",
                                               f"{len(r.received)}/{r.quorum} updates by the deadline")
                self.next_round = r.ann.round + 1
                self._checkpoint()
                self._journal_end()
                self._publish_metrics(metrics)
                self._submit_plots()
                self._check_done(values)

    def _handled(self, m, commit: bool = True) -> None:
        """``m`` is dealt with: it is acknowledged (with its receipt, if an update) by the next group commit,
        which runs now once the group is full (``commit``)."""
        if m.qos:
            self._unacked.append(AckToken.of(m))
        if commit and len(self._unacked) >= max(self.cfg.service.read_batch, JOURNAL_GROUP):
            self._commit()  # one fdatasync per group, then its acknowledgements and receipts

    def _everyone_in(self) -> bool:
        """The open round holds an update of every asked agent (it closes at the next poll)."""
        cur = self.controller.current
        return cur is not None and cur.quorum_at is not None and len(cur.received) >= len(cur.asked_set)

    def _journal_sync(self) -> None:
        j = self.journal
        if j is not None and j.active:
            try:
                j.sync()
            except OSError as e:
                self._journal_failed("syncing", e)

    def _commit(self) -> None:
        """The handled batch is ours: its journal records on disk (one fdatasync in fsync mode), then the
        broker's acknowledgements (it stops holding the messages for us) and the agents' receipts."""
        self._journal_sync()
        if self._unacked:
            ack = getattr(self.client, "ack", None)
            if ack is not None:
                for m in self._unacked:
                    ack(m)
            self._unacked.clear()
        if self._receipts and getattr(self.client, "connected", True):  # else kept: sent once connected
            pending, self._receipts = self._receipts, []
            for topic, data in pending:
                try:
                    self.client.publish(topic, data, qos=0, wait=False)
                except Exception as e:  # noqa: BLE001 - a receipt must never stop the round loop
                    self.bounded_log.reject(topic, "receipt", "receipt on %s not handed over: %s", topic[:200], e)

    def _journal_failed(self, what: str, e: BaseException) -> None:
        """The journal cannot be written: go on without it for this round (a restart then re-opens the
        round and the agents re-send, as with ``journal = off``); the file is removed so that it is never
        taken back with updates missing."""
        self.journal_errors += 1
        self.telemetry.journal_errors.inc()
        log.error("round journal: %s failed (%s): this round goes on without it; a restart would have the agents "
                  "re-send (free disk space under %s)", what, e, self.state_dir)
        if self.journal is not None:
            try:
                self.journal.discard()
            except OSError as e2:
                log.error("round journal %s could not be removed either (%s): remove it before restarting",
                          self.journal.path, e2)

    def _journal_begin(self, ann, asked: list[str], quorum: int, now: float) -> None:
        if self.journal is None:
            return
        header = {"format": 1, "run": ann.run, "round": ann.round, "model_id": ann.model_id,
                  "base_round": ann.base_round, "ann": codec.encode(ann), "asked": asked, "quorum": quorum,
                  "started": now, "mode": self.journal.mode, "boot": boot_id()}
        try:
            self.journal.begin(header)
        except OSError as e:
            self._journal_failed("starting", e)

    def _journal_append(self, kind: bytes, body) -> None:
        j = self.journal
        if j is None or not j.active:
            return
        try:
            j.append(kind, body)
        except OSError as e:
            self._journal_failed("writing", e)

    def _journal_end(self) -> None:
        if self.journal is not None:
            try:
                self.journal.discard()
            except OSError as e:
                self._journal_failed("removing", e)

    def _scan_presence(self) -> None:
        """After a resumed start, once its round is over and before the next one picks agents: have the
        broker send every retained status again (a subscribe with Retain Handling 0 on the subscription we
        have), then a marker on our own status topic; when the marker is back the view is complete."""
        t = self.topics
        self._presence_until = time.monotonic() + max(30.0, self.cfg.service.publish_timeout_s)
        if not self._wildcards:  # a quarantine subscribed agents one by one: their subscriptions are new anyway
            self._presence_nonce = None
            return
        self.client.subscribe(t.all_statuses(), qos=1, wait=False, retain_handling=0)
        self.client.publish(t.status(self.cfg.service.id), self._presence_nonce, qos=1, retain=False, wait=False)
        self.client.subscribe(t.all_statuses(), qos=1, wait=False, retain_handling=1)  # what reconnects use
        log.info("the resumed round is over: reading the fleet's retained statuses again before the next round")

    def _discard_journal(self, j: RoundJournal) -> None:
        """Remove a journal that must not be taken back; one that cannot be removed stops the start (a
        later start would take it back with this process's updates missing)."""
        try:
            j.discard()
        except OSError as e:
            from fedmq.broker.errors import ConfigError

            raise ConfigError(f"the round journal {j.path} cannot be removed ({e}): fix the state directory's "
                              "permissions, or remove the file") from e

    def _resume_round(self) -> bool:
        """At start: go on with the round the journal holds, if it is the one the checkpoint expects next
        (same run, round, model and base); anything else there is stale and removed."""
        j = self.journal
        if j is None:  # journal = off now: an old journal would miss this process's updates
            self._discard_journal(RoundJournal(self.state_dir / "round.journal", "write"))
            return False
        got = j.read_header()
        if got is None:
            self._discard_journal(j)
            return False
        h, offset = got
        if self._fresh_run and h.get("round") == 1 and h.get("base_round") == 0 and not self.history \
                and h.get("model_id") == self.served.model_id and isinstance(h.get("run"), str) and h["run"]:
            # the first round of a run: no checkpoint names the run yet, its journal does
            self.run_id = h["run"]
            log.info("run %s: its first round is in the journal", self.run_id)
        want = {"run": self.run_id, "round": self.next_round, "model_id": self.served.model_id,
                "base_round": self.global_round}
        if h.get("mode") == "write" and h.get("boot") != boot_id():
            log.warning("round journal of round %s was written without fdatasync before the host restarted: records "
                        "its receipts vouched for may be gone; round %d is opened afresh and its agents re-send",
                        h.get("round"), self.next_round)
            self._discard_journal(j)
            return False
        if self._done or any(h.get(k) != v for k, v in want.items()):
            log.info("round journal of round %s (run %s) is stale: the checkpoint expects round %d; removed",
                     h.get("round"), h.get("run"), self.next_round)
            self._discard_journal(j)
            return False
        t0 = time.monotonic()
        try:
            ann = codec.decode(h["ann"])
            asked = [sys.intern(a) for a in h["asked"]]
            if not isinstance(ann, RoundAnnouncement) or not all(isinstance(a, str) for a in asked):
                raise ValueError("header does not hold an announcement and the asked ids")
            self.controller.resume(ann, asked, int(h["quorum"]), float(h.get("started", ann.opened)),
                                   self.global_weights)
            replayed, refused = 0, Counter()
            now = time.time()
            for rec in j.replay(offset):
                if rec.kind == b"D":
                    ann.deadline = float(msgpack.unpackb(rec.body))
                    self.controller.current.extensions += 1
                    continue
                u = codec.decode(rec.body, self.receiver.limits)
                if not isinstance(u, Update):
                    raise ValueError(f"a {type(u).__name__} record where an update belongs")
                reason = self.controller.on_update(u, len(rec.body), now)
                if reason is None:
                    replayed += 1
                    self.fleet.on_update(u.agent, None, now)
                    # its receipt again (sent once connected): the one of the last group before the crash
                    # may never have left this process; a copy costs the agent nothing
                    self._receipt(u, None)
                else:
                    refused[reason] += 1
            if refused:  # it would not hold what its receipts said: not this round's journal after all
                raise ValueError(f"updates refused on replay: {dict(refused)}")
        except Exception as e:  # noqa: BLE001 - a journal we cannot take back: the round is opened afresh
            log.error("round journal %s could not be taken back (%s: %s): round %d is opened afresh and its agents "
                      "re-send", j.path, type(e).__name__, e, self.next_round)
            self.controller.current = None
            self._receipts.clear()
            self._discard_journal(j)
            return False
        r = self.controller.current
        self.telemetry.round.set(ann.round)
        self._size_reassembly(len(asked))
        log.info("round %d taken back from its journal: %d of %d asked updates held (%.2fs)", ann.round, replayed,
                 len(asked), time.monotonic() - t0)
        if r is not None and r.quorum_at is not None:
            log.info("round %d: its quorum %d was already reached", ann.round, r.quorum)
        return True

    def _tick(self) -> None:
        """About once a second: expire incomplete blobs, flush rejection summaries, export gauges."""
        mono = time.monotonic()
        if mono < self._next_tick:
            return
        self._next_tick = mono + 1.0
        self._count_limited(summary=mono >= self._next_summary)
        try:
            self._quarantine(mono)
        except Exception as e:  # noqa: BLE001 - a failed (un)subscribe is retried at the next tick
            self._internal("updating quarantine subscriptions", e)
        if mono >= self._next_summary:
            self._next_summary = mono + self.cfg.limits.log_interval_s
        tick = getattr(self.receiver, "tick", None)
        try:
            if callable(tick):
                tick()
            else:
                self.receiver.reassembler.expire()
        except Exception as e:  # noqa: BLE001
            self._internal("expiring incomplete blobs", e)
        self.bounded_log.tick()
        self.telemetry.inbox_dropped.set(getattr(self.client, "dropped", 0))
        self.fleet.readmit_expired(time.time(), self.cfg.rounds.exclude_s)
        self.telemetry.devices_known.set(len(self.fleet.devices))  # O(1): no pass over the table each second
        self.telemetry.devices_excluded.set(len(self.fleet.excluded))
        if mono >= self._next_fleet_save:
            self._next_fleet_save = mono + 30.0
            self._save_fleet()

    def _fleet_close(self, r) -> None:
        try:
            self.fleet.on_close(r.ann.round, r.asked, list(r.received))
        except Exception as e:  # noqa: BLE001 - the operator's table never stops a round
            self._internal("updating the fleet table", e)

    @property
    def fleet_path(self) -> Path:
        return self.state_dir / "fleet.json"

    def _save_fleet(self) -> None:
        """fleet.json in the state dir: what `fedmq-aggregator status` shows when no service answers."""
        try:
            self.fleet.save(self.fleet_path, {"service": self._service_doc()})
        except Exception as e:  # noqa: BLE001 - a full disk must not stop the rounds
            log.warning("could not write %s: %s", self.fleet_path, e)

    def _service_doc(self) -> dict:
        state = "done" if self._done else ("online" if self.client.connected else "connecting")
        return {"id": self.cfg.service.id, "run": self.run_id, "model_id": self.served.model_id if self.served else "",
                "state": state, "connected": bool(self.client.connected), "version": __version__,
                "global_round": self.global_round, "next_round": self.next_round, "started": self.started,
                "fleet": self.topics.fleet}

    def status_doc(self, rounds: int = 500) -> dict:
        """The service, the open round, fleet counts and the last closed rounds (served as /api/status).

        Called from the HTTP threads: it only reads (dict copies are atomic under the GIL)."""
        now = time.time()
        c = self.controller.current
        doc: dict = {"ts": now, "service": self._service_doc()}
        if c is not None:
            rej = dict(self.round_rejects)
            doc["round"] = {"round": c.ann.round, "asked": len(c.asked), "quorum": c.quorum,
                            "received": len(c.received), "rejected": int(sum(rej.values())),
                            "rejected_by_reason": rej, "opened": c.started, "deadline": c.ann.deadline,
                            "seconds_left": max(0.0, c.ann.deadline - now), "quorum_reached": c.quorum_at is not None}
        else:
            doc["round"] = None
        doc["fleet"] = self.fleet.counts()
        total: Counter[str] = Counter()
        for metric in self.telemetry.rejected.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    total[sample.labels["reason"]] += int(sample.value)
        doc["rejected_total"] = dict(total)
        rows = []
        keep = ("round", "outcome", "ts", "duration_s", "eval_accuracy", "eval_loss", "train_loss")
        for h in self.history[-rounds:]:
            row = {k: h[k] for k in keep if k in h and (not isinstance(h[k], float) or np.isfinite(h[k]))}
            row.update(participants=int(h.get("participants", 0)), asked=int(h.get("asked", 0)),
                       bytes_received=int(h.get("bytes_received", 0)),
                       bytes_sent=int(self._bytes_sent.get(h["round"], 0)), rejected=h.get("rejected", {}))
            rows.append(row)
        doc["rounds"] = rows
        return doc

    def _republish_state(self) -> None:
        """Publish every retained message we own (first connection, reconnects, after a failed publish)."""
        try:
            if not self._scanned:
                self._clear_stale_chunks()
                self._scanned = True
            t = self.topics
            # not waited for: a wait reads on, and after a restart what waits in our session (the uploads of
            # our dead time, the fleet's retained statuses) would pile up in the inbox (~30 MB at 10,000
            # devices); the broker's answers are checked by step (_check_tracked)
            track = self._tracked
            self.publisher.publish(t.service(), self._service_status("online"), retain=True, wait=False, track=track)
            self.publisher.publish(t.model(), self.served.manifest(self.run_id), retain=True, wait=False, track=track)
            if self._delta is not None and self._delta.round == self.global_round:
                self.publisher.publish(t.delta(), self._delta, retain=True, wait=False, track=track)
            self.publisher.publish(t.global_(), GlobalModel(self.global_round, self.served.model_id,
                                                            self.global_weights, time.time(), run=self.run_id),
                                   retain=True, wait=False, track=track)
            if self.controller.current is not None:
                # the same announcement (same "opened"): we still hold every update we sent a receipt for
                # (in memory, and in the round's journal across a restart), so nobody is asked to re-send
                # those. An update the broker took but we never got (its queue for us lost with a broker
                # restart, or our session expired) has no receipt: its agent re-sends it soon after its own
                # reconnect, else after resend_s (docs/protocol.md, Receipts)
                self.publisher.publish(t.round(), self.controller.current.ann, retain=True, wait=False, track=track)
            self._tracked_until = time.monotonic() + self.cfg.service.publish_timeout_s
            log.info("model, global (round %d) and round state handed to the broker", self.global_round)
        except FedmqError as e:
            log.warning("publishing the retained state failed (%s); retrying in 2 s", e)
            self._next_republish = time.monotonic() + 2.0
            self._republish.set()

    def _check_tracked(self) -> None:
        """The broker's answers to the retained state published by _republish_state: a refusal or no
        answer within ``publish_timeout_s`` means publishing it again (in 2 s), as a failed wait did."""
        if not self._tracked:
            return
        refused = [(topic, w.value) for topic, _, w in self._tracked
                   if w.event.is_set() and getattr(w.value, "is_failure", False)]
        done = all(w.event.is_set() for _, _, w in self._tracked)
        late = not done and time.monotonic() > self._tracked_until
        if not (done or late or refused):
            return
        for _, mid, w in self._tracked:
            if not w.event.is_set():
                self.client.forget(mid)
        self._tracked = []
        if refused or late:
            what = (f"refused: {', '.join(f'{tp} ({rc})' for tp, rc in refused[:5])}" if refused
                    else f"not acknowledged within {self.cfg.service.publish_timeout_s}s")
            log.warning("publishing the retained state failed (%s); retrying in 2 s", what)
            self._next_republish = time.monotonic() + 2.0
            self._republish.set()
        else:
            log.info("retained state acknowledged by the broker (global round %d)", self.global_round)

    def _clear_stale_chunks(self, timeout: float = 10.0) -> None:
        """Find the retained chunk topics an earlier process left (model, global) so our publishes clear them.

        Subscribes to the chunk filters, then sends itself a marker on the same filter: the broker
        delivers the retained chunks before the marker, so when the marker arrives the scan is
        complete. Other messages that arrive meanwhile are handled as usual.
        """
        t = self.topics
        # the marker goes to our own status topic (we read agents/+/status; agents never subscribe to it)
        marker, nonce = t.status(self.cfg.service.id), f"scan-{uuid.uuid4().hex}".encode()
        filters = {f"{s}/chunk/+": s for s in (t.model(), t.global_(), t.delta())}
        found: dict[str, int] = {}
        # nothing here waits for an acknowledgement: a wait reads on without pausing (behind a restart's
        # flood of retained statuses, ~N messages) and may fill the inbox; the marker's arrival is the ack
        for f in filters:
            self.client.subscribe(f, qos=1, wait=False)
        self.client.publish(marker, nonce, qos=1, retain=False, wait=False)
        end = time.monotonic() + timeout
        done = False
        while not done and time.monotonic() < end:
            m = self.client.get(timeout=0)
            if m is None:
                self._commit()  # before blocking: the broker sends no more until it has our acknowledgements
                m = self.client.get(timeout=0.1)
            if m is None:
                continue
            self._handled(m)
            if m.topic == marker and m.payload == nonce:
                done = True
            elif "/chunk/" in m.topic and m.topic.rsplit("/chunk/", 1)[0] in filters.values():
                stream, idx = m.topic.rsplit("/chunk/", 1)
                if idx.isascii() and idx.isdigit() and m.payload:
                    found[stream] = max(found.get(stream, 0), int(idx) + 1)
            else:
                try:
                    self._handle(m.topic, m.payload, m.retain)
                except Exception as e:  # noqa: BLE001 - one message never ends the service
                    self._internal(f"handling a message on {m.topic[:200]!r}", e)
        self._commit()
        for f in filters:
            self.client.unsubscribe(f)
        for stream, n in found.items():
            self.publisher.forget_retained(stream, n)
        if not done:
            log.warning("scan for stale retained chunks timed out after %.0fs; found %s", timeout, found)
        elif found:
            log.info("retained chunk topics left by an earlier process (cleared by our next publish): %s", found)

    def _on_sys_dropped(self, payload: bytes) -> None:
        try:
            n = int(bytes(payload[:32]).decode("ascii").strip())
        except (ValueError, UnicodeDecodeError):
            return
        old, self.broker_dropped = self.broker_dropped, n
        self.telemetry.broker_dropped.set(n)
        if old is not None and n > old:
            log.warning("the broker dropped %d messages since its last report (%d in total): a client's queue is "
                        "full (raise max_queued_messages / max_inflight_messages for the fleet; docs/operations.md)",
                        n - old, n)

    def _receipt(self, u: Update, reason: str | None) -> None:
        """Tell the agent whether we hold its update (never blocks).

        QoS 0: a lost receipt costs the agent one re-send (answered ``duplicate``; soon after its reconnect,
        else after ``resend_s``); at QoS 1 each would cost a PUBACK to read, and paho's window of 20
        unacknowledged publishes would hold the global behind thousands of receipts at the end of a large
        round (0.8 s at 10,000)."""
        accepted = reason is None or (reason == "duplicate" and self.controller.holds(u))
        msg = Receipt(u.run if u.run else self.run_id, u.round, u.agent, u.update_id, accepted, reason or "",
                      reason in RETRY_REASONS)
        # sent by _commit, after the batch's journal records are on disk (a receipt is never ahead of them)
        self._receipts.append((self.topics.receipt(u.agent), codec.encode(msg)))

    def _on_own_topic(self, topic: str, payload: bytes, retained: bool) -> None:
        """A message on a retained topic we own: if it is not what we last put there, put our state back."""
        import hashlib

        if self.publisher is None or hashlib.sha256(payload).digest() == self.publisher.retained_digest.get(topic):
            return  # our own (3.1.1 has no No Local; or the retained copy of our last publish)
        if retained and not self._scanned:
            return  # what an earlier process left: replaced by the first publish of the state anyway
        self.foreign_writes += 1
        self.telemetry.rejected.labels("foreign_write").inc()
        self.bounded_log.reject(topic, "foreign_write", "someone else wrote %s (%d bytes, retained=%s): republishing "
                                "our state; agents refuse what the fleet key did not sign. Check the broker's ACL "
                                "and who holds write credentials", topic[:200], len(payload), retained)
        if not self._republish.is_set():
            self._next_republish = max(self._next_republish, time.monotonic() + 1.0)  # a flood costs 1 publish/s
            self._republish.set()

    def _handle(self, topic: str, payload: bytes, retained: bool) -> None:
        if self._presence_until and self._presence_nonce is not None and len(payload) == len(self._presence_nonce) \
                and payload == self._presence_nonce and topic == self.topics.status(self.cfg.service.id):
            self._presence_nonce = None  # every retained status was delivered before it
            log.info("who is online after the restart: %d agents", len(self.online))
            return
        if topic == SYS_DROPPED:
            self._on_sys_dropped(payload)
            return
        if topic in self._guarded:
            self._on_own_topic(topic, payload, retained)
            return
        if self.limiter is not None and not self._admits:  # an injected client: limit here
            agent = agent_of(topic, self.topics.base)
            if agent is not None and not self.limiter.allow(agent, len(payload)):
                self._count_reject("rate_limited")
                self.bounded_log.reject(agent, "rate_limited", "message from %s on %s dropped: over its rate limit",
                                        agent, topic[:200])
                return
        if not payload and agent_of(topic, self.topics.base) is not None and topic.endswith("/update"):
            self._count_reject("empty")  # a status may be cleared (empty retained); an update may not
            return
        got = self.receiver.feed(topic, payload, retained)
        if got is None:
            return
        msg = got.message
        if got.topic.channel is Channel.STATUS and isinstance(msg, Status):
            agent = sys.intern(msg.agent)  # one str per device in every table (not one per status received)
            self._known.add(agent)
            self.fleet.on_status(agent, msg.state, msg.runtime, msg.interpreter, msg.version, msg.num_samples,
                                 msg.error, time.time(), retained)
            if msg.state == "offline":
                self.online.discard(agent)
            else:
                self.online.add(agent)
            self.telemetry.agents.set(len(self.online))
        elif got.topic.channel is Channel.UPDATE and isinstance(msg, Update):
            reason = self.controller.on_update(msg, got.nbytes, time.time())
            if reason is None:  # first: it counts now, so it is in the journal before anything else can fail
                self._journal_append(b"U", got.payload if got.payload is not None else payload)
            self.fleet.on_update(msg.agent, reason, time.time())
            if reason is None:
                self.telemetry.accepted.inc()
                self.telemetry.bytes_in.inc(got.nbytes)
            else:
                self._count_reject(reason)
            self._receipt(msg, reason)
        else:
            self._count_reject("wrong_channel")

    def _maybe_open(self, now: float) -> None:
        rc = self.cfg.rounds
        if not self.client.connected or self._republish.is_set():
            return  # nobody could hear the announcement; the retained state goes out first
        if self._presence_nonce is not None:
            if not self._presence_until:  # after a resumed start: who is online, before asking anyone
                self._scan_presence()
                return
            if time.monotonic() < self._presence_until:
                return
            log.warning("the retained statuses asked for after the restart did not all arrive in time; opening "
                        "with the %d agents seen online", len(self.online))
            self._presence_nonce = None
        excluded = [a for a in self.fleet.excluded if a in self.online]  # O(excluded), not O(fleet)
        # min_agents counts the devices that can be asked: excluded ones are online but never asked
        if rc.select != "list" and (len(self.online) - len(excluded) < rc.min_agents or len(excluded) >= len(self.online)):
            return
        tc = self.cfg.train
        lr = tc.lr * tc.lr_decay ** (self.next_round - 1)
        train = TrainConfig(tc.epochs, self.served.batch_size, lr, tc.mu, Compression(tc.encoding, tc.topk_fraction),
                            seed=self.next_round, upload_window_s=rc.upload_window_s, downlink=tc.downlink)
        self.round_rejects = Counter()
        ann = self.controller.open(self.next_round, self.served.model_id, self.global_round, self.global_weights,
                                   list(self.online), train, now, run=self.run_id, excluded=excluded)
        if self.controller.current is not None:
            self.fleet.on_open(self.controller.current.asked)
            self._journal_begin(ann, self.controller.current.asked, self.controller.current.quorum, now)
        self.telemetry.round.set(self.next_round)
        self._size_reassembly(len(self.controller.current.asked) if self.controller.current else 0)
        self._publish_retained(self.topics.round(), ann)

    def _close_round(self, now: float) -> None:
        r, result = self.controller.close()
        self._fleet_close(r)
        if "weight_capped" in result.metrics:
            self.telemetry.weight_capped.inc(result.metrics["weight_capped"])
        # the state before the round: put back if recording or checkpointing fails, so that nothing of an
        # uncheckpointed round is ever published (the global round never moves past the checkpoint)
        before = (self.global_weights, self.global_round, self.next_round, len(self.history), self._delta)
        self._delta = None
        try:
            self._apply_round(r, result, now)
        except BaseException:
            self.global_weights, self.global_round, self.next_round, n, self._delta = before
            del self.history[n:]
            raise
        self._journal_end()  # the checkpoint counts the round: its journal is done
        if result.weights is not None:
            b0 = self.publisher.bytes_out
            if self._delta is not None:
                self._publish_retained(self.topics.delta(), self._delta)
            self._publish_global()
            self._bytes_sent[r.ann.round] = self.publisher.bytes_out - b0
            self.telemetry.bytes_out.inc(self.publisher.bytes_out - b0)
            if len(self._bytes_sent) > 1000:
                del self._bytes_sent[min(self._bytes_sent)]
            #: (round, seconds from the quorum being reached to the new global model being published)
            self.quorum_to_publish = (r.ann.round, time.time() - (r.quorum_at or now))
        self._publish_metrics(self._last_metrics)
        self._submit_plots()
        self._check_done(self._last_values)

    def _apply_round(self, r, result, now: float) -> None:
        """Take the round's result as the new state, record it and checkpoint it (nothing is published here)."""
        if result.weights is not None:
            new = result.weights
            if self.cfg.train.downlink != "raw" and set(new) == set(self.global_weights):
                from fedmq.broker.contract.downlink import make_delta

                prev = GlobalModel(self.global_round, self.served.model_id, self.global_weights, 0.0, self.run_id)
                # the reconstruction every device computes IS the new global (no drift between them)
                self._delta, new = make_delta(prev, new, r.ann.round, self.cfg.train.downlink, time.time())
            self.global_weights = new
            self.global_round = r.ann.round
        self._last_metrics, self._last_values = self._record(r, result, now, result.outcome, result.reason)
        self.next_round = r.ann.round + 1
        # aggregate -> checkpoint -> global -> metrics: a crash after the checkpoint never re-applies the
        # round, and a metrics message exists only for a checkpointed (and published) round
        self._checkpoint()

    def _submit_plots(self) -> None:
        if not self.cfg.service.plots:
            return
        if self._plots is None:
            from .plots import PlotWriter

            self._plots = PlotWriter(self.state_dir / "plots")
        self._plots.submit(self.history)

    def _publish_metrics(self, metrics: RoundMetrics) -> None:
        try:  # disconnected: handed to paho, which sends it after the reconnect (never blocks the round loop)
            self.publisher.publish(self.topics.metrics(), metrics, wait=self.client.connected,
                                   timeout=self.cfg.service.publish_timeout_s)
        except Exception as e:  # noqa: BLE001 - metrics must never stop the round loop
            log.warning("could not publish round metrics: %s", e)

    def _record(self, r, result, now: float, outcome: str, reason: str) -> tuple[RoundMetrics, dict[str, float]]:
        """Append the round's history row; return its metrics message (published after the checkpoint)."""
        values: dict[str, float] = {"participants": float(len(r.received)), "asked": float(len(r.asked)),
                                    "bytes_received": float(r.bytes_in), "duration_s": now - r.started,
                                    "global_round": float(self.global_round)}
        if result is not None:
            values.update({k: float(v) for k, v in result.metrics.items()})
        if self._evaluator is not None and outcome == "aggregated":
            t0 = time.perf_counter()
            self._evaluator.set_weights([self.global_weights[w.name] for w in self.served.weights])
            loss, acc = self._evaluator.evaluate(self._eval.x, self._eval.y, batch=256)
            values.update(eval_loss=loss, eval_accuracy=acc, eval_s=time.perf_counter() - t0)
        rejected = dict(self.round_rejects)
        participants = list(r.received)
        listed = participants[: self.cfg.rounds.participants_listed]  # rows and messages of bounded size
        self.history_log.append_participants(r.ann.round, self.run_id, participants)  # all of them, append-only
        row = {"round": r.ann.round, "run": self.run_id, "outcome": outcome, "reason": reason, "ts": time.time(),
               **values,
               "strategy": self.strategy.name, "server_optimizer": self.strategy.server.name,
               "strategy_params": self._strategy_info()["table"],
               **({"strategy_switched_from": self._switched_from} if self._switched_from else {}),
               "participants_list": listed, "participants_truncated": len(listed) < len(participants),
               "rejected": rejected}
        self._switched_from = None  # recorded once, in the first round after the switch
        self.history.append(row)
        self.telemetry.rounds.labels(outcome).inc()
        self.telemetry.duration.observe(values["duration_s"])
        log.info("round %d %s: %d updates%s%s", r.ann.round, outcome, len(r.received),
                 f", eval acc {values['eval_accuracy']:.4f}" if "eval_accuracy" in values else "",
                 f" ({reason})" if reason else "")
        metrics = RoundMetrics(r.ann.round, time.time(), outcome, listed,
                               {k: v for k, v in values.items() if np.isfinite(v)},
                               {k: float(v) for k, v in rejected.items()}, run=self.run_id)
        return metrics, values

    def _check_done(self, values: dict[str, float]) -> None:
        rc = self.cfg.rounds
        aggregated = sum(1 for h in self.history if h["outcome"] == "aggregated")
        hit = rc.target_metric and values.get(rc.target_metric, float("-inf")) >= rc.target_value
        if (rc.rounds and aggregated >= rc.rounds) or hit:
            log.info("run complete: %d rounds aggregated%s", aggregated, f", {rc.target_metric} reached" if hit else "")
            self._done = True
            if self.cfg.service.export_final:
                try:
                    paths = export_final(self.cfg.model, self.served, self.global_weights, self.state_dir / "final")
                    log.info("final model written: %s", ", ".join(map(str, paths)))
                except ImportError:
                    log.warning("TensorFlow not installed: final .keras/.tflite export skipped")
