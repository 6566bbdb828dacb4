"""On the machine that runs the embedded stack, the client finds the stack's key in its state
folder when no key is given, but only for a service on a loopback address."""

from __future__ import annotations

import pytest

from teachercache import _http

KEY = "tck_local_secret"


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(_http.API_KEY_ENV, raising=False)
    monkeypatch.setenv(_http.STATE_DIR_ENV, str(tmp_path))
    (tmp_path / _http.LOCAL_KEY_FILE).write_text(KEY + "\n")
    return tmp_path


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost:9000", "http://[::1]:8080",
                                 "http://127.3.2.1"])
def test_a_loopback_service_gets_the_local_stack_s_key(state_dir, url):
    assert _http.resolve_api_key(None, url) == KEY


@pytest.mark.parametrize("url", ["http://10.0.0.5:8080", "https://teachercache.example.com", "http://testserver"])
def test_another_host_never_gets_the_local_key(state_dir, url):
    assert _http.resolve_api_key(None, url) is None


def test_a_given_or_exported_key_wins(state_dir, monkeypatch):
    assert _http.resolve_api_key("tck_given", "http://127.0.0.1:8080") == "tck_given"
    monkeypatch.setenv(_http.API_KEY_ENV, "tck_env")
    assert _http.resolve_api_key(None, "http://127.0.0.1:8080") == "tck_env"


def test_the_state_folder_in_the_current_directory_is_found(tmp_path, monkeypatch):
    monkeypatch.delenv(_http.API_KEY_ENV, raising=False)
    monkeypatch.delenv(_http.STATE_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".state").mkdir()
    (tmp_path / ".state" / _http.LOCAL_KEY_FILE).write_text(KEY)
    assert _http.resolve_api_key(None, "http://127.0.0.1:8080") == KEY


def test_the_client_sends_the_local_key_to_the_local_service(state_dir):
    import httpx

    import teachercache as tc

    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["authorization"] = request.headers.get("authorization")
        return httpx.Response(200, json={"teachers": []})

    with tc.Client("http://127.0.0.1:8080", transport=httpx.MockTransport(handler)) as client:
        client.teachers()
    assert seen["authorization"] == f"Bearer {KEY}"
