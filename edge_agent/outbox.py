"""The durable outbox: an update stays on disk until the broker acknowledged it.

Only the files: which update to send or resend is the protocol machine's decision
(edge_agent.protocol.AgentProtocol.trained / restore / sent). Without a state dir there is no
disk outbox and every method does nothing.

A file left by an earlier process is resent on restart (`unsent`) unless it cannot be: one an
older (or newer) release wrote, whose frame or protocol version this build does not speak, is
moved aside as `.stale` (an aggregator of this release would refuse it as wrong_version); one
that does not decode at all (truncated, bad checksum, not a frame) as `.bad`. Both are kept for
a person to look at and are safe to delete.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

from broker import codec
from broker.errors import UnsupportedVersion, WireError
from broker.messages import PROTOCOL_VERSION, ModelUpdate, parse

log = logging.getLogger("edgetune.agent")


class Outbox:
    def __init__(self, state_dir: str | os.PathLike | None) -> None:
        self.dir = Path(state_dir) / "outbox" if state_dir else None
        self._paths: dict[int, Path] = {}  # round -> its file

    def _ready(self) -> Path | None:
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir

    def put(self, round_number: int, payload: bytes) -> None:
        """Write the update (fsync'd, then renamed into place) before it is published."""
        d = self._ready()
        if d is None:
            return
        path = d / f"round-{round_number:06d}.frame"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._paths[round_number] = path

    def remove(self, round_number: int) -> None:
        """The broker has it (PUBACK): nothing left to resend."""
        path = self._paths.pop(round_number, None)
        if path is not None:
            path.unlink(missing_ok=True)

    def unsent(self) -> Iterator[tuple[int, bytes]]:
        """(round, update frame) of each update left by an earlier process, oldest round first;
        one written by another release is moved aside (.stale), an unreadable one too (.bad)."""
        d = self._ready()
        if d is None:
            return
        for path in sorted(d.glob("round-*.frame")):
            payload = path.read_bytes()
            try:
                meta = parse(codec.decode(payload, as_torch=False).header, ModelUpdate)
            except UnsupportedVersion as e:
                log.warning("outbox file %s holds an update written by another release of edgetune (%s): it cannot "
                            "be sent (this release's aggregator accepts protocol %d only), so it is not resent; moved "
                            "aside as %s (safe to delete). The agent trains again in the rounds it is selected for",
                            path, e, PROTOCOL_VERSION, path.with_suffix(".stale").name)
                path.rename(path.with_suffix(".stale"))
                continue
            except WireError as e:
                log.warning("outbox file %s is unreadable (%s): moved aside as %s", path, e,
                            path.with_suffix(".bad").name)
                path.rename(path.with_suffix(".bad"))
                continue
            self._paths[meta.round] = path
            yield meta.round, payload
