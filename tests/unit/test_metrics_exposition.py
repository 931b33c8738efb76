"""Format negotiation and gzip of the metrics exposition (pure: a fake collector)."""

from __future__ import annotations

import gzip

import pytest
from prometheus_client.registry import CollectorRegistry

from echod.metrics import render


class _Fixed:
    def describe(self) -> list:
        return []

    def collect(self):
        yield (
            render.MetricFamily("echod_connections_total", "counter", "Accepted")
            .add(7)
            .to_prometheus()
        )
        yield (
            render.MetricFamily("echod_workers", "gauge", "By state")
            .add(2, state="ready")
            .to_prometheus()
        )


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed())
    return registry


def test_text_format_by_default(registry: CollectorRegistry) -> None:
    scrape = render.expose(registry, "", "")
    assert scrape.content_type == render.CONTENT_TYPE and not scrape.gzipped
    text = scrape.body.decode()
    assert "# TYPE echod_connections_total counter\necho" in text
    assert "echod_connections_total 7.0\n" in text
    assert 'echod_workers{state="ready"} 2.0\n' in text
    assert "_created" not in text


@pytest.mark.parametrize("accept", ["text/plain;version=1.0.0", "text/plain", "*/*", "bogus/x"])
def test_every_other_accept_gets_0_0_4(registry: CollectorRegistry, accept: str) -> None:
    assert render.expose(registry, accept, "").content_type == render.CONTENT_TYPE


def test_openmetrics_when_asked(registry: CollectorRegistry) -> None:
    scrape = render.expose(registry, "application/openmetrics-text; version=1.0.0", "")
    assert scrape.content_type.startswith("application/openmetrics-text")
    assert scrape.body.endswith(b"# EOF\n")
    assert b"echod_connections_total 7.0\n" in scrape.body


@pytest.mark.parametrize(
    ("accept_encoding", "gzipped"),
    [
        ("gzip", True),
        ("deflate, GZIP;q=0.5", True),
        ("gzip;q=0", False),
        ("gzip; q=0.000", False),
        ("identity", False),
        ("", False),
        ("x-gzip", False),
    ],
)
def test_gzip_only_when_allowed(
    registry: CollectorRegistry, accept_encoding: str, gzipped: bool
) -> None:
    plain = render.expose(registry, "", "").body
    scrape = render.expose(registry, "", accept_encoding)
    assert scrape.gzipped is gzipped
    assert (gzip.decompress(scrape.body) if gzipped else scrape.body) == plain
