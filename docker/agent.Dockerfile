# fedmq edge agent: no TensorFlow, just numpy + paho-mqtt + msgpack + LiteRT (~170 MB).
FROM python:3.11-slim
WORKDIR /opt/fedmq
COPY pyproject.toml README.md ./
COPY LICENSE ./
COPY broker ./broker
COPY edge_agent ./edge_agent
COPY aggregator ./aggregator
RUN pip install --no-cache-dir ".[agent]" && useradd --system --home /var/lib/fedmq fedmq \
    && mkdir -p /var/lib/fedmq && chown fedmq /var/lib/fedmq
USER fedmq
ENTRYPOINT ["fedmq-agent"]
CMD ["run", "--config", "/etc/fedmq/agent.toml"]
