"""Run untrusted programs (model-written code) with time, CPU, memory and process limits, no network, and a
private temporary directory as the only writable place.

Isolation levels, strongest first (`Sandbox(isolation="auto")` takes the first the machine allows and says why
it skipped the others in `sandbox.isolation_reason`):

- ``bwrap``: bubblewrap. New user, PID, network, IPC, UTS and cgroup namespaces; the host filesystem is mounted
  read-only, ``/tmp`` is a fresh tmpfs, ``/dev`` and ``/proc`` are fresh; the work directory is the one writable
  host path. The whole tree dies with its parent.
- ``unshare``: util-linux ``unshare``. New user, PID, network, IPC and UTS namespaces, but the host filesystem is
  the host's: only file permissions keep the program out (see the uid note below), and world-writable places
  (``/tmp``, ``/dev/shm``) stay writable.
- ``rlimits-only``: no namespaces. Resource limits, a private process group and (as root) a private uid; the
  network is reachable.

Whatever the level: rlimits (address space, CPU seconds, processes, file size, core dumps off), a new session that
is killed as a whole on timeout, the work directory as cwd, HOME and TMPDIR, a minimal environment, and stdin,
stdout and stderr as files (so a chatty program cannot fill our memory or deadlock a pipe).

When the host runs as root, each concurrent run gets its own unprivileged uid (from ``uid_base``, claimed with a lock
file so that sandboxes in other threads and processes never share one): files owned by
root or other users are then not writable, the harness cannot be signalled, RLIMIT_NPROC counts only that run's
processes (the kernel does not apply it to root), and after the run every process left with that uid is killed
(``rlimits-only``) or, with a PID namespace, a timed-out run returns once the namespace's processes have exited.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

ISOLATION_LEVELS = ("bwrap", "unshare", "rlimits-only")
_SETPRIV = shutil.which("setpriv")  # util-linux


class SandboxUnavailable(RuntimeError):
    """The requested isolation level cannot be used on this machine (the message says why)."""


@dataclass(frozen=True)
class Limits:
    """Per-run limits. `memory_mb` bounds the address space of each process (RLIMIT_AS), `output_mb` each file
    the program writes, stdout and stderr included (RLIMIT_FSIZE)."""

    wall_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 2048
    max_procs: int = 32
    output_mb: int = 64
    open_files: int = 256

    def with_(self, **changes: float | int) -> Limits:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass
class RunResult:
    returncode: int | None  # negative: killed by that signal; None if it never started
    stdout: str
    stderr: str
    timed_out: bool = False
    killed_reason: str | None = None  # "wall-time", "cpu-time", "file-size", "SIGSEGV", "start-failed" ...
    wall_s: float = 0.0
    truncated: bool = False  # stdout or stderr was cut at `max_capture` characters

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass
class Job:
    """One `run_many` item: the same arguments as `Sandbox.run`."""

    argv: Sequence[str] | None = None
    code: str | None = None
    stdin: str | bytes | None = None
    files: Mapping[str, str | bytes] = field(default_factory=dict)
    limits: Limits | None = None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _probe(argv: Sequence[str], uid: int | None) -> str | None:
    """Run `argv` (a sandbox wrapper around `true`) once; None if it worked, else why not."""
    ids = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=10, **ids)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{argv[0]} failed to start: {exc}"
    if proc.returncode != 0:
        return f"{argv[0]} exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[:200]}"
    return None


def _bwrap_prefix(workdir: str) -> list[str]:
    return [
        "bwrap", "--unshare-all", "--die-with-parent", "--new-session",
        "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
        "--bind", workdir, workdir, "--chdir", workdir, "--",
    ]  # fmt: skip


_UNSHARE_PREFIX = ["unshare", "--user", "--net", "--pid", "--fork", "--kill-child", "--ipc", "--uts", "--"]

_detect_lock = threading.Lock()
_detected: dict[tuple[str, int | None], str | None] = {}


def detect_isolation(level: str, uid: int | None) -> str | None:
    """None if `level` works here for `uid` (None: our own uid), else the reason it does not. Cached."""
    if level == "rlimits-only":
        return None
    key = (level, uid)
    with _detect_lock:
        if key not in _detected:
            if level == "bwrap":
                if shutil.which("bwrap") is None:
                    _detected[key] = "bwrap not installed (Debian package bubblewrap)"
                else:
                    with tempfile.TemporaryDirectory(prefix="openk2-sbx-probe-") as probe_dir:
                        if uid is not None:
                            os.chown(probe_dir, uid, uid)
                        _detected[key] = _probe([*_bwrap_prefix(probe_dir), "true"], uid)
            elif level == "unshare":
                if shutil.which("unshare") is None:
                    _detected[key] = "unshare not installed (util-linux)"
                else:
                    _detected[key] = _probe([*_UNSHARE_PREFIX, "true"], uid)
            else:
                raise ValueError(f"unknown isolation level {level!r}; valid: {', '.join(ISOLATION_LEVELS)}")
        return _detected[key]


def _uid_switch_works(uid: int) -> bool:
    return _probe(["true"], uid) is None


class _UidPool:
    """Unprivileged uids for concurrent runs. A uid is claimed with an flock on a file in a root-only directory,
    so two sandboxes (threads or processes) never run programs under the same uid at once: that would share
    RLIMIT_NPROC and let one run's cleanup (kill every process of the uid) hit the other."""

    SIZE = 1024
    _pools: dict[int, _UidPool] = {}
    _pools_lock = threading.Lock()

    @classmethod
    def get(cls, base: int) -> _UidPool:
        with cls._pools_lock:
            if base not in cls._pools:
                cls._pools[base] = cls(base)
            return cls._pools[base]

    def __init__(self, base: int) -> None:
        self.base = base
        self.lock_dir = Path(tempfile.gettempdir()) / f"openk2-sandbox-uids-{os.geteuid()}"
        self.lock_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.lock_dir, 0o700)  # lock files must stay out of the programs' reach
        self._next = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def claim(self) -> Iterator[int]:
        while True:
            with self._lock:
                for _ in range(self.SIZE):
                    uid = self.base + self._next
                    self._next = (self._next + 1) % self.SIZE
                    fd = os.open(self.lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        os.close(fd)
                        continue
                    break
                else:
                    fd = -1
            if fd >= 0:
                break
            time.sleep(0.05)  # every uid busy (more than SIZE concurrent runs on this machine): wait for one
        try:
            yield uid
        finally:
            os.close(fd)


def _python_for(uid: int | None, notes: list[str]) -> str:
    """Our interpreter if `uid` may run it, else the first system python3 it may run. (A venv or pyenv under
    /root is closed to the sandbox's uid.)"""
    if uid is None:
        return sys.executable
    candidates = [sys.executable, "/usr/local/bin/python3", "/usr/bin/python3"]
    for candidate in candidates:
        if os.path.exists(candidate) and _probe([candidate, "-I", "-S", "-c", "pass"], uid) is None:
            if candidate != sys.executable:
                notes.append(f"{sys.executable} is closed to uid {uid}, so Python programs run with {candidate}")
            return candidate
    notes.append(f"no Python interpreter that uid {uid} may run among {candidates}")
    return sys.executable


def _processes_of(uid: int) -> Iterator[str]:
    """The /proc directories of the processes running as `uid` (any of them may exit while the caller reads it)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    yield entry.path


def _user_task_count(uid: int) -> int:
    count = 0
    for path in _processes_of(uid):
        with contextlib.suppress(OSError):
            count += len(os.listdir(f"{path}/task"))
    return count


def _live_process_of(uid: int) -> bool:
    """Whether a process other than a zombie runs as `uid` (a zombie has exited and holds no resources; it waits
    for a parent outside our control to reap it)."""
    for path in _processes_of(uid):
        with contextlib.suppress(OSError):
            stat = Path(path, "stat").read_bytes()
            if stat[stat.rindex(b")") + 2:][:1] != b"Z":
                return True
    return False


def _await_namespace_teardown(uid: int, timeout_s: float = 10.0) -> None:
    """Wait until no live process runs as `uid`. Killing bwrap or unshare on a timeout ends the program's PID
    namespace, but the kernel kills its processes after the launcher is gone: a fork bomb's thousands were still
    running 0.2 s after a run on a loaded 2-core host. A run returns once they have exited."""
    deadline = time.monotonic() + timeout_s
    while _live_process_of(uid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process running as `uid` (what a run left behind: daemons, setsid'd fork bombs). A child
    that switches to `uid` and calls kill(-1) reaches exactly those processes, with no race against pid reuse."""
    kill = shutil.which("kill")
    argv = [kill, "-KILL", "-1"] if kill else [sys.executable, "-S", "-c", "import os; os.kill(-1, 9)"]
    # setpriv switches uid without making Python fork() (see Sandbox._execute); Popen(user=) is the fallback.
    ids: dict[str, object] = {"user": uid, "group": uid, "extra_groups": []}
    if _SETPRIV is not None:
        argv, ids = [_SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv], {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        # It exits non-zero when nothing was left to kill, which is the usual case.
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=10, **ids)


def _decode(data: bytes, limit: int) -> tuple[str, bool]:
    text = data.decode("utf-8", errors="replace")
    return (text[:limit], True) if len(text) > limit else (text, False)


class Sandbox:
    """Runs programs in a fresh private directory each, under `limits` and the strongest isolation available.

        sandbox = Sandbox(Limits(wall_s=5))
        result = sandbox.run(code="print(input()[::-1])", stdin="abc\\n")
        result.stdout  # "cba\\n"
        sandbox.isolation, sandbox.isolation_reason  # ("bwrap", "...")
    """

    def __init__(
        self,
        limits: Limits | None = None,
        isolation: str = "auto",
        *,
        parallel: int | None = None,
        python: str | None = None,
        uid_base: int | None = None,
        workdir_root: str | Path | None = None,
        max_capture: int = 1 << 20,
    ) -> None:
        self.limits = limits or Limits()
        self.max_capture = max_capture
        self.workdir_root = str(workdir_root) if workdir_root is not None else None
        self.parallel = max(1, parallel or os.cpu_count() or 1)
        if uid_base is None:
            uid_base = int(os.environ.get("OPENK2_SANDBOX_UID_BASE", "61000"))
        self._uid_pool: _UidPool | None = None
        notes: list[str] = []
        if os.geteuid() == 0:
            if _uid_switch_works(uid_base):
                self._uid_pool = _UidPool.get(uid_base)
            else:
                notes.append(f"cannot switch to uid {uid_base}, so programs run as root")
        probe_uid = uid_base if self._uid_pool is not None else None
        self.python = python or _python_for(probe_uid, notes)
        self._running = threading.BoundedSemaphore(self.parallel)

        if isolation == "auto":
            for level in ISOLATION_LEVELS:
                why_not = detect_isolation(level, probe_uid)
                if why_not is None:
                    self.isolation = level
                    break
                notes.append(f"no {level}: {why_not}")
        else:
            why_not = detect_isolation(isolation, probe_uid)
            if why_not is not None:
                raise SandboxUnavailable(f"isolation {isolation!r} unavailable: {why_not}")
            self.isolation = isolation
        if self.isolation == "rlimits-only":
            notes.append("no network or filesystem isolation: the program can reach the network and write "
                         "wherever its uid may")
        elif self.isolation == "unshare":
            notes.append("no filesystem isolation: the program can write wherever its uid may (e.g. /tmp)")
        self.isolation_reason = "; ".join(notes) or "full isolation"

    def __repr__(self) -> str:
        return f"Sandbox(isolation={self.isolation!r}, limits={self.limits}, parallel={self.parallel})"

    # --- running -----------------------------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str] | None = None,
        *,
        code: str | None = None,
        stdin: str | bytes | None = None,
        files: Mapping[str, str | bytes] | None = None,
        limits: Limits | None = None,
    ) -> RunResult:
        """Run `argv` (relative paths resolve in the private directory) or, with `code`, that Python source as
        ``main.py``. `files` are written into the directory first (relative paths only). Blocks while `parallel`
        runs are already in flight."""
        if (argv is None) == (code is None):
            raise ValueError("give exactly one of argv and code")
        with self._running:
            if self._uid_pool is None:
                return self._run(argv, code, stdin, dict(files or {}), limits or self.limits, None)
            with self._uid_pool.claim() as uid:
                return self._run(argv, code, stdin, dict(files or {}), limits or self.limits, uid)

    def run_many(self, jobs: Iterable[Job], parallel: int | None = None) -> list[RunResult]:
        """Run `jobs` concurrently (at most `parallel`, itself capped by the sandbox's own `parallel`); results in
        job order."""
        jobs = list(jobs)
        workers = max(1, min(parallel or self.parallel, self.parallel, len(jobs) or 1))

        def one(job: Job) -> RunResult:
            return self.run(job.argv, code=job.code, stdin=job.stdin, files=job.files, limits=job.limits)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(one, jobs))

    def _run(
        self,
        argv: Sequence[str] | None,
        code: str | None,
        stdin: str | bytes | None,
        files: dict[str, str | bytes],
        limits: Limits,
        uid: int | None,
    ) -> RunResult:
        workdir = tempfile.mkdtemp(prefix="openk2-sbx-", dir=self.workdir_root)
        try:
            if code is not None:
                files["main.py"] = code
                # -E -s: ignore PYTHON* variables and the user site (the script's directory stays importable, for
                # helper modules in `files`); -B: no .pyc litter.
                argv = [self.python, "-E", "-s", "-B", "main.py"]
            self._write_files(workdir, files, uid)
            assert argv is not None
            return self._execute(list(argv), workdir, stdin, limits, uid)
        finally:
            if uid is not None and self.isolation == "rlimits-only":
                # With a PID namespace (bwrap, unshare) its end killed everything; without one, sweep the uid,
                _kill_uid(uid)  # before removing the directory, so nothing writes into it meanwhile
            _remove_tree(workdir)

    @staticmethod
    def _write_files(workdir: str, files: Mapping[str, str | bytes], uid: int | None) -> None:
        root = Path(workdir)
        for name, content in files.items():
            path = (root / name).resolve()
            if not path.is_relative_to(root.resolve()) or Path(name).is_absolute():
                raise ValueError(f"sandbox file {name!r} must be a relative path inside the work directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                path.write_text(content, encoding="utf-8")
            else:
                path.write_bytes(content)
        if uid is not None:
            for dirpath, dirnames, filenames in os.walk(workdir):
                os.chown(dirpath, uid, uid)
                for name in [*dirnames, *filenames]:
                    os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)

    def _execute(
        self, argv: list[str], workdir: str, stdin: str | bytes | None, limits: Limits, uid: int | None
    ) -> RunResult:
        if self.isolation == "bwrap":
            command = [*_bwrap_prefix(workdir), *argv]
        elif self.isolation == "unshare":
            command = [*_UNSHARE_PREFIX, *argv]
        else:
            command = argv
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",  # numpy & co. would otherwise start a thread per core and hit max_procs
        }
        nproc = limits.max_procs
        if uid is None and os.geteuid() != 0:
            # Without a uid of its own the limit counts every task (thread) this user already runs, the harness's
            # included, so it is set that far above the current count. (For root the kernel ignores it.)
            nproc += _user_task_count(os.getuid())
        rlimits = [
            (resource.RLIMIT_AS, limits.memory_mb << 20),
            (resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1)),
            (resource.RLIMIT_NPROC, nproc),
            (resource.RLIMIT_FSIZE, limits.output_mb << 20),
            (resource.RLIMIT_NOFILE, limits.open_files),
            (resource.RLIMIT_CORE, 0),
        ]

        # The program must not run a single instruction without its limits, yet setting them in the child
        # (preexec_fn) or switching uid there (Popen(user=...)) makes Python fork() instead of vfork(), which
        # costs ~70 ms in a harness that holds a few hundred MB (torch). So a tiny shell starts first and waits
        # on a pipe while we set its limits from outside (prlimit), then execs setpriv (the uid switch) and the
        # program, which inherit them.
        gate_read, gate_write = os.pipe()
        launcher = ["sh", "-c", f'read _ < /proc/self/fd/{gate_read} && exec "$@"', "sh"]
        ids: dict[str, object] = {}
        if uid is not None and _SETPRIV is not None:
            launcher += [_SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        elif uid is not None:
            ids = {"user": uid, "group": uid, "extra_groups": []}
        stdin_bytes = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        with tempfile.TemporaryFile() as stdin_file, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            stdin_file.write(stdin_bytes)
            stdin_file.seek(0)
            start = time.monotonic()
            proc: subprocess.Popen | None = None
            try:
                try:
                    proc = subprocess.Popen(
                        [*launcher, *command], stdin=stdin_file, stdout=out, stderr=err, cwd=workdir, env=env,
                        start_new_session=True, close_fds=True, pass_fds=(gate_read,), **ids,
                    )  # fmt: skip
                finally:
                    os.close(gate_read)
                for which, value in rlimits:
                    resource.prlimit(proc.pid, which, value if isinstance(value, tuple) else (value, value))
                os.write(gate_write, b"go\n")
            except OSError as exc:
                os.close(gate_write)  # the shell reads EOF and exits without running argv
                if proc is not None:
                    proc.wait()
                return RunResult(None, "", f"failed to start {argv[0]}: {exc}", killed_reason="start-failed",
                                 wall_s=time.monotonic() - start)
            os.close(gate_write)
            timed_out = not _wait_exit(proc, limits.wall_s)
            if not timed_out:
                returncode = proc.wait()
            else:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                returncode = proc.wait()
            wall_s = time.monotonic() - start
            if timed_out and uid is not None and self.isolation != "rlimits-only":
                _await_namespace_teardown(uid)
            if uid is None:
                # Children that stayed in the session (a backgrounded loop) must not outlive the run.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            out.seek(0)
            err.seek(0)
            stdout, cut_out = _decode(out.read(self.max_capture * 4), self.max_capture)
            stderr, cut_err = _decode(err.read(self.max_capture * 4), self.max_capture)

        if self.isolation == "bwrap" and returncode > 128 and not timed_out:
            # bwrap reports a program killed by signal N as exit status 128 + N.
            returncode = -(returncode - 128)
        killed_reason = None
        if timed_out:
            killed_reason = "wall-time"
        elif returncode < 0:
            number = -returncode
            if number == signal.SIGXCPU or (number == signal.SIGKILL and _cpu_limit_hit(limits, wall_s)):
                killed_reason = "cpu-time"
            elif number == signal.SIGXFSZ:
                killed_reason = "file-size"
            else:
                killed_reason = _signal_name(number)
        return RunResult(returncode, stdout, stderr, timed_out, killed_reason, wall_s, cut_out or cut_err)


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until `proc` exits or `timeout_s` passes; True if it exited. `Popen.wait(timeout)` polls with sleeps
    of up to 50 ms, which would be most of a short program's overhead; a pidfd wakes us the moment it exits."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # kernel < 5.3 or not Linux
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout_s) * 1000))
    finally:
        os.close(pidfd)


def _cpu_limit_hit(limits: Limits, wall_s: float) -> bool:
    # The hard CPU limit (soft + 1 s) ends in SIGKILL; it can only have been reached after that much wall time.
    return wall_s >= limits.cpu_s


def _remove_tree(path: str) -> None:
    def make_writable_and_retry(function, failed_path, _exc_info):  # type: ignore[no-untyped-def]
        # Programs may leave read-only directories behind; as a non-root host we must chmod them to delete.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed_path), 0o700)
            os.chmod(failed_path, 0o700)
            function(failed_path)

    shutil.rmtree(path, onerror=make_writable_and_retry)
