"""hotswap status: rows and table from a metrics text, no server."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from serving.triton.status import render, status_rows

TEXT = """\
# TYPE hotswap_weights_info gauge
hotswap_weights_info{model="m",instance="m_0_0",version="v1"} 0
hotswap_weights_info{model="m",instance="m_0_0",version="v2+lora"} 1
hotswap_weights_info{model="m",instance="m_0_1",version="v2+lora"} 1
# TYPE hotswap_last_refit_success_timestamp_seconds gauge
hotswap_last_refit_success_timestamp_seconds{model="m",instance="m_0_0"} 1000
# TYPE hotswap_refits_total counter
hotswap_refits_total{model="m",instance="m_0_0",outcome="rejected",reason="corrupt"} 2
hotswap_refits_total{model="m",instance="m_0_0",outcome="rejected",reason="invalid"} 1
hotswap_refits_total{model="m",instance="m_0_0",outcome="success",reason=""} 5
hotswap_refits_total{model="m",instance="m_0_1",outcome="failed",reason="engine"} 1
# TYPE hotswap_watcher_errors_total counter
hotswap_watcher_errors_total{model="m",instance="m_0_1"} 3
# TYPE nv_inference_count counter
nv_inference_count{model="m",version="1"} 9
"""


def samples() -> list:  # type: ignore[type-arg]
    return [s for f in text_string_to_metric_families(TEXT) for s in f.samples]


def test_rows_per_instance() -> None:
    a, b = status_rows(samples())
    assert (a.instance, a.version, a.last_success, a.rejected, a.failed, a.watcher_errors) == \
        ("m_0_0", "v2+lora", 1000.0, 3, 0, 0)
    assert (b.instance, b.version, b.last_success, b.rejected, b.failed, b.watcher_errors) == \
        ("m_0_1", "v2+lora", 0.0, 0, 1, 3)


def test_table() -> None:
    text = render(status_rows(samples()), now=1090.0)
    lines = text.splitlines()
    assert lines[0].split() == ["MODEL", "INSTANCE", "LIVE", "VERSION", "LAST", "REFIT", "REJECTED", "FAILED",
                                "WATCHER", "ERRORS"]
    assert "(90s ago)" in lines[1] and lines[1].split()[-3:] == ["3", "0", "0"]
    assert lines[2].split()[3:] == ["-", "0", "1", "3"]
    assert render([], now=0) == "no hotswap models on this endpoint"
