"""Where a rollout publishes `RouterConfig` documents and router instances acknowledge them.

The default store is a folder (local, or shared between hosts):

    <dir>/router_config.json        the current document (replaced atomically)
    <dir>/acks/<instance>.json      each instance's heartbeat: applied version, refusals

Anything with the same four methods can replace it; the router only needs
`read_document` and `write_ack`. `router.http_control_store.HttpControlStore` is the
fleet's option: one HTTP endpoint instead of a shared folder (`PROD_LB_CONTROL_URL` for
routers, `ROLLOUT_CONTROL_URL` for the flows; `rollout control serve` is a stand-in
endpoint over a folder).
"""

from __future__ import annotations

import os
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from router.files import remove_old_files, sync_directory
from router.modes import DeploymentMode
from router.router_config import RouterConfig

#: A heartbeat older than this is from an instance that is gone (routers write one every
#: `PROD_LB_CONTROL_POLL_S`, 1 s by default; a slower poll stretches it, see `is_stale`).
STALE_AFTER_S = 15.0
#: ... or older than this many of the instance's own poll intervals.
STALE_AFTER_POLLS = 3
#: A heartbeat file is deleted (at the next publish) after a day without news: long
#: gone, it only slowed every read of the fleet down.
ACK_KEPT_S = 24 * 3600.0


class Acknowledgement(BaseModel):
    """An instance's heartbeat: what it runs now and what it refused."""

    model_config = ConfigDict(extra="ignore")

    instance: str
    applied_version: int
    effective_mode: DeploymentMode
    configured_mode: DeploymentMode
    traffic_percent: float
    failback_reason: str | None = None
    refused_version: int | None = None
    refused_reason: str | None = None
    heartbeat_at: AwareDatetime
    started_at: AwareDatetime
    host: str = ""
    pid: int = 0
    routed: int = 0
    #: The instance's `PROD_LB_CONTROL_POLL_S`: how often it writes a heartbeat.
    poll_s: float = 1.0
    #: When the store received it, by the store's clock (set when read; None from a
    #: store that cannot tell). Liveness is judged by it: `heartbeat_at` is the
    #: replica's own clock, and one running an hour ahead looked alive for an hour
    #: after it died.
    received_at: datetime | None = None

    def same_process(self, other: Acknowledgement) -> bool:
        return (self.host, self.pid, self.started_at) == (other.host, other.pid, other.started_at)

    def age_s(self, now: datetime | None = None) -> float:
        return (
            (now or datetime.now(UTC)) - (self.received_at or self.heartbeat_at)
        ).total_seconds()

    def is_stale(self, now: datetime | None = None) -> bool:
        """Gone: no heartbeat for `STALE_AFTER_S`, or for `STALE_AFTER_POLLS` of its own
        polls if it polls slower (a router polling every 20 s read as gone a quarter of
        the time, and ticks skipped their evaluations waiting for it)."""
        return self.age_s(now) > max(STALE_AFTER_S, STALE_AFTER_POLLS * self.poll_s)


@runtime_checkable
class ControlStore(Protocol):
    def publish(self, config: RouterConfig) -> None: ...

    def read_document(self) -> tuple[object, str] | None:
        """(change token, raw text) of the current document, or None if there is none.

        Bytes that are not UTF-8 must not raise: decode them with `decode_document`, so
        the router refuses the document (and says so) instead of failing to read it.
        """
        ...

    def write_ack(self, ack: Acknowledgement) -> None: ...

    def read_acks(self) -> list[Acknowledgement]: ...


def decode_document(raw: bytes) -> str:
    """A document's bytes as text. JSON is UTF-8; bytes that are not (a Latin-1 edit, a
    torn copy) become surrogate escapes, which validation refuses, so a corrupt document
    is refused like any other invalid one rather than breaking the read."""
    return raw.decode("utf-8", errors="surrogateescape")


def atomic_write(path: Path, text: str, *, durable: bool = True) -> None:
    """`durable`: the rename survives a host crash (the folder is fsynced), and temporary
    files of writers that died are swept. A heartbeat needs neither: it is rewritten
    every poll, by every instance, and a folder scan each time cost a shared folder
    O(fleet) per heartbeat."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name: two writers at once (threads of one server, or two
    # processes) must never write into the same temporary file.
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temp = Path(name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if durable:
        sync_directory(path.parent)
        remove_old_files(path.parent, f".{path.name}.*.tmp")  # of writers that died


class DocumentReads:
    """`current` and `current_or_none` for any store with `read_document`."""

    def read_document(self) -> tuple[object, str] | None:
        raise NotImplementedError

    def current(self) -> RouterConfig | None:
        """The published document, validated; None if nothing was published yet."""
        found = self.read_document()
        if found is None:
            return None
        return RouterConfig.model_validate_json(found[1])

    def current_or_none(self) -> RouterConfig | None:
        """Like `current`, but an unreadable document counts as none (the caller republishes)."""
        try:
            return self.current()
        except (ValidationError, ValueError):
            return None


class FileControlStore(DocumentReads):
    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.config_path = self.directory / "router_config.json"
        self.acks_dir = self.directory / "acks"

    def publish(self, config: RouterConfig) -> None:
        atomic_write(self.config_path, config.to_json(indent=2))
        self.sweep_heartbeat_temps()

    def sweep_heartbeat_temps(self) -> None:
        """Heartbeat writes skip the sweep (see `atomic_write`); publishes, which are
        rare, do it for them. The heartbeats of instances silent for `ACK_KEPT_S` go
        too: every process start (the default id is host and pid) added one for good,
        and every read of the fleet, every 0.1 s while a flow waits, read them all."""
        if self.acks_dir.is_dir():
            remove_old_files(self.acks_dir, ".*.json.*.tmp")
            remove_old_files(self.acks_dir, "*.json", ACK_KEPT_S)

    def read_document(self) -> tuple[object, str] | None:
        try:
            stat = self.config_path.stat()
            raw = self.config_path.read_bytes()
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size), decode_document(raw)

    def write_ack(self, ack: Acknowledgement) -> None:
        atomic_write(self.acks_dir / f"{ack.instance}.json", ack.model_dump_json(), durable=False)

    def read_acks(self) -> list[Acknowledgement]:
        acks = []
        for path in sorted(self.acks_dir.glob("*.json")):
            try:
                ack = Acknowledgement.model_validate_json(path.read_bytes())
                written = datetime.fromtimestamp(path.stat().st_mtime, UTC)
            except (OSError, ValueError):  # ValidationError, bytes that are not JSON or UTF-8
                continue  # being replaced right now, or foreign junk: the next read sees it
            acks.append(ack.model_copy(update={"received_at": written}))
        return acks


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"
