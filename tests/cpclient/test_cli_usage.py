"""The CLI's parsing, help and the exit codes decided before any request (no server): every
command answers ``--help``, usage errors exit 2, no key exits 4, an unreachable control plane
exits 5, and the CLI runs without Django."""

import subprocess

import pytest

from cpclient import cli
from tests.processes import free_port

from .cli import ROOT, cli_env, command, run

COMMANDS = [
    ["nodes"],
    ["models"],
    ["describe"],
    ["describe", "model"],
    ["describe", "node"],
    ["drain"],
    ["resume"],
    ["undrain"],
    ["uncordon"],
    ["approve"],
    ["scale"],
    ["events"],
    ["reconcile"],
]


@pytest.mark.parametrize("words", [[], *COMMANDS], ids=lambda words: " ".join(words) or "(top)")
def test_every_command_answers_help(words, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([*words, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    named = [{"undrain": "resume", "uncordon": "resume"}.get(word, word) for word in words]  # aliases
    assert out.startswith(f"usage: python -m cpclient {' '.join(named)}".rstrip())
    assert "exit codes:" in out and "CONTROLPLANE_API_KEY" in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nodes", "--bogus"],
        ["frobnicate"],
        ["describe"],
        ["describe", "pod", "x"],
        ["describe", "model"],
        ["scale", "m"],
        ["scale", "m", "--min", "-1"],
        ["scale", "m", "--min", "two"],
        ["events", "--limit", "0"],
        ["events", "--interval", "0"],
        ["-o", "yaml", "nodes"],
        ["nodes", "--request-timeout", "nan"],
        ["nodes", "--url", "ftp://example"],
    ],
)
def test_usage_errors_exit_2(argv, capsys, monkeypatch):
    monkeypatch.setenv("CONTROLPLANE_API_KEY", "cpk_unused")
    try:
        code = cli.main(argv)
    except SystemExit as done:
        code = done.code
    assert code == 2
    assert "usage:" in capsys.readouterr().err


def test_global_options_go_before_or_after_the_command():
    parser = cli.build_parser()
    before = parser.parse_args(["-o", "json", "--url", "http://a:1", "nodes"])
    after = parser.parse_args(["nodes", "-o", "json", "--url", "http://a:1"])
    default = parser.parse_args(["nodes"])
    assert (before.output, before.url) == (after.output, after.url) == ("json", "http://a:1")
    assert (default.output, default.url, default.request_timeout) == ("table", None, 10.0)


def test_an_empty_model_name_is_a_usage_error_before_any_request(capsys):
    assert cli.main(["--url", f"http://127.0.0.1:{free_port()}", "--api-key", "k", "scale", "", "--min", "1"]) == 2
    assert capsys.readouterr().err == "error: a model name is required\n"


def test_no_api_key_exits_4_before_any_request(capsys, monkeypatch):
    monkeypatch.delenv("CONTROLPLANE_API_KEY", raising=False)
    assert cli.main(["--url", f"http://127.0.0.1:{free_port()}", "nodes"]) == 4
    assert "CONTROLPLANE_API_KEY" in capsys.readouterr().err


def test_as_a_subprocess_without_django_an_unreachable_control_plane_exits_5():
    down = run("models", url=f"http://127.0.0.1:{free_port()}", key="cpk_x")
    assert down.returncode == 5
    assert down.stdout == ""
    assert down.stderr.startswith("error: cannot connect to the control plane at http://127.0.0.1:")

    # cpclient imports only proto and the standard library: the CLI starts without Django.
    probe = subprocess.run(
        command("--help"),
        cwd=ROOT,
        env=cli_env(None, None, PYTHONPROFILEIMPORTTIME="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0 and probe.stdout.startswith("usage: python -m cpclient")
    assert "django" not in probe.stderr
