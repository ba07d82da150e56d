"""The sending task without Spark: one SMTP connection to a real scripted server on loopback, its
journal, its pacing, TLS and AUTH (the stage through Spark is tests/test_send.py)."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import ssl
import time
from pathlib import Path

import pyarrow as pa
import pytest

from inboxlift.clock import FixedClock
from inboxlift.delivery import states as S
from inboxlift.delivery import journal
from inboxlift.delivery.journal import LeaseLostError, RunLock, SendLockedError, TaskJournal, start_run
from inboxlift.delivery.partition import RESULT_ARROW_SCHEMA, SendPlan, TaskSender, send_batches
from inboxlift.delivery.ratelimit import TaskPacer, backoff_seconds
from inboxlift.delivery.smtp import RelayConfig, RelayError, check_relay, wire_data
from inboxlift.render.eml import message_bytes

from smtp_server import ScriptedHandler, smtp_server

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
UNSUBSCRIBE = ("<https://t.shop.example/u/AQAAAABpHnMAIDk0ZjE4YjQ5ZGQ2NjQzYWRmNjI1YjBkZGYxZjRmMGRlQHNob3AuZXhhbXBsZQ>, "
               "<mailto:unsubscribe@shop.example?subject=unsubscribe>")


def row(user: str, **changes) -> dict:
    base = dict(message_id=f"{user}-m@shop.example", attempt=1, to_email=f"{user}@mail.example",
                from_email="news@shop.example", subject=f"Hello {user}", text="Hi\n.dot line\n", html="<p>Hi</p>",
                headers={"From": "Example Shop <news@shop.example>", "Message-ID": f"<{user}-m@shop.example>",
                         "List-Unsubscribe": UNSUBSCRIBE, "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
                send_at=dt.datetime(2026, 11, 20, 9, 0, tzinfo=UTC))
    base.update(changes)
    return base


def plan(port: int, folder: Path, sleeps: list[float] | None = None, **changes) -> SendPlan:
    base = dict(relay=RelayConfig(host="127.0.0.1", port=port, security="none", helo_name="localhost",
                                  connect_timeout=2.0, command_timeout=2.0),
                run_dir=str(folder), connections=1, return_path="bounces@shop.example", messages_per_second=0.0,
                domain_messages_per_second=0.0, throttle_backoff_seconds=1.0, throttle_backoff_max_seconds=8.0,
                throttle_retries=2, max_attempts=3, retry_backoff_minutes=15.0, retry_backoff_max_minutes=120.0,
                journal_fsync=True, clock=FixedClock(NOW),
                sleep=(sleeps.append if sleeps is not None else (lambda s: None)))
    base.update(changes)
    return SendPlan(**base)


def journal_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("part-*.jsonl")) for line in path.read_text().splitlines()]


def header_block(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


def test_one_connection_sends_each_message_once_with_the_outbox_bytes(tmp_path):
    handler = ScriptedHandler()
    rows = [row("ann"), row("bo")]
    with smtp_server(handler) as port:
        sender = TaskSender(plan(port, tmp_path), TaskJournal(tmp_path, partition=0, attempt=0, fsync=True))
        outcomes = [sender.handle(r) for r in rows]
        sender.close()
        sender.journal.close()
    assert [(o.state, o.code) for o in outcomes] == [(S.SENT, 250), (S.SENT, 250)]
    assert sender.connection.opened == 1
    assert [(r.mail_from, r.rcpt) for r in handler.received] == [
        ("bounces@shop.example", "ann@mail.example"), ("bounces@shop.example", "bo@mail.example")]
    for sent, received in zip(rows, handler.received):
        # The whole message arrives as message_bytes wrote it (the dot-stuffed line included).
        assert received.content.rstrip(b"\r\n") == message_bytes(sent).rstrip(b"\r\n")
        assert b"\r\nList-Unsubscribe: <https://t.shop.example/u/" in header_block(received.content)
    # Each message: a start line (before the content) and an end line.
    assert [(e["k"], e["m"], e.get("s")) for e in journal_lines(tmp_path)] == [
        ("start", "ann-m@shop.example", None), ("end", "ann-m@shop.example", "sent"),
        ("start", "bo-m@shop.example", None), ("end", "bo-m@shop.example", "sent")]


def test_wire_data_doubles_leading_dots_and_ends_with_the_terminator():
    assert wire_data(b"a\r\n.b\r\n..c") == b"a\r\n..b\r\n...c\r\n.\r\n"
    assert wire_data(b"") == b"\r\n.\r\n"
    # Without a line that starts with a dot the bytes pass unchanged, then the terminator.
    assert wire_data(b"a.b\r\nc.\r\n") == b"a.b\r\nc.\r\n.\r\n"
    assert wire_data(b"a.b") == b"a.b\r\n.\r\n"
    # A dot on the first line only, and one after a bare LF, are doubled too.
    assert wire_data(b".a\r\nb") == b"..a\r\nb\r\n.\r\n"
    assert wire_data(b"a\n.b\r\n") == b"a\n..b\r\n.\r\n"


def test_throttle_codes_slow_the_task_down_then_defer_a_4xx_defers_a_5xx_bounces(tmp_path):
    handler = ScriptedHandler(script={
        "slowdown@mail.example": ["421", "451", "250"],   # two "slow down": retried on the same task
        "full@mail.example": ["452"],                      # keeps saying 452: deferred after 2 retries
        "busy@mail.example": ["450"],                      # another 4xx: deferred at once
        "gone@mail.example": ["rcpt550"],                  # hard bounce at RCPT
    })
    sleeps: list[float] = []
    with smtp_server(handler) as port:
        sender = TaskSender(plan(port, tmp_path, sleeps, messages_per_second=100.0),
                            TaskJournal(tmp_path, partition=0, attempt=0, fsync=False))
        outcomes = {u: sender.handle(row(u)) for u in ("slowdown", "full", "busy", "gone", "ann")}
        sender.close()
    assert outcomes["slowdown"].state == S.SENT
    assert (outcomes["full"].state, outcomes["full"].code, outcomes["full"].reason) == (S.DEFERRED, 452, S.THROTTLED)
    assert outcomes["full"].next_at == NOW + dt.timedelta(minutes=15)    # attempt 1: the first back-off
    assert (outcomes["busy"].state, outcomes["busy"].code, outcomes["busy"].reason) == (S.DEFERRED, 450, S.TEMPORARY)
    assert (outcomes["gone"].state, outcomes["gone"].code, outcomes["gone"].reason) == (S.BOUNCED, 550, S.REJECTED)
    assert outcomes["ann"].state == S.SENT
    assert handler.transactions["slowdown@mail.example"] == 3 and handler.transactions["full@mail.example"] == 3
    # Back-off 1 s then 2 s for each throttled message (the fake sleep also carries the pacing waits).
    assert [s for s in sleeps if s >= 1.0] == [1.0, 2.0, 1.0, 2.0]
    # 100/s halved by the 421 and the 451 (25), +5 for the accepted message (30), halved by the three
    # 452s (3.75), +5 for ann's. The 421 closed the connection: one more was opened.
    assert sender.pacer.rate == pytest.approx(8.75) and sender.connection.opened == 2
    assert sorted(r.rcpt for r in handler.received) == ["ann@mail.example", "slowdown@mail.example"]


def test_a_4xx_at_the_last_attempt_fails_the_message(tmp_path):
    handler = ScriptedHandler(script={"busy@mail.example": ["450"]})
    with smtp_server(handler) as port:
        sender = TaskSender(plan(port, tmp_path), TaskJournal(tmp_path, partition=0, attempt=0, fsync=False))
        outcome = sender.handle(row("busy", attempt=3))
        sender.close()
    assert (outcome.state, outcome.code, outcome.reason, outcome.next_at) == (S.FAILED, 450, S.RETRIES_EXHAUSTED, None)


def test_a_connection_dropped_after_the_content_is_unknown_and_the_next_message_reconnects(tmp_path):
    handler = ScriptedHandler(script={"drop@mail.example": ["drop"]})
    with smtp_server(handler) as port:
        sender = TaskSender(plan(port, tmp_path), TaskJournal(tmp_path, partition=0, attempt=0, fsync=False))
        dropped = sender.handle(row("drop"))
        after = sender.handle(row("ann"))
        sender.close()
    # The relay may have taken it: never sent again by itself.
    assert (dropped.state, dropped.reason) == (S.UNKNOWN, S.NO_REPLY)
    assert after.state == S.SENT and sender.connection.opened == 2
    assert handler.transactions["drop@mail.example"] == 1


def test_a_reply_slower_than_the_timeout_is_unknown(tmp_path):
    handler = ScriptedHandler(script={"slow@mail.example": ["slow"]}, slow_seconds=1.5)
    with smtp_server(handler) as port:
        relay = RelayConfig(host="127.0.0.1", port=port, security="none", helo_name="localhost", command_timeout=0.5)
        sender = TaskSender(plan(port, tmp_path, relay=relay),
                            TaskJournal(tmp_path, partition=0, attempt=0, fsync=False))
        slow = sender.handle(row("slow"))
        sender.close()
    assert (slow.state, slow.reason) == (S.UNKNOWN, S.NO_REPLY)


def test_bad_rows_fail_with_the_reason_and_nothing_reaches_the_relay(tmp_path):
    handler = ScriptedHandler()
    rows = {
        "invalid": row("x", to_email="ann@@mail.example"),
        "local_non_ascii": row("x", to_email="änn@mail.example"),
        "crlf_subject": row("x", subject="Hi\r\nBcc: victim@mail.example"),
        "crlf_header": row("x", headers={**row("x")["headers"], "X-Inboxlift-Campaign": "c1\nBcc: v@mail.example"}),
        "unknown_header": row("x", headers={**row("x")["headers"], "Bcc": "v@mail.example"}),
        "null_address": row("x", to_email=None),
    }
    with smtp_server(handler) as port:
        sender = TaskSender(plan(port, tmp_path), TaskJournal(tmp_path, partition=0, attempt=0, fsync=False))
        outcomes = {name: sender.handle(r) for name, r in rows.items()}
        idna = sender.handle(row("idna", to_email="Ann@Bücher.example"))
        sender.close()
    assert {n: (o.state, o.reason) for n, o in outcomes.items()} == {
        "invalid": (S.FAILED, S.INVALID_ADDRESS), "local_non_ascii": (S.FAILED, S.INVALID_ADDRESS),
        "crlf_subject": (S.FAILED, S.HEADER_LINE_BREAK), "crlf_header": (S.FAILED, S.HEADER_LINE_BREAK),
        "unknown_header": (S.FAILED, S.BAD_MESSAGE), "null_address": (S.FAILED, S.INVALID_ADDRESS)}
    assert outcomes["crlf_header"].reply == "headers[X-Inboxlift-Campaign] holds a line break"
    # An internationalised domain goes out in its IDNA form, in the envelope and in To:.
    assert idna.state == S.SENT
    assert [(r.rcpt, b"To: Ann@xn--bcher-kva.example\r\n" in r.content) for r in handler.received] == [
        ("Ann@xn--bcher-kva.example", True)]


def test_a_task_run_again_replays_its_journal_and_resends_nothing(tmp_path):
    first = TaskJournal(tmp_path, partition=3, attempt=0, fsync=True)
    first.started("a@shop.example", 1, NOW)
    first.ended("a@shop.example", 1, NOW, state=S.SENT, code=250, reply="ok")
    first.started("b@shop.example", 1, NOW)   # the task died here, after the content went out
    first._fh.write('{"k": "start", "m": "c@sh')  # and a line cut short: never handed over
    first.close()
    handler = ScriptedHandler()
    with smtp_server(handler) as port:
        batch = pa.RecordBatch.from_pylist([row("a", message_id="a@shop.example"), row("b", message_id="b@shop.example"),
                                            row("c", message_id="c@shop.example")])
        out = pa.Table.from_batches(list(send_batches([batch], plan(port, tmp_path)))).to_pylist()
    assert [(r["message_id"], r["state"], r["reason"]) for r in out] == [
        ("a@shop.example", S.SENT, None), ("b@shop.example", S.UNKNOWN, S.INTERRUPTED), ("c@shop.example", S.SENT, None)]
    assert [r.rcpt for r in handler.received] == ["c@mail.example"]
    assert pa.Table.from_pylist(out, schema=RESULT_ARROW_SCHEMA).num_rows == 3


def test_an_empty_partition_opens_no_connection(tmp_path):
    assert list(send_batches([], plan(1, tmp_path))) == []


def test_a_relay_that_cannot_be_reached_defers_every_message_untried(tmp_path):
    with smtp_server(ScriptedHandler()) as port:
        pass  # the port is free again: nothing listens there
    sleeps: list[float] = []
    sender = TaskSender(plan(port, tmp_path, sleeps), TaskJournal(tmp_path, partition=0, attempt=0, fsync=False))
    # cy's attempt is the last one allowed (max_attempts 3): untried, it does not use it up.
    first, second, last = sender.handle(row("ann")), sender.handle(row("bo")), sender.handle(row("cy", attempt=3))
    assert (first.state, first.reason) == (S.DEFERRED, S.RELAY_UNAVAILABLE)
    assert (second.state, second.reason) == (S.DEFERRED, S.RELAY_UNAVAILABLE)
    assert (last.state, last.reason, last.next_at) == (S.DEFERRED, S.RELAY_UNAVAILABLE, NOW + dt.timedelta(minutes=60))
    assert sleeps == [1.0, 2.0]   # the retries of the first message only


def test_attempts_that_never_reached_the_relay_do_not_count_towards_max_attempts(tmp_path):
    handler = ScriptedHandler(script={"busy@mail.example": ["450"], "late@mail.example": ["450"]})
    with smtp_server(handler) as port:
        sender = TaskSender(plan(port, tmp_path), TaskJournal(tmp_path, partition=0, attempt=0, fsync=False))
        # Attempt 3 of 3, but attempt 2 was deferred untried: this is the second time the relay sees it.
        busy = sender.handle(row("busy", attempt=3, untried_attempts=1))
        late = sender.handle(row("late", attempt=4, untried_attempts=1))
        sender.close()
    assert (busy.state, busy.code, busy.reason) == (S.DEFERRED, 450, S.TEMPORARY)
    assert busy.next_at == NOW + dt.timedelta(minutes=30)   # the back-off of its second try
    assert (late.state, late.code, late.reason) == (S.FAILED, 450, S.RETRIES_EXHAUSTED)


def test_the_pacer_keeps_each_tasks_share_overall_and_per_domain():
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    pacer = TaskPacer(rate=4.0, domain_rate=1.0, clock=lambda: now[0], sleep=sleep)
    for domain in ("a", "b", "a", "c"):
        pacer.wait(domain)
    # 4/s overall: a at 0, b at 0.25; a again only at 1.0 (1/s per domain); c 0.25 s after that.
    assert slept == [0.25, 0.75, 0.25]
    assert backoff_seconds(1, first=2, cap=60) == 2 and backoff_seconds(4, first=2, cap=60) == 16
    assert backoff_seconds(9, first=2, cap=60) == 60


def test_the_run_lock_refuses_a_second_run_and_takes_over_a_dead_ones(tmp_path):
    with RunLock(tmp_path, run_id="one", lease_seconds=60):
        with pytest.raises(SendLockedError, match="another send run"):
            RunLock(tmp_path, run_id="two", lease_seconds=60).acquire()
    # A lock left by a process that is gone (pid 2**22 + 7 is above Linux's pid_max default) is stale.
    (tmp_path / "send.lock").write_text(json.dumps({"run_id": "dead", "host": __import__("socket").gethostname(),
                                                   "pid": 2 ** 22 + 7, "expires": 9e12}))
    with RunLock(tmp_path, run_id="three", lease_seconds=60):
        assert json.loads((tmp_path / "send.lock").read_text())["run_id"] == "three"
    assert not (tmp_path / "send.lock").exists()


def test_an_empty_lock_file_is_held_until_it_is_older_than_the_lease(tmp_path):
    lock = tmp_path / "send.lock"
    lock.write_text("")   # what a competitor sees between another run's create and its write
    with pytest.raises(SendLockedError, match="another send run"):
        RunLock(tmp_path, run_id="two", lease_seconds=60).acquire()
    assert lock.read_text() == ""
    # Left empty by a run that died a lease ago: taken over.
    old = time.time() - 61
    os.utime(lock, (old, old))
    with RunLock(tmp_path, run_id="three", lease_seconds=60):
        assert json.loads(lock.read_text())["run_id"] == "three"
    assert not lock.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_live_owner_on_this_host_keeps_the_lock_even_past_its_lease(tmp_path):
    held = {"run_id": "live", "host": socket.gethostname(), "pid": os.getpid(), "expires": time.time() - 10}
    (tmp_path / "send.lock").write_text(json.dumps(held))
    with pytest.raises(SendLockedError, match="another send run"):
        RunLock(tmp_path, run_id="two", lease_seconds=60).acquire()
    assert json.loads((tmp_path / "send.lock").read_text()) == held


def test_a_renewal_that_fails_is_retried_and_the_lock_kept(tmp_path, monkeypatch):
    failed: list[Path] = []
    write = journal._write_atomic

    def flaky(path: Path, text: str) -> None:
        if path.name == "send.lock" and not failed:
            failed.append(path)
            raise OSError(5, "Input/output error")
        write(path, text)

    monkeypatch.setattr(journal, "_write_atomic", flaky)
    lock = RunLock(tmp_path, run_id="one", lease_seconds=0.6)   # renewed every 0.2 s
    lock.acquire()
    try:
        time.sleep(1.5)   # the first renewal failed; had nothing renewed since, the lease would have ended
        held = json.loads((tmp_path / "send.lock").read_text())
        assert failed and held["run_id"] == "one" and held["expires"] > time.time()
        lock.check()
    finally:
        lock.release()
    assert not (tmp_path / "send.lock").exists()


def test_a_lost_lease_is_not_renewed_and_stops_the_run_and_its_tasks(tmp_path):
    lock = RunLock(tmp_path, run_id="one", lease_seconds=0.6)
    lock.acquire()
    other = {"run_id": "two", "host": "elsewhere.example", "pid": 1, "expires": time.time() + 60}
    try:
        # Another run took the lock over (this one stalled past its lease on another host, say).
        (tmp_path / "send.lock").write_text(json.dumps(other))
        time.sleep(0.6)
        assert json.loads((tmp_path / "send.lock").read_text()) == other   # not written over
        with pytest.raises(LeaseLostError, match="run one lost the send lock"):
            lock.check()
    finally:
        lock.release()
    assert json.loads((tmp_path / "send.lock").read_text()) == other      # nor removed


def test_a_task_whose_run_lost_its_lease_sends_nothing_more(tmp_path):
    lock = RunLock(tmp_path, run_id="one", lease_seconds=60)
    with lock:
        folder = start_run(tmp_path, "one", {"run_id": "one"}, lock=lock)
    handler = ScriptedHandler()
    with smtp_server(handler) as port:
        batch = pa.RecordBatch.from_pylist([row("ann"), row("bo")])
        with pytest.raises(LeaseLostError, match="run one"):
            list(send_batches([batch], plan(port, folder, run_id="one")))
    assert handler.transactions == {} and journal_lines(folder) == []


def test_pending_runs_are_the_folders_of_runs_whose_lease_ended(tmp_path):
    def folder(run_id: str, lease: dict | None, *, age: float = 0.0) -> Path:
        path = journal.runs_dir(tmp_path) / run_id
        path.mkdir(parents=True)
        if lease is not None:
            (path / "lease.json").write_text(json.dumps({"run_id": run_id, **lease}))
        os.utime(path, (time.time() - age, time.time() - age))
        return path

    here = socket.gethostname()
    live = folder("send-1-live", {"host": here, "pid": os.getpid(), "expires": time.time() + 60})
    ended = folder("send-2-ended", {"host": "elsewhere.example", "pid": 1, "expires": time.time() - 1})
    killed = folder("send-3-killed", {"host": here, "pid": 2 ** 22 + 7, "expires": time.time() + 60})
    released = folder("send-4-released", {"host": here, "pid": os.getpid(), "expires": 0})
    older = folder("send-0-older", None, age=61)   # written before folders had a lease
    (live / journal.COMMITTED).write_text("")
    with pytest.raises(SendLockedError, match="send-1-live is still sending"):
        journal.pending_runs(tmp_path, lease_seconds=60)
    assert live.is_dir()
    live_lease = live / "lease.json"
    live_lease.write_text(json.dumps({"run_id": live.name, "host": here, "pid": os.getpid(), "expires": 0}))
    assert journal.pending_runs(tmp_path, lease_seconds=60) == [older, ended, killed, released]
    assert not live.exists()   # committed by its run, and its lease over: removed


# ---- TLS and AUTH --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (cryptography), and its PEM as the client's CA file."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(dt.datetime.now(UTC) + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return context, str(folder / "cert.pem")


class Accounts:
    def __init__(self, password: str) -> None:
        self.password = password

    def __call__(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult

        ok = auth_data.login == b"shop" and auth_data.password == self.password.encode()
        return AuthResult(success=ok, handled=False)


def relay(port: int, ca: str | None, **changes) -> RelayConfig:
    return RelayConfig(**{**dict(host="127.0.0.1", port=port, security="starttls", username="shop", password="s3cret",
                                 tls_ca_file=ca, helo_name="localhost", connect_timeout=2, command_timeout=2),
                          **changes})


def test_starttls_and_auth_then_a_message(certificate, tmp_path):
    context, ca = certificate
    handler = ScriptedHandler()
    with smtp_server(handler, tls_context=context, require_starttls=True, authenticator=Accounts("s3cret"),
                     auth_required=True) as port:
        check_relay(relay(port, ca))
        sender = TaskSender(plan(port, tmp_path, relay=relay(port, ca)),
                            TaskJournal(tmp_path, partition=0, attempt=0, fsync=False))
        assert sender.handle(row("ann")).state == S.SENT
        sender.close()
    assert [r.rcpt for r in handler.received] == ["ann@mail.example"]


def test_a_relay_that_refuses_tls_or_auth_is_a_clear_error(certificate):
    context, ca = certificate
    with smtp_server(ScriptedHandler()) as port:   # no TLS offered at all
        with pytest.raises(RelayError, match="does not offer STARTTLS"):
            check_relay(relay(port, ca))
    with smtp_server(ScriptedHandler(), tls_context=context, authenticator=Accounts("other"),
                     auth_required=True) as port:
        with pytest.raises(RelayError, match="refused AUTH for 'shop': 535"):
            check_relay(relay(port, ca))
        # A certificate this machine does not trust is refused too (no CA file: the system's CAs).
        with pytest.raises(RelayError, match="CERTIFICATE_VERIFY_FAILED"):
            check_relay(relay(port, None))


@pytest.mark.parametrize("folder_exists", [False, True])
def test_the_embedded_relay_stores_each_message_even_in_an_existing_empty_folder(tmp_path, folder_exists):
    """``make run``'s sink: a folder that already exists (an earlier run's empty ``sent/``) must not
    make it refuse every message (``mailbox.Maildir`` only creates tmp/new/cur for a new folder)."""
    import mailbox
    import smtplib

    from inboxlift.delivery.sink import embedded_relay

    folder = tmp_path / "sent"
    if folder_exists:
        folder.mkdir()
    message = b"From: shop@example.com\r\nTo: ana@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
    with embedded_relay(folder) as (relay, handler):
        with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
            refused = client.sendmail("bounce@example.com", ["ana@example.org"], message)
    assert refused == {}
    assert handler.accepted == 1
    stored = [m.as_bytes() for m in mailbox.Maildir(str(folder), create=False)]
    assert len(stored) == 1
    assert b"Delivered-To: ana@example.org" in stored[0] and b"Subject: hello" in stored[0]
