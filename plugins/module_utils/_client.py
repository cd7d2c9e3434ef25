# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The one client of a havend node's REST API (internal use only).

One ``requests.Session`` per node; connect and read timeouts; TLS verified
by default (``ca_path`` for the deployment CA, optional client certificate
for mTLS); a bearer token. Retries with exponential back-off only where the
request cannot have been carried out twice: a connection that was never
made (refused, connect timeout, name resolution) for every method, and a
502/503/504 for the requests that only read (GET, HEAD). A request that may
have reached the node (a broken read, a timeout waiting for the answer) is
never sent again: a DELETE or PATCH repeated could fail on its own success.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import time
import traceback

from ansible_collections.haven.dr.plugins.module_utils._errors import (
    HavenConnectionError,
    HavenError,
    api_error,
)

REQUESTS_IMPORT_ERROR = None
try:
    import requests
except ImportError:  # reported by the module with missing_required_lib
    requests = None
    REQUESTS_IMPORT_ERROR = traceback.format_exc()

RETRY_STATUS = (502, 503, 504)
READS = ("GET", "HEAD")  # sent again after a 502/503/504


# A 409 with Retry-After (havend: another operation holds the group, the request was
# refused before anything was done) is sent again after the seconds it says, for at most
# this many seconds in all.
BUSY_WAIT = 60.0


def _busy_for(response):
    """Seconds to wait before sending again a request the node refused as busy, or None."""
    if response.status_code != 409:
        return None
    try:
        return min(10.0, max(0.1, float(response.headers.get("Retry-After"))))
    except (TypeError, ValueError):
        return None


class HavenClient:
    """Requests to one node; every error is a ``HavenError`` naming the node."""

    def __init__(
        self,
        url,
        token=None,
        ca_path=None,
        validate_certs=True,
        client_cert=None,
        client_key=None,
        timeout=30.0,
        connect_timeout=10.0,
        retries=3,
        backoff=0.5,
        session=None,
        sleep=time.sleep,
    ):
        if requests is None:
            raise HavenError("the Python library requests is required: %s" % REQUESTS_IMPORT_ERROR)
        if not url:
            raise HavenError("no node URL: set url (or HAVEN_URL)")
        self.url = url.rstrip("/")
        self.timeout = (float(connect_timeout), float(timeout))
        self.retries = max(0, int(retries))
        self.backoff = float(backoff)
        self._sleep = sleep
        self.session = session or requests.Session()
        self.session.headers["Accept"] = "application/json"
        self.session.headers["User-Agent"] = "haven.dr-ansible"
        if token:
            self.session.headers["Authorization"] = "Bearer %s" % token
        # Given with every request, not set on the session: requests lets
        # REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's verify.
        self.verify = False if not validate_certs else (ca_path or True)
        self.cert = None
        if client_cert:
            self.cert = (client_cert, client_key) if client_key else client_cert

    # Requests ----------------------------------------------------------------

    def get(self, path, params=None):
        return self.request("GET", path, params=params)

    def post(self, path, body=None):
        return self.request("POST", path, body=body if body is not None else {})

    def patch(self, path, body):
        return self.request("PATCH", path, body=body)

    def delete(self, path):
        return self.request("DELETE", path)

    def get_or_none(self, path, params=None):
        """The object at ``path``, or None when the node says 404."""
        try:
            return self.get(path, params=params)
        except HavenError as exc:
            if getattr(exc, "status", None) == 404:
                return None
            raise

    def request(self, method, path, body=None, params=None):
        """The parsed JSON answer of a 2xx; else the error for its status."""
        attempt = 0
        busy_waited = 0.0
        while True:
            try:
                response = self.session.request(
                    method,
                    self.url + path,
                    json=body,
                    params=params,
                    timeout=self.timeout,
                    verify=self.verify,
                    cert=self.cert,
                    allow_redirects=False,
                )
            except requests.exceptions.RequestException as exc:
                # A certificate problem does not go away by asking again.
                tls = isinstance(exc, requests.exceptions.SSLError)
                if not tls and _never_sent(exc) and attempt < self.retries:
                    attempt += 1
                    self._sleep(self.backoff * (2 ** (attempt - 1)))
                    continue
                raise HavenConnectionError(self._cause(exc), url=self.url)
            if response.status_code in RETRY_STATUS and method in READS and attempt < self.retries:
                attempt += 1
                self._sleep(self.backoff * (2 ** (attempt - 1)))
                continue
            wait = _busy_for(response)
            if wait is not None and busy_waited + wait <= BUSY_WAIT:
                # another operation holds the group for a moment: refused before anything
                # was done, whatever the method, so sent again when the node says
                busy_waited += wait
                self._sleep(wait)
                continue
            return self._answer(method, path, response)

    def _answer(self, method, path, response):
        try:
            data = response.json() if response.content else None
        except ValueError:
            data = None
        if 200 <= response.status_code < 300:
            if data is None and response.content:
                raise HavenError(
                    "%s %s answered %d with a body that is not JSON" % (method, path, response.status_code),
                    url=self.url,
                )
            return data
        detail = data.get("detail") if isinstance(data, dict) else (response.text[:200] or None)
        raise api_error(response.status_code, detail, self.url, method, path)

    def _cause(self, exc):
        """One line: why the node could not be reached."""
        if isinstance(exc, requests.exceptions.SSLError):
            return "TLS failed: %s" % _innermost(exc)
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return "no connection within %g s (timeout)" % self.timeout[0]
        if isinstance(exc, requests.exceptions.ReadTimeout):
            return "no answer within %g s (timeout)" % self.timeout[1]
        if isinstance(exc, requests.exceptions.ConnectionError):
            text = _innermost(exc)
            if "refused" in text.lower():
                return "connection refused (is havend running and its API on?)"
            return "cannot connect: %s" % text
        return "%s: %s" % (type(exc).__name__, exc)


def _never_sent(exc):
    """Whether the request certainly never reached the node."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError):
        text = _innermost(exc).lower()
        return "refused" in text or "name or service not known" in text or "failed to resolve" in text
    return False


def _innermost(exc):
    """The root cause's text (requests wraps urllib3's, which wraps the socket's)."""
    seen = exc
    for _depth in range(8):
        inner = getattr(seen, "reason", None) or (seen.args[0] if seen.args else None)
        if isinstance(inner, BaseException) and inner is not seen:
            seen = inner
            continue
        break
    return str(seen)
