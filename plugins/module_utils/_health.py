# -*- coding: utf-8 -*-
# Copyright (c) haven.dr maintainers
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The health checks of a recovery plan, for real (internal use only).

``Checker(where)`` is the plan engine's ``HealthChecker``: ``check(server,
check, timeout)`` tries a ``_plan.HealthCheck`` once and answers ``(ok,
output)``, the output what it saw (the last error when it failed):

- ``tcp``: a connection to ``host:port`` is accepted;
- ``http``: ``url`` answers ``status``, its body contains ``body_contains``,
  and the ``jmespath`` expression over its JSON body is true (needs the
  Python library jmespath; without it the check fails saying so);
- ``command``: ``command`` run by ``sh -c`` on the controller exits
  ``expect_rc`` (``HAVEN_CHECK_HOST``, ``_USER``, ``_PORT``, ``_KEY_FILE``
  in its environment, from the check's keys).

``where(server, check)`` says where a check of ``server`` runs: None for here (the
controller's own network), or the argv prefix that runs a command inside
the server's network - the qemu provider's ``network_command(network, [])``
(``ip netns exec haven-<network>``): an isolated drill network cannot be
reached from the host, so tcp and http run there as a tiny Python probe
(this interpreter) and commands as ``sh -c`` there. Every try is bounded
by ``timeout`` (a probe that does not end in time is killed).
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress
import json
import os
import socket
import subprocess
import sys

from ansible.module_utils.urls import open_url

try:
    from ansible.module_utils.urls import HTTPError
except ImportError:  # pragma: no cover - an ansible-core without it
    from urllib.error import HTTPError

try:
    import jmespath
except ImportError:
    jmespath = None

from ansible_collections.haven.dr.plugins.module_utils._plan_engine import HealthChecker

MAX_BODY = 65536  # what is read of an http answer
MAX_OUTPUT = 2000  # what a report keeps of an output
MIN_TRY = 0.2  # seconds: less left than this is no try (the last one's output stands)

# Run as ``python -c PROBE '<json>'`` inside a network: one tcp connect or
# one http GET; prints one JSON line {ok, status, body, error}.
PROBE = r"""
import json, socket, ssl, sys
a = json.loads(sys.argv[1])
out = {"ok": False, "status": None, "body": "", "error": None}
try:
    if a["type"] == "tcp":
        socket.create_connection((a["host"], a["port"]), timeout=a["timeout"]).close()
        out["ok"] = True
    else:
        try:
            import http.client as hc
            from urllib.parse import urlsplit
        except ImportError:
            import httplib as hc
            from urlparse import urlsplit
        u = urlsplit(a["url"])
        if u.scheme == "https":
            ctx = ssl.create_default_context()
            if not a["validate_certs"]:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            c = hc.HTTPSConnection(u.hostname, u.port or 443, timeout=a["timeout"], context=ctx)
        else:
            c = hc.HTTPConnection(u.hostname, u.port or 80, timeout=a["timeout"])
        c.request("GET", (u.path or "/") + ("?" + u.query if u.query else ""), headers={"Host": u.netloc})
        r = c.getresponse()
        out["status"] = r.status
        out["body"] = r.read(%d).decode("utf-8", "replace")
        c.close()
        out["ok"] = True
except Exception as e:
    out["error"] = "%%s: %%s" %% (type(e).__name__, e)
sys.stdout.write(json.dumps(out))
""" % MAX_BODY


def _clip(text):
    text = text or ""
    return text if len(text) <= MAX_OUTPUT else text[: MAX_OUTPUT - 3] + "..."


class Checker(HealthChecker):
    """Real tcp, http and command checks, here or inside a server's network."""

    def __init__(self, where=None, python=None):
        self.where = where or (lambda server, check: None)
        self.python = python or sys.executable
        self.last = {}  # server name -> the output of its last try

    def check(self, server, check, timeout):
        # End before the caller's own bound (the engine gives the time left
        # as both): a try cut short would lose its error for the report.
        budget = float(timeout) * 0.9 - 0.05
        name = getattr(server, "name", server)
        if budget < MIN_TRY:
            return False, self.last.get(name) or "no time left for a try (%g s)" % float(timeout)
        ok, output = self._once(server, check, budget)
        self.last[name] = output
        return ok, output

    def _once(self, server, check, timeout):
        prefix = self.where(server, check)
        if check.type == "tcp":
            return self._tcp(check, timeout, prefix)
        if check.type == "http":
            return self._http(check, timeout, prefix)
        if check.type == "command":
            return self._command(check, timeout, prefix)
        return False, "%s health checks are not supported by this checker (tcp, http, command are)" % check.type

    # --- the probes --------------------------------------------------------

    def _probe(self, args, timeout, prefix):
        """The probe's answer (a dict) run inside the network of ``prefix``."""
        args = dict(args, timeout=max(0.1, timeout - 0.5))
        argv = list(prefix) + [self.python, "-c", PROBE, json.dumps(args)]
        try:
            done = subprocess.run(argv, check=False, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": "the probe did not end within %g s" % timeout}
        except OSError as exc:
            return {"ok": False, "error": "cannot run the probe %s: %s" % (argv[0], exc)}
        try:
            return json.loads(done.stdout.decode("utf-8", "replace"))
        except ValueError:
            err = (done.stderr or done.stdout).decode("utf-8", "replace").strip()
            return {"ok": False, "error": "the probe failed (exit %d): %s" % (done.returncode, _clip(err))}

    def _tcp(self, check, timeout, prefix):
        target = "%s:%s" % (check.host, check.port)
        if prefix:
            out = self._probe({"type": "tcp", "host": check.host, "port": check.port}, timeout, prefix)
            if out.get("ok"):
                return True, "connected to %s" % target
            return False, "%s: %s" % (target, out.get("error"))
        try:
            socket.create_connection((check.host, check.port), timeout=timeout).close()
        except (OSError, socket.timeout) as exc:
            return False, "%s: %s: %s" % (target, type(exc).__name__, exc)
        return True, "connected to %s" % target

    def _http(self, check, timeout, prefix):
        if check.jmespath and jmespath is None:
            return False, "the http check's jmespath option needs the Python library jmespath (pip install jmespath)"
        if prefix:
            out = self._probe(
                {"type": "http", "url": check.url, "validate_certs": check.validate_certs is not False},
                timeout,
                prefix,
            )
            if not out.get("ok"):
                return False, "%s: %s" % (check.url, out.get("error"))
            status, body = out.get("status"), out.get("body") or ""
        else:
            try:
                status, body = self._get(check, timeout)
            except Exception as exc:  # pylint: disable=broad-except
                return False, "%s: %s: %s" % (check.url, type(exc).__name__, exc)
        return judge_http(check, status, body)

    @staticmethod
    def _get(check, timeout):
        try:
            answer = open_url(
                check.url, timeout=timeout, validate_certs=check.validate_certs is not False, follow_redirects="none"
            )
        except HTTPError as exc:  # a status that is not 2xx is an answer too
            answer = exc
        return answer.getcode(), answer.read(MAX_BODY).decode("utf-8", "replace")

    def _command(self, check, timeout, prefix):
        env = dict(os.environ)
        for key, value in (
            ("HOST", check.host),
            ("USER", check.user),
            ("PORT", check.ssh_port),
            ("KEY_FILE", check.key_file),
        ):
            if value is not None:
                env["HAVEN_CHECK_" + key] = str(value)
        argv = list(prefix or []) + ["sh", "-c", check.command]
        expect = check.expect_rc if check.expect_rc is not None else 0
        try:
            done = subprocess.run(argv, check=False, capture_output=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return False, "%r did not end within %g s" % (check.command, timeout)
        except OSError as exc:
            return False, "cannot run %r: %s" % (check.command, exc)
        output = _clip((done.stdout + done.stderr).decode("utf-8", "replace").strip())
        if done.returncode != expect:
            return False, "%r exited %d, not %d: %s" % (check.command, done.returncode, expect, output)
        return True, output or "%r exited %d" % (check.command, expect)


def judge_http(check, status, body):
    """``(ok, output)`` of an http answer against the check's conditions."""
    want = check.status if check.status is not None else 200
    if status != want:
        return False, "%s answered %s, not %s: %s" % (check.url, status, want, _clip(body))
    if check.body_contains and check.body_contains not in body:
        return False, "%s: the body does not contain %r: %s" % (check.url, check.body_contains, _clip(body))
    if check.jmespath:
        if jmespath is None:
            return False, "the http check's jmespath option needs the Python library jmespath (pip install jmespath)"
        try:
            value = jmespath.search(check.jmespath, json.loads(body))
        except ValueError as exc:
            return False, "%s: the body is not JSON (%s) or %r is not valid: %s" % (
                check.url,
                exc,
                check.jmespath,
                _clip(body),
            )
        if not value:
            return False, "%s: %s is %s: %s" % (check.url, check.jmespath, json.dumps(value), _clip(body))
    return True, "%s answered %s" % (check.url, status)


def in_server_network(plan, providers):
    """A ``where`` for ``Checker``: a check runs inside the network of the
    server's NIC whose network holds the check's host (else its first NIC)
    when the server's provider has ``network_command`` (qemu: a netns);
    here otherwise (no NIC, or a provider without one)."""

    def where(server, check):
        provider = providers.get(server.provider) if isinstance(providers, dict) else providers
        if provider is None or not hasattr(provider, "network_command") or not server.nics:
            return None
        chosen = server.nics[0].network
        host = check.host
        if host is None and check.url:
            host = _url_host(check.url)
        for nic in server.nics:
            cidr = plan.networks[nic.network].cidr if nic.network in plan.networks else None
            try:
                if host and cidr and ipaddress.ip_address(host) in ipaddress.ip_network(cidr, strict=False):
                    chosen = nic.network
                    break
            except ValueError:  # a host name: the first NIC's network
                break
        return provider.network_command(chosen, [])

    return where


def _url_host(url):
    rest = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return rest.split(":", 1)[0]
