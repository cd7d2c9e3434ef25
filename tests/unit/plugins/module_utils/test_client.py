# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import pytest

from ansible_collections.haven.dr.plugins.module_utils._client import HavenClient
from ansible_collections.haven.dr.plugins.module_utils._errors import (
    HavenApiError,
    HavenAuthError,
    HavenConflict,
    HavenConnectionError,
    HavenInvalid,
    HavenNotFound,
)


def client(url, **kwargs):
    naps = []
    kwargs.setdefault("token", "hvn_abc_secret")
    made = HavenClient(url, sleep=naps.append, **kwargs)
    return made, naps


def test_a_request_carries_the_token_and_returns_the_json(havend):
    havend.script.on("GET", "/v1/node", (200, {"name": "src1", "role": "source"}))
    c, dummy = client(havend.url + "/")
    assert c.get("/v1/node") == {"name": "src1", "role": "source"}
    method, path, headers, dummy = havend.script.requests[0]
    assert (method, path) == ("GET", "/v1/node")
    assert headers["Authorization"] == "Bearer hvn_abc_secret"


@pytest.mark.parametrize(
    ("status", "detail", "error", "says"),
    [
        (401, "a valid bearer token is required", HavenAuthError, "answered 401: a valid bearer token"),
        (403, "this token's scope is read, admin needed", HavenAuthError, "scope is read"),
        (404, "no group 'nope' on this node", HavenNotFound, "no group 'nope'"),
        (409, "failover is not possible while the group is paused", HavenConflict, "while the group is paused"),
        (422, [{"field": "timeout", "error": "must be > 0"}], HavenInvalid, "timeout: must be > 0"),
        (500, "boom", HavenApiError, "answered 500: boom"),
    ],
)
def test_an_error_answer_is_the_error_of_its_status_naming_the_node(havend, status, detail, error, says):
    havend.script.on("POST", "/v1/groups/app/checkpoints", (status, {"detail": detail}))
    c, naps = client(havend.url)
    with pytest.raises(error) as raised:
        c.post("/v1/groups/app/checkpoints", {"label": "x"})
    assert says in str(raised.value)
    assert str(raised.value).startswith(havend.url)
    assert raised.value.status == status and raised.value.detail == detail
    assert naps == []  # none of these is sent again


def test_404_as_none_where_asked(havend):
    havend.script.on("GET", "/v1/groups/nope", (404, {"detail": "no group 'nope'"}))
    c, dummy = client(havend.url)
    assert c.get_or_none("/v1/groups/nope") is None


def test_a_read_is_retried_with_back_off_after_a_gateway_error(havend):
    havend.script.on("GET", "/v1/groups", (503, {"detail": "busy"}), (502, {}), (200, []))
    c, naps = client(havend.url, retries=3, backoff=0.5)
    assert c.get("/v1/groups") == []
    assert naps == [0.5, 1.0]
    assert len(havend.script.requests) == 3


def test_a_post_that_may_have_arrived_is_not_sent_again(havend):
    havend.script.on("POST", "/v1/groups/app/operations/failover", (503, {"detail": "busy"}), (202, {}))
    c, naps = client(havend.url, retries=3)
    with pytest.raises(HavenApiError) as raised:
        c.post("/v1/groups/app/operations/failover", {})
    assert raised.value.status == 503 and naps == []
    assert len(havend.script.requests) == 1


def test_a_busy_group_is_asked_again_when_the_node_says_whatever_the_method(havend):
    """409 with Retry-After: another operation held the group and the node did
    nothing; a POST too is sent again, after the seconds it says."""
    busy = (409, {"detail": "volume_add is running on shop"}, 0, {"Retry-After": "1"})
    havend.script.on("POST", "/v1/groups/shop/volumes", busy, busy, (201, {"name": "db"}))
    c, naps = client(havend.url, retries=0)
    assert c.post("/v1/groups/shop/volumes", {"name": "db"}) == {"name": "db"}
    assert naps == [1.0, 1.0] and len(havend.script.requests) == 3


def test_a_group_busy_for_too_long_is_the_409_in_the_end(havend):
    busy = (409, {"detail": "failback is running on shop"}, 0, {"Retry-After": "7"})
    havend.script.on("POST", "/v1/groups/shop/volumes", busy)
    c, naps = client(havend.url, retries=0)
    with pytest.raises(HavenApiError) as raised:
        c.post("/v1/groups/shop/volumes", {"name": "db"})
    assert raised.value.status == 409 and "failback is running on shop" in str(raised.value)
    assert sum(naps) <= 60 and naps == [7.0] * 8  # 56 s waited, a 9th would pass the minute


def test_a_409_without_retry_after_is_not_sent_again(havend):
    havend.script.on("POST", "/v1/groups/shop/operations/failback", (409, {"detail": "group shop has not failed over"}))
    c, naps = client(havend.url, retries=3)
    with pytest.raises(HavenApiError):
        c.post("/v1/groups/shop/operations/failback", {})
    assert naps == [] and len(havend.script.requests) == 1


def test_retries_run_out_with_the_last_error(havend):
    havend.script.on("GET", "/v1/node", (504, {"detail": "gateway timeout"}))
    c, naps = client(havend.url, retries=2, backoff=0.1)
    with pytest.raises(HavenApiError) as raised:
        c.get("/v1/node")
    assert raised.value.status == 504 and naps == [0.1, 0.2]


@pytest.mark.parametrize("method", ["DELETE", "PATCH", "GET"])
def test_a_request_that_may_have_arrived_is_never_sent_again(method):
    """A node that reads the request and drops the connection: it may have
    carried it out, so the client reports it instead of sending it again."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    arrived = []

    def serve():
        server.settimeout(5)
        try:
            while True:
                conn, dummy = server.accept()
                arrived.append(conn.recv(65536))
                conn.close()
        except (socket.timeout, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = "http://127.0.0.1:%d" % server.getsockname()[1]
    c, naps = client(url, retries=3)
    with pytest.raises(HavenConnectionError):
        c.request(method, "/v1/groups/x", body={} if method == "PATCH" else None)
    server.close()
    thread.join(6)
    assert len(arrived) == 1 and naps == []


def test_a_refused_connection_says_so_in_one_line_after_the_retries(closed_port):
    url = "http://127.0.0.1:%d" % closed_port
    c, naps = client(url, retries=2, backoff=0.1)
    with pytest.raises(HavenConnectionError) as raised:
        c.post("/v1/tokens", {"name": "x", "scope": "read"})  # never sent: retried even as a POST
    assert str(raised.value) == url + ": connection refused (is havend running and its API on?)"
    assert naps == [0.1, 0.2]


def test_a_slow_node_is_a_timeout_naming_the_seconds(havend):
    havend.script.on("GET", "/v1/node", (200, {}, 2.0))
    c, dummy = client(havend.url, timeout=0.3, retries=0)
    with pytest.raises(HavenConnectionError, match=r"no answer within 0\.3 s \(timeout\)"):
        c.get("/v1/node")


def test_tls_is_verified_by_default_and_trusts_the_ca_given(havend_tls):
    havend_tls.script.on("GET", "/v1/node", (200, {"name": "tgt1"}))
    untrusted, naps = client(havend_tls.url)
    with pytest.raises(HavenConnectionError, match="TLS failed"):
        untrusted.get("/v1/node")
    assert naps == []  # a certificate problem is not retried
    trusted, dummy = client(havend_tls.url, ca_path=havend_tls.ca)
    assert trusted.get("/v1/node") == {"name": "tgt1"}
    unchecked, dummy = client(havend_tls.url, validate_certs=False)
    assert unchecked.get("/v1/node") == {"name": "tgt1"}


def test_ca_path_wins_over_the_environments_bundle(havend_tls, monkeypatch, tmp_path):
    """requests lets REQUESTS_CA_BUNDLE override a session's verify: the CA
    given must still be the one used (found in the integration plays)."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    havend_tls.script.on("GET", "/v1/node", (200, {"name": "tgt1"}))
    trusted, dummy = client(havend_tls.url, ca_path=havend_tls.ca)
    assert trusted.get("/v1/node") == {"name": "tgt1"}


def test_a_body_that_is_not_json_is_an_error_not_a_crash(havend):
    havend.script.on("GET", "/v1/node", (200, b"<html>a proxy page</html>"))
    c, dummy = client(havend.url)
    with pytest.raises(Exception, match="not JSON"):
        c.get("/v1/node")


def test_no_url_is_a_clear_error():
    with pytest.raises(Exception, match="no node URL: set url"):
        HavenClient("")
