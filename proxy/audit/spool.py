"""The local append-only spool: every record is here before the request leaves the gateway.

Segments are JSON-lines files written with O_APPEND through the page cache, so a `kill -9` of the
gateway cannot lose a line that was written (a crash of the whole machine can lose the last
moments; `fsync_interval` bounds that). Two kinds of line:

    {"k":"b","rec":{...}}   a forwarded request is about to leave (its record as far as known)
    {"k":"r","rec":{...}}   a finished record, chained (seq, prev_hash, hash)

A segment is deleted once every record in it is in the store and every request it saw begin has
finished. At start the spool is replayed: records the store lacks are shipped again, and requests
that began but never finished become records that say so. A record line counts only when its
record's hash checks out (proxy/audit/FORMATS.md), at replay and when read back: a damaged line
is never shipped. A whole one keeps its seq (it was handed out), a hole that `audit verify`
reports; a torn last line (a kill mid-write) never finished, and its seq goes to the next record.

A record not yet stored need not stay in memory: its `Spooled` place (segment, offset, length of
its JSON text) is enough to read it back when it is shipped (`read`). The fetch log holds the
newest records in memory up to a bound and the rest as places, so a long store outage costs disk
(up to the spool limit), not RAM; the replay works the same way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import NamedTuple

import structlog

from proxy.audit.record import record_hash
from proxy.audit.store import ReplicaInUse

log = structlog.get_logger("crawlwarden.audit.spool")

_SEGMENT = re.compile(r"^segment-(\d{10})\.jsonl$")


_RECORD = b'{"k":"r","rec":'  # a chained record's line: this, its JSON text, then b"}\n"
_RECORD_END = b"}\n"


def intact(rec: Any) -> bool:
    """Whether a record read from the spool is the one that was chained: its hash recomputed
    from its body and `prev_hash` (proxy/audit/FORMATS.md) is the `hash` it carries. A line
    can be damaged and still parse (one changed byte in a key or a value): checking its shape
    alone lets a record through that no store or verifier accepts."""
    if not isinstance(rec, dict):
        return False
    try:
        return record_hash(rec) == rec.get("hash")
    except (KeyError, ValueError, TypeError):  # no prev_hash, or one that is not hex
        return False


class SpoolReadError(Exception):
    """The spool could not be read (a lost segment, an I/O error)."""


class Spooled(NamedTuple):
    """Where a chained record's JSON text is in the spool: enough to read it back."""

    seq: int
    segment: int
    offset: int
    length: int


class ReplayedRecord(NamedTuple):
    spooled: Spooled
    hash: str
    ts: str | None


def hold_spool(directory: Path) -> int | None:
    """Lock a replica's spool directory: the lock's file descriptor (close it to let go), or
    None while a running gateway holds it."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@dataclass
class Segment:
    index: int
    path: Path
    size: int = 0
    max_seq: int = 0
    open_begins: int = 0


@dataclass
class Replayed:
    """What a previous run left in the spool."""

    records: list[ReplayedRecord] = field(default_factory=list)  # chained, in seq order
    unfinished: list[dict[str, Any]] = field(default_factory=list)  # began, never finished
    damaged_lines: int = 0
    # Of those, whole record lines that fail their hash, by the seq they claim: such a line was
    # written in full, so its seq was handed out (a torn line's never was).
    damaged: dict[int, ReplayedRecord] = field(default_factory=dict)


class Spool:
    def __init__(self, directory: Path, segment_bytes: int = 16 * 2**20):
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.segments: list[Segment] = []
        self._fd: int | None = None
        # Requests begun and not finished in this run: their begin line's segment and record.
        self._begun: dict[str, tuple[Segment, dict[str, Any]]] = {}
        self.unsynced = False
        self._lock_fd: int | None = None
        # A write that failed part-way could not be taken back: the segment's sizes, and the
        # places handed out after it, would be wrong. Nothing more is written then.
        self.broken = False

    # -- start-up --------------------------------------------------------------------------

    def open(self) -> Replayed:
        """Lock the spool for this process, read what is left from earlier runs, then start a
        fresh segment for this run."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock()
        replayed = Replayed()
        # Memory stays bounded by the requests in flight at the stop, not by the spool's size:
        # a finished request's begin is dropped, a record is kept as its place.
        begins: dict[str, dict[str, Any]] = {}
        records: dict[int, ReplayedRecord] = {}
        for path in sorted(self.directory.iterdir()):
            m = _SEGMENT.match(path.name)
            if not m:
                continue
            seg = Segment(int(m.group(1)), path, path.stat().st_size)
            self.segments.append(seg)
            offset = 0
            with path.open("rb") as f:
                for raw in f:
                    start, offset = offset, offset + len(raw)
                    try:
                        entry = json.loads(raw)
                        kind, rec = entry["k"], entry["rec"]
                        ident = str(rec["id"])
                        if kind == "r":
                            seq, hash_, ts = int(rec["seq"]), str(rec["hash"]), rec.get("ts")
                    except (ValueError, KeyError, TypeError):
                        # A torn last line from a kill mid-write, or damage: never fatal.
                        replayed.damaged_lines += 1
                        continue
                    if kind == "b":
                        begins[ident] = rec
                    elif kind == "r":
                        if not (raw.startswith(_RECORD) and raw.endswith(_RECORD_END)):
                            replayed.damaged_lines += 1  # parses, but not as `finish` writes
                            continue
                        place = Spooled(
                            seq, seg.index, start + len(_RECORD), len(raw) - len(_RECORD) - 2
                        )
                        if not intact(rec):
                            # Parses, but is not the record that was chained (a changed byte,
                            # a renamed key): never shipped. Its begin, if any, stays
                            # unfinished: the request is then recorded as interrupted.
                            replayed.damaged_lines += 1
                            replayed.damaged[seq] = ReplayedRecord(place, hash_, ts)
                            continue
                        begins.pop(ident, None)
                        records[seq] = ReplayedRecord(place, hash_, ts)
                        seg.max_seq = max(seg.max_seq, seq)
        replayed.records = [records[s] for s in sorted(records)]
        replayed.unfinished = list(begins.values())
        if replayed.damaged_lines:
            log.warning(
                "spool_damaged_lines",
                count=replayed.damaged_lines,
                records=len(replayed.damaged),
            )
        self._start_segment()
        return replayed

    def keep(self, place: Spooled) -> None:
        """Keep the segment of a replayed place until its seq is shipped. A damaged line's seq
        is not counted in its segment's at replay (damage may have made it up): once the fetch
        log takes it, its segment must not be deleted before it is read back."""
        for seg in self.segments:
            if seg.index == place.segment:
                seg.max_seq = max(seg.max_seq, place.seq)

    def _lock(self) -> None:
        """One writer per spool: a second gateway on the same data dir and replica id would
        interleave two chains in one spool. The lock dies with the process (kill -9 too)."""
        fd = hold_spool(self.directory)
        if fd is None:
            raise ReplicaInUse(
                f"the spool {self.directory} is in use by another running gateway (same data dir"
                " and replica id); give each replica its own --data-dir or --replica-id"
            )
        self._lock_fd = fd

    def _start_segment(self) -> None:
        index = self.segments[-1].index + 1 if self.segments else 1
        path = self._path(index)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o600)  # first: if it fails, the current segment goes on
        if self._fd is not None:
            # The sync loop only ever sees the newest segment: flush the old one before leaving
            # it, or a machine crash could lose lines that `fsync_interval` promised to keep.
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
        self._fd = fd
        self.segments.append(Segment(index, path))

    def _path(self, index: int) -> Path:
        return self.directory / f"segment-{index:010d}.jsonl"

    # -- writing ---------------------------------------------------------------------------

    @property
    def current(self) -> Segment:
        return self.segments[-1]

    @property
    def size(self) -> int:
        return sum(s.size for s in self.segments)

    def _write(self, line: bytes) -> None:
        """Write a whole line or nothing: a write that fails part-way (disk full) is cut off
        again, so the segment holds whole lines and the next write goes where it is counted."""
        assert self._fd is not None, "spool is not open"
        if self.broken:
            raise OSError(errno.EIO, "the spool could not take back a failed write; restart")
        view = memoryview(line)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            if len(view) < len(line):
                try:
                    os.ftruncate(self._fd, self.current.size)
                except OSError:
                    self.broken = True
            raise
        self.current.size += len(line)
        self.unsynced = True

    def has_room(self, probe_bytes: int = 64 * 1024) -> bool:
        """Whether the spool can be written again after a failed write: a probe file of
        `probe_bytes` (a few records) is written and removed beside the segments."""
        if self.broken:
            return False
        path = self.directory / ".room-probe"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(bytes(probe_bytes))
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
                path.unlink(missing_ok=True)
        except OSError:
            return False
        return True

    def begin(self, rec: dict[str, Any]) -> None:
        self._write(b'{"k":"b","rec":' + json.dumps(rec, separators=(",", ":")).encode() + b"}\n")
        self.current.open_begins += 1
        self._begun[rec["id"]] = (self.current, rec)

    def has_begun(self, rec_id: str) -> bool:
        """Whether a request of this id was begun in this run and is not finished yet."""
        return rec_id in self._begun

    def unfinished(self) -> list[dict[str, Any]]:
        """The records of requests begun in this run and not finished (yet)."""
        return [rec for _, rec in self._begun.values()]

    def finish(self, rec_json: bytes, rec_id: str, seq: int) -> Spooled:
        """Write a chained record (already serialised) and close its begin, if any; returns
        where its JSON text is, to read it back with `read`."""
        segment = self.current
        place = Spooled(seq, segment.index, segment.size + len(_RECORD), len(rec_json))
        self._write(_RECORD + rec_json + _RECORD_END)
        segment.max_seq = max(segment.max_seq, seq)
        begun = self._begun.pop(rec_id, None)
        if begun is not None:
            begun[0].open_begins -= 1
        if self.current.size >= self.segment_bytes:
            # The line is written: a new segment that cannot be made now is tried again at the
            # next line (this one must not be reported as unwritten: its seq is taken).
            with contextlib.suppress(OSError):
                self._start_segment()
        return place

    # -- reading back ----------------------------------------------------------------------

    def read(self, places: list[Spooled]) -> list[tuple[dict[str, Any], str] | None]:
        """The records at `places` (each record and its JSON text), in order; None for a place
        whose line is damaged: it does not parse, or fails its hash (what replay skips too).
        Raises SpoolReadError when a segment cannot be read at all (worth retrying).

        Safe beside the writer (in a thread): a place is handed out only after its line is
        written, and a segment is deleted only once all its records are stored."""
        out: list[tuple[dict[str, Any], str] | None] = []
        fds: dict[int, int] = {}
        try:
            for place in places:
                fd = fds.get(place.segment)
                if fd is None:
                    fd = fds[place.segment] = os.open(self._path(place.segment), os.O_RDONLY)
                raw = os.pread(fd, place.length, place.offset)
                try:
                    rec = json.loads(raw)
                    ok = rec.get("seq") == place.seq and intact(rec)
                except (ValueError, AttributeError):
                    ok = False
                out.append((rec, raw.decode()) if ok else None)
        except OSError as e:
            raise SpoolReadError(f"cannot read record {place.seq} back from the spool: {e}") from e
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def sync(self) -> None:
        fd = self._fd
        if fd is not None and self.unsynced:
            self.unsynced = False
            with contextlib.suppress(OSError):  # the segment may have been rotated meanwhile
                os.fsync(fd)

    # -- retiring --------------------------------------------------------------------------

    def retire(self, shipped_seq: int, rotate_at: int = 1 << 20) -> int:
        """Delete segments that are fully in the store; returns how many were deleted.

        The current segment is closed once it is all stored and `rotate_at` bytes long, and
        deleted once the requests begun in it are over too: otherwise a spool limit below one
        segment would stay reached after the store came back, and the gateway would keep
        refusing. (Waiting for no request to be under way in it as well kept it from ever
        rotating under steady load: 503s with a healthy store and a limit under ~16 MB.)
        """
        if self.current.size > 0 and self.current.max_seq <= shipped_seq:
            if self.current.size >= rotate_at:
                # A new segment that cannot be made now (no file descriptors, no inodes) is
                # tried again at the next round; shipping must not stop for it.
                with contextlib.suppress(OSError):
                    self._start_segment()
        removed = 0
        for seg in list(self.segments[:-1]):
            if seg.max_seq <= shipped_seq and seg.open_begins == 0:
                try:
                    seg.path.unlink(missing_ok=True)
                except OSError:
                    continue  # deleted at a next round
                self.segments.remove(seg)
                removed += 1
        return removed

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # and the lock with it
            self._lock_fd = None
