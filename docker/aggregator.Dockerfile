# fedmq aggregator: TensorFlow for model export, numpy strategies, Prometheus metrics.
FROM python:3.11-slim
WORKDIR /opt/fedmq
COPY pyproject.toml README.md ./
COPY LICENSE ./
COPY broker ./broker
COPY edge_agent ./edge_agent
COPY aggregator ./aggregator
COPY examples ./examples
RUN pip install --no-cache-dir ".[aggregator]" && useradd --system --home /var/lib/fedmq fedmq \
    && mkdir -p /var/lib/fedmq && chown fedmq /var/lib/fedmq
USER fedmq
EXPOSE 9464
ENTRYPOINT ["fedmq-aggregator"]
CMD ["run", "--config", "/etc/fedmq/aggregator.toml"]
