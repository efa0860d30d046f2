"""One command at a time, for the line protocols (POP3, IMAP).

While a command's Deferred is pending no further input is interpreted, so
pipelined replies stay in order and STARTTLS/STLS can discard what was sent
behind them; if more than ``max_paused_input`` bytes pile up meanwhile, the
transport is paused until the command is done.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure


class SerialCommands:
    """Mixin for a protocol with ``transport``, ``resetTimeout`` and ``_disconnected``."""

    max_paused_input = 64 * 1024
    _busy = False
    _paused = False
    _in_loop = False

    def next_command(self) -> Any:
        """The next parsed command from the buffered input, or None."""
        raise NotImplementedError

    def handle_command(self, command: Any) -> defer.Deferred | None:
        """Run one command; a Deferred holds back further input until it fires."""
        raise NotImplementedError

    def command_failed(self, failure: Failure) -> None:
        """Answer a command that failed unexpectedly (the session goes on)."""
        raise NotImplementedError

    def buffered_input(self) -> int:
        raise NotImplementedError

    def run_commands(self) -> None:
        self._in_loop = True
        try:
            while (not self._busy and not self._disconnected
                   and not self.transport.disconnecting):
                command = self.next_command()
                if command is None:
                    break
                try:
                    result = self.handle_command(command)
                except Exception:  # noqa: BLE001 - one failing command must not end the session
                    self.command_failed(Failure())
                    continue
                if isinstance(result, defer.Deferred):
                    self._busy = True
                    result.addErrback(self.command_failed)
                    result.addBoth(self._command_done)
        finally:
            self._in_loop = False
        if self._busy and not self._paused and self.buffered_input() > self.max_paused_input:
            self._paused = True
            self.transport.pauseProducing()

    def _command_done(self, result: object) -> None:
        self._busy = False
        if self._disconnected:
            return
        self.resetTimeout()
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        if not self._in_loop:
            self.run_commands()
