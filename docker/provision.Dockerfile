# One-shot provisioning step: CA, certificates, password file, ACL and client configs.
FROM python:3.11-slim
WORKDIR /opt/fedmq
COPY pyproject.toml README.md ./
COPY LICENSE ./
COPY broker ./broker
COPY edge_agent ./edge_agent
COPY aggregator ./aggregator
RUN pip install --no-cache-dir ".[broker]"
ENTRYPOINT ["fedmq-broker"]
