"""The CLI's plain-text output (``cpclient.table``) and its one-cell summaries
(``cpclient.commands``): pure functions, no server."""

import pytest

from cpclient.commands import conditions_text, desired_text
from cpclient.table import age, cell, format_fields, format_row, format_table, labels_text, size, width

from .cli import table


def test_columns_are_aligned_under_their_headers_with_no_trailing_blanks():
    text = format_table(["NAME", "STATUS", "REPLICAS"], [["a", "healthy", 2], ["a-much-longer-name", "offline", 10]])
    assert text.splitlines() == [
        "NAME                 STATUS    REPLICAS",
        "a                    healthy   2",
        "a-much-longer-name   offline   10",
    ]
    assert table(text) == [
        {"NAME": "a", "STATUS": "healthy", "REPLICAS": "2"},
        {"NAME": "a-much-longer-name", "STATUS": "offline", "REPLICAS": "10"},
    ]


def test_a_table_without_rows_is_its_header_line():
    assert format_table(["AGE", "KIND"], []) == "AGE   KIND"


def test_empty_values_show_as_none_and_a_row_stays_one_line():
    text = format_table(["NAME", "MESSAGE", "OK"], [["x", None, True], ["y", "two\nlines\tand a tab", False]])
    lines = text.splitlines()
    assert len(lines) == 3
    assert table(text) == [
        {"NAME": "x", "MESSAGE": "<none>", "OK": "true"},
        {"NAME": "y", "MESSAGE": "two lines and a tab", "OK": "false"},
    ]
    assert cell({}) == cell([]) == cell("") == "<none>"
    assert cell(0) == "0"


def test_wide_characters_take_two_columns():
    text = format_table(["NAME", "STATUS"], [["模型", "healthy"], ["ab", "offline"]])
    first, second, third = text.splitlines()
    assert width("模型") == 4
    assert first == "NAME   STATUS"
    assert second == "模型   healthy"  # 4 columns wide: padded like "NAME"
    assert third == "ab     offline"


def test_a_row_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="2 values under 3 headers"):
        format_table(["A", "B", "C"], [["1", "2"]])


def test_a_row_keeps_given_widths_and_overflows_them_rather_than_cutting():
    assert format_row(["5s", "replica_added", "m"], [3, 4, 1]) == "5s    replica_added   m"


def test_describe_fields_align_values_after_the_longest_key():
    assert format_fields([("Name", "m"), ("Min replicas", 2), ("Node selector", {})]).splitlines() == [
        "Name:           m",
        "Min replicas:   2",
        "Node selector:  <none>",
    ]
    assert format_fields([("A", 1)], indent=2) == "  A:  1"
    assert format_fields([]) == ""


@pytest.mark.parametrize(
    "seconds,shown",
    [
        (None, "<none>"),
        (-3, "0s"),
        (0, "0s"),
        (59.9, "59s"),
        (119, "119s"),
        (120, "2m"),
        (125, "2m5s"),
        (599, "9m59s"),
        (600, "10m"),
        (179 * 60, "179m"),
        (3 * 3600, "3h"),
        (3 * 3600 + 60 * 7, "3h7m"),
        (8 * 3600 + 60 * 7, "8h"),
        (47 * 3600, "47h"),
        (48 * 3600, "2d"),
        (7 * 86400 + 3600 * 23, "7d23h"),
        (30 * 86400 + 5, "30d"),
    ],
)
def test_ages_read_as_kubectl_shows_them(seconds, shown):
    assert age(seconds) == shown


def test_labels_sizes_and_summaries():
    assert labels_text({"zone": "eu", "gpu": "a100", "flag": ""}) == "flag=,gpu=a100,zone=eu"
    assert labels_text({}) == labels_text(None) == "<none>"
    assert [size(value) for value in (0, None, 512, 2048, 5 * 2**20, 8 * 2**30, 3 * 2**40)] == [
        "0",
        "0",
        "512",
        "2Ki",
        "5Mi",
        "8.0Gi",
        "3.0Ti",
    ]

    conditions = [
        {"type": "Available", "status": False, "reason": "below_floor"},
        {"type": "Progressing", "status": True, "reason": "loading"},
        {"type": "NoLoadInfo", "status": False, "reason": "load_info_present"},
    ]
    assert conditions_text(conditions) == "NotAvailable,Progressing"
    assert conditions_text(conditions, reasons=True) == "NotAvailable(below_floor),Progressing(loading)"
    assert conditions_text([]) == "<none>"

    assert desired_text({"autoscaled": True, "min_replicas": 2, "max_replicas": 0}) == "2"
    assert desired_text({"autoscaled": True, "min_replicas": 1, "max_replicas": 4}) == "1-4"
    assert desired_text({"autoscaled": False, "min_replicas": 0, "max_replicas": 0}) == "-"
