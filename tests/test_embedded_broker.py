"""The contract over the embedded pure-Python broker (amqtt, MQTT 3.1.1): the launcher's fallback."""

import uuid

import numpy as np
import pytest
from conftest import wait_until

from fedmq.broker.contract.messages import GlobalModel, Update
from fedmq.broker.ops.launcher import LocalBroker
from fedmq.broker.transport.client import MqttClient, MqttConfig
from fedmq.broker.transport.publisher import Publisher
from fedmq.broker.transport.receiver import Receiver

pytest.importorskip("amqtt")
pytestmark = pytest.mark.network
MID = "ab" * 32
RUN = "0123456789abcdef"  # a run id (every message of a run carries one)


def test_chunked_update_and_retained_global_over_amqtt(tmp_path, topics):
    with LocalBroker(force_embedded=True, workdir=str(tmp_path)) as b:
        assert b.embedded and b.protocol == "3.1.1"

        def mk(name):
            c = MqttClient(MqttConfig(b.host, b.port, client_id=name, protocol="3.1.1", max_payload=100_000))
            c.connect(timeout=15)
            return c

        with mk("sub-" + uuid.uuid4().hex[:6]) as sub, mk("pub-" + uuid.uuid4().hex[:6]) as pub:
            w = {"w": np.random.default_rng(1).normal(size=200_000).astype(np.float32)}
            p = Publisher(pub, topics)
            p.publish(topics.global_(), GlobalModel(1, MID, w, 0.0, run=RUN), retain=True)
            sub.subscribe(topics.all_updates())
            for f in topics.with_chunks(topics.global_()):
                sub.subscribe(f)
            assert p.publish(topics.update("a"), Update(1, "a", MID, uuid.uuid4().hex, 4, w, {}, 0.0, run=RUN)) > 1
            rx = Receiver(topics)
            got = []

            def step():
                m = sub.get(timeout=0.1)
                if m is not None and (r := rx.feed(m.topic, m.payload, m.retain)) is not None:
                    got.append(r.message)
                return len(got) == 2

            wait_until(step, 30, interval=0, what="global + update over amqtt")
            kinds = sorted(type(g).__name__ for g in got)
            assert kinds == ["GlobalModel", "Update"]
            for g in got:
                assert g.tensors["w"].tobytes() == w["w"].tobytes()
