"""API keys, the create_api_key command, roles, node tokens and the serving checks."""

import importlib
import io
import logging
import sys
from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command

from core import checks
from core.models import ApiKey
from core.tokens import token_matches
from tests.clients import assert_problem, bearer
from tests.factories import make_api_key

pytestmark = pytest.mark.django_db

NODES = "/api/v1/nodes"


# --- ApiKey -----------------------------------------------------------------------------------


def test_create_key_stores_only_a_hash_and_a_display_prefix():
    key, plaintext = ApiKey.objects.create_key("frontend-1", ApiKey.Role.FRONTEND)

    assert plaintext.startswith("cpk_")
    assert key.prefix == plaintext[:12]
    assert token_matches(plaintext, key.key_hash)
    assert plaintext not in (key.key_hash, key.prefix)
    assert key.revoked_at is None and key.last_used_at is None


@pytest.mark.parametrize(("name", "role"), [("", "operator"), ("  ", "operator"), ("x", "admin")])
def test_create_key_refuses_empty_names_and_unknown_roles(name, role):
    with pytest.raises(ValueError):
        ApiKey.objects.create_key(name, role)


def test_authenticate_finds_the_key_and_stamps_last_used(now):
    key, plaintext = make_api_key("operator")

    found = ApiKey.objects.authenticate(plaintext, now=now)

    assert found == key
    key.refresh_from_db()
    assert key.last_used_at == now


def test_last_used_is_stamped_at_most_once_a_minute(now):
    key, plaintext = make_api_key("operator")
    ApiKey.objects.authenticate(plaintext, now=now)
    ApiKey.objects.authenticate(plaintext, now=now + timedelta(seconds=30))
    key.refresh_from_db()
    assert key.last_used_at == now
    ApiKey.objects.authenticate(plaintext, now=now + timedelta(seconds=61))
    key.refresh_from_db()
    assert key.last_used_at == now + timedelta(seconds=61)


@pytest.mark.parametrize(
    "mutate", [lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"), lambda t: t[:12], lambda t: "", lambda t: "x" + t]
)
def test_authenticate_rejects_wrong_tokens(mutate):
    _, plaintext = make_api_key("operator")
    assert ApiKey.objects.authenticate(mutate(plaintext)) is None


def test_revoked_keys_do_not_authenticate_and_revoking_twice_is_a_no_op():
    key, plaintext = make_api_key("operator")
    assert key.revoke()
    assert not key.revoke()
    assert ApiKey.objects.authenticate(plaintext) is None


def test_create_api_key_command_prints_only_the_key():
    stdout, stderr = io.StringIO(), io.StringIO()

    call_command("create_api_key", "frontend-1", "--role", "frontend", stdout=stdout, stderr=stderr)

    printed = stdout.getvalue()
    assert printed.endswith("\n") and printed.count("\n") == 1
    key = ApiKey.objects.authenticate(printed.strip())
    assert key is not None and (key.name, key.role) == ("frontend-1", "frontend")
    assert printed.strip() not in stderr.getvalue()


def test_create_api_key_command_requires_a_known_role():
    with pytest.raises(CommandError, match="invalid choice"):
        call_command("create_api_key", "x", "--role", "admin", stdout=io.StringIO(), stderr=io.StringIO())


# --- API keys and roles on /api/v1/ ------------------------------------------------------------


def test_no_credentials_is_401_not_authenticated_with_a_challenge(api_client):
    response = api_client.get(NODES)
    assert_problem(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Bearer cpk_nope", "Bearer", "Bearer a b", "Bearer cpn_node-token"])
def test_wrong_or_malformed_bearer_is_401_invalid_token(api_client, header):
    response = api_client.get(NODES, HTTP_AUTHORIZATION=header)
    assert_problem(response, 401, "invalid_token")


def test_revoked_key_is_401(api_client):
    key, plaintext = make_api_key("operator")
    key.revoke()
    assert_problem(api_client.get(NODES, **bearer(plaintext)), 401, "invalid_token")


def test_frontend_key_on_an_operator_endpoint_is_403(frontend_client):
    assert_problem(frontend_client.get(NODES), 403, "permission_denied")


def test_operator_key_may_use_frontend_endpoints(operator_client):
    assert_problem(operator_client.get("/api/v1/models/llama/load-info"), 404, "no_load_info")


def test_staff_session_gets_operator_endpoints_as_json_and_html_only_is_406(staff_client):
    assert staff_client.get(NODES).status_code == 200
    browser = staff_client.get(NODES, HTTP_ACCEPT="text/html,application/xhtml+xml,*/*;q=0.8")
    assert browser.status_code == 200 and browser["Content-Type"] == "application/json"
    assert_problem(staff_client.get(NODES, HTTP_ACCEPT="text/html"), 406, "not_acceptable")


def test_non_staff_session_is_403(non_staff_client):
    assert_problem(non_staff_client.get(NODES), 403, "permission_denied")


def test_secrets_are_not_logged(api_client, caplog):
    _, plaintext = make_api_key("operator")
    with caplog.at_level(logging.DEBUG):
        api_client.get(NODES, **bearer(plaintext + "x"))
        api_client.get(NODES, **bearer(plaintext))
    assert plaintext not in caplog.text


# --- serving checks ---------------------------------------------------------------------------


def test_serving_check_fails_without_a_registration_token(settings):
    settings.CONTROLPLANE_REGISTRATION_TOKEN = ""
    settings.CONTROLPLANE_ALLOW_OPEN_REGISTRATION = False
    with pytest.raises(ImproperlyConfigured, match="CONTROLPLANE_REGISTRATION_TOKEN"):
        checks.require_serving_configuration()


def test_serving_check_passes_with_a_token_or_explicit_open_registration(settings):
    checks.require_serving_configuration()
    settings.CONTROLPLANE_REGISTRATION_TOKEN = ""
    settings.CONTROLPLANE_ALLOW_OPEN_REGISTRATION = True
    checks.require_serving_configuration()


def test_runserver_system_check_is_an_error_without_a_token(settings, monkeypatch):
    settings.CONTROLPLANE_REGISTRATION_TOKEN = ""
    monkeypatch.setattr("sys.argv", ["manage.py", "runserver"])
    errors = checks.check_registration_token_when_serving()
    assert [e.id for e in errors] == [checks.E001]
    assert errors[0].is_serious()


def test_other_commands_are_not_blocked_but_check_deploy_reports_it(settings, monkeypatch):
    settings.CONTROLPLANE_REGISTRATION_TOKEN = ""
    monkeypatch.setattr("sys.argv", ["manage.py", "migrate"])
    assert checks.check_registration_token_when_serving() == []
    assert [e.id for e in checks.check_registration_token_for_deploy()] == [checks.E001]


@pytest.mark.parametrize("module", ["controlplane.wsgi", "controlplane.asgi"])
def test_the_server_entry_module_refuses_to_load_without_a_token(settings, monkeypatch, module):
    settings.CONTROLPLANE_REGISTRATION_TOKEN = ""
    settings.CONTROLPLANE_ALLOW_OPEN_REGISTRATION = False
    monkeypatch.delitem(sys.modules, module, raising=False)

    with pytest.raises(ImproperlyConfigured):
        importlib.import_module(module)
    settings.CONTROLPLANE_REGISTRATION_TOKEN = "set"
    assert importlib.import_module(module).application is not None


# --- the per-process cache of verified keys (ApiKey.objects.verify) ------------------------------


def test_a_verified_key_is_answered_from_memory_until_its_entry_is_older_than_the_cache_ttl(
    settings, monkeypatch, django_assert_num_queries
):
    settings.API_KEY_CACHE_SECONDS = 5
    key, plaintext = make_api_key("frontend")
    clock = [1000.0]
    monkeypatch.setattr("core.models.time.monotonic", lambda: clock[0])

    assert ApiKey.objects.verify(plaintext) == key  # read (and last_used stamped)
    with django_assert_num_queries(0):
        cached = ApiKey.objects.verify(plaintext)
    assert (cached.pk, cached.name, cached.role, cached.is_active) == (key.pk, key.name, "frontend", True)
    assert cached is not ApiKey.objects.verify(plaintext)  # a new instance per call

    clock[0] += 5
    with django_assert_num_queries(1):  # expired: read again; last_used is fresh, so no write
        assert ApiKey.objects.verify(plaintext) == key


def test_a_revocation_holds_at_once_in_this_process(settings):
    settings.API_KEY_CACHE_SECONDS = 3600
    key, plaintext = make_api_key("operator")
    assert ApiKey.objects.verify(plaintext) == key

    assert key.revoke()

    assert ApiKey.objects.verify(plaintext) is None


def test_verified_role_answers_as_verify_does_and_from_memory_once_cached(settings, django_assert_num_queries):
    settings.API_KEY_CACHE_SECONDS = 3600
    key, plaintext = make_api_key("frontend")

    assert ApiKey.objects.verified_role(plaintext) == "frontend"  # read, then cached
    with django_assert_num_queries(0):
        assert ApiKey.objects.verified_role(plaintext) == "frontend"
    assert ApiKey.objects.verified_role(plaintext + "x") is None
    assert ApiKey.objects.verified_role("") is None

    assert key.revoke()
    assert ApiKey.objects.verified_role(plaintext) is None


def test_a_revocation_in_another_process_holds_here_once_the_entry_expires(settings, monkeypatch):
    settings.API_KEY_CACHE_SECONDS = 5
    key, plaintext = make_api_key("operator")
    clock = [1000.0]
    monkeypatch.setattr("core.models.time.monotonic", lambda: clock[0])
    assert ApiKey.objects.verify(plaintext) == key
    # Another process's ``revoke`` writes the row; its in-memory forget cannot reach this one.
    monkeypatch.setattr("core.models.verified_keys.forget", lambda key_id: None)
    assert ApiKey.objects.revoke(key.pk)

    assert ApiKey.objects.verify(plaintext) == key  # still within this process's TTL
    clock[0] += 5
    assert ApiKey.objects.verify(plaintext) is None


def test_a_revocation_during_a_verification_is_not_cached(settings, monkeypatch):
    settings.API_KEY_CACHE_SECONDS = 3600
    key, plaintext = make_api_key("operator")
    real_authenticate = ApiKey.objects.authenticate

    def authenticate_then_revoke(token, **kwargs):
        found = real_authenticate(token, **kwargs)  # read while the key was still active
        key.revoke()  # revoked (another thread of this process) before the answer is cached
        return found

    monkeypatch.setattr(ApiKey.objects, "authenticate", authenticate_then_revoke)
    assert ApiKey.objects.verify(plaintext) == key
    monkeypatch.undo()
    assert ApiKey.objects.verify(plaintext) is None


def test_a_renamed_key_is_named_anew_at_once(settings):
    settings.API_KEY_CACHE_SECONDS = 3600
    key, plaintext = make_api_key("operator")
    ApiKey.objects.verify(plaintext)
    ApiKey.objects.rename(key.pk, "renamed")
    assert ApiKey.objects.verify(plaintext).name == "renamed"


def test_wrong_tokens_are_never_cached(settings, django_assert_num_queries):
    settings.API_KEY_CACHE_SECONDS = 3600
    _, plaintext = make_api_key("operator")
    wrong = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    for _ in range(2):
        with django_assert_num_queries(1):
            assert ApiKey.objects.verify(wrong) is None


def test_cached_answers_only_what_verify_cached_and_never_reads(settings, monkeypatch, django_assert_num_queries):
    settings.API_KEY_CACHE_SECONDS = 5
    key, plaintext = make_api_key("frontend")
    clock = [1000.0]
    monkeypatch.setattr("core.models.time.monotonic", lambda: clock[0])
    with django_assert_num_queries(0):
        assert ApiKey.objects.cached(plaintext) is None  # never verified here: ask verify
        assert ApiKey.objects.cached("not-a-key") is None
    assert ApiKey.objects.verify(plaintext) == key
    with django_assert_num_queries(0):
        cached = ApiKey.objects.cached(plaintext)
        assert (cached.pk, cached.role) == (key.pk, "frontend")
        clock[0] += 5
        assert ApiKey.objects.cached(plaintext) is None  # expired
    assert ApiKey.objects.verify(plaintext) == key
    key.revoke()
    assert ApiKey.objects.cached(plaintext) is None  # forgotten at once in this process
    settings.API_KEY_CACHE_SECONDS = 0
    assert ApiKey.objects.cached(plaintext) is None  # no cache: always verify


def test_api_calls_stamp_last_used_at_most_once_a_minute_with_the_cache(api_client, settings, monkeypatch):
    settings.API_KEY_CACHE_SECONDS = 5
    key, plaintext = make_api_key("operator")
    clock = [1000.0]
    monkeypatch.setattr("core.models.time.monotonic", lambda: clock[0])
    for _ in range(3):
        assert api_client.get(NODES, **bearer(plaintext)).status_code == 200
    key.refresh_from_db()
    first = key.last_used_at
    assert first is not None
    clock[0] += 5  # the entry expires; the re-read finds last_used fresh and writes nothing
    assert api_client.get(NODES, **bearer(plaintext)).status_code == 200
    key.refresh_from_db()
    assert key.last_used_at == first
