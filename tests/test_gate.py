"""gate.Gate's request checks: Host on loopback, same-origin websockets, --allow-origin, --token."""

import pytest
from aiohttp.test_utils import make_mocked_request

from personaplex_fast.admission import Limits
from personaplex_fast.gate import Gate, is_loopback


def refusal(gate, path="/ws", **headers):
    if path.startswith("/ws"):
        headers = {"Upgrade": "websocket", "Connection": "Upgrade", **headers}
    got = gate.refusal(make_mocked_request("GET", path, headers=headers))
    return None if got is None else got[0]


def test_loopback_names():
    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "a.localhost", "127.3.4.5"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "10.0.0.1", "evil.example", "localhost.evil.example"))


@pytest.mark.parametrize("headers, status", [
    (dict(Host="127.0.0.1:8998"), None),
    (dict(Host="localhost:8998", Origin="http://localhost:8998"), None),
    (dict(Host="[::1]:8998", Origin="http://[::1]:8998"), None),
    (dict(), None),  # no Host, no Origin: not a browser
    (dict(Host="evil.example:8998"), 403),  # DNS rebinding: the page's own name
    (dict(Host="evil.example:8998", Origin="http://evil.example:8998"), 403),
    (dict(Host="127.0.0.1:8998", Origin="http://evil.example"), 403),
    (dict(Host="127.0.0.1:8998", Origin="http://127.0.0.1:9999"), 403),
    (dict(Host="127.0.0.1:8998", Origin="null"), 403),
    # --allow-origin: a TLS reverse proxy in front of us; its host and origin pass by name
    (dict(Host="chat.example.org", Origin="https://chat.example.org"), None),
    (dict(Host="127.0.0.1:8998", Origin="https://chat.example.org/"), None),
])
def test_host_and_origin(headers, status):
    gate = Gate(Limits(), "127.0.0.1", allow_origins=("https://chat.example.org",))
    assert refusal(gate, **headers) == status


def test_any_host_on_a_public_address_but_still_same_origin():
    gate = Gate(Limits(), "0.0.0.0")
    assert refusal(gate, Host="box.lan:8998", Origin="http://box.lan:8998") is None
    assert refusal(gate, Host="box.lan:8998", Origin="http://evil.example") == 403
    # Not a websocket: a foreign page cannot read the reply (no CORS headers).
    assert refusal(gate, "/api/info", Host="box.lan:8998", Origin="http://evil.example") is None
    assert refusal(gate, "/api/chat", Host="box.lan:8998", Origin="http://evil.example",
                   Upgrade="websocket") == 403


def test_token():
    gate = Gate(Limits(), "127.0.0.1", token="s3cret")
    assert refusal(gate, "/ws") == 401 and refusal(gate, "/api/info") == 401
    assert refusal(gate, "/ws?token=s3cret") is None and refusal(gate, "/ws?token=s3cre") == 401
    assert refusal(gate, "/ws", Authorization="Bearer s3cret") is None
    assert refusal(gate, "/api/chat", Upgrade="websocket") == 401  # any websocket, any /api/
    assert refusal(gate, "/") is None and refusal(gate, "/app.js") is None  # the page is public
