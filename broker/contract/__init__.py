"""The wire contract both sides share: topic layout, messages, tensors, codec, chunking."""
