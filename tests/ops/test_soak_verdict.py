"""The soak's pass/fail rules (tests/e2e/soak.py ``verdict``), on hand-made reports: the soak
itself runs as ``make soak`` (real processes, minutes), so its judgement is pinned here."""

from tests.e2e.soak import RSS_SLACK_KIB, verdict


def passing_report(**changes):
    report = {
        "final_violations": [],
        "chaos_violations": [],
        "actions": [{"kind": "worker_kill", "recovered_s": 6.2}],
        "failed": {"route: no HTTP answer (web down)": 90, "predict: UNAVAILABLE (replica unreachable)": 20},
        "served_ratio_outside_web_restarts": 0.98,
        "rss": {
            "web": [{"pid": 1, "first_kib": 200_000, "last_kib": 205_000}],
            "qcluster": [{"pid": 2, "first_kib": 420_000, "last_kib": 430_000}],
            "reconciler": [{"pid": 3, "first_kib": 90_000, "last_kib": 92_000}],
        },
    }
    report.update(changes)
    return report


def test_a_run_within_every_bound_passes():
    assert verdict(passing_report(), min_served=0.9, max_rss_growth=0.1) == []


def test_each_broken_rule_is_named():
    cases = {
        "invariants broken at the end": passing_report(final_violations=["soak-a: 1 loaded replica(s) < floor 2"]),
        "chaos-time invariant": passing_report(chaos_violations=[["replica 4: in_flight 1 != live leases 0"]]),
        "never recovered": passing_report(actions=[{"kind": "web_restart", "recovered_s": None}]),
        "server errors": passing_report(failed={"route: HTTP 500 server_error": 1}),
        "served ratio outside web restarts": passing_report(served_ratio_outside_web_restarts=0.89),
        "web pid 1: RSS": passing_report(
            rss={
                "web": [{"pid": 1, "first_kib": 100_000, "last_kib": 110_000 + RSS_SLACK_KIB + 1}],
                "qcluster": [],
                "reconciler": [],
            }
        ),
    }
    for expected, report in cases.items():
        failures = verdict(report, min_served=0.9, max_rss_growth=0.1)
        assert len(failures) == 1 and expected in failures[0], (expected, failures)


def test_a_503_is_not_a_server_error():
    report = passing_report(failed={"route: HTTP 503 no_capacity": 3})
    assert verdict(report, min_served=0.9, max_rss_growth=0.1) == []
