"""The admin's inline SVG charts: pure rendering, escaping, and the dashboard's charts built
from what the reconciler and the router recorded through their verbs."""

import xml.etree.ElementTree as ET
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from reconciler.admin import charts
from reconciler.models import ReconcilePass, ReplicaSample
from registry.models import LoadJob
from tests.admin.conftest import populate

SVG = "{http://www.w3.org/2000/svg}"


def parse(markup) -> ET.Element:
    return ET.fromstring(str(markup))  # well-formed XML, or this raises


def test_bars_and_dots_place_marks_in_time_and_scale_to_the_largest(now):
    start = now - timedelta(hours=1)
    marks = [charts.Mark(start, 1.0, "outcome-ok", "a"), charts.Mark(now, 4.0, "outcome-error", "b")]
    svg = parse(charts.bars(marks, start=start, end=now, unit="s", label="durations", width=128, height=64))
    rects = svg.findall(f"{SVG}rect")
    assert [r.get("class") for r in rects] == ["chart-bar outcome-ok", "chart-bar outcome-error"]
    # the first at the left edge of the plot, the last at the right; the larger one is 4x taller
    assert float(rects[0].get("x")) + 1 == charts.AXIS and float(rects[1].get("x")) + 1 == 128
    assert float(rects[1].get("height")) == pytest.approx(4 * float(rects[0].get("height")), rel=0.02)
    assert svg.get("aria-label") == "durations" and "4s" in "".join(svg.itertext())
    dots = parse(charts.dots(marks, start=start, end=now, label="loads")).findall(f"{SVG}circle")
    assert [d.find(f"{SVG}title").text for d in dots] == ["a", "b"]


def test_empty_charts_render_axes_only(now):
    svg = parse(charts.dots([], start=now - timedelta(hours=1), end=now, label="nothing"))
    assert svg.findall(f"{SVG}circle") == [] and svg.findall(f"{SVG}line")


def test_steps_hold_each_value_until_the_next_and_escape_names(now):
    start = now - timedelta(hours=1)
    svg = parse(
        charts.steps(
            [("ready", "line-ready", [(start, 0), (now - timedelta(minutes=30), 2), (now, 2)])],
            start=start,
            end=now,
            label='<script>alert("x")</script>',
            width=128,
            height=54,
        )
    )
    points = [tuple(map(float, p.split(","))) for p in svg.find(f"{SVG}polyline").get("points").split()]
    xs, ys = zip(*points, strict=True)
    assert xs == tuple(sorted(xs))  # time moves right only
    assert ys[0] == ys[1] and ys[2] < ys[1]  # 0 held until the change, then up to 2
    assert svg.get("aria-label") == '<script>alert("x")</script>'  # escaped in the markup, intact once parsed


@pytest.mark.django_db
def test_the_dashboard_charts_passes_cold_loads_and_each_models_replicas(admin_client):
    now = timezone.now()  # the dashboard charts the hour before the request
    populate(nodes=2, models=1)
    ReplicaSample.objects.record_changes([("model-0", 0, 1)], now=now - timedelta(minutes=20))
    ReplicaSample.objects.record_changes([("model-0", 2, 1)], now=now - timedelta(minutes=5))
    for minutes, outcome in ((40, "ok"), (30, "error"), (10, "ok")):
        ReconcilePass.objects.record(
            outcome=outcome,
            started_at=now - timedelta(minutes=minutes),
            duration=timedelta(milliseconds=80 * minutes),
            summary={"outcome": outcome, "actions": {"replicas_added": minutes // 10}, "skipped": {}},
        )
    ok, _ = LoadJob.objects.claim_or_attach("model-0", now=now - timedelta(minutes=15))
    assert LoadJob.objects.start(ok.pk, "test:1", now=now - timedelta(minutes=15))
    assert LoadJob.objects.fail(ok.pk, code="load_failed", message="no", now=now - timedelta(minutes=14))

    html = admin_client.get(reverse("admin:fleet_dashboard")).content.decode()
    assert html.count("<svg class=\"chart ") == 4  # passes: durations and actions; cold loads; model-0's replicas
    assert "chart-bar outcome-error" in html and "chart-dot load-failed" in html
    assert "load_failed" in html and "model-0: ready vs floor, last hour" in html
    assert "4 pass(es)" in html  # the three above and populate's


@pytest.mark.django_db
def test_the_pass_history_page_has_a_timeline_and_every_page_the_favicon(admin_client):
    ReconcilePass.objects.record(
        outcome="ok", started_at=timezone.now() - timedelta(minutes=3), duration=timedelta(seconds=1), summary={}
    )
    html = admin_client.get(reverse("admin:reconciler_reconcilepass_changelist")).content.decode()
    assert 'id="pass-timeline"' in html and html.count('<svg class="chart ') == 2 and "1 pass(es)" in html
    assert 'rel="icon" type="image/svg+xml"' in html and "favicon.svg" in html
    assert "| Control plane</title>" in html
