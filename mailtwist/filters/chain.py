"""Running the enabled filters of a listener, stage by stage.

Each hook call gets ``timeout`` seconds on the injected clock.  A filter that
raises, times out or answers something that is not a verdict allowed at that
stage yields a :class:`~mailtwist.interfaces.TempFail` (451 4.7.1) and one log
line naming the filter: never a lost or silently accepted message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from mailtwist.filters.headers import apply_header_actions
from mailtwist.interfaces import (
    CONTINUE,
    DELIVERY_ACTIONS,
    HEADER_ACTIONS,
    STAGE_METHODS,
    Accept,
    Action,
    Continue,
    Discard,
    FilterSession,
    IFilter,
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

    @property
    def refused(self) -> bool:
        return isinstance(self.verdict, (Reject, TempFail))


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

        For ``data`` and ``delivery`` the first argument is the message; header
        edits are applied before the next filter sees it.
        """
        method_name = STAGE_METHODS[stage]
        message: bytes | None = args[0] if stage in ("data", "delivery") else None
        result = StageResult(message=message)
        for flt in self.filters:
            name = getattr(flt, "name", "") or type(flt).__name__
            call_args = (message, *args[1:]) if message is not None else args
            try:
                verdict = yield self._call(getattr(flt, method_name), session, call_args)
                self._check(stage, verdict)
            except defer.TimeoutError:
                log.error("filter {filter} timed out after {timeout}s in the {stage} stage; "
                          "answering a temporary failure", filter=name, stage=stage,
                          timeout=self.timeout)
                return StageResult(FILTER_FAILURE, message)
            except Exception as e:  # noqa: BLE001 - any filter bug is a tempfail
                log.failure("filter {filter} failed in the {stage} stage ({error}); answering "
                            "a temporary failure", filter=name, stage=stage,
                            error=f"{type(e).__name__}: {e}")
                return StageResult(FILTER_FAILURE, message)
            if isinstance(verdict, (Continue, Accept)):
                headers = [a for a in verdict.actions if isinstance(a, HEADER_ACTIONS)]
                if headers:
                    message = apply_header_actions(message, headers)
                result.actions += [a for a in verdict.actions
                                   if isinstance(a, DELIVERY_ACTIONS)]
                result.message = message
                if isinstance(verdict, Accept):
                    result.verdict = verdict
                    break
                continue
            if isinstance(verdict, (Reject, TempFail)):
                log.info("filter {filter} refused in the {stage} stage: {code} {enhanced} "
                         "{text}", filter=name, stage=stage, code=verdict.code,
                         enhanced=verdict.enhanced, text=verdict.text)
            result.verdict = verdict
            break
        return result

    def _call(self, method, session: FilterSession, args: tuple) -> defer.Deferred:
        d = defer.maybeDeferred(method, session, *args)
        d.addTimeout(self.timeout, self.clock)
        return d

    @staticmethod
    def _check(stage: str, verdict: object) -> None:
        if not isinstance(verdict, (Continue, Accept, Reject, TempFail, Discard)):
            raise FilterError(f"returned {verdict!r}, not a verdict")
        if isinstance(verdict, Discard) and stage in ("connect", "helo", "auth"):
            raise FilterError(f"Discard is not allowed in the {stage} stage")
        for action in getattr(verdict, "actions", ()):
            if isinstance(action, HEADER_ACTIONS) and stage == "data":
                continue
            if isinstance(action, DELIVERY_ACTIONS) and stage in ("data", "delivery"):
                continue
            raise FilterError(f"{type(action).__name__} is not allowed in the {stage} stage")

