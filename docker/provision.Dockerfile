# One-shot provisioning step: CA, certificates, password file, ACL and client configs.
FROM python:3.11-slim
WORKDIR /opt/fedmq
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY edge_agent/__init__.py ./edge_agent/__init__.py
COPY aggregator/__init__.py ./aggregator/__init__.py
RUN pip install --no-cache-dir ".[broker]"
ENTRYPOINT ["fedmq-broker"]
