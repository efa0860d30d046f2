"""Running the enabled filters of a listener, stage by stage.

Each hook call gets ``timeout`` seconds on the injected clock.  A filter that
raises, times out or answers something that is not a verdict allowed at that
stage yields a :class:`~mailtwist.interfaces.TempFail` (451 4.7.1) and one log
line naming the filter: never a lost or silently accepted message.
Mailbox events (:meth:`FilterChain.notify`) are notifications: failures
there are logged and otherwise ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from mailtwist import events
from mailtwist.filters.headers import apply_header_actions
from mailtwist.interfaces import (
    CONTINUE,
    DELIVERY_ACTIONS,
    HEADER_ACTIONS,
    MESSAGE_STAGES,
    STAGE_METHODS,
    Accept,
    Action,
    Continue,
    Discard,
    FilterSession,
    IFilter,
    MailboxEvent,
    Quarantine,
    Reject,
    TempFail,
    Verdict,
)

log = Logger()

DEFAULT_TIMEOUT = 30.0

FILTER_FAILURE = TempFail("Error: temporary failure in message filter, try again later",
                          451, "4.7.1")


@dataclass
class StageResult:
    """What the filters of one stage decided."""

    verdict: Verdict = CONTINUE
    #: data and delivery stages: the message after header edits
    message: bytes | None = None
    #: FileInto / AddFlags / Redirect actions, in order
    actions: list[Action] = field(default_factory=list)
    #: the name of the filter whose verdict ended the stage (None: all continued)
    filter: str | None = None

    @property
    def refused(self) -> bool:
        return isinstance(self.verdict, (Reject, TempFail))


def filter_name(flt: object) -> str:
    """The name logs use for *flt*: its ``name``, else its class name."""
    return getattr(flt, "name", "") or type(flt).__name__


class FilterError(Exception):
    """A filter broke the API (wrong verdict type or action for the stage)."""


class FilterChain:
    """The filters of one listener role, in order."""

    def __init__(self, filters: Sequence[IFilter] = (), timeout: float = DEFAULT_TIMEOUT,
                 clock=None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.filters = list(filters)
        self.timeout = timeout
        self.clock = clock

    def __bool__(self) -> bool:
        return bool(self.filters)

    def __len__(self) -> int:
        return len(self.filters)

    @defer.inlineCallbacks
    def run(self, stage: str, session: FilterSession, *args: Any):
        """Ask every filter about one stage; fires with a StageResult.

        For ``data``, ``delivery`` and ``outbound`` the first argument is the
        message; header edits are applied before the next filter sees it.  A
        filter without the stage's method (written before the stage existed)
        counts as Continue.
        """
        method_name = STAGE_METHODS[stage]
        message: bytes | None = args[0] if stage in MESSAGE_STAGES else None
        result = StageResult(message=message)
        for flt in self.filters:
            name = filter_name(flt)
            method = getattr(flt, method_name, None)
            if method is None:
                continue
            call_args = (message, *args[1:]) if message is not None else args
            try:
                verdict = yield self._call(method, session, call_args)
                self._check(stage, verdict)
            except defer.TimeoutError:
                log.error("filter {filter} timed out after {timeout}s in the {stage} stage; "
                          "answering a temporary failure", filter=name, stage=stage,
                          timeout=self.timeout)
                return StageResult(FILTER_FAILURE, message, filter=name)
            except Exception as e:  # noqa: BLE001 - any filter bug is a tempfail
                log.failure("filter {filter} failed in the {stage} stage ({error}); answering "
                            "a temporary failure", filter=name, stage=stage,
                            error=f"{type(e).__name__}: {e}")
                return StageResult(FILTER_FAILURE, message, filter=name)
            if not isinstance(verdict, Continue):
                events.filter_verdict(filter_name=name, stage=stage, verdict=verdict,
                                      session=session)
            if isinstance(verdict, (Continue, Accept)):
                headers = [a for a in verdict.actions if isinstance(a, HEADER_ACTIONS)]
                if headers:
                    message = apply_header_actions(message, headers)
                result.actions += [a for a in verdict.actions
                                   if isinstance(a, DELIVERY_ACTIONS)]
                result.message = message
                if isinstance(verdict, Accept):
                    result.verdict = verdict
                    result.filter = name
                    break
                continue
            if isinstance(verdict, (Reject, TempFail)):
                log.info("filter {filter} refused in the {stage} stage: {code} {enhanced} "
                         "{text}", filter=name, stage=stage, code=verdict.code,
                         enhanced=verdict.enhanced, text=verdict.text)
            elif isinstance(verdict, Quarantine):
                log.info("filter {filter} quarantined in the {stage} stage: {reason}",
                         filter=name, stage=stage, reason=verdict.reason)
            result.verdict = verdict
            result.filter = name
            break
        return result

    @defer.inlineCallbacks
    def notify(self, event: MailboxEvent):
        """Tell every filter about a mailbox event, in order.  The verdicts are
        ignored; a filter that raises or times out is logged with its name and
        the next one is still asked.  Never fails; fires with None."""
        for flt in self.filters:
            method = getattr(flt, STAGE_METHODS["mailbox"], None)
            if method is None:
                continue
            name = filter_name(flt)
            d = defer.maybeDeferred(method, event)
            d.addTimeout(self.timeout, self.clock)
            try:
                yield d
            except defer.TimeoutError:
                log.error("filter {filter} timed out after {timeout}s on a mailbox {kind} "
                          "event of {user}; ignored", filter=name, timeout=self.timeout,
                          kind=event.kind, user=event.user)
            except Exception as e:  # noqa: BLE001 - a notification never fails the command
                log.failure("filter {filter} failed on a mailbox {kind} event of {user} "
                            "({error}); ignored", filter=name, kind=event.kind,
                            user=event.user, error=f"{type(e).__name__}: {e}")

    def _call(self, method, session: FilterSession, args: tuple) -> defer.Deferred:
        d = defer.maybeDeferred(method, session, *args)
        d.addTimeout(self.timeout, self.clock)
        return d

    @staticmethod
    def _check(stage: str, verdict: object) -> None:
        if not isinstance(verdict, (Continue, Accept, Reject, TempFail, Discard, Quarantine)):
            raise FilterError(f"returned {verdict!r}, not a verdict")
        if isinstance(verdict, Discard) and stage in ("connect", "helo", "auth"):
            raise FilterError(f"Discard is not allowed in the {stage} stage")
        if isinstance(verdict, Quarantine) and stage not in ("data", "delivery"):
            raise FilterError(f"Quarantine is not allowed in the {stage} stage")
        for action in getattr(verdict, "actions", ()):
            if isinstance(action, HEADER_ACTIONS) and stage in ("data", "outbound"):
                continue
            if isinstance(action, DELIVERY_ACTIONS) and stage in ("data", "delivery"):
                continue
            raise FilterError(f"{type(action).__name__} is not allowed in the {stage} stage")

