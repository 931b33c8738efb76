"""The image's files (container/) and the Kubernetes example agree with echod and each other.

Static checks, no podman: tests/system/test_image.py builds and runs them.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from support.paths import ETC, REPO

from echod.config import Config, coerce

CONTAINER = REPO / "container"
PODMAN_STOP_TIMEOUT = 10  # seconds between podman's (and docker's) TERM and SIGKILL


def container_config() -> Config:
    values = tomllib.loads((CONTAINER / "echod.toml").read_text())
    return Config(**{key: coerce(key, value, "echod.toml") for key, value in values.items()})


def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", CONTAINER / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kubernetes() -> dict[str, Any]:
    text = (ETC / "kubernetes" / "echod.yaml").read_text()
    return {doc["kind"]: doc for doc in yaml.safe_load_all(text)}


def deployment_pod() -> dict[str, Any]:
    pod: dict[str, Any] = kubernetes()["Deployment"]["spec"]["template"]["spec"]
    return pod


def test_container_config_serves_everywhere_in_json_and_stops_before_podman_kills() -> None:
    config = container_config()
    assert list(config.bind) == ["0.0.0.0:7007", "udp://0.0.0.0:7007"]
    assert config.metrics_bind == "0.0.0.0:9707"
    assert config.log_format == "json" and config.log_file == ""
    assert config.graceful_timeout < PODMAN_STOP_TIMEOUT
    assert config.runtime_dir == "/run/echod"
    assert "workers" not in tomllib.loads((CONTAINER / "echod.toml").read_text())


def test_containerfile_declares_what_the_spec_asks() -> None:
    text = (CONTAINER / "Containerfile").read_text()
    uid = re.search(r"^ARG UID=(\d+)$", text, re.MULTILINE)
    assert uid and int(uid.group(1)) != 0
    assert re.search(r"^USER \$\{UID\}:\$\{UID\}$", text, re.MULTILINE)  # numeric: runAsNonRoot
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.MULTILINE)
    assert re.search(
        r"^HEALTHCHECK .*\n\s+CMD \[\"/usr/local/bin/echod-healthcheck\"\]", text, re.M
    )
    assert "EXPOSE 7007/tcp 7007/udp 9707/tcp" in text
    assert 'ENTRYPOINT ["/usr/bin/echod"]' in text
    pod = deployment_pod()
    assert pod["securityContext"]["runAsUser"] == int(uid.group(1))


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("0.0.0.0:9707", ("127.0.0.1", 9707)),
        ("127.0.0.1:19707", ("127.0.0.1", 19707)),
        ("[::]:9707", ("::1", 9707)),
        ("[::1]:9", ("::1", 9)),
        ("10.0.0.5:9707", ("10.0.0.5", 9707)),
    ],
)
def test_healthcheck_asks_a_wildcard_on_loopback(address: str, expected: tuple[str, int]) -> None:
    assert healthcheck().split(address) == expected


def test_healthcheck_follows_the_environment_then_the_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    module = healthcheck()
    config = tmp_path / "echod.toml"
    config.write_text('metrics_bind = "0.0.0.0:9800"\n')
    monkeypatch.setenv("ECHOD_CONFIG", str(config))
    monkeypatch.delenv("ECHOD_METRICS_BIND", raising=False)
    assert module.metrics_bind() == "0.0.0.0:9800"
    monkeypatch.setenv("ECHOD_METRICS_BIND", "127.0.0.1:1234")
    assert module.metrics_bind() == "127.0.0.1:1234"


def test_kubernetes_example_is_locked_down_and_sized_for_its_workers() -> None:
    pod = deployment_pod()
    [container] = pod["containers"]
    version = re.match(r"echod \(([^)-]+)-", (REPO / "debian" / "changelog").read_text())
    assert version and container["image"] == f"localhost/echod:{version.group(1)}"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    # workers unset: echod runs one per CPU of the limit (the quota caps the affinity)
    config = tomllib.loads(kubernetes()["ConfigMap"]["data"]["echod.toml"])
    assert "workers" not in config
    assert container["resources"]["limits"]["cpu"] == "2"
    # the read-only root's one writable place holds the runtime directory
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert config["runtime_dir"].startswith("/run/") and "/run" in mounts
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/run"]]
