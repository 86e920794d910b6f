"""The edge agent service: receive the model, train on local data when asked, send the delta.

Single protocol thread (paho's thread only enqueues). State that matters is on disk: the model
artifact cache (by id), the outbox of finished updates (by run, model and round), the top-k
error-feedback residual, the latest accepted global (``global.msgpack``, for on-device predictions,
and read back while training: the agent drops its in-memory copy once the weights are in the
interpreter) and the run this agent follows with the highest round it has seen of it (``run.json``).
Training runs from ``step`` once the received messages are handled, never inside a handler.

What it will not do:
* go back: within the run it follows, a global or announcement older than one it already had is
  refused (``stale_global``); a new run id is followed explicitly (logged; the old run's outbox and
  residual are dropped) and a run it has left is never followed again;
* download what it will not train on: the global is subscribed to only while an announcement asks
  this agent and its copy is not the announced base (``follow_global`` keeps it subscribed), so a
  slow link carries one global per round it trains, not every intermediate one;
* block: updates and statuses are handed to paho without waiting for PUBACKs (paho re-sends after a
  reconnect), so the protocol loop keeps reading while a slow upload drains;
* trust a PUBACK as a receipt: an update counts as delivered only when the aggregator's receipt says
  it holds it; without one it is re-sent from the outbox (same ``update_id``, capped backoff from
  ``[agent] resend_s``) until the round closes; a refusal that cannot change drops the entry;
* burst: with the round's ``upload_window_s`` it uploads at a seeded moment within that window, and
  when a (re)started aggregator announces itself it republishes its status (and re-sends an update
  still without its receipt) after a seeded delay within ``[agent] presence_jitter_s`` (a presence
  re-sync that never relies on every retained status fitting the aggregator's broker queue at once);
* outlive refused credentials: the loop raises the client's AuthError (``fedmq-agent`` exits 3).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import threading
import time
import uuid
import zlib

import numpy as np

from fedmq.broker import __version__
from fedmq.broker.contract import codec
from fedmq.broker.contract.downlink import weights_digest
from fedmq.broker.contract.messages import (
    GlobalDelta,
    GlobalModel,
    ModelManifest,
    Receipt,
    RoundAnnouncement,
    ServiceStatus,
    Signed,
    Status,
    Update,
)
from fedmq.broker.contract.topics import Channel
from fedmq.broker.errors import FedmqError
from fedmq.broker.storage import atomic_write
from fedmq.broker.transport.client import MqttClient, Will
from fedmq.broker.transport.publisher import Publisher
from fedmq.broker.transport.receiver import Receiver

from .compress import ErrorFeedback, apply_error_feedback
from .config import AgentConfig
from .data import load_local, split_eval
from .memory import note, trim_heap
from .outbox import Outbox, OutboxKey
from .trainer import ArtifactError, DataError, TFLiteTrainer, check_data

log = logging.getLogger(__name__)

#: when an update without receipt is re-sent, as fractions of presence_jitter_s: after our own reconnect
#: within the first tenth (reconnects are spread by their backoff jitter already); after a (re)connected
#: aggregator's "online" in the second half (what its session kept arrives, with receipts, first)
RECONNECT_SPREAD = (0.0, 0.1)
ONLINE_SPREAD = (0.5, 1.0)
VERSION = __version__


def _update_id(payload: bytes) -> str:
    """The update_id of an encoded update of ours (read back from the outbox bytes)."""
    m = codec.decode(payload)
    return getattr(m, "update_id", "")


class AgentService:
    def __init__(self, cfg: AgentConfig, client: MqttClient | None = None) -> None:
        self.cfg = cfg
        self.id = cfg.agent.id
        self.topics = cfg.broker.topics()
        cache = cfg.cache_dir
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "models").mkdir(exist_ok=True)
        self.outbox = Outbox(cache / "outbox")
        self.ef = ErrorFeedback(cache / "residual.npz")
        offline = codec.encode(Status(self.id, "offline", time.time(), version=VERSION))
        self.client = client or MqttClient(cfg.broker.mqtt(self.id, clean_start=True,
                                                           will=Will(self.topics.status(self.id), offline)))
        self.client.on_connected = self._on_connected
        trust = None
        if cfg.agent.trusted_keys:
            from fedmq.broker.contract.signing import TrustedKeys

            trust = TrustedKeys.parse(cfg.agent.trusted_keys)
        else:
            log.warning("[agent] trusted_keys is empty: model and global messages are not authenticated (anyone "
                        "who can write the fleet's retained topics could push a model); set it from the fleet's "
                        "aggregator/signing.pub")
        self.receiver = Receiver(self.topics, trust=trust)
        self.stop_event = threading.Event()
        self._reannounce = threading.Event()
        x, y = load_local(cfg.data.source)
        self.x, self.y, self.x_eval, self.y_eval = split_eval(x, y, cfg.data.eval_fraction, cfg.data.seed)
        self.trainer: TFLiteTrainer | None = None
        self.manifest: ModelManifest | None = None
        self.global_msg: GlobalModel | None = None
        self._train_due = False  # a round to train for: step() trains once the received messages are handled
        self._global_on_disk: tuple[str, int, str] | None = None  # (run, round, model) cache_dir/global.msgpack holds
        self.announcement: RoundAnnouncement | None = None
        self.sent: set[tuple[int, float]] = set()  # (round, announcement opened) already delivered
        #: the update being handed over: (key, paho message infos); done when every PUBACK is in
        self.pending: tuple[tuple[int, float], list] | None = None
        #: the update awaiting its receipt: outbox key, update_id, monotonic time last handed over, attempts
        self.inflight: tuple[OutboxKey, str, float, int] | None = None
        self.delivered: set[OutboxKey] = set()  # the aggregator's receipt says it holds these (or refused for good)
        self.wait_reannounce: set[OutboxKey] = set()  # refused for a reason that can change: re-sent when re-announced
        self.scheduled: tuple[float, tuple[int, float], bytes] | None = None  # (due, key, payload): upload window
        self._presence_due: float | None = None
        self._connected_at = 0.0  # monotonic: our last (re)connect, and the last live "online" of the aggregator
        self._online_at = 0.0
        self._announced_at = 0.0  # ``opened`` of the announcement our last send answered
        self.run_state = self._load_run_state()  # {"run", "global_round", "round", "left": [...]}
        self._global_subscribed = "off"  # off | full (the keyframe) | delta (the compressed delta)
        self._delta_failed = -1  # the base round for which the delta did not apply: fetch the keyframe
        self.deltas_applied = 0
        self.service: ServiceStatus | None = None
        self.state = "online"
        self.rounds_trained = 0
        self.data_error: str | None = None  # our data does not fit the model (reported in our status)
        self.model_error: str | None = None  # the model artifact was refused by every runtime
        self._told_excluded = 0  # the last round whose announcement named us excluded (logged once)

    # -- status --------------------------------------------------------------------------------------
    def _on_connected(self, reconnect: bool) -> None:
        self._reannounce.set()  # republish our status from the protocol thread

    def _status(self, state: str) -> None:
        """Publish our retained status; while we cannot train (data or model refused) it is "error" with why,
        so that the aggregator stops asking us until a later status says we are ready again."""
        error = self.data_error or self.model_error or ""
        if error and state in ("online", "idle"):
            state = "error"
        elif not error and state == "error":
            state = "idle"
        self.state = state
        runtime = self.trainer.runtime if self.trainer else ""
        msg = Status(self.id, state, time.time(), runtime=f"python {platform.python_version()}",
                     interpreter=runtime, num_samples=int(len(self.y)), version=VERSION, error=error[:500])
        try:  # not waited for: paho sends it (again after a reconnect); the loop never blocks on it
            self.client.publish(self.topics.status(self.id), codec.encode(msg), qos=1, retain=True, wait=False)
        except FedmqError as e:
            log.warning("could not publish status %s: %s", state, e)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._load_cached_model()
        t = self.topics
        # plain topic before its chunks: the retained pointer arrives before the chunks it names
        for f in (*t.with_chunks(t.model()), t.round(), t.service(), t.receipt(self.id)):
            self.client.subscribe(f, qos=1)  # remembered; made on every (re)connect
        if self.cfg.agent.follow_global:
            self._subscribe_global(True)
        self.publisher = Publisher(self.client, t)
        self.client.start()  # returns at once: the broker may not be up yet; on_connected publishes our status
        log.info("agent %s up: %d local examples (%d held out); connecting to %s:%s", self.id, len(self.y),
                 len(self.y_eval), self.cfg.broker.host, self.cfg.broker.port)

    def run(self, max_seconds: float | None = None) -> None:
        self.start()
        t_end = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not self.stop_event.is_set():
                if t_end is not None and time.monotonic() > t_end:
                    break
                if self.client.fatal is not None:
                    log.error("the broker refused this device's credentials (%s): revoked or wrong password; "
                              "stopping for good (exit code 3: systemd does not restart it). Re-provision the "
                              "device (fedmq-broker rotate/add) and start it again.", self.client.fatal)
                    raise self.client.fatal
                self.step(0.1)
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self) -> None:
        """Graceful: mark ourselves offline (retained), then disconnect (no last will needed)."""
        if self.client.connected:
            self._status("offline")
        self.client.close()

    # -- protocol --------------------------------------------------------------------------------------
    def step(self, timeout: float = 0.1) -> None:
        if self._reannounce.is_set():
            self._reannounce.clear()
            self._status(self.state if self.state != "offline" else "online")
            self._connected_at = time.monotonic()
            self._resend_soon(RECONNECT_SPREAD)  # reconnects are spread by their own backoff jitter already
            self._maybe_work()  # after a reconnect: re-send from the outbox if the round is open
        self._check_pending()
        self._timers()
        m = self.client.get(timeout=timeout)
        while m is not None:
            self._handle(m.topic, m.payload, m.retain)
            m = self.client.get(timeout=0)
        if self._train_due:  # here, not inside a handler: no received message holds the global's bytes
            self._train_due = False
            try:
                self._maybe_work(train=True)
            except Exception as e:  # the agent keeps serving (as for a message's handler)
                self.receiver.internal_error(e, self.topics.round(), "training a round")
        self.receiver.tick()  # expire idle chunked blobs (memory back to the OS), flush rejection summaries

    def _handle(self, topic: str, payload: bytes, retained: bool) -> None:
        """Handle one received message; nothing it holds can raise out of here (counted ``internal``)."""
        try:
            self._handle_one(topic, payload, retained)
        except Exception as e:  # last line of defence: the agent keeps serving
            self.receiver.internal_error(e, topic, "handling a received message")

    def _handle_one(self, topic: str, payload: bytes, retained: bool) -> None:
        got = self.receiver.feed(topic, payload, retained)
        if got is None:
            return
        msg = got.message
        ch = got.topic.channel
        if ch is Channel.SERVICE and isinstance(msg, ServiceStatus):
            old = self.service
            self.service = msg
            if old is None or (old.state, old.run) != (msg.state, msg.run):
                log.info("aggregator %s: %s (run %s, global round %d)", msg.service, msg.state, msg.run,
                         msg.global_round)
            if msg.state == "online" and not retained and (old is None or old.ts != msg.ts):
                # we (re)connected since we last saw the aggregator online (live or retained): what we sent
                # meanwhile may have found no subscription (a broker restart): re-send as soon as after a
                # reconnect; else its session kept it, and its receipts come first
                soon = self._connected_at > self._online_at
                self._online_at = time.monotonic()
                # a (re)connected aggregator: republish our status within the jitter window, and re-send an
                # update still without its receipt (what we sent before its subscriptions were back, e.g.
                # after a broker restart, reached nobody)
                jitter = self.cfg.agent.presence_jitter_s * (zlib.crc32(f"{self.id}/{msg.ts}".encode()) / 2**32)
                self._presence_due = time.monotonic() + jitter
                self._resend_soon(RECONNECT_SPREAD if soon else ONLINE_SPREAD)
            elif msg.state == "online":  # retained: the aggregator was there when we (re)subscribed
                self._online_at = time.monotonic()
            return
        if ch is Channel.RECEIPT and isinstance(msg, Receipt):
            self._on_receipt(msg)
            return
        if ch is Channel.MODEL and isinstance(msg, ModelManifest):
            if hashlib.sha256(msg.artifact).hexdigest() != msg.model_id:
                self.receiver.reject("bad_model_id", f"model {msg.model_id[:12]}: artifact hash differs", topic)
                return
            if not self._same_run(msg.run, topic, "model"):
                return
            self._set_model(msg)
        elif ch is Channel.GLOBAL and isinstance(msg, GlobalModel):
            bad = self._global_misfit(msg)
            if bad:
                self.receiver.reject("bad_global", f"global of round {msg.round}: {bad}", topic)
                return
            if not self._same_run(msg.run, topic, "global", global_round=msg.round):
                return
            new = self.global_msg is None or (self.global_msg.run, self.global_msg.round) != (msg.run, msg.round)
            note(f"global {msg.round} received")
            if new or self.global_msg is None or not self.global_msg.tensors:
                self.global_msg = msg  # a re-delivered copy of the one we hold (a reconnect) changes nothing
            self.outbox.drop_before(msg.run, msg.round + 1)  # rounds up to this one are closed
            if new and got.payload is not None:
                self._global_on_disk = None
                atomic_write(self.cfg.cache_dir / "global.msgpack", got.payload)  # for LocalModel / predict
                self._global_on_disk = (msg.run, msg.round, msg.model_id)
                (self.cfg.cache_dir / "global.proof").unlink(missing_ok=True)  # the keyframe proves itself
        elif ch is Channel.DELTA and isinstance(msg, GlobalDelta):
            if not self._apply_delta(msg, got.payload, topic):
                return
        elif ch is Channel.ROUND and isinstance(msg, RoundAnnouncement):
            if not self._same_run(msg.run, topic, "round", round_no=msg.round):
                return
            self.announcement = msg
            self.outbox.drop_before(msg.run, msg.round)
        else:
            return
        self._maybe_work()

    def _apply_delta(self, d: GlobalDelta, payload, topic: str) -> bool:
        """Reconstruct the new global from ours and the compressed delta; else fall back to the keyframe."""
        from fedmq.broker.contract.downlink import apply_delta
        from fedmq.broker.errors import DecodeError

        g, ann = self.global_msg, self.announcement
        try:
            if g is None:
                raise DecodeError("no global to apply a delta to", reason="bad_delta")
            if (g.run, g.round) == (d.run, d.round):
                return False  # we have it already
            new = apply_delta(g, d)
        except DecodeError as e:
            if ann is not None and d.round >= ann.base_round and g is not None and (g.run, g.model_id, g.round) == \
                    (d.run, d.model_id, d.base_round):
                self.receiver.reject(e.reason, str(e), topic)  # it should have applied: a real failure
            self._delta_failed = ann.base_round if ann is not None else d.round
            log.info("round %d: the delta does not apply to our global (%s); fetching the full global", d.round, e)
            self._maybe_work()
            return False
        if self._global_misfit(new) or not self._same_run(new.run, topic, "global", global_round=new.round):
            return False
        self.global_msg = new
        self.deltas_applied += 1
        self.outbox.drop_before(new.run, new.round + 1)
        self._global_on_disk = None
        atomic_write(self.cfg.cache_dir / "global.msgpack", codec.encode(new))  # for LocalModel / predict ...
        self._global_on_disk = (new.run, new.round, new.model_id)
        if payload is not None:
            atomic_write(self.cfg.cache_dir / "global.proof", payload)  # ... with the signed delta that proves it
        return True

    # -- runs ------------------------------------------------------------------------------------------
    def _load_run_state(self) -> dict:
        p = self.cfg.cache_dir / "run.json"
        try:
            d = json.loads(p.read_text())
            if isinstance(d, dict) and isinstance(d.get("run"), str):
                return {"run": d["run"], "global_round": int(d.get("global_round", 0)),
                        "round": int(d.get("round", 0)), "left": [str(x) for x in d.get("left", [])][-16:]}
        except (OSError, ValueError, TypeError):
            pass
        return {"run": "", "global_round": 0, "round": 0, "left": []}

    def _save_run_state(self) -> None:
        atomic_write(self.cfg.cache_dir / "run.json", json.dumps(self.run_state).encode())

    def _same_run(self, run: str, topic: str, what: str, global_round: int | None = None,
                  round_no: int | None = None) -> bool:
        """Follow ``run`` (a new one explicitly), refuse a left run or going back within the run."""
        st = self.run_state
        if run != st["run"]:
            if run in st["left"]:
                self.receiver.reject("stale_global", f"{what} of run {run}, which this agent left", topic)
                return False
            if st["run"]:
                log.warning("following new run %s (was %s): the old run's outbox and residual are dropped", run,
                            st["run"])
                st["left"] = (st["left"] + [st["run"]])[-16:]
            else:
                log.info("following run %s", run)
            st.update(run=run, global_round=0, round=0)
            self.outbox.drop_other_runs(run)
            self.ef.reset()
            self.global_msg = None if self.global_msg is None or self.global_msg.run != run else self.global_msg
            self.announcement = None if self.announcement is None or self.announcement.run != run \
                else self.announcement
            self.sent.clear()
            self._save_run_state()
        if global_round is not None:
            if global_round < st["global_round"]:
                self.receiver.reject("stale_global", f"global of round {global_round}, this agent had round "
                                     f"{st['global_round']} of run {run}", topic)
                return False
            if global_round > st["global_round"]:
                st["global_round"] = global_round
                self._save_run_state()
        if round_no is not None:
            if round_no < st["round"]:
                self.receiver.reject("stale_global", f"announcement of round {round_no}, this agent had round "
                                     f"{st['round']} of run {run}", topic)
                return False
            if round_no > st["round"]:
                st["round"] = round_no
                self._save_run_state()
        return True

    def _subscribe_global(self, on: bool, delta: bool = False, force: bool = False) -> None:
        """Subscribe to the global only while it is needed: the full keyframe, or (``delta``) only the
        compressed delta from the copy we hold (plain topic first, then its chunks). ``force``:
        unsubscribe and subscribe again even when subscribed (the retained message comes again)."""
        want = "off" if not on else ("delta" if delta else "full")
        if want == self._global_subscribed and not force:
            return
        t = self.topics
        topics = {"full": t.global_(), "delta": t.delta()}
        old = self._global_subscribed
        if old in topics:
            for f in t.with_chunks(topics[old]):
                self.client.unsubscribe(f)
        if want in topics:
            for f in t.with_chunks(topics[want]):
                self.client.subscribe(f, qos=1, wait=False)  # never block the loop behind a big retained global
        self._global_subscribed = want

    def _load_cached_model(self) -> None:
        for p in sorted((self.cfg.cache_dir / "models").glob("*.tflite"), key=lambda p: p.stat().st_mtime)[-1:]:
            try:
                self.trainer = TFLiteTrainer(p.read_bytes(), p.stem, self.cfg.agent.runtime or None,
                                             self.cfg.agent.num_threads or None, xnnpack=not self.cfg.agent.low_memory)
                log.info("model %s loaded from cache (%s)", p.stem[:12], self.trainer.runtime)
            except ArtifactError as e:
                log.warning("cached model %s unusable (%s): removed", p.name, e)
                p.unlink(missing_ok=True)

    def _global_misfit(self, g: GlobalModel) -> str | None:
        """Why global weights cannot be used with the model (names, shapes, float dtype), or None."""
        m = self.manifest
        specs = {w.name: tuple(w.shape) for w in m.weights} if m is not None and m.model_id == g.model_id else {}
        if self.trainer is not None and self.trainer.model_id == g.model_id:
            specs = specs or {n: None for n in self.trainer.weight_names}  # type: ignore[misc]
            missing = set(self.trainer.weight_names) - set(g.tensors)
            if missing:
                return f"missing tensors {sorted(missing)[:3]}"
        for name, shape in specs.items():
            t = g.tensors.get(name)
            if t is None:
                return f"missing tensor {name!r}"
            if shape is not None and tuple(t.shape) != shape:
                return f"tensor {name!r} has shape {tuple(t.shape)}, the model {shape}"
            if t.dtype.kind != "f":
                return f"tensor {name!r} has dtype {t.dtype}"
        return None

    def _set_model(self, m: ModelManifest) -> None:
        if self.trainer is not None and self.trainer.model_id == m.model_id:
            self.manifest = m
            return
        try:
            trainer = TFLiteTrainer(bytes(m.artifact), m.model_id, self.cfg.agent.runtime or None,
                                    self.cfg.agent.num_threads or None, xnnpack=not self.cfg.agent.low_memory)
        except ArtifactError as e:
            log.error("model %s refused: %s", m.model_id[:12], e)
            self.receiver.reject("bad_model", str(e), self.topics.model())
            self.model_error = f"model {m.model_id[:12]} refused: {e}"
            if self.client.connected:  # else sent with the status at the next connect
                self._status(self.state)
            return
        except Exception as e:  # a runtime may fail on a hostile flatbuffer in ways it does not type
            self.receiver.internal_error(e, self.topics.model(), "loading a received model artifact")
            return
        self.model_error = None
        try:
            check_data(self.x[:1], self.y[:1], trainer.x_shape, trainer.num_classes)
            self.data_error = None
        except DataError as e:
            self.data_error = f"data does not fit model {m.model_id[:12]}: {e}"
            log.error("local data does not fit model %s: %s", m.model_id[:12], e)
        if self.client.connected:
            self._status(self.state)  # "error" with why, or ready again
        path = self.cfg.cache_dir / "models" / f"{m.model_id}.tflite"
        atomic_write(path, m.artifact)
        for old in path.parent.glob("*.tflite"):
            if old != path:
                old.unlink(missing_ok=True)
        self.trainer, self.manifest = trainer, m
        log.info("model %s ready (%s, batch %d)", m.model_id[:12], trainer.runtime, trainer.batch_size)
        if self.cfg.agent.low_memory:
            trainer.release()  # loaded again when a round asks for this agent

    def _maybe_work(self, train: bool = False) -> None:
        """Send, re-send or train for the announced round, as far as what we hold allows. Training
        itself only with ``train`` (``step`` calls that once the received messages are handled)."""
        ann = self.announcement
        if ann is not None and ann.excluded and self.id in ann.excluded and self._told_excluded != ann.round:
            self._told_excluded = ann.round
            log.warning("round %d: the aggregator does not ask this device (excluded: its updates were refused "
                        "several rounds in a row, or it reported an error; `fedmq-aggregator status` says why). "
                        "Restarting the agent after a fix makes it eligible again", ann.round)
        if ann is None or not ann.asks(self.id) or time.time() > ann.deadline:
            self._subscribe_global(self.cfg.agent.follow_global)
            return
        key = (ann.round, ann.opened)
        okey = OutboxKey(ann.run, ann.model_id, ann.round, ann.base_round)
        stored = self.outbox.get(okey)
        if stored is not None:  # finished earlier: re-send into a re-announced round (the aggregator restarted)
            self._subscribe_global(self.cfg.agent.follow_global)
            if key in self.sent or (self.pending is not None and self.pending[0] == key) \
                    or (self.scheduled is not None and self.scheduled[1][0] == ann.round):
                return  # delivered for this announcement, or still being handed over (paho re-sends)
            if okey in self.delivered and self.inflight is not None and self.inflight[0] == okey \
                    and key[1] == self._announced_at:
                return  # the aggregator holds it, and this is not a re-announcement
            self._announced_at = key[1]
            self.delivered.discard(okey)  # a re-announced round: the aggregator may have restarted
            self.wait_reannounce.discard(okey)
            self._send(key, stored)
            return
        if key in self.sent:
            return
        t, g = self.trainer, self.global_msg
        has_base = g is not None and g.run == ann.run and g.round == ann.base_round and g.model_id == ann.model_id
        by_delta = not has_base and not self.cfg.agent.follow_global and ann.config.downlink != "raw" \
            and g is not None and g.run == ann.run and g.model_id == ann.model_id and g.round < ann.base_round \
            and self._delta_failed != ann.base_round
        self._subscribe_global(self.cfg.agent.follow_global or not has_base, delta=by_delta)
        if t is None or t.model_id != ann.model_id or not has_base or self.data_error or self._global_misfit(g):
            return  # wait for the matching model / global weights
        if not train:
            self._train_due = True
            return
        del t, g  # no reference to the global from here while it trains (see _spill_global)
        self._train(ann)

    def _train(self, ann: RoundAnnouncement) -> None:
        self._status("training")
        try:
            payload, steps, seconds, loss = self._train_and_encode(ann)  # its model-size temporaries are gone
        except Exception:
            self._status("idle")  # the round is tried again when a message asks for work (step() counts this)
            raise
        note(f"round {ann.round} encoded")
        self.outbox.put(OutboxKey(ann.run, ann.model_id, ann.round, ann.base_round), payload)  # on disk first
        self.rounds_trained += 1
        delay = self._upload_delay(ann)
        log.info("round %d: trained %d steps in %.1fs, loss %.4f; sending %d bytes%s", ann.round, steps, seconds,
                 loss, len(payload), f" in {delay:.1f}s (upload window)" if delay else "")
        self._announced_at = ann.opened
        if self.cfg.agent.low_memory:
            self.trainer.release()  # idle between rounds without the interpreter's model-size buffers
        if delay > 0:
            self.scheduled = (time.monotonic() + delay, (ann.round, ann.opened), payload)
        else:
            self._send((ann.round, ann.opened), payload)
        del payload
        trim_heap()  # what the round freed goes back to the OS (a device's RSS is its idle size again)
        note(f"round {ann.round} handed over")
        self._status("idle")

    def _train_and_encode(self, ann: RoundAnnouncement) -> tuple[bytes, int, float, float]:
        """Train on the global, return the encoded update (and steps, seconds, loss). The trained
        weights, the delta and the message object die here, before the upload's own buffers exist.

        Once the global weights are in the interpreter, the agent's own copy goes (back from disk for
        the delta, after the interpreter is gone): one model-size buffer less at the peak."""
        t = self.trainer
        names = t.weight_names
        cfg = ann.config
        if cfg.mu and not t.prox:  # what fit would refuse, refused before the global is spilled
            raise ArtifactError(f"round {ann.round} asks for FedProx (mu = {cfg.mu}) but model {t.model_id[:12]} "
                                "was exported without it")
        t.set_weights([np.asarray(self.global_msg.tensors[n], dtype=np.float32) for n in names], copy=False)
        t.prepare()
        spilled = self._spill_global()
        try:
            return self._fit_and_encode(ann, spilled)
        except BaseException:
            t.release()  # no interpreter, and no reference to the trained weights, left behind
            if spilled is not None and self.global_msg is not None and not self.global_msg.tensors:
                try:
                    self._unspill_global(spilled)
                except RuntimeError as e:
                    log.error("%s", e)
            raise

    def _fit_and_encode(self, ann: RoundAnnouncement, spilled) -> tuple[bytes, int, float, float]:
        t = self.trainer
        names = t.weight_names
        cfg = ann.config
        r = t.fit(self.x, self.y, epochs=cfg.epochs, lr=cfg.lr, mu=cfg.mu, seed=cfg.seed * 1000 + zlib.crc32(self.id.encode()) % 1000)
        metrics = {"loss": r.loss, "train_seconds": r.seconds}
        # one signature's buffers at a time: the training ones go before the evaluation allocates its own
        # (the FedAvg CNN: ~13 MB less at the peak); reloading the ~40 KB artifact takes milliseconds
        note(f"round {ann.round} trained")
        t.release()
        if len(self.y_eval):
            t.set_weights(r.weights, copy=False)  # r.weights stays unchanged until the release below
            vl, va = t.evaluate(self.x_eval, self.y_eval)
            metrics.update(val_loss=vl, val_accuracy=va)
            note(f"round {ann.round} evaluated")
            t.release()  # before r.weights becomes the delta, in place
        g = self._unspill_global(spilled) if spilled is not None else self.global_msg
        base = [np.asarray(g.tensors[n], dtype=np.float32) for n in names]
        del g
        # in place: the trained weights become the delta (no second model-size copy on the device)
        delta = {n: np.subtract(w, b, out=w) if w.dtype == np.float32 and w.flags.writeable
                 else (w - b).astype(np.float32) for n, w, b in zip(names, r.weights, base)}
        del base
        r.weights = []
        if self.cfg.agent.attack:  # robustness experiments: a Byzantine agent
            factor = -1.0 if self.cfg.agent.attack == "sign_flip" else 100.0
            delta = {n: np.multiply(d, np.float32(factor), out=d) for n, d in delta.items()}
        delta = apply_error_feedback(delta, cfg.compression, self.ef)
        upd = Update(ann.round, self.id, ann.model_id, uuid.uuid4().hex, r.num_samples, delta, metrics, time.time(),
                     cfg.compression, base_round=ann.base_round, run=ann.run)
        return codec.encode(upd), r.steps, r.seconds, r.loss

    def _spill_global(self) -> tuple[tuple[str, int, str], bytes] | None:
        """Drop the global's weights from memory while they are in the interpreter, when the cache file
        holds exactly this global (then ``_unspill_global`` reads them back); None: kept in memory."""
        g = self.global_msg
        if g is None or self._global_on_disk != (g.run, g.round, g.model_id):
            return None
        key, digest = (g.run, g.round, g.model_id), weights_digest(g.tensors)
        self.global_msg = GlobalModel(g.round, g.model_id, {}, g.created, g.run)  # its metadata only
        return key, digest

    def _unspill_global(self, spilled: tuple[tuple[str, int, str], bytes]) -> GlobalModel:
        """The spilled global, read back from the cache file and checked against its digest."""
        key, digest = spilled
        path = self.cfg.cache_dir / "global.msgpack"
        try:
            m = codec.decode(path.read_bytes(), self.receiver.limits)
            if isinstance(m, Signed):  # verified when it arrived; the digest below says it is the same
                m = codec.decode(m.body, self.receiver.limits, expect=GlobalModel)
            if not isinstance(m, GlobalModel) or (m.run, m.round, m.model_id) != key \
                    or weights_digest(m.tensors) != digest:
                raise ValueError("it holds another global")
        except (OSError, ValueError, FedmqError) as e:
            self.global_msg = None  # fetched again (retained), and the round trained again
            self._global_on_disk = None
            self._subscribe_global(True, force=True)  # the broker sends the retained global again
            raise RuntimeError(f"the global of round {key[1]} cannot be read back from {path} ({e}): this "
                               "round's update is not sent") from None
        if self.global_msg is not None and (self.global_msg.run, self.global_msg.round) == key[:2]:
            self.global_msg = m
        return m

    def _send(self, key: tuple[int, float], payload: bytes) -> None:
        """Hand an update to paho without waiting; it stays in the outbox until its round closes.

        The PUBACKs are collected by ``_check_pending`` on later steps, so a slow upload never blocks
        the protocol loop; paho re-sends unacknowledged packets after a reconnect.
        """
        infos: list = []
        try:
            self.publisher.publish_payload(self.topics.update(self.id), payload, qos=1, wait=False, infos=infos)
        except FedmqError as e:
            log.warning("round %d: update not handed over (%s); kept in the outbox", key[0], e)
            return
        self.pending = (key, infos)
        ann = self.announcement
        if ann is not None and ann.round == key[0]:
            okey = OutboxKey(ann.run, ann.model_id, ann.round, ann.base_round)
            prev = self.inflight
            attempts = prev[3] + 1 if prev is not None and prev[0] == okey else 1
            self.inflight = (okey, _update_id(payload), time.monotonic(), attempts)
        self._check_pending()

    def _on_receipt(self, rc: Receipt) -> None:
        """The aggregator's answer for our update: stop re-sending it, or drop it if it can never count."""
        inf = self.inflight
        if rc.agent != self.id or inf is None or rc.update_id != inf[1] or rc.round != inf[0].round \
                or rc.run != inf[0].run:
            return  # not about the update we are delivering (an old copy's answer)
        okey = inf[0]
        if rc.accepted:
            self.delivered.add(okey)
        elif rc.retry:
            log.info("round %d: update refused for now (%s); re-sent when the round is (re-)announced", rc.round,
                     rc.reason)
            self.wait_reannounce.add(okey)
        else:
            log.warning("round %d: update refused (%s); it can never count: dropped from the outbox", rc.round,
                        rc.reason)
            self.outbox.drop(okey)
            self.delivered.add(okey)

    def _upload_delay(self, ann: RoundAnnouncement) -> float:
        """Seconds after training before uploading: the round's upload window x crc32("<agent>/<round>")
        / 2**32 (docs/protocol.md)."""
        window = ann.config.upload_window_s
        return window * (zlib.crc32(f"{self.id}/{ann.round}".encode()) / 2**32) if window > 0 else 0.0

    def _resend_soon(self, spread: tuple[float, float]) -> None:
        """After our (re)connect, or when a (re)connected aggregator announces itself: an update still
        without its receipt is re-sent within a seeded delay of ``presence_jitter_s`` instead of after
        ``resend_s``. Receipts are QoS 0: one the aggregator sent while we were away (a broker restart) is
        lost; and an update sent before the aggregator's subscriptions were back reached nobody. The
        fleet would otherwise wait out resend_s. The seeded delay lies in ``spread`` × presence_jitter_s
        (RECONNECT_SPREAD, ONLINE_SPREAD)."""
        inf = self.inflight
        if inf is None or inf[0] in self.delivered or inf[0] in self.wait_reannounce:
            return
        okey, uid, last, attempts = inf
        wait = self._resend_wait(attempts)
        lo, hi = spread
        u = zlib.crc32(f"{self.id}/{okey.round}/resend".encode()) / 2**32
        jitter = self.cfg.agent.presence_jitter_s * (lo + (hi - lo) * u)
        self.inflight = (okey, uid, min(last, time.monotonic() + jitter - wait), attempts)

    def _resend_wait(self, attempts: int) -> float:
        """How long after a send without a receipt it is re-sent: resend_s, doubling up to 8x."""
        return min(self.cfg.agent.resend_s * 2 ** (attempts - 1), 8 * self.cfg.agent.resend_s)

    def _timers(self) -> None:
        """Due uploads (upload window), presence re-sync, and re-sends of updates without a receipt."""
        now = time.monotonic()
        if self.scheduled is not None and now >= self.scheduled[0]:
            _, key, payload = self.scheduled
            self.scheduled = None
            self._send(key, payload)
        if self._presence_due is not None and now >= self._presence_due and self.client.connected:
            self._presence_due = None
            self._status(self.state if self.state != "offline" else "online")
        inf, ann = self.inflight, self.announcement
        if inf is None or ann is None or self.pending is not None or not self.client.connected:
            return
        okey, uid, last, attempts = inf
        if okey in self.delivered or okey in self.wait_reannounce:
            return
        if (ann.run, ann.model_id, ann.round, ann.base_round) != (okey.run, okey.model_id, okey.round,
                                                                 okey.base_round) or time.time() > ann.deadline:
            return  # its round closed: nothing to re-send into
        if now - last < self._resend_wait(attempts):
            return
        stored = self.outbox.get(okey)
        if stored is None:
            return
        log.info("round %d: no receipt %.0fs after sending: re-sending from the outbox (attempt %d)", okey.round,
                 now - last, attempts + 1)
        self._send((ann.round, ann.opened), stored)

    def _check_pending(self) -> None:
        if self.pending is None:
            return
        key, infos = self.pending
        try:
            done = all(i.is_published() for i in infos)
        except (RuntimeError, ValueError):  # paho raises while disconnected; the packets stay queued in it
            return
        if not done:
            return
        self.pending = None
        self.sent.add(key)
        if len(self.sent) > 1000:
            self.sent = {k for k in self.sent if k[0] >= key[0] - 10}
