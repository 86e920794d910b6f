"""Round control, free of transport: who is asked, which updates count, when a round closes.

A round opens with an announcement. An update counts only if it is for the open round of this
run, was computed against the announced model and base round, comes from an asked agent, is the
agent's first accepted update for the round and passes the strategy's checks. Only accepted
updates make later copies duplicates: an update refused for a reason that can change
(``no_open_round``, ``future``) counts when it is re-sent into its round. The round closes when a quorum has
arrived AND (every asked agent reported OR ``grace_s`` passed since the quorum was reached).
If the deadline passes without quorum the round is abandoned (the global model stays) or, by
policy, extended a bounded number of times.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace

from fedmq.broker.contract.messages import RoundAnnouncement, Sample, TrainConfig, Update, sampled

from .config import RoundsSection
from .ratelog import BoundedLog
from .strategies import ClientUpdate, RoundResult, Strategy

log = logging.getLogger(__name__)


@dataclass
class OpenRound:
    ann: RoundAnnouncement
    asked: list[str]
    quorum: int
    #: agent -> update_id of its accepted update, in arrival order (``list(received)``: participants)
    received: dict[str, str] = field(default_factory=dict)
    asked_set: frozenset[str] = frozenset()  # O(1) membership; filled by the controller
    quorum_at: float | None = None
    extensions: int = 0
    bytes_in: int = 0
    started: float = 0.0


def select_agents(online: list[str], cfg: RoundsSection, round_no: int) -> list[str]:
    """The agents asked in a round: all online, the seeded hash rule's fraction of them, or a fixed list.

    ``fraction`` uses ``messages.sampled`` (an agent is asked when its seeded hash falls below the
    fraction), which every agent evaluates for itself: the announcement carries the rule, not the ids.
    If the rule picks nobody online, one agent is picked so that the round can run (then listed).
    """
    online = sorted(online)
    if cfg.select == "list":
        return sorted(cfg.agents)
    if cfg.select == "fraction":
        picked = [a for a in online if sampled(cfg.seed, round_no, a, cfg.fraction)]
        if not picked and online:
            picked = [random.Random(f"{cfg.seed}/{round_no}").choice(online)]
        return picked
    return online


def quorum_for(n_asked: int, cfg: RoundsSection) -> int:
    if cfg.quorum > 0:
        return min(cfg.quorum, n_asked) if cfg.select != "list" else cfg.quorum
    return max(1, math.ceil(cfg.quorum_fraction * n_asked))


MAX_UPLOAD_WINDOW_S = 86_400.0  # what agents accept in an announcement (docs/protocol.md)


def upload_window(n_asked: int, cfg: RoundsSection, configured: float) -> float:
    """The announced upload window: at least ``configured``, and long enough that ``n_asked`` uploads
    spread over it arrive at no more than ``cfg.upload_rate`` per second (so one aggregator is never
    handed a whole fleet's burst at once: the backlog, and the time from the last update to the global,
    stay short). The paced part is capped at half the deadline, so that paced uploads still make it."""
    paced = n_asked / cfg.upload_rate if cfg.upload_rate > 0 else 0.0
    return min(MAX_UPLOAD_WINDOW_S, max(configured, round(min(paced, cfg.deadline_s / 2), 3)))


class RoundController:
    def __init__(self, strategy: Strategy, cfg: RoundsSection, rejects: BoundedLog | None = None) -> None:
        self.strategy = strategy
        self.rejects = rejects or BoundedLog(log)
        self.cfg = cfg
        self.current: OpenRound | None = None
        self.closed_rounds: set[int] = set()
        #: the last aggregated round: a re-sent copy of an update it counted (its receipt was lost, e.g.
        #: in a broker restart) is told "duplicate, accepted" instead of "no_open_round" / "late"
        self.last_closed: OpenRound | None = None
        self.rejected: Counter[str] = Counter()

    def open(self, round_no: int, model_id: str, base_round: int, global_weights: dict, online: list[str],
             train: TrainConfig, now: float, run: str = "", excluded: list[str] | None = None) -> RoundAnnouncement:
        """Open a round over ``online`` agents; ``excluded`` (online but not to be asked) are named in the
        announcement so that they know it (under select = all / fraction, the rule alone would ask them)."""
        skip = set(excluded or ())
        asked = select_agents([a for a in online if a not in skip], self.cfg, round_no)
        q = quorum_for(len(asked), self.cfg)
        train = replace(train, upload_window_s=upload_window(len(asked), self.cfg, train.upload_window_s))
        sample, listed = None, None
        if self.cfg.select == "list":
            listed = asked
        elif self.cfg.select == "fraction":
            if all(sampled(self.cfg.seed, round_no, a, self.cfg.fraction) for a in asked):
                sample = Sample(self.cfg.seed, self.cfg.fraction)  # O(1) size, whatever the fleet
            else:
                listed = asked  # the fallback pick of one agent
        if listed is not None:
            shown = None
        else:  # only those the rule would have asked (bounded by the excluded devices, not the fleet)
            shown = sorted(a for a in skip if sample is None or sampled(sample.seed, round_no, a, sample.fraction))
        ann = RoundAnnouncement(round_no, model_id, base_round, now, now + self.cfg.deadline_s, train,
                                listed, q, run=run, sample=sample, excluded=shown or None)
        self.current = OpenRound(ann, asked, q, started=now, asked_set=frozenset(asked))
        self.strategy.begin_round(global_weights, round_no)
        log.info("round %d open: %d agents asked, quorum %d, deadline in %.0fs", round_no, len(asked), q,
                 self.cfg.deadline_s)
        return ann

    def resume(self, ann: RoundAnnouncement, asked: list[str], quorum: int, started: float,
               global_weights: dict) -> OpenRound:
        """Go on with a round an earlier process opened (taken back from its journal): the same
        announcement, asked agents and quorum; its updates are then fed again through ``on_update``."""
        self.current = OpenRound(ann, list(asked), quorum, started=started, asked_set=frozenset(asked))
        self.strategy.begin_round(global_weights, ann.round)
        log.info("round %d resumed: %d agents asked, quorum %d, deadline in %.0fs", ann.round, len(asked), quorum,
                 ann.deadline - time.time())
        return self.current

    def _reject(self, reason: str, u: Update) -> str:
        self.rejected[reason] += 1
        self.rejects.reject(u.agent, reason, "update from %s for round %s rejected: %s", u.agent, u.round, reason)
        return reason

    def on_update(self, u: Update, nbytes: int, now: float) -> str | None:
        """Consider one decoded update; return None if it counts, else the rejection reason."""
        r = self.current
        if r is None or u.round != r.ann.round:
            if self._counted_before(u):  # a copy of what the last round counted (its receipt was lost)
                return self._reject("duplicate", u)
        if r is None:
            return self._reject("no_open_round", u)
        ann = r.ann
        if u.run != ann.run:  # another run's update (an old outbox, a previous state_dir): never counts
            return self._reject("wrong_run", u)
        if u.round != ann.round:
            reason = "late" if u.round in self.closed_rounds else ("stale" if u.round < ann.round else "future")
            return self._reject(reason, u)
        if u.model_id != ann.model_id:
            return self._reject("wrong_model", u)
        if u.base_round != ann.base_round:  # computed against another global model
            return self._reject("stale_base", u)
        if u.agent not in r.asked_set:  # also under select = "all": asked = online when the round opened
            return self._reject("not_asked", u)
        if u.agent in r.received:  # an accepted update's copy (QoS 1 redelivery, a re-send) or a second one
            return self._reject("duplicate", u)
        try:
            reason = self.strategy.add(ClientUpdate(u.agent, u.num_samples, u.tensors, u.metrics))
        except Exception as e:  # noqa: BLE001 - one update never ends the round
            self.rejects.internal(f"folding the update of {u.agent}", e)
            reason = "internal"
        if reason is not None:
            self.rejected[reason] += 1
            return reason
        r.received[u.agent] = u.update_id
        r.bytes_in += nbytes
        if r.quorum_at is None and len(r.received) >= r.quorum:
            r.quorum_at = now
            log.info("round %d: quorum %d reached", ann.round, r.quorum)
        return None

    def _counted_before(self, u: Update) -> bool:
        lc = self.last_closed
        return (lc is not None and u.round == lc.ann.round and u.run == lc.ann.run
                and lc.received.get(u.agent) == u.update_id)

    def holds(self, u: Update) -> bool:
        """Whether this very update (same update_id) counts in the open round or counted in the last one."""
        r = self.current
        if r is not None and r.ann.round == u.round and r.received.get(u.agent) == u.update_id:
            return True
        return self._counted_before(u)

    def poll(self, now: float) -> str:
        """'open', 'close' (aggregate now) or 'timeout' (deadline passed without quorum)."""
        r = self.current
        if r is None:
            return "idle"
        if r.quorum_at is not None:
            everyone = len(r.received) >= len(r.asked_set)  # received is a subset of asked
            if everyone or now >= r.quorum_at + self.cfg.grace_s or now >= r.ann.deadline:
                return "close"
            return "open"
        if now >= r.ann.deadline:
            return "timeout"
        return "open"

    def extend(self, now: float) -> RoundAnnouncement | None:
        """Extend the deadline of the open round (policy 'extend'); None when no extension is left."""
        r = self.current
        if r is None or self.cfg.on_timeout != "extend" or r.extensions >= self.cfg.max_extensions:
            return None
        r.extensions += 1
        r.ann.deadline = now + self.cfg.deadline_s
        log.warning("round %d: no quorum (%d/%d) by the deadline; extended (%d/%d)", r.ann.round,
                    len(r.received), r.quorum, r.extensions, self.cfg.max_extensions)
        return r.ann

    def close(self):
        r = self.current
        assert r is not None
        try:
            result = self.strategy.finish()
        except Exception as e:  # noqa: BLE001 - a strategy failure leaves the global model as it was
            self.rejects.internal(f"closing round {r.ann.round}", e)
            result = RoundResult(None, "unchanged", {}, list(r.received), {},
                                 f"strategy error: {type(e).__name__}: {str(e)[:200]}")
        self.closed_rounds.add(r.ann.round)
        if len(self.closed_rounds) > 1000:
            self.closed_rounds.discard(min(self.closed_rounds))
        self.current = None
        self.last_closed = r
        return r, result

    def abandon(self) -> OpenRound:
        r = self.current
        assert r is not None
        self.closed_rounds.add(r.ann.round)
        self.current = None
        log.warning("round %d abandoned: %d/%d updates by the deadline; global model unchanged",
                    r.ann.round, len(r.received), r.quorum)
        return r
