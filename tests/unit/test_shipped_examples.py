"""The shipped load-balancer examples agree with echod and with each other."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import yaml
from support.paths import ETC

from echod.config import Config, coerce

KUBERNETES = ETC / "kubernetes" / "echod.yaml"
HAPROXY = ETC / "haproxy" / "echod.cfg"


def kubernetes() -> dict[str, Any]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(KUBERNETES.read_text())}


def pod_config(docs: dict[str, Any]) -> Config:
    values = tomllib.loads(docs["ConfigMap"]["data"]["echod.toml"])
    return Config(**{name: coerce(name, value, "echod.yaml") for name, value in values.items()})


def test_kubernetes_example_is_consistent() -> None:
    docs = kubernetes()
    config = pod_config(docs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["echo"] == int(config.bind[0].rsplit(":", 1)[1])
    assert ports["metrics"] == int(config.metrics_bind.rsplit(":", 1)[1])
    liveness, readiness = container["livenessProbe"], container["readinessProbe"]
    assert (liveness["httpGet"]["path"], liveness["httpGet"]["port"]) == ("/healthz", "metrics")
    assert (readiness["httpGet"]["path"], readiness["httpGet"]["port"]) == ("/readyz", "metrics")
    # readiness must turn within the delay, and the kubelet must wait out the whole stop
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < config.shutdown_delay
    stop_takes = config.shutdown_delay + config.graceful_timeout + 1
    assert pod["terminationGracePeriodSeconds"] > stop_takes
    assert pod["enableServiceLinks"] is False
    assert "/etc/echod/echod.toml" in container["args"]
    assert container["volumeMounts"][0]["mountPath"] == "/etc/echod"
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == "echo"


def test_haproxy_example_checks_readyz_faster_than_the_delay_lasts() -> None:
    text = HAPROXY.read_text()
    assert "option httpchk GET /readyz" in text
    inter = re.search(r"default-server inter (\d+)ms fall (\d+)", text)
    assert inter, "default-server inter ...ms fall ... not found"
    takes_out = int(inter.group(1)) / 1000 * int(inter.group(2))
    # the example's backends use the Kubernetes example's settings or the tests' (2 s)
    assert takes_out < 2.0 <= pod_config(kubernetes()).shutdown_delay
    timeout = re.search(r"timeout server (\d+)s", text)
    assert timeout and int(timeout.group(1)) > Config().idle_timeout  # never cut before echod


def test_haproxy_example_is_valid_for_haproxy(tmp_path: Path) -> None:
    result = subprocess.run(
        ["haproxy", "-c", "-f", str(HAPROXY)],
        env={"ECHO_LB_STATS": str(tmp_path / "stats.sock"), "PATH": "/usr/sbin:/usr/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
