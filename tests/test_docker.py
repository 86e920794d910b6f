"""docker/ checked statically (no Docker engine here): compose parses, every path exists."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def dockerfiles():
    return sorted(DOCKER.glob("*.Dockerfile"))


def test_compose_parses_and_has_the_roles():
    c = compose()
    services = c["services"]
    assert {"provision", "mosquitto", "aggregator"} <= set(services)
    assert sum(1 for s in services if s.startswith("agent-")) >= 2


def test_mosquitto_image_is_pinned():
    image = compose()["services"]["mosquitto"]["image"]
    name, _, tag = image.partition(":")
    assert name == "eclipse-mosquitto" and re.fullmatch(r"\d+\.\d+\.\d+", tag), image


def test_every_build_and_mount_path_exists():
    for name, svc in compose()["services"].items():
        if "build" in svc:
            ctx = (DOCKER / svc["build"]["context"]).resolve()
            assert ctx.is_dir(), name
            assert (ctx / svc["build"]["dockerfile"]).is_file(), name
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith(".") or src.startswith("/"):
                assert (DOCKER / src).resolve().exists(), f"{name}: {src}"


def test_every_dockerfile_copy_source_exists():
    for df in dockerfiles():
        for line in df.read_text().splitlines():
            if line.startswith("COPY "):
                parts = line.split()[1:]
                for src in parts[:-1]:
                    assert (ROOT / src).exists(), f"{df.name}: {src}"


def test_agent_image_installs_only_the_agent_extra():
    text = "\n".join(line for line in (DOCKER / "agent.Dockerfile").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    installs = re.findall(r"pip install[^\n&]*", text)
    assert installs and all('".[agent]"' in i for i in installs), installs
    assert "tensorflow" not in text.lower() and "aggregator]" not in text


def test_agent_commands_point_at_provisioned_configs():
    c = compose()
    prov = c["services"]["provision"]["command"]
    count = int(re.search(r"--count (\d+)", prov).group(1))
    agents = [s for s in c["services"] if s.startswith("agent-")]
    assert len(agents) == count
    for a in agents:
        assert f"/fleet/agents/{a}/agent.toml" in c["services"][a]["command"]


def test_agents_get_their_data_and_state_dirs_from_the_environment():
    c = compose()
    for name, svc in c["services"].items():
        if name.startswith("agent-"):
            env = svc["environment"]
            assert env["FEDMQ_DATA_SOURCE"] == f"npz:/data/{name}.npz"
            assert env["FEDMQ_AGENT_CACHE_DIR"].startswith("/var/lib/fedmq")
    assert c["services"]["aggregator"]["environment"]["FEDMQ_SERVICE_STATE_DIR"] == "/var/lib/fedmq"
