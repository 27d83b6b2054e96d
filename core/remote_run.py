"""Run folders at an fsspec URL (``s3://bucket/prefix/run``): a local working copy, mirrored to the URL.

The trainer writes a local run folder as always (`RunFolder` stays a local path): the working copy,
``$ANYMODAL_CACHE/runs/<hash of the URL>``. `RemoteRun` keeps it and the URL in step:

- Before a run (`RemoteRun.hold`) it takes the remote folder's lock, then fetches the remote folder
  into the working copy, replacing what differs, unless the remote still holds unchanged every
  file this working copy uploaded or fetched: the copy is then the same run, at or ahead of the
  remote (a kill between a checkpoint and its upload), and is kept. Eval and export
  (`RemoteRun.read`) fetch the same way and upload only the folder they write.
- After every checkpoint (`RemoteRun.push`, the trainer's ``after_save``) and at the end, what
  changed is uploaded, ``checkpoints/last.pt`` last, and what the working copy no longer holds
  (older ``shards-*`` folders) is removed from the URL after it. An object PUT is atomic (the
  object appears whole or not at all; other storage gets an upload to a temporary name and a
  rename), so a kill at any moment leaves the URL with a whole ``last.pt``, every file it names,
  and at worst metric lines past it, which a resume cuts.
- One run per remote folder: a lock object ``.lock`` (host, pid, start, and a heartbeat refreshed
  every `HEARTBEAT_S` seconds) is created with a conditional write (``If-None-Match: *`` on S3) and
  removed at the end. A second run is refused, naming the holder, unless the holder's process is
  gone (same host), its heartbeat is older than `STALE_S`, or ``--take-over`` is given; a run that
  finds its lock taken over stops before its next upload, so two runs never interleave.

Credentials come from where the storage's own client reads them (``AWS_*`` variables, ``~/.aws``,
fsspec's config); a URL with a password in it is refused, and neither the URL's user part nor any
option is logged. Only one process uploads (rank 0); all processes of a run must see the same working
copy (one machine, or ``ANYMODAL_CACHE`` on a shared filesystem).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence
from urllib.parse import urlsplit

from .data import cache_dir
from .errors import UserError
from .runfolder import RunFolder, RunFolderBusy, write_atomic

__all__ = ["RemoteRun", "RemoteStorageError", "is_url", "HEARTBEAT_S", "STALE_S"]

log = logging.getLogger("anymodal.train")

HEARTBEAT_S = 60.0  # how often a running run refreshes its lock
STALE_S = 600.0  # a lock not refreshed for this long belongs to a run that is gone
LAST = "checkpoints/last.pt"
RECORD = ".remote.json"  # in the working copy: what was uploaded from it, never uploaded itself
LOCK = ".lock"  # the remote lock object; locally, RunFolder's lock file (neither is mirrored)
# storage clients whose DEBUG records carry request headers (access key id, signatures): kept at INFO
# even under ``anymodal -v`` unless a level is set for them
_QUIET_LOGGERS = ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "gcsfs", "adlfs", "azure")
# object stores whose PUT makes an object appear whole or not at all
_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}


class RemoteStorageError(UserError):
    """The storage at a run folder's URL cannot be reached, read or written."""


def is_url(path: Any) -> bool:
    return "://" in str(path)


def _excluded(rel: str) -> bool:
    """Files that are never mirrored: the locks, the sync record, temporary files of interrupted writes."""
    return rel in (LOCK, RECORD) or rel.rsplit("/", 1)[-1].endswith(".tmp")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"


def _error_codes(e: BaseException) -> Iterator[str]:
    """The storage error codes (``PreconditionFailed``) and messages along an exception's chain."""
    seen: list[BaseException] = []
    while e is not None and e not in seen:
        seen.append(e)
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            yield str(response.get("Error", {}).get("Code", ""))
        yield str(e)
        e = e.__cause__ or e.__context__


def _precondition_failed(e: BaseException) -> bool:
    """A conditional write refused (HTTP 412): someone else wrote the object first."""
    return any(c in ("PreconditionFailed", "412", "ConditionalRequestConflict") or "pre-condition" in c
               for c in _error_codes(e))


def _not_implemented(e: BaseException) -> bool:
    """A server without conditional writes."""
    return any(c in ("NotImplemented", "501") for c in _error_codes(e))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RemoteRun:
    """A run folder at ``url``, worked on in a local copy (`local`)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(str(url))
        if parts.password:
            raise UserError(f"the run folder URL {self._redact(str(url))} holds a password: put credentials in the "
                            "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) or the storage's "
                            "config file, never in the URL (it would be saved with the run and logged)")
        self.url = str(url).rstrip("/")
        self.local = Path(cache_dir("runs", hashlib.sha1(self.url.encode()).hexdigest()[:16]))
        self.session: Optional[str] = None  # set by pull: which fetch the working copy holds
        self._fs: Any = None
        self._path = ""
        self._token: Optional[str] = None  # ours, while we hold the remote lock
        self._started = ""
        self._lock_etag: Optional[str] = None
        self._lost: Optional[str] = None  # who took the lock over
        self._lock_io = threading.Lock()
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None
        self._conditional = True

    # ---- storage ----------------------------------------------------------------------------
    @staticmethod
    def _redact(url: str) -> str:
        """The URL without its user part (``sftp://alice@host/x`` -> ``sftp://***@host/x``)."""
        return re.sub(r"^([A-Za-z][\w+.-]*://)[^/@]*@", r"\1***@", url)

    def _error(self, what: str, e: BaseException) -> RemoteStorageError:
        hint = ""
        if type(e).__name__ == "NoCredentialsError":
            hint = ("; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, ~/.aws/credentials), and "
                    "AWS_ENDPOINT_URL for a server other than AWS")
        elif type(e).__name__ == "EndpointConnectionError":
            hint = "; is the endpoint (AWS_ENDPOINT_URL) right and the server up?"
        return RemoteStorageError(f"{self._redact(self.url)}: cannot {what} ({_one_line(e)}){hint}")

    @property
    def fs(self) -> Any:
        if self._fs is None:
            for name in _QUIET_LOGGERS:
                if logging.getLogger(name).level == logging.NOTSET:
                    logging.getLogger(name).setLevel(logging.INFO)
            try:
                import fsspec
            except ImportError:
                raise UserError(f"a run folder at {self._redact(self.url)} needs fsspec (and s3fs for s3://): "
                                "pip install 'anymodal[shards]'") from None
            try:
                self._fs, self._path = fsspec.core.url_to_fs(self.url)
            except ImportError as e:
                raise UserError(f"a run folder at {self._redact(self.url)} needs a filesystem package ({e}): "
                                "pip install 'anymodal[shards]'") from None
            except Exception as e:  # an unknown protocol, a malformed URL
                raise self._error("open it", e) from None
            self._path = self._path.rstrip("/")
        return self._fs

    def _remote(self, rel: str) -> str:
        self.fs  # noqa: B018 (sets _path)
        return f"{self._path}/{rel}"

    @property
    def _atomic_put(self) -> bool:
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        return bool(_ATOMIC_PUT & set(protocols))

    def _listing(self) -> dict[str, tuple[int, str]]:
        """The remote folder's files: relative path -> (size, version token), in one listing."""
        try:
            self.fs.invalidate_cache()
            found = self.fs.find(self._path, detail=True)
        except Exception as e:
            raise self._error("list it", e) from None
        prefix = self._path + "/"
        return {name[len(prefix):]: (int(info.get("size") or 0), self._version(info))
                for name, info in found.items() if name.startswith(prefix) and info.get("type", "file") == "file"}

    @staticmethod
    def _version(info: dict) -> str:
        for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created"):
            if info.get(key) is not None:
                return str(info[key])
        return ""

    def _info(self, rel: str) -> tuple[int, str]:
        info = self.fs.info(self._remote(rel))
        return int(info.get("size") or 0), self._version(info)

    def _put(self, rel: str) -> None:
        source, target = str(self.local / rel), self._remote(rel)
        if self._atomic_put:
            self.fs.put_file(source, target)
            return
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.{rel.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:8]}.tmp"
        self.fs.put_file(source, tmp)  # then a rename: the name never holds half a file
        self.fs.mv(tmp, target)

    def fetch(self, rel: str, dest: str) -> bool:
        """Copy the remote folder's file ``rel`` to ``dest``; False when it has none."""
        try:
            self.fs.get_file(self._remote(rel), dest)
        except FileNotFoundError:
            return False
        except Exception as e:
            raise self._error(f"fetch {rel}", e) from None
        return True

    def fetched_session(self) -> Optional[str]:
        """The `session` of the last fetch into the working copy, as this process sees it on disk."""
        return self._read_record().get("session")

    # ---- the working copy's record of what it uploaded --------------------------------------
    def _stat(self, rel: str) -> list[int]:
        """What tells a changed file: size, mtime and inode (an atomic rewrite is a new inode, even
        within one tick of a coarse clock)."""
        st = (self.local / rel).stat()
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def _local_files(self) -> dict[str, list[int]]:
        files = {}
        for folder, _, names in os.walk(self.local):
            for name in names:
                rel = Path(folder, name).relative_to(self.local).as_posix()
                if not _excluded(rel):
                    with contextlib.suppress(FileNotFoundError):  # a file removed while we look
                        files[rel] = self._stat(rel)
        return files

    def _read_record(self) -> dict[str, Any]:
        try:
            record = json.loads((self.local / RECORD).read_text())
        except (FileNotFoundError, ValueError):
            return {"url": self.url, "files": {}}
        if record.get("url") != self.url or not isinstance(record.get("files"), dict):
            return {"url": self.url, "files": {}}
        return record

    def _write_record(self, record: dict[str, Any]) -> None:
        self.local.mkdir(parents=True, exist_ok=True)
        write_atomic(self.local / RECORD, lambda tmp: tmp.write_text(json.dumps(record)))

    # ---- fetch and upload -------------------------------------------------------------------
    def pull(self) -> None:
        """Make the working copy hold the remote run folder.

        A working copy that is this URL's own, whose every uploaded (or fetched) file the remote still
        holds unchanged, is the same run at or ahead of the remote (a kill between a checkpoint and its
        upload): it is kept, and only files it has never seen are fetched (an ``eval/`` written from
        another machine). Any other copy is made the remote's: what differs is fetched, what the remote
        lacks is removed.
        """
        remote = self._listing()
        if self._token is not None:  # holding the lock: what killed uploads left behind goes
            for rel in [r for r in remote if _excluded(r) and r != LOCK]:
                with contextlib.suppress(Exception):
                    self.fs.rm_file(self._remote(rel))
        remote = {rel: v for rel, v in remote.items() if not _excluded(rel)}
        record, local = self._read_record(), self._local_files()
        same_run = (self.local / RECORD).is_file() and all(
            remote.get(rel) == tuple(entry["remote"]) for rel, entry in record["files"].items())
        if same_run:
            files = dict(record["files"])
            wanted = [rel for rel in remote if rel not in files and rel not in local]
            stale: list[str] = []
        else:
            files = {rel: entry for rel, entry in record["files"].items()
                     if remote.get(rel) == tuple(entry["remote"]) and local.get(rel) == entry["local"]}
            wanted = [rel for rel in remote if rel not in files]
            stale = [rel for rel in local if rel not in remote]  # the remote is the run: the rest is another attempt's
        for rel in sorted(wanted):
            path = self.local / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                self.fs.get_file(self._remote(rel), str(tmp))
                os.replace(tmp, path)
            except Exception as e:
                raise self._error(f"fetch {rel}", e) from None
            finally:
                tmp.unlink(missing_ok=True)
            files[rel] = {"local": self._stat(rel), "remote": list(remote[rel])}
        for rel in stale:
            (self.local / rel).unlink(missing_ok=True)
        for folder, _, _ in sorted(os.walk(self.local), key=lambda w: -len(w[0])):
            if Path(folder) != self.local:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # only empty ones go
        self.session = uuid.uuid4().hex
        self._write_record({"url": self.url, "session": self.session, "files": files})
        if same_run:
            log.info("working copy %s of %s is this run's, at or ahead of the remote; fetched %d new file(s)", self.local,
                     self._redact(self.url), len(wanted))
        else:
            log.info("fetched %d file(s) of %s into its working copy %s%s", len(wanted), self._redact(self.url), self.local,
                     f" (removed {len(stale)} the remote does not hold)" if stale else "")

    def push(self, only: Sequence[str] = ()) -> int:
        """Upload what changed in the working copy (within the folders ``only`` names, if any), ``last.pt``
        last, then remove from the URL what the working copy no longer holds. Returns the files uploaded."""
        if self._token is not None:
            self._check_lock()
        record = self._read_record()
        local = self._local_files()

        def in_scope(rel: str) -> bool:
            return not only or any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in only)

        changed = sorted((rel for rel, stat in local.items()
                          if in_scope(rel) and record["files"].get(rel, {}).get("local") != stat),
                         key=lambda rel: (rel == LAST, rel))
        try:
            for rel in changed:
                stat = local[rel]
                self._put(rel)
                record["files"][rel] = {"local": stat, "remote": list(self._info(rel))}
                self._write_record(record)
            gone = [rel for rel in record["files"] if rel not in local and in_scope(rel)]
            for rel in gone:  # after last.pt: nothing it names goes before it is replaced
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self._remote(rel))
                del record["files"][rel]
                self._write_record(record)
        except UserError:
            raise
        except Exception as e:
            raise self._error(f"upload to it (the working copy {self.local} holds the run; resume with "
                              f"`anymodal train --resume --run-dir {self._redact(self.url)}` once it is reachable)", e) from None
        if changed or gone:
            log.debug("uploaded %d file(s) to %s, removed %d", len(changed), self._redact(self.url), len(gone))
        return len(changed)

    # ---- the remote lock --------------------------------------------------------------------
    def _read_lock(self) -> tuple[Optional[dict], Optional[str]]:
        """The lock object's content and version (None, None when there is none). The version is read
        first: a conditional write over it fails if the content changed after."""
        path = self._remote(LOCK)
        try:
            _, version = self._info(LOCK)
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None, None
        try:
            held = json.loads(data)
        except ValueError:
            held = None
        return (held if isinstance(held, dict) else {"host": "?", "pid": "?", "heartbeat": 0}), version

    def _write_lock(self, data: bytes, create: bool = False, match: Optional[str] = None) -> None:
        """Write the lock object: ``create`` only if there is none, or ``match`` only over that version
        (conditional writes on S3; elsewhere a check and a write). Raises FileExistsError when refused."""
        path = self._remote(LOCK)
        s3 = "s3" in (self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,))
        if s3 and self._conditional:
            try:
                if create:
                    self.fs.pipe_file(path, data, mode="create")
                else:
                    self.fs.pipe_file(path, data, IfMatch=match)
                return
            except FileExistsError:
                raise
            except Exception as e:
                if _precondition_failed(e):
                    raise FileExistsError(errno.EEXIST, "the lock changed") from None
                if not _not_implemented(e):
                    raise
                self._conditional = False  # a server without conditional writes: check, then write
        held, version = self._read_lock()
        if (create and held is not None) or (not create and version != match):
            raise FileExistsError(errno.EEXIST, "the lock changed")
        self.fs.pipe_file(path, data)

    def _lock_data(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": self._started,
                           "heartbeat": time.time(), "token": self._token}).encode()

    @staticmethod
    def _holder(held: dict) -> str:
        age = time.time() - float(held.get("heartbeat") or 0)
        return (f"pid {held.get('pid', '?')} on {held.get('host', '?')} since {held.get('started', '?')} "
                f"(lock refreshed {age:.0f} s ago)")

    def _free(self, held: dict, take_over: bool) -> Optional[str]:
        """Why another run's lock may be taken over, or None while it holds the folder."""
        if take_over:
            return "--take-over"
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
            return f"its process {held['pid']} on this machine is gone"
        age = time.time() - float(held.get("heartbeat") or 0)
        if age > STALE_S:
            return f"its lock was last refreshed {age / 60:.0f} min ago"
        return None

    def acquire(self, take_over: bool = False) -> None:
        """Take the remote folder's lock; `RunFolderBusy` names the run that holds it."""
        self._token, self._started = uuid.uuid4().hex, time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            if not self._atomic_put:  # a filesystem with folders (file://, sftp://): the folder first
                self.fs.makedirs(self._path, exist_ok=True)
            for _ in range(5):
                try:
                    self._write_lock(self._lock_data(), create=True)
                    break
                except FileExistsError:
                    pass
                held, version = self._read_lock()
                if held is None:
                    continue  # released meanwhile
                reason = self._free(held, take_over)
                if reason is None:
                    self._token = None
                    raise RunFolderBusy(
                        f"run folder {self._redact(self.url)} is in use by {self._holder(held)}; wait for it to finish, "
                        f"or choose another folder (--run-dir, or run.name=). If that run is gone, its lock is taken "
                        f"over once it is {STALE_S / 60:.0f} min old, or at once with --take-over")
                try:
                    self._write_lock(self._lock_data(), match=version)
                except FileExistsError:
                    continue  # another run took it first: look again
                log.warning("took over the lock of %s from %s: %s", self._redact(self.url), self._holder(held), reason)
                break
            else:
                self._token = None
                raise RunFolderBusy(f"run folder {self._redact(self.url)}: its lock keeps changing (several runs "
                                    "starting at once?); try again")
            self._confirm()
        except UserError:
            raise
        except Exception as e:
            self._token = None
            raise self._error("write its lock", e) from None
        if self._lost is not None:
            self._token = None
            raise RunFolderBusy(f"run folder {self._redact(self.url)} was taken by {self._lost} as this run started; "
                                "wait for it to finish, or choose another folder")
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="anymodal-remote-lock", daemon=True)
        self._beat.start()

    def _confirm(self) -> None:
        """After our write of the lock: remember its version, or note who wrote it after us."""
        held, version = self._read_lock()
        if held is None or held.get("token") != self._token:
            self._lost = self._holder(held) if held else "someone who then removed the lock"
        else:
            self._lock_etag = version

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock_io:
                if self._lost or self._token is None:
                    return
                try:
                    self._write_lock(self._lock_data(), match=self._lock_etag)
                    self._confirm()
                except FileExistsError:  # the lock is no longer the one we wrote
                    self._confirm()
                except Exception as e:  # the storage is unreachable for now: the next beat tries again
                    log.warning("cannot refresh the lock of %s (%s)", self._redact(self.url), _one_line(e))

    def _check_lock(self) -> None:
        with self._lock_io:
            if self._lost is None:
                try:
                    held, _ = self._read_lock()
                except Exception as e:
                    raise self._error("read its lock", e) from None
                if held is None or held.get("token") != self._token:
                    self._lost = self._holder(held) if held else "someone who then removed the lock"
        if self._lost is not None:
            raise RunFolderBusy(f"run folder {self._redact(self.url)} was taken over by {self._lost}: this run stops "
                                f"so as not to overwrite it (its own state is in the working copy {self.local})")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=30)
        with self._lock_io:
            if self._token is None or self._lost is not None:
                return
            try:
                held, _ = self._read_lock()
                if held is not None and held.get("token") == self._token:
                    self.fs.rm_file(self._remote(LOCK))
            except Exception as e:
                log.warning("cannot remove the lock of %s (%s); the next run takes it over once it is stale",
                            self._redact(self.url), _one_line(e))
            self._token = None

    # ---- the two ways in --------------------------------------------------------------------
    @contextlib.contextmanager
    def hold(self, take_over: bool = False) -> Iterator[Path]:
        """For a training run: the remote lock, the working copy's lock, the remote fetched into it; on
        the way out what changed is uploaded (after an error too, unless the lock was lost) and the lock removed."""
        self.acquire(take_over)
        try:
            with self._local_lock():
                self.pull()
                try:
                    yield self.local
                except BaseException:
                    if self._lost is None:
                        with contextlib.suppress(Exception):
                            self.push()
                    raise
                self.push()
        finally:
            self.release()

    @contextlib.contextmanager
    def read(self, write: Sequence[str] = ()) -> Iterator[Path]:
        """For eval and export: the remote fetched into the working copy (under its local lock); on the way
        out the folders named in ``write`` are uploaded. Takes no remote lock: it writes only those folders."""
        with self._local_lock():
            self.pull()
            if not (self.local / "config.yaml").is_file():
                raise FileNotFoundError(f"{self._redact(self.url)} is not a run folder: it has no config.yaml")
            try:
                yield self.local
            except BaseException:
                if write:
                    with contextlib.suppress(Exception):
                        self.push(only=write)  # what was written before the error
                raise
            if write:
                self.push(only=write)

    @contextlib.contextmanager
    def _local_lock(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(RunFolder(self.local).lock())
            except RunFolderBusy as e:
                raise RunFolderBusy(f"{self._redact(self.url)}: its working copy on this machine is busy ({e})") from None
            yield
