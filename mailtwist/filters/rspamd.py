"""rspamd as a data-stage filter, over its HTTP protocol (``POST /checkv2``).

The message is the request body; the envelope goes in the request headers
rspamd documents (``IP``, ``Helo``, ``From``, one ``Rcpt`` per recipient,
``User`` for authenticated senders, ``Queue-Id``, ``MTA-Name``).  The JSON
answer's ``action`` is honoured as rspamd's own MTA integrations do:

==================  ==========================================================
``no action``       X-Spam-Status / X-Spam-Score headers
``greylist``        ``451 4.7.1`` (unless ``greylist = false``: no action)
``add header``      headers, ``X-Spam-Flag: YES``, filed into ``junk_folder``
``rewrite subject`` as ``add header``, and the Subject rspamd proposes
``soft reject``     ``451 4.7.1``
``reject``          ``550 5.7.1``
==================  ==========================================================

Scanner failures follow the same ``on_failure`` policy as the spamd filter
(fail open with a log line, or tempfail).

With ``learn_url`` (rspamd's controller) and the filter enabled for the
``mailbox`` chain, messages users copy or move into ``junk_folder`` are
posted to ``/learnspam``, and out of it to ``/learnham``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from mailtwist.filters import FilterConfigError, FilterFactory
from mailtwist.filters.spamd import (
    COMMON_DEFAULTS,
    ScannerError,
    ScannerFilter,
    SpamResult,
    check_common,
    common_kwargs,
    spam_headers,
)
from mailtwist.interfaces import CONTINUE, ChangeHeader, Continue, Reject, TempFail

log = Logger()

ACTIONS = ("no action", "greylist", "add header", "rewrite subject", "soft reject", "reject")


def _reply_text(text: Any, default: str) -> str:
    """rspamd's smtp_message, made safe for an SMTP reply line."""
    if not isinstance(text, str) or not text.strip():
        return default
    cleaned = " ".join(text.replace("\0", " ").split())
    return cleaned[:200]


def parse_answer(body: bytes) -> SpamResult:
    """A SpamResult from a /checkv2 JSON answer; ScannerError for anything else."""
    try:
        data = json.loads(body)
    except ValueError:
        raise ScannerError(f"rspamd answered something that is not JSON: "
                           f"{body[:80]!r}") from None
    if not isinstance(data, dict):
        raise ScannerError("rspamd's answer is not a JSON object")
    if "error" in data:
        raise ScannerError(f"rspamd refused the request: {str(data['error'])[:200]}")
    try:
        score = float(data["score"])
        threshold = float(data.get("required_score", 0.0))
        action = str(data["action"])
    except (KeyError, TypeError, ValueError):
        raise ScannerError("rspamd's answer has no score or action") from None
    symbols = data.get("symbols") or {}
    names = tuple(sorted(symbols)) if isinstance(symbols, dict) else ()
    return SpamResult(score, threshold, names, action, data)


class RspamdFilter(ScannerFilter):
    """Asks rspamd's normal worker about each message at the data stage."""

    name = "rspamd"

    def __init__(self, url: str = "http://127.0.0.1:11333", password: str = "",
                 greylist: bool = True, rewrite_subject: bool = True, hostname: str = "",
                 learn_url: str = "", learn_max: int = 20, reactor: Any = None,
                 **kwargs: Any) -> None:
        if reactor is None:
            from twisted.internet import reactor
        super().__init__(clock=kwargs.pop("clock", None) or reactor, **kwargs)
        self.url = url.rstrip("/")
        self.password = password
        self.greylist = greylist
        self.rewrite_subject = rewrite_subject
        self.hostname = hostname
        self.learn_url = learn_url.rstrip("/")
        self.learn_max = learn_max
        self.reactor = reactor
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, connectTimeout=self.timeout, pool=pool)

    def describe(self) -> str:
        return f"rspamd at {self.url}"

    def request_headers(self, session) -> Headers:
        """The envelope as rspamd's HTTP protocol wants it."""
        headers = Headers({"Content-Type": ["message/rfc822"]})

        def put(name: str, values: list[str]) -> None:
            values = [v for v in values if v is not None and not any(c in v for c in "\r\n\0")]
            if values:
                headers.setRawHeaders(name, values)
        put("IP", [session.peer_host])
        put("Helo", [session.helo or ""] if session.helo else [])
        put("From", [session.sender or ""] if session.sender is not None else [])
        put("Rcpt", list(session.recipients))
        put("User", [session.user] if session.user else [])
        put("Queue-Id", [session.queue_id] if session.queue_id else [])
        put("MTA-Name", [self.hostname] if self.hostname else [])
        put("Password", [self.password] if self.password else [])
        return headers

    def scan(self, session, message):
        d = self.agent.request(b"POST", f"{self.url}/checkv2".encode("ascii"),
                               self.request_headers(session),
                               BytesProducer(message))
        d.addCallback(self._read)
        return d

    def _read(self, response):
        if response.code != 200:
            d = readBody(response)

            def fail(body):
                raise ScannerError(f"rspamd answered HTTP {response.code}: "
                                   f"{body[:120].decode('utf-8', 'replace')}")
            return d.addBoth(lambda body: fail(body if isinstance(body, bytes) else b""))
        return readBody(response).addCallback(parse_answer)

    def decide(self, result: SpamResult, cleanup: list):
        action = result.action
        messages = result.extra.get("messages") if result.extra else None
        smtp_message = messages.get("smtp_message") if isinstance(messages, dict) else None
        if action == "reject":
            return Reject(_reply_text(smtp_message, "Message rejected as spam"), 550, "5.7.1")
        if action == "soft reject":
            return TempFail(_reply_text(smtp_message, "Try again later"), 451, "4.7.1")
        if action == "greylist" and self.greylist:
            return TempFail(_reply_text(smtp_message, "Greylisted, try again later"),
                            451, "4.7.1")
        if action not in ACTIONS:
            log.warn("{filter}: unknown rspamd action {action!r}, taken as no action",
                     filter=self.name, action=action)
        is_spam = action in ("add header", "rewrite subject")
        actions = [*cleanup, *spam_headers(result, is_spam, "rspamd")]
        subject = result.extra.get("subject") if result.extra else None
        if (action == "rewrite subject" and self.rewrite_subject and isinstance(subject, str)
                and subject and not any(c in subject for c in "\r\n\0")):
            actions.append(ChangeHeader("Subject", subject))
        if is_spam:
            actions.append(self.junk)
        return Continue(*actions)

    # -- learning from what users move into and out of Junk --------------------

    def mailbox_event(self, event):
        """Teach rspamd's controller (``/learnspam``, ``/learnham``) from IMAP
        copies and moves into Junk (spam) and out of it (ham, except to Trash).
        Off unless ``learn_url`` is set; at most ``learn_max`` messages per event."""
        if not self.learn_url or event.kind not in ("copy", "move"):
            return CONTINUE
        junk = self.junk.folder
        if event.destination == junk and event.source != junk:
            kind = "spam"
        elif event.source == junk and event.destination not in (junk, "Trash"):
            kind = "ham"
        else:
            return CONTINUE
        if len(event.uids) > self.learn_max:
            log.info("{filter}: learning {kind} from {count} of {total} messages of {user}",
                     filter=self.name, kind=kind, count=self.learn_max,
                     total=len(event.uids), user=event.user)
            event = replace(event, uids=tuple(event.uids[:self.learn_max]))
        d = event.read_messages()
        d.addCallback(self._learn_all, kind, event.user)
        return d

    @defer.inlineCallbacks
    def _learn_all(self, messages, kind: str, user: str):
        for uid, message in messages:
            try:
                yield self.learn(kind, message)
            except Exception as e:  # noqa: BLE001 - one line per message, never a crash
                reason = (f"no answer within {self.timeout:g} s"
                          if isinstance(e, defer.TimeoutError) else str(e) or repr(e))
                log.warn("{filter}: learning {kind} from {user} uid {uid} at {url} failed: "
                         "{reason}", filter=self.name, kind=kind, user=user, uid=uid,
                         url=self.learn_url, reason=reason)
        return CONTINUE

    def learn(self, kind: str, message: bytes) -> defer.Deferred:
        """POST *message* to the controller's /learnspam or /learnham."""
        headers = Headers({"Content-Type": ["message/rfc822"]})
        if self.password:
            headers.setRawHeaders("Password", [self.password])
        d = self.agent.request(b"POST", f"{self.learn_url}/learn{kind}".encode("ascii"),
                               headers, BytesProducer(message))

        def check(response):
            def answer(body):
                # 208: rspamd already learned this message as that class
                if response.code not in (200, 208):
                    raise ScannerError(f"HTTP {response.code}: "
                                       f"{body[:120].decode('utf-8', 'replace')}")
                return response.code
            return readBody(response).addCallback(answer)
        d.addCallback(check)
        d.addTimeout(self.timeout, self.clock)
        return d


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written at once."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def _build(settings: dict[str, Any], context: Any = None) -> RspamdFilter:
    check_common(settings)
    url = urlsplit(settings["url"])
    if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
        raise FilterConfigError("url", f"expected http://host:port of rspamd's normal "
                                       f"worker, got {settings['url']!r}")
    if settings["learn_url"]:
        learn = urlsplit(settings["learn_url"])
        if learn.scheme not in ("http", "https") or not learn.hostname \
                or learn.path not in ("", "/"):
            raise FilterConfigError("learn_url", f"expected http://host:port of rspamd's "
                                                 f"controller, got {settings['learn_url']!r}")
    if settings["learn_max"] < 1:
        raise FilterConfigError("learn_max", "must be 1 or more")
    return RspamdFilter(url=settings["url"], password=settings["password"],
                        learn_url=settings["learn_url"], learn_max=settings["learn_max"],
                        greylist=settings["greylist"],
                        rewrite_subject=settings["rewrite_subject"],
                        hostname=getattr(context, "hostname", "") or "",
                        reactor=getattr(context, "reactor", None), **common_kwargs(settings))


rspamd = FilterFactory(
    "rspamd", _build,
    description="rspamd (HTTP /checkv2): X-Spam-* headers, Junk, 451 or 550 by its action; "
                "learns from Junk moves",
    defaults={"url": "http://127.0.0.1:11333", "password": "", "greylist": True,
              "rewrite_subject": True, "learn_url": "", "learn_max": 20, **COMMON_DEFAULTS},
)
