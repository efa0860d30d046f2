"""A protocol factory that stands in front of another one.

The listeners' factories are wrapped several times (connection caps, session
tracking for shutdown, metrics); each wrapper adds one thing in
``buildProtocol`` and is otherwise the wrapped factory: unknown attributes,
start/stop and the log prefix are passed through, so code that inspects a
listener's factory still finds what the innermost one has.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory


class WrappingFactory(Factory):
    """Delegates everything to ``wrappedFactory``; subclasses override :meth:`built`
    (or buildProtocol, to decide whether the wrapped factory is asked at all)."""

    def __init__(self, wrapped: Factory) -> None:
        self.wrappedFactory = wrapped
        self.noisy = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["wrappedFactory"], name)

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        return self.wrappedFactory.logPrefix()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self.wrappedFactory.buildProtocol(addr)
        if protocol is not None:
            self.built(protocol)
        return protocol

    def built(self, protocol: Any) -> None:
        """Called with each protocol the wrapped factory built (None ones are not)."""
