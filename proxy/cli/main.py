"""The ``sendguard`` command.

Exit codes: 0 success (or: the message would be accepted), 1 the message would be refused
or deferred, 2 bad input or bad config (os.EX_USAGE-like), 3 could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from policies.base import Action, Reply, Transaction
from policies.message import ParsedMessage
from proxy import __version__
from proxy.addresses import address_key, envelope_address, relayable_recipient
from proxy.api.config import add_api_parser, run_api_command
from proxy.cli import dns as dns_cli
from proxy.cli.consent import add_consent_parser, run_consent_command
from proxy.cli.health import add_health_parser, run_health
from proxy.cli.limits import add_limits_parser, run_limits
from proxy.cli.pauses import add_pauses_parser, run_pauses
from proxy.cli.queue import add_queue_parser, run_queue
from proxy.cli.report import add_report_parser, run_report
from proxy.cli.upstream import add_upstream_parser, run_upstream
from proxy.config.settings import ConfigError, Settings, load_config, parse_upstream_address
from proxy.observability.logsetup import configure_logging, stop_logging
from proxy.relay.classify import Classifier
from proxy.relay.intake import MessageRefused, prepare_message
from proxy.relay.pipeline import Pipeline, PolicyResult, StageDecision
from proxy.reputation.bounces import Bounces
from proxy.schema import parse_hostport, parse_workers
from proxy.smtp.auth import add_user, delete_user, list_users
from proxy.stores.consent import ConsentStore, ConsentStoreError, open_consent_store
from proxy.stores.pauses import MemoryPauseStore
from proxy.unsubscribe import add_unsubscribe_parser, run_unsubscribe_command

__all__ = ("main",)

EXIT_OK, EXIT_REFUSED, EXIT_BAD_INPUT, EXIT_START_FAILED = 0, 1, 2, 3


def _checked(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type: the text as given, once ``parse`` accepts it."""

    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


_hostport = _checked(parse_hostport)
_workers = _checked(parse_workers)


def _upstream(text: str) -> str:
    try:
        return parse_upstream_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sendguard", description="Outbound SMTP filtering proxy.")
    parser.add_argument("--version", action="version", version=f"sendguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", required=True, help="YAML config file")
    serve.add_argument("--listen", type=_hostport, help="HOST:PORT for the first listener")
    serve.add_argument("--upstream", type=_upstream, help="HOST:PORT of the upstream MTA, or maildir:PATH")
    serve.add_argument("--http", type=_hostport, help="HOST:PORT for /metrics, /healthz, /readyz")
    serve.add_argument(
        "--workers", type=_workers, help="SMTP worker processes, or auto (one per core); overrides workers:"
    )

    milter = commands.add_parser(
        "milter", help="serve the policies to an MTA's milter interface (Postfix smtpd_milters)"
    )
    milter.add_argument("--config", required=True, help="YAML config file")
    milter.add_argument("--listen", required=True, help="inet:HOST:PORT or unix:PATH (as smtpd_milters names it)")
    milter.add_argument("--http", type=_hostport, help="HOST:PORT for /metrics, /healthz, /readyz")

    check = commands.add_parser("check", help="run the policies on a message offline; print the decision as JSON")
    check.add_argument("--config", required=True, help="YAML config file")
    check.add_argument("--from", dest="sender", help="envelope sender (default: from the headers)")
    check.add_argument(
        "--to", dest="recipients", action="append", help="envelope recipient, repeatable (default: To, Cc and Bcc)"
    )
    check.add_argument(
        "--class", dest="message_class", choices=("commercial", "transactional"), help="force the message class"
    )
    check.add_argument("--listener", help="listener the message arrives on (default: the first)")
    check.add_argument("--auth-user", help="AUTH user the message is sent as")
    check.add_argument("message", help="the message, an .eml file (- for standard input)")

    config = commands.add_parser("config", help="config file tools")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    config_check = config_commands.add_parser("check", help="validate a config file")
    config_check.add_argument("file")
    config_commands.add_parser("schema", help="print the config's JSON Schema (for editors)")
    config_commands.add_parser("reference", help="print the config reference (Markdown), from the schema")

    user = commands.add_parser("user", help="AUTH users")
    user_commands = user.add_subparsers(dest="user_command", required=True, metavar="SUBCOMMAND")
    user_add = user_commands.add_parser("add", help="add a user or change a password")
    user_add.add_argument("name")
    where = user_add.add_mutually_exclusive_group()
    where.add_argument("--config", help="take the users file from this config (users_file)")
    where.add_argument("--users-file", help="the users file (default: var/users)")
    user_add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    user_list = user_commands.add_parser("list", help="the user names in the users file")
    user_del = user_commands.add_parser("del", help="remove a user (AUTH fails for it from the next attempt on)")
    user_del.add_argument("name")
    for sub in (user_list, user_del):
        where = sub.add_mutually_exclusive_group()
        where.add_argument("--config", help="take the users file from this config (users_file)")
        where.add_argument("--users-file", help="the users file (default: var/users)")

    dns_cli.add_commands(commands)  # dkim keygen, domain check
    add_limits_parser(commands)
    add_queue_parser(commands)  # queue list, retry, drop
    add_unsubscribe_parser(commands)  # unsubscribe keygen
    add_api_parser(commands)  # api token
    add_consent_parser(commands)  # consent import, export, show, add, customer, revoke, suppress ...
    add_health_parser(commands)  # health: the running process's /readyz (container healthchecks)
    add_upstream_parser(commands)  # upstream check: connect, TLS, certificate, AUTH, EHLO, SIZE
    add_pauses_parser(commands)  # pauses list, lift
    add_report_parser(commands)  # report: compliance report for a period, evidence pack for an address
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "milter":
            return _milter(args)
        if args.command == "check":
            return _check(args)
        if args.command == "config":
            return _config_command(args)
        if args.command == "user":
            return _user_command(args)
        if args.command in ("dkim", "domain"):
            return dns_cli.run(args)
        if args.command == "limits":
            return run_limits(args, load_config(args.config))
        if args.command == "queue":
            return run_queue(args, load_config(args.config))
        if args.command == "consent":
            return run_consent_command(args)
        if args.command == "unsubscribe":
            return run_unsubscribe_command(args)
        if args.command == "api":
            return run_api_command(args)
        if args.command == "health":
            return run_health(args)
        if args.command == "upstream":
            return run_upstream(args)
        if args.command == "pauses":
            return run_pauses(args, load_config(args.config))
        if args.command == "report":
            return run_report(args, load_config(args.config))
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_BAD_INPUT
    parser.error("unknown command")  # exits


def _print_config_error(exc: ConfigError) -> None:
    print(f"sendguard: the config has {len(exc.issues)} problem(s):", file=sys.stderr)
    for issue in exc.issues:
        print(f"  {issue}", file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    from proxy.app import serve
    from proxy.supervisor import WORKER_ENV, Supervisor, serve_worker

    given = (("listen", args.listen), ("upstream", args.upstream), ("http", args.http), ("workers", args.workers))
    overrides = {k: v for k, v in given if v}
    settings = load_config(args.config, overrides=overrides)  # refuse to start on bad config
    worker = os.environ.get(WORKER_ENV)  # set by the supervising parent for its workers
    fields = {"worker": int(worker.split(";", 1)[0]), "pid": os.getpid()} if worker else None
    if worker:
        main = serve_worker(args.config, overrides, worker)
    elif settings.workers > 1:
        main = Supervisor(settings, args.config, overrides).run()
    else:
        main = serve(args.config, overrides)
    return _run_until_stopped(settings, main, fields=fields)


def _run_until_stopped(
    settings: Settings, main: Coroutine[Any, Any, int], *, fields: dict[str, Any] | None = None
) -> int:
    """Run a serving command (serve, a worker, milter) with the config's logging and event loop
    until it stops."""
    configure_logging(settings.logging.format, settings.logging.level, fields=fields)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
            return runner.run(main)
    except (OSError, ConsentStoreError) as exc:
        logging.getLogger("sendguard").error("cannot start: %s", exc)
        return EXIT_START_FAILED
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        stop_logging()  # flush every queued line before the process ends


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``event_loop``: uvloop's loop (libuv) when chosen or, for auto, installed; else asyncio's."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":  # the config check said it is there: a broken install
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _milter(args: argparse.Namespace) -> int:
    try:
        import Milter  # noqa: F401
    except ImportError:
        print(
            "sendguard: milter mode needs pymilter: pip install 'sendguard[milter]' "
            "(it builds against Sendmail's libmilter: Debian's libmilter-dev)",
            file=sys.stderr,
        )
        return EXIT_START_FAILED
    from proxy.app import serve_milter
    from proxy.milter.server import libmilter_address
    from proxy.milter.session import milter_config_errors

    overrides = {"http": args.http} if args.http else {}
    settings = load_config(args.config, overrides=overrides)
    try:
        libmilter_address(args.listen)
    except ValueError as exc:
        print(f"sendguard: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    errors = milter_config_errors(settings)
    if errors:  # refuse to start rather than let a policy's remedy silently not happen
        print(f"sendguard: the config has {len(errors)} problem(s) in milter mode:", file=sys.stderr)
        for error in errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _run_until_stopped(settings, serve_milter(args.config, overrides, args.listen))


def _config_check(path: str) -> int:
    settings = load_config(path)
    print(
        f"{path}: OK ({len(settings.listeners)} listener(s), {len(settings.policies)} polic(ies), "
        f"upstream {settings.upstream.address})"
    )
    for warning in settings.compliance_warnings():  # valid, but the law's checks are off
        print(f"{path}: warning: {warning}", file=sys.stderr)
    for warning in settings.load_warnings:  # valid, but probably not what was meant
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _config_command(args: argparse.Namespace) -> int:
    if args.config_command == "schema":
        from proxy.config.reference import config_schema

        print(json.dumps(config_schema(), indent=2))
        return EXIT_OK
    if args.config_command == "reference":
        from proxy.config.reference import config_reference

        sys.stdout.write(config_reference())
        return EXIT_OK
    return _config_check(args.file)


def _user_command(args: argparse.Namespace) -> int:
    users_file = args.users_file or (load_config(args.config).users_file if args.config else "var/users")
    if args.user_command == "list":
        for name in list_users(users_file):
            print(name)
        return EXIT_OK
    if args.user_command == "del":
        if delete_user(users_file, args.name):
            print(f"user {args.name} removed from {users_file}")
            return EXIT_OK
        print(f"sendguard: no user {args.name} in {users_file}", file=sys.stderr)
        return EXIT_REFUSED
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {args.name}: ")
        if password != getpass.getpass("Again: "):
            print("sendguard: the passwords differ", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        new = add_user(users_file, args.name, password)
    except ValueError as exc:
        print(f"sendguard: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{'added' if new else 'updated'} user {args.name} in {users_file}")
    return EXIT_OK


# ---- check ---------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    settings = load_config(args.config)
    try:
        raw = sys.stdin.buffer.read() if args.message == "-" else Path(args.message).read_bytes()
    except OSError as exc:
        print(f"sendguard: cannot read {args.message}: {exc.strerror}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not raw.strip():
        print(f"sendguard: {args.message} is empty", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.listener is not None and args.listener not in {listener.name for listener in settings.listeners}:
        print(f"sendguard: no listener is called {args.listener!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result = asyncio.run(
        run_check(
            settings,
            raw,
            sender=args.sender,
            recipients=args.recipients,
            forced_class=args.message_class,
            listener=args.listener,
            auth_user=args.auth_user,
        )
    )
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if result["action"] == "error":
        return EXIT_BAD_INPUT
    return EXIT_OK if result["action"] == "accept" else EXIT_REFUSED


async def run_check(
    settings: Settings,
    raw: bytes,
    *,
    sender: str | None = None,
    recipients: Sequence[str] | None = None,
    forced_class: str | None = None,
    listener: str | None = None,
    auth_user: str | None = None,
) -> dict[str, Any]:
    """The proxy's decision for one message, without sockets and without side effects."""
    try:
        checker = await Checker.open(settings)
    except ConsentStoreError as exc:
        return {"action": "error", "reply": None, "reason": f"consent store: {exc}", "policies": []}
    try:
        return await checker.check(
            raw,
            sender=sender,
            recipients=recipients,
            forced_class=forced_class,
            listener=listener,
            auth_user=auth_user,
        )
    finally:
        await checker.close()


class Checker:
    """``sendguard check`` for one config: built once, like the proxy's ``Runtime`` (the
    classifier's word lists, the policies, the consent store), then asked about messages.

    Each message takes the proxy's path: the envelope read as the SMTP session reads MAIL and
    RCPT (``envelope_address``: the addr-spec with needless quotes dropped,
    ``"bob2"@example.net`` is ``bob2@example.net``), a second spelling of a recipient
    (``address_key``) dropped as the session drops it, each recipient through the same two
    checks as at RCPT (the policies, then the hard-bounce suppression), then the intake, the
    classifier and the message stage. What the check cannot know: the upstream's answers,
    pauses and rate-limit budgets in the shared state store.
    """

    def __init__(self, settings: Settings, consent: ConsentStore | None) -> None:
        self.settings = settings
        self.consent = consent
        # Exhaustive: every policy runs and the first refusal is marked as the deciding one, so
        # that a sender fixes a message in one round (the running proxy stops at the first).
        self.pipeline = Pipeline(settings.policies, resources={"consent": consent}, exhaustive=True)
        self.classifier = Classifier(settings.classes)
        self.bounces = Bounces(settings.bounces, consent, MemoryPauseStore())  # only its look-up is used

    @classmethod
    async def open(cls, settings: Settings) -> Checker:
        """Raises ``ConsentStoreError`` when the consent store cannot be opened."""
        consent = None
        # Opened when the proxy opens it: for a policy, or for the hard-bounce suppression at RCPT.
        if settings.needs("consent") or settings.bounces.suppress:
            # connect=False: an unreachable store shows up as the proxy's 451, not as a crash.
            consent = await open_consent_store(settings.stores.consent, connect=False)
        return cls(settings, consent)

    async def close(self) -> None:
        await self.pipeline.close()
        if self.consent is not None:
            await self.consent.close()

    async def check(
        self,
        raw: bytes,
        *,
        sender: str | None = None,
        recipients: Sequence[str] | None = None,
        forced_class: str | None = None,
        listener: str | None = None,
        auth_user: str | None = None,
    ) -> dict[str, Any]:
        """The decision for one message as JSON-ready data: ``action`` and ``reply`` (the
        deciding refusal, or the 250), every policy's verdict, the problems, and what the proxy
        does with it: ``deliver_to`` (who gets the message) and ``data_reply`` (the answer to
        the final dot; null when the proxy's client never gets to DATA)."""
        settings, pipeline, classifier = self.settings, self.pipeline, self.classifier
        try:
            content, message = prepare_message(raw, settings.message)
        except MessageRefused as refusal:
            return {
                "action": "reject" if refusal.reply.code >= 500 else "tempfail",
                "reply": refusal.reply.line(),
                "reason": refusal.why,
                "policies": [],
                "deliver_to": [],
                "data_reply": refusal.reply.line(),
            }
        if sender is None:
            sender = _sender_from_headers(message)
        else:
            try:
                sender = envelope_address(sender)
            except ValueError as exc:
                return {"action": "error", "reply": None, "reason": f"--from: {exc}", "policies": []}
        given_recipients = bool(recipients)
        if not recipients:
            # Mailboxes only: an address written in a display name is never a recipient.
            recipients = [a.addr_spec for a in message.addresses("To", "Cc", "Bcc")]
        envelope: dict[str, str] = {}  # address_key -> the first spelling, as RCPT keeps it
        for given in recipients:
            try:
                recipient = envelope_address(given)
            except ValueError as exc:
                if not given_recipients:
                    continue  # a header address no RCPT can carry ("a@example.com."): not a recipient
                return {"action": "error", "reply": None, "reason": f"recipient {given!r}: {exc}", "policies": []}
            if not relayable_recipient(recipient):
                if not given_recipients:
                    continue
                return {
                    "action": "error",
                    "reply": None,
                    "reason": f"recipient {given!r} is not an address the proxy relays (name@domain)",
                    "policies": [],
                }
            envelope.setdefault(address_key(recipient), recipient)
        recipients = list(envelope.values())
        if not recipients:
            return {
                "action": "error",
                "reply": None,
                "reason": "no recipients: give --to or put To: in the message",
                "policies": [],
            }

        txn = Transaction(
            txn_id="check",
            listener=listener or settings.listeners[0].name,
            client_ip="127.0.0.1",
            auth_user=auth_user,
            mail_from=sender,
        )
        results: list[PolicyResult] = []
        deciding: Reply | None = None
        deciding_action = Action.ACCEPT

        def decided(decision: StageDecision) -> None:
            nonlocal deciding, deciding_action
            if deciding is None and not decision.accepted and decision.reply is not None:
                deciding, deciding_action = decision.reply, decision.action

        classification = classifier.from_envelope(txn)
        txn.message_class = forced_class or (classification.message_class if classification else None)
        decision = await pipeline.check_mail(txn)
        results.extend(decision.results)
        decided(decision)
        mail_refused = not decision.accepted
        refused: dict[str, StageDecision] = {}
        for recipient in recipients:
            decision = await pipeline.check_rcpt(txn, recipient)
            results.extend(decision.results)
            if decision.accepted:
                # As RelayTransaction.rcpt: an address that hard-bounced is refused for any class.
                suppressed = await self.bounces.refusal(txn, recipient)
                if suppressed is not None:
                    result = PolicyResult(
                        "suppression",
                        "rcpt",
                        Action.REJECT,
                        "enforce",
                        "hard-bounced before",
                        suppressed,
                        recipient=recipient,
                    )
                    results.append(result)
                    decision = StageDecision(Action.REJECT, suppressed, [result])
            if decision.accepted:
                txn.recipients.append(recipient)
            else:
                refused[recipient] = decision
        for first in refused.values():
            decided(first)
            break
        reaches_data = not mail_refused and bool(txn.recipients)
        if not txn.recipients:  # still judge the message, for every problem at once
            txn.recipients.extend(recipients)
        txn.message = message
        txn.size = len(content)
        final = classifier.from_message(txn, message)
        txn.message_class = forced_class or final.message_class
        txn.class_note = final.note() if txn.message_class == final.message_class else ""
        class_refusal = final.refusal if forced_class is None else None
        if class_refusal is not None and deciding is None:
            deciding, deciding_action = class_refusal, Action.REJECT
        decision = await pipeline.check_message(txn)
        results.extend(decision.results)
        decided(decision)
        txn.recipients[:] = [r for r in txn.recipients if r not in refused and r not in decision.held]
        ok = "250 2.0.0 Ok"
        if decision.held and deciding is None:  # as the proxy does: the others get the message
            ok = f"250 2.0.0 Ok for {len(txn.recipients)}; {len(decision.held)} refused, reported to the sender"
        # What the proxy's client is told at its final dot: the class refusal first (the proxy
        # stops there), else the message stage's answer.
        stopped = class_refusal or (decision.reply if not decision.accepted else None)
        data_reply = None if not reaches_data else stopped.line() if stopped else "250 2.0.0 Ok"
        out: dict[str, Any] = {
            "action": str(deciding_action),
            "reply": deciding.line() if deciding else ok,
            "class": txn.message_class,
            "class_reason": final.as_dict() if forced_class is None else {"class": forced_class, "source": "--class"},
            "sender": txn.mail_from,
            "recipients": list(txn.recipients),
            "deliver_to": list(txn.recipients) if reaches_data and stopped is None else [],
            "data_reply": data_reply,
            "policies": [r.as_dict() for r in results],
            "problems": [
                {
                    "policy": r.policy,
                    "stage": r.stage,
                    "reply": r.reply.line(),
                    **({"recipient": r.recipient} if r.recipient else {}),
                }
                for r in results
                if r.action is not Action.ACCEPT and r.mode == "enforce" and r.reply is not None
            ],
        }
        if class_refusal is not None:
            out["problems"].insert(0, {"policy": "classes", "stage": "message", "reply": class_refusal.line()})
        if refused or decision.held:
            out["refused_recipients"] = {rcpt: d.reply.line() if d.reply else None for rcpt, d in refused.items()}
            out["refused_recipients"].update({rcpt: reply.line() for rcpt, reply in decision.held.items()})
        additions = [f"{name}: {value}" for edit in decision.edits for name, value in edit.add]
        if additions and deciding is None:
            out["added_headers"] = additions
        return out


def _sender_from_headers(message: ParsedMessage) -> str:
    for name in ("Return-Path", "Sender", "From"):
        addresses = message.addresses(name)
        if addresses:
            return addresses[0].addr_spec
    return ""
