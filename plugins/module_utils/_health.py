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
- ``command``: ``command`` run over ssh (paramiko) on ``host:ssh_port`` as
  ``user`` with ``key_file`` (else the default keys and agent; never a
  password prompt) exits ``expect_rc``; an unknown host key is accepted (a
  recovery VM's is new by nature) and its fingerprint is in the output;
- ``guest_agent``: ``command`` run as ``sh -c`` in the guest by the server's
  provider (``guest_exec``: the QEMU guest agent) exits ``expect_rc``.

``where(server, check)`` says where a check of ``server`` runs: None for here (the
controller's own network), or the argv prefix that runs a command inside
the server's network - the qemu provider's ``network_command(network, [])``
(``ip netns exec haven-<network>``): an isolated drill network cannot be
reached from the host, so tcp, http and the ssh client run there as tiny
Python probes (this interpreter; the ssh one imports paramiko). Every try
is bounded by ``timeout`` (a probe that does not end in time is killed).
``providers`` (a provider, or a dict of them by name; default the
``providers`` of ``where``, as ``in_server_network`` gives) run the
``guest_agent`` checks.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import ipaddress
import json
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

from ansible_collections.haven.dr.plugins.module_utils._errors import HavenError
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


# Run as ``python -c SSH_PROBE '<json>'`` inside a network: one ssh session
# (paramiko) running one command; prints one JSON line {ok, rc, output,
# fingerprint, error}, the error without the "ssh user@host:port: " the
# checker puts before it. Every step is bounded by the time left of
# ``timeout`` (counted from the probe's start).
SSH_PROBE = r"""
import base64, hashlib, json, socket, sys, time
a = json.loads(sys.argv[1])
end = time.monotonic() + a["timeout"]
out = {"ok": False, "rc": None, "output": "", "fingerprint": None, "error": None}


def left():
    return max(0.05, end - time.monotonic())


def done():
    sys.stdout.write(json.dumps(out))
    sys.stdout.flush()


try:
    import paramiko
except ImportError:
    out["error"] = "the command health check needs the Python library paramiko on the controller (pip install paramiko)"
    done()
    sys.exit(0)


def fingerprint(key):
    digest = base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")
    return "%s SHA256:%s" % (key.get_name(), digest)


class Record(paramiko.MissingHostKeyPolicy):
    # accepted (a recovery VM's host key is new by nature), kept for the output
    def missing_host_key(self, client, hostname, key):
        out["fingerprint"] = fingerprint(key)


stage = "key"
client = paramiko.SSHClient()
client.set_missing_host_key_policy(Record())  # no known_hosts is loaded
try:
    pkey = None
    if a["key_file"]:
        try:
            pkey = paramiko.PKey.from_path(a["key_file"])
        except paramiko.PasswordRequiredException:
            raise
        except (IOError, OSError) as e:
            raise ValueError("cannot read the key file %s: %s" % (a["key_file"], e.strerror or e))
        except (paramiko.SSHException, ValueError, TypeError) as e:
            if "encrypted" in str(e) or "assword" in str(e):
                raise paramiko.PasswordRequiredException(str(e))
            raise ValueError("the key file %s is not a private key paramiko reads: %s" % (a["key_file"], e))
    stage = "connect"
    sock = socket.create_connection((a["host"], a["port"]), timeout=left())
    stage = "ssh"
    client.connect(
        a["host"], a["port"], a["user"], pkey=pkey, sock=sock, timeout=left(),
        banner_timeout=left(), auth_timeout=left(), channel_timeout=left(),
        look_for_keys=pkey is None, allow_agent=pkey is None,
    )
    transport = client.get_transport()
    out["fingerprint"] = fingerprint(transport.get_remote_server_key())
    stage = "command"
    chan = transport.open_session(timeout=left())
    chan.set_combine_stderr(True)
    chan.exec_command(a["command"])
    data = b""
    while True:
        chan.settimeout(left())
        chunk = chan.recv(65536)
        if not chunk:
            break
        if len(data) < a["max_output"]:
            data += chunk
    if not chan.status_event.wait(left()):
        raise socket.timeout()
    out["rc"] = chan.recv_exit_status()
    out["output"] = data.decode("utf-8", "replace")
    out["ok"] = True
except paramiko.PasswordRequiredException:
    out["error"] = "the key file %s needs a passphrase (none is asked for)" % a["key_file"]
except paramiko.AuthenticationException as e:
    how = "the key file %s" % a["key_file"] if a["key_file"] else "the default keys and agent (no key_file)"
    out["error"] = "authentication failed (%s): %s" % (how, e)
except (socket.timeout, TimeoutError) as e:
    out["error"] = {
        "connect": "connection timed out (no answer within %g s)",
        "ssh": "no ssh answer within %g s",
        "command": "the command did not end within %g s",
    }.get(stage, "timed out within %g s") % a["timeout"]
except ConnectionRefusedError:
    out["error"] = "connection refused"
except ValueError as e:
    out["error"] = str(e)
except paramiko.SSHException as e:
    if stage == "ssh" and time.monotonic() >= end - 0.2:  # paramiko's own timeouts say less
        out["error"] = "no ssh answer within %g s (%s)" % (a["timeout"], e or type(e).__name__)
    else:
        out["error"] = "ssh failed: %s" % (e or type(e).__name__)
except (OSError, EOFError) as e:
    out["error"] = "%s: %s" % (type(e).__name__, e)
except Exception as e:
    out["error"] = "%s: %s" % (type(e).__name__, e)
finally:
    client.close()
done()
"""


def _clip(text):
    text = text or ""
    return text if len(text) <= MAX_OUTPUT else text[: MAX_OUTPUT - 3] + "..."


class Checker(HealthChecker):
    """Real tcp, http, command (ssh) and guest_agent checks, here or inside a
    server's network."""

    def __init__(self, where=None, python=None, providers=None):
        self.where = where or (lambda server, check: None)
        self.python = python or sys.executable
        self.providers = providers if providers is not None else getattr(where, "providers", None)
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
        if check.type == "guest_agent":
            return self._guest_agent(server, check, timeout)
        return False, "%s health checks are not supported by this checker (tcp, http, command, guest_agent are)" % check.type

    # --- the probes --------------------------------------------------------

    def _probe(self, args, timeout, prefix, source=PROBE):
        """The probe's answer (a dict) run inside the network of ``prefix``."""
        args = dict(args, timeout=max(0.1, timeout - 0.5))
        argv = list(prefix) + [self.python, "-c", source, json.dumps(args)]
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
        target = "ssh %s@%s:%s" % (check.user or "root", check.host, check.ssh_port or 22)
        args = {
            "host": check.host,
            "port": int(check.ssh_port or 22),
            "user": check.user or "root",
            "key_file": check.key_file,
            "command": check.command,
            "max_output": MAX_OUTPUT * 4,
        }
        out = self._probe(args, timeout, prefix or [], source=SSH_PROBE)
        return judge_ssh(target, check, out)

    def _provider(self, server):
        providers = self.providers
        if isinstance(providers, dict):
            return providers.get(getattr(server, "provider", None))
        return providers

    def _guest_agent(self, server, check, timeout):
        provider = self._provider(server)
        if provider is None or not hasattr(provider, "guest_exec"):
            return False, "guest_agent checks run through the server's provider (guest_exec): this checker has none for %s" % (
                getattr(server, "provider", None) or "it"
            )
        try:
            got = provider.guest_exec(server, ["/bin/sh", "-c", check.command], timeout)
        except HavenError as exc:
            return False, "guest agent: %s" % exc
        return judge_rc("guest agent", check, got.get("rc"), (got.get("stdout") or "") + (got.get("stderr") or ""))


def judge_rc(where, check, rc, output):
    """``(ok, output)`` of a command's exit status against the check's ``expect_rc``."""
    expect = check.expect_rc if check.expect_rc is not None else 0
    output = _clip((output or "").strip())
    if rc != expect:
        return False, "%s: %r exited %s, not %d: %s" % (where, check.command, rc, expect, output)
    return True, "%s: %r exited %d%s" % (where, check.command, expect, ": " + output if output else "")


def judge_ssh(target, check, out):
    """``(ok, output)`` of the ssh probe's answer ``out`` for ``target``
    (``ssh user@host:port``): its error, or the exit status against
    ``expect_rc``, with the host key's fingerprint."""
    if not out.get("ok"):
        return False, "%s: %s" % (target, out.get("error") or "the probe said nothing")
    where = target
    if out.get("fingerprint"):
        where += " (host key %s)" % out["fingerprint"]
    return judge_rc(where, check, out.get("rc"), out.get("output"))


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
    here otherwise (no NIC, or a provider without one). It carries
    ``providers`` (a provider or a dict of them by name), which a
    ``Checker`` made with it uses for the ``guest_agent`` checks."""
    return ServerNetwork(plan, providers)


class ServerNetwork:
    """``in_server_network``'s answer: called as ``where(server, check)``."""

    def __init__(self, plan, providers):
        self.plan = plan
        self.providers = providers

    def provider(self, server):
        if isinstance(self.providers, dict):
            return self.providers.get(server.provider)
        return self.providers

    def __call__(self, server, check):
        provider = self.provider(server)
        if provider is None or not hasattr(provider, "network_command") or not server.nics:
            return None
        chosen = server.nics[0].network
        host = check.host
        if host is None and check.url:
            host = _url_host(check.url)
        for nic in server.nics:
            cidr = self.plan.networks[nic.network].cidr if nic.network in self.plan.networks else None
            try:
                if host and cidr and ipaddress.ip_address(host) in ipaddress.ip_network(cidr, strict=False):
                    chosen = nic.network
                    break
            except ValueError:  # a host name: the first NIC's network
                break
        return provider.network_command(chosen, [])


def _url_host(url):
    rest = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return rest.split(":", 1)[0]
