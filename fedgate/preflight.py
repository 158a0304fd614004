"""Checks of a service config against the machine and the broker (`fedgate config check`).

Theory of operation
-------------------
A check is a small function ``check(subject) -> list[Finding]``: one finding per thing it
looked at, ok or a problem naming the config file, the key, the value and the reason, with
the exit code the service would end with. :func:`run` runs the lists in the order the
service meets them at start-up, so the first problem's exit code is the service's:

1. ``FILE_CHECKS``: every file the config names can be read, and every folder it writes
   can be written, *by the service's user* (``--user``; as root the probe runs in a
   forked child that has dropped to that user).                               -> 78
2. ``CREDENTIAL_CHECKS``: the client certificate's CN is the configured id (the broker's
   ACL grants topics by that name: else PUBACK 135 on every update)               -> 77;
   the key belongs to the certificate, the fleet CA accepts the certificate, the signing
   key and keyring load and agree                                                   -> 78
3. ``fedgate.preflight_data``: the edge's sample store gives the rows its task names.
4. ``LIVE_CHECKS`` (``--live``): a TLS handshake and CONNACK within the timeout, judged by
   the same :class:`~fedcore.transport.connection.ConnectionWatch` as the services
   (69 unreachable, 78 our TLS settings, 77 our certificate refused); SUBACK for each
   subscription the service makes; PUBACK for an empty, non-retained QoS 1 publish on the
   service's own topic that receivers ignore                                        -> 77

Over TLS the broker names every session after the client certificate, whatever client id
was asked for (``use_username_as_clientid``), so a live session with the service's
certificate would take a running service's connection over. ``--live`` alone therefore
stops at the CONNACK of an authentication probe (CONNACK 140, sent only after the broker
accepted the certificate; no session is opened). ``--session`` (stop the service first)
opens a clean, non-persistent session and tries the SUBACKs and the PUBACK too. Without TLS
the broker cannot bind names, and the probe uses its own client id and a full session.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import queue
import time
from pathlib import Path
from typing import Any

from fedcore.errors import ConfigError, FedgateError, NotAuthorizedError, TransportError
from fedcore.protocol.topics import Topics
from fedcore.service_config import BrokerConfig
from fedcore.transport.base import Connected, PublishDenied, SubscriptionRefused, TransportEvent
from fedcore.transport.connection import GIVING_UP, ConnectionWatch
from fedcore.transport.factory import tls_settings
from fedcore.transport.tls import (
    certificate_names,
    client_certificate_problem,
    read_error,
    tls_context,
    tls_files,
)
from fedgate.preflight_findings import Check, Finding, NamedPath, Subject, UsageError

__all__ = ["Check", "Finding", "NamedPath", "Subject", "UsageError", "run"]

EXIT_CONFIG = ConfigError.exit_code
EXIT_NOT_AUTHORIZED = NotAuthorizedError.exit_code
EXIT_UNAVAILABLE = TransportError.exit_code


# --------------------------------------------------------------------------- subjects


def edge_subject(config: Any) -> Subject:
    topics = Topics(config.fleet, config.task)
    paths = [*_broker_paths(config.broker), *_security_paths(config.security)]
    store = getattr(config.data, "store", None) if config.data.source == "store" else None
    if store is not None:  # the edge waits for the bridge to create it (StoreNotReady)
        paths.append(NamedPath("data.store", store, later="the edge waits for the bridge to write it"))
    paths.append(NamedPath("state.dir", config.state_dir, folder=True))
    spool = config.state_dir / "spool.bin"
    if spool.exists() or spool.is_symlink():  # the gateway creates it with its first message
        paths.append(NamedPath("state.dir", spool))
    return Subject(
        "edge", config.file, config, config.broker,
        identity_keys=(("device.id", config.device), ("broker.client_id", config.broker.client_id)),
        paths=tuple(paths), security=dict(config.security), signer=config.device,
        subscriptions=(topics.round(), topics.model(), topics.deployment()),
        probe_topic=topics.status(config.device),
    )


def aggregator_subject(config: Any) -> Subject:
    topics = Topics(config.fleet, config.task)
    paths = [*_broker_paths(config.broker), *_security_paths(config.security)]
    root_data = getattr(getattr(config, "fusion", None), "root_data", None)
    if root_data is not None:
        paths.append(NamedPath("fusion.root_data", root_data))
    paths.append(NamedPath("state.dir", config.state_dir, folder=True))
    return Subject(
        "aggregator", config.file, config, config.broker,
        identity_keys=(("broker.client_id", config.broker.client_id),),
        paths=tuple(paths), security=dict(config.security), signer="",  # the keyring's aggregator
        subscriptions=(topics.updates_filter(), topics.status_filter()),
        probe_topic=topics.metrics(),
    )


def _broker_paths(broker: BrokerConfig) -> list[NamedPath]:
    if not broker.url.startswith("mqtts://"):
        return []
    named = (("ca_file", broker.ca_file), ("cert_file", broker.cert_file), ("key_file", broker.key_file))
    return [NamedPath(f"broker.{k}", p) for k, p in named if p is not None]


def _security_paths(security: dict[str, Path]) -> list[NamedPath]:
    out = [NamedPath(f"security.{k}", security[k]) for k in ("keyring", "signing_key", "revocations")
           if k in security]
    if "keyring" in security and "revocations" not in security:  # load_keyring's default
        out.append(NamedPath("security.revocations", security["keyring"].with_name("revoked.json"),
                             note=" (default: next to the keyring)"))
    return out


# --------------------------------------------------------------------------- 1. files


def check_paths(subject: Subject) -> list[Finding]:
    who = subject.user or current_user()
    problems = probe_as(subject.user, list(subject.paths))
    out = []
    for named, problem in zip(subject.paths, problems, strict=True):
        what = "writable" if named.folder else "readable"
        if problem == _NOT_YET:
            out.append(Finding("file", f"{named.key} {named.path} does not exist yet: {named.later}",
                               skipped=True))
        elif problem is None:
            out.append(Finding("file", f"{named.key} {named.path}{named.note}: {what} by {who}"))
        else:
            out.append(subject.problem("file", named.key, named.path, f"{problem} (as {who})", EXIT_CONFIG))
    return out


# --------------------------------------------------------------------------- 2. credentials


def check_certificate_name(subject: Subject) -> list[Finding]:
    cert = subject.broker.cert_file
    if not subject.broker.url.startswith("mqtts://") or cert is None:
        return [Finding("certificate name", "no client certificate configured", skipped=True)]
    if read_error(cert) is not None:
        return [_first_the_files("certificate name")]
    try:
        cn = certificate_names(cert)[0]
    except (OSError, ValueError) as exc:
        return [Finding("certificate name", f"cannot read the name in {cert}: {exc}", skipped=True)]
    out = []
    for key, configured in subject.identity_keys:
        if configured == cn:
            out.append(Finding("certificate name", f"CN {cn!r} of broker.cert_file equals {key}"))
            continue
        out.append(subject.problem(
            "certificate name", key, configured,
            f"the client certificate {cert} is issued to {cn!r} (its CN, the name the broker's "
            f"ACL uses), not {configured!r}: the broker would refuse this service's own topics "
            f"(PUBACK 135). Set {key} = \"{cn}\", or provision a certificate for {configured!r}",
            EXIT_NOT_AUTHORIZED))
    return out


def check_tls_files(subject: Subject) -> list[Finding]:
    tls = tls_settings(subject.broker)
    if tls is None:
        return [Finding("tls", f"broker.url {subject.broker.url} is not TLS: no certificates", skipped=True)]
    if any(read_error(path) is not None for _, path in tls_files(tls)):
        return [_first_the_files("tls")]
    try:
        tls_context(tls, subject.file)
    except ConfigError as exc:
        return [subject.problem("tls", exc.key, exc.value, exc.problem, EXIT_CONFIG)]
    pair = " and broker.key_file belongs to broker.cert_file" if tls.cert_file else ""
    out = [Finding("tls", f"broker.ca_file loads{pair}")]
    if tls.ca_file is None or tls.cert_file is None or tls.key_file is None:
        return out
    problem = client_certificate_problem(tls.ca_file, tls.cert_file, tls.key_file)
    if problem is None:
        out.append(Finding("certificate chain", f"the fleet CA in broker.ca_file accepts {tls.cert_file} "
                           "as a client certificate"))
    else:
        out.append(subject.problem(
            "certificate chain", "broker.cert_file", tls.cert_file,
            f"a broker trusting broker.ca_file {tls.ca_file} would refuse it: {problem} "
            f"({_issuers(tls.cert_file, tls.ca_file)}); copy ca.crt, client.crt "
            "and client.key from the same fleet's bundle", EXIT_CONFIG))
    return out


def _first_the_files(check: str) -> Finding:
    return Finding(check, "not checked: the files it needs are unreadable (above)", skipped=True)


def _issuers(cert: Path, ca: Path) -> str:
    try:
        issuer, ca_name = certificate_names(cert)[1], certificate_names(ca)[0]
    except (OSError, ValueError):
        return "names unreadable"
    return f"the certificate is issued by {issuer!r}; broker.ca_file is {ca_name!r}"


def check_signing(subject: Subject) -> list[Finding]:
    from fedcore.protocol import signing

    if not subject.security:
        return [Finding("signing", "no [security] table: messages are not signed", skipped=True)]
    if any(read_error(n.path) is not None for n in subject.paths if n.key.startswith("security.")):
        return [_first_the_files("signing")]
    try:
        keyring, key = signing.load_credentials(subject.file, subject.security)
    except ConfigError as exc:
        return [Finding("signing", exc.problem, EXIT_CONFIG, exc.file, exc.key, str(exc.value))]
    if keyring is None or key is None:
        return []
    signer = subject.signer or keyring.aggregator_id
    try:
        listed = keyring.key_for(signer)
    except FedgateError:
        listed = None
    if listed != key.verify_key:
        found = "has no key" if listed is None else f"has key {listed.fingerprint()}"
        return [subject.problem(
            "signing", "security.signing_key", subject.security.get("signing_key", ""),
            f"its public key {key.verify_key.fingerprint()} is not the keyring's key for "
            f"{signer!r} (the keyring {found}): peers would reject every message this service "
            "signs; copy signing.key and keyring.json from the current bundle", EXIT_CONFIG)]
    return [Finding("signing", f"security.signing_key is the keyring's key for {signer!r} "
                    f"(keyring: {len(keyring.devices)} devices, {len(keyring.revoked)} revoked keys)")]


# --------------------------------------------------------------------------- 4. live


def check_broker(subject: Subject) -> list[Finding]:
    from fedcore.transport.factory import transport_from_config

    url = subject.broker.url
    probe_id = f"{subject.broker.client_id}-check-{os.getpid()}"
    auth_probe = url.startswith("mqtts://") and not subject.session
    try:
        transport = transport_from_config(
            subject.broker, client_id=probe_id, clean_start=True, session_expiry=0,
            connect_timeout=min(5.0, subject.timeout_s), backoff=(0.2, 1.0), auth_probe=auth_probe)
    except ConfigError as exc:
        return [Finding("broker", f"not tried: {exc.key} must be fixed first", skipped=True)]
    events: queue.Queue[TransportEvent] = queue.Queue()
    started = time.monotonic()
    watch = ConnectionWatch(url, subject.timeout_s, started_at=started, identity=subject.identity,
                            own_topics=(subject.probe_topic, *subject.subscriptions))
    subject.transport, subject.watch = transport, watch
    transport.start(events.put)
    while True:
        try:
            event = events.get(timeout=0.1)
        except queue.Empty:
            verdict = watch.check(time.monotonic())
        else:
            if isinstance(event, Connected) and auth_probe:
                took = time.monotonic() - started
                subject.transport = None
                transport.stop()
                return [Finding("broker", f"{url}: TLS handshake, certificate accepted as "
                                f"{subject.identity!r} (CONNACK 140 to the probe) in {took:.2f} s")]
            if isinstance(event, Connected):
                took = time.monotonic() - started
                tls = "TLS handshake and " if url.startswith("mqtts://") else ""
                who = (f"as {subject.identity!r}, a clean session: the one the service kept on the "
                       "broker is gone" if tls else f"as {probe_id!r}")
                return [Finding("broker", f"{url}: {tls}CONNACK in {took:.2f} s ({who})")]
            verdict = watch.handle(event, time.monotonic())
        if verdict is not None and verdict.exit_code is not None:
            subject.transport = None
            transport.stop()
            reason = verdict.message.partition(GIVING_UP)[0]  # the exit code has its own column
            return [subject.problem("broker", "broker.url", url, reason, verdict.exit_code)]


NO_SESSION = ("not tried: the broker names sessions after certificates, so a session would take "
              "the running service's over; stop the service and add --session")


def check_subscriptions(subject: Subject) -> list[Finding]:
    if subject.transport is None:
        return [Finding("subscribe", _not_connected(subject), skipped=True)]
    out = []
    for topic_filter in subject.subscriptions:
        try:
            code = subject.transport.check_subscription(topic_filter, 1, subject.timeout_s)
        except TransportError as exc:
            out.append(subject.problem("subscribe", "broker.url", subject.broker.url, str(exc), EXIT_UNAVAILABLE))
            continue
        if code < 0x80:
            out.append(Finding("subscribe", f"{topic_filter}: granted (SUBACK {code})"))
        else:
            out.append(_denied(subject, "subscribe", SubscriptionRefused(topic_filter, code)))
    return out


def _not_connected(subject: Subject) -> str:
    probed = subject.broker.url.startswith("mqtts://") and not subject.session
    return NO_SESSION if probed else "not connected"


def check_publish(subject: Subject) -> list[Finding]:
    if subject.transport is None:
        return [Finding("publish", _not_connected(subject), skipped=True)]
    topic = subject.probe_topic
    try:  # empty and not retained: receivers ignore it, retained state stays as it is
        result = subject.transport.publish(topic, b"", qos=1, retain=False, wait=subject.timeout_s)
    except TransportError as exc:
        return [subject.problem("publish", "broker.url", subject.broker.url, str(exc), EXIT_UNAVAILABLE)]
    assert result.reason_code is not None
    if not result.denied:
        return [Finding("publish", f"{topic} (empty, not retained): accepted (PUBACK {result.reason_code})")]
    return [_denied(subject, "publish", PublishDenied(topic, result.reason_code))]


def _denied(subject: Subject, check: str, event: PublishDenied | SubscriptionRefused) -> Finding:
    """Said as the service would say it (its ConnectionWatch), naming the configured id."""
    assert subject.watch is not None
    verdict = subject.watch.handle(event, time.monotonic())
    assert verdict is not None
    key, configured = subject.identity_keys[0]
    return subject.problem(check, key, configured, verdict.message.partition(GIVING_UP)[0],
                           verdict.exit_code or EXIT_CONFIG)


FILE_CHECKS: list[Check] = [check_paths]
CREDENTIAL_CHECKS: list[Check] = [check_certificate_name, check_tls_files, check_signing]
LIVE_CHECKS: list[Check] = [check_broker, check_subscriptions, check_publish]


def checks_for(subject: Subject) -> list[Check]:
    from fedgate.preflight_data import EDGE_DATA_CHECKS, SERVICE_CHECKS

    data: list[Check] = [*SERVICE_CHECKS, *(EDGE_DATA_CHECKS if subject.kind == "edge" else [])]
    return [*FILE_CHECKS, *CREDENTIAL_CHECKS, *data, *(LIVE_CHECKS if subject.live else [])]


def run(subject: Subject) -> list[Finding]:
    """Every check's findings, in start-up order. Raises UsageError for a bad ``--user``."""
    findings: list[Finding] = []
    transport_log = logging.getLogger("fedcore.transport")
    level = transport_log.level
    if transport_log.getEffectiveLevel() >= logging.WARNING:
        transport_log.setLevel(logging.ERROR)  # the findings say it; -v shows the transport's view
    try:
        for check in checks_for(subject):
            findings.extend(check(subject))
    finally:
        transport_log.setLevel(level)
        if subject.transport is not None:
            subject.transport.stop()
            subject.transport = None
    return findings


def exit_code(findings: list[Finding]) -> int:
    """The first problem's exit code (the service stops at its first problem), else 0."""
    return next((f.exit_code for f in findings if not f.ok), 0)


# --------------------------------------------------------------------------- as another user


def current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


_NOT_YET = "not created yet"


def access_problem(named: NamedPath) -> str | None:
    """Why this process cannot read the file / write in the folder, or None."""
    if not named.folder:
        if named.later and not os.path.lexists(named.path):
            return _NOT_YET
        return read_error(named.path)
    existing = named.path
    try:
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent  # the service creates the folder: its parent must allow it
        is_dir = existing.is_dir()
    except OSError as exc:  # a parent folder cannot be entered
        return f"cannot reach {existing}: {exc.strerror or exc}"
    if not is_dir:
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        creating = "" if existing == named.path else f" (to create {named.path})"
        return f"cannot write in {existing}{creating}"
    return None


def probe_as(user: str | None, items: list[NamedPath]) -> list[str | None]:
    """:func:`access_problem` of each item as ``user`` (None: as this process)."""
    if user is None or user == current_user():
        return [access_problem(item) for item in items]
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"--user {user}: no such user") from None
    if os.geteuid() != 0:
        raise UsageError(f"--user {user}: only root can check as another user (use sudo)")
    return _probe_in_child(account, items)


def _probe_in_child(account: pwd.struct_passwd, items: list[NamedPath]) -> list[str | None]:
    """Fork, drop to the user in the child, probe, send the answers back. A fork rather than
    a new interpreter: the user may not be able to read this Python installation."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no cleanup handlers, no return into the caller's stack
        status = 1
        try:
            os.close(read_end)
            os.setgroups(os.getgrouplist(account.pw_name, account.pw_gid))
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(json.dumps([access_problem(item) for item in items]).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not data:
        raise UsageError(f"--user {account.pw_name}: the probe as that user failed")
    answers: list[str | None] = json.loads(data)
    return answers
