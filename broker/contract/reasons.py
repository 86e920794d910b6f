"""Every rejection reason fedmq can count, with its meaning: one table for code, docs and tests.

A reason is the short label a rejected message is counted under (metric label, ``rejected`` map
of ``metrics`` messages, log lines). tests/test_hostile_contract.py fails when code uses a label
that is not here; docs/protocol.md lists the same table.
"""

from __future__ import annotations

#: label -> one-line meaning (rejections: the message was refused and counted)
REASONS: dict[str, str] = {
    # -- topic and framing (fedmq.broker.contract.topics / codec / msgview) --------------------
    "bad_topic": "topic outside the fedmq layout (unknown channel, bad name, non-ASCII or bad chunk index)",
    "empty": "empty payload on a channel that is never retained (update, metrics)",
    "too_large": "payload, string, container or declared tensor size above its limit",
    "truncated": "a declared length runs past the end of the payload",
    "malformed": "not valid msgpack for fedmq (ext type, bad UTF-8, duplicate key, trailing bytes, nested chunk)",
    "bad_version": "field 'v' missing, not an int, or not a supported schema version",
    "bad_kind": "field 'kind' missing, not a string, unknown, or not the kind expected here",
    "schema": "a field is missing, has the wrong type or is out of range",
    "bad_shape": "tensor shape invalid (rank > 8, a dimension out of range) or not matching the data length",
    "bad_dtype": "tensor dtype not allowed, or not the model's dtype",
    "bad_encoding": "tensor encoding is not raw, f16, int8 or topk",
    "bad_samples": "num_samples is 0, negative or above the configured maximum",
    "agent_mismatch": "the payload's 'agent' differs from the agent named by the topic",
    "wrong_channel": "a valid message of a kind that does not belong on the channel it came on",
    "internal": "handling the message raised an unexpected exception (a bug: traceback logged once per cause)",
    # -- signatures (fedmq.broker.contract.signing; agents holding trusted keys) ----------------
    "unsigned": "an unsigned model, global, round or service message where the fleet's signature is required",
    "unknown_key": "a signed message whose key id is not among the agent's trusted keys",
    "bad_signature": "a signed message whose Ed25519 signature does not verify (forged or altered)",
    # -- chunk reassembly (fedmq.broker.contract.chunking) -------------------------------------
    "chunk_too_large": "a blob declares more bytes than max_blob_bytes",
    "chunk_too_many": "a blob declares more chunks than max_chunks",
    "chunk_flood": "the sender (or everyone) has the maximum number of blobs in flight already",
    "chunk_budget": "the sender's reassembly byte budget (max_source_bytes) is used up",
    "chunk_memory": "the total reassembly byte budget (max_total_bytes) is used up",
    "chunk_inconsistent": "a chunk disagrees with earlier chunks of its blob (total, size, hash, count, topic index)",
    "chunk_offset": "a chunk's offset/length lies outside the blob or overlaps data already received",
    "chunk_hash": "the reassembled blob failed its SHA-256 check",
    "chunk_dropped": "a chunk of a blob refused earlier (its id is remembered for the TTL)",
    # -- agent side (fedmq.edge_agent.service) -------------------------------------------------
    "bad_model_id": "a model manifest whose model_id is not the SHA-256 of its artifact",
    "bad_model": "a model artifact the runtime cannot load",
    "bad_global": "global weights that do not match the model's weight names and shapes",
    "bad_delta": "a global_delta that does not apply to the agent's global or whose reconstruction fails its digest",
    "stale_global": "a global (or round) of the followed run older than one this agent already had",
    # -- round control (fedmq.aggregator.rounds) -----------------------------------------------
    "no_open_round": "an update arrived while no round is open (re-sent when the round opens, it counts)",
    "wrong_run": "an update for another run (an old outbox, a previous state_dir) than the open round's",
    "late": "an update for a round that has closed",
    "stale": "an update for an older round that this aggregator never had open (e.g. before a restart)",
    "future": "an update for a round above the open one (re-sent when that round opens, it counts)",
    "wrong_model": "an update for another model than the open round's",
    "stale_base": "an update computed against another global round than the open round's base_round",
    "not_asked": "an update from an agent the open round did not ask",
    "duplicate": "a copy of an accepted update, or a second update from the same agent for the same round",
    # -- strategies (fedmq.aggregator.strategies) ----------------------------------------------
    "bad_tensors": "update tensor names differ from the model's",
    "non_finite": "update holds NaN or infinite values",
    "norm_outlier": "update norm above the magnitude bound",
    # -- per-agent limits (fedmq.aggregator.limits) --------------------------------------------
    "rate_limited": "the agent is over its [limits] message or byte rate: dropped before decoding",
    "bad_weight": "the update's aggregation weight is not finite and >= 0",
    "zero_weight": "the update's aggregation weight is 0",
    "missing_quality": "quality weighting: the update does not report the quality metric",
    "bad_quality": "quality weighting: the quality metric is not finite or negative",
    "too_many": "the strategy holds its maximum number of updates for this round",
    "foreign_write": "a client other than the aggregator wrote one of its retained topics: state republished",
    # -- transport (fedmq.broker.transport.client) ---------------------------------------------
    "puback_0x": "prefix: the broker refused a publish with this MQTT 5 PUBACK reason code (e.g. puback_0x97)",
}

#: label -> meaning (counted, not errors)
IGNORED: dict[str, str] = {
    "cleared": "empty payload on a retained channel: a cleared retained message",
    "duplicate_delivery": "a chunk seen before (QoS 1 redelivery, outbox resend): dropped",
    "stale_chunk": "a retained chunk of another blob than its topic's pointer names (an older version): ignored",
}


def is_known(reason: str) -> bool:
    """True when ``reason`` is in REASONS (``puback_0x..`` matches its prefix entry)."""
    return reason in REASONS or reason.startswith("puback_0x")
