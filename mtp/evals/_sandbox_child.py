# The sandbox's child bootstrap (mtp.evals.sandbox): run as `python -I -S -B -X utf8 -c <this file>`,
# never imported. argv[1]: a file descriptor holding the payload (JSON: cfg, nonce, program, tests),
# argv[2]: the report pipe. Everything that matters is local to _sandbox(); the functions at module
# level are the replacements the program can see, and they reach the hook only through sys.audit
# (they hold nothing worth stealing).
import sys, os, posix, _signal, _imp, resource


def _mtp_signal(signalnum, handler):
    box = []
    sys.audit("mtp.signal", signalnum, handler, box)
    return box[0]


def _mtp_open(path, flags, mode=0o777, *, dir_fd=None):
    box = []
    sys.audit("mtp.open", path, flags, mode, dir_fd, box)
    return box[0]


def _mtp_create_builtin(spec):
    box = []
    sys.audit("mtp.create_builtin", spec, box)
    return box[0]


def _mtp_exec_builtin(mod):
    box = []
    sys.audit("mtp.exec_builtin", mod, box)
    return box[0]


def _mtp_refusal(name):
    def refused(*args, **kwargs):
        sys.audit("mtp.refused", name)
    return refused


def _mtp_exit_early(code=0):
    raise SystemExit("os._exit(%r) called" % (code,))


def _sandbox():
    # builtins the program could replace, taken now: after this point the hook, the report and
    # the handling of the program's exception look up no global or builtin name
    _str, _bytes, _int, _len, _isinstance, _type, _repr = str, bytes, int, len, isinstance, type, repr
    _callable, _getattr, _next, _exec, _compile = callable, getattr, next, exec, compile
    _BaseException, _AssertionError, _SyntaxError = BaseException, AssertionError, SyntaxError
    _ValueError, _PermissionError = ValueError, PermissionError
    _sys = sys
    import json, itertools
    _write, _exit, _close, _read = os.write, os._exit, os.close, os.read
    payload_fd, report_fd = _int(sys.argv[1]), _int(sys.argv[2])
    chunks = []
    while True:
        chunk = _read(payload_fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    _close(payload_fd)
    msg = json.loads(b"".join(chunks))
    del chunks
    cfg, nonce = msg["cfg"], msg["nonce"]
    program, tests = msg["program"], msg["tests"]
    del msg
    for name, (soft, hard) in cfg["limits"].items():
        which = getattr(resource, name)
        cur = resource.getrlimit(which)[1]
        if cur != resource.RLIM_INFINITY:  # never above what we were given
            soft, hard = min(soft, cur), min(hard, cur)
        resource.setrlimit(which, (soft, hard))
    ROOT = os.path.realpath(os.getcwd())
    source = program + (tests or "")
    lines = source.splitlines()
    with open("program.py", "w", encoding="utf-8") as f:
        f.write(source)
    C_TRACEBACK = sys.version_info < (3, 13)  # 3.13 prints tracebacks in Python, through tb_frame

    def report(status, detail=""):
        detail = _str(detail).replace("\n", " ").replace("\r", " ")[:300]
        try:
            _write(report_fd, (nonce + " " + status + " " + detail + "\n").encode("utf-8", "replace"))
        except _BaseException:
            pass

    def finish(status, detail=""):
        try:
            _sys.stdout.flush()
        except _BaseException:
            pass
        if detail:
            try:
                _sys.stderr.write("[sandbox] " + detail + "\n")
                _sys.stderr.flush()
            except _BaseException:
                pass
        report(status, detail)
        _exit(0)

    try:
        codes = [_compile(program, "program.py", "exec")]
        if tests is not None:  # compiled on its own, numbered as in program.py
            codes.append(_compile("\n" * program.count("\n") + tests, "program.py", "exec"))
    except _SyntaxError as e:
        finish("error", "SyntaxError: " + _str(e))
    del program, tests, source

    if cfg["guard"]:
        W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | getattr(os, "O_TMPFILE", 0)
        DENY = frozenset((
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
            "sys.remote_exec", "os.pidfd_open", "mtp.refused",
            # tracing hooks, heap walks and hand-made code objects: ways to the bootstrap's state
            "sys.settrace", "sys.setprofile", "sys.monitoring.register_callback", "gc.get_objects",
            "gc.get_referrers", "gc.get_referents", "code.__new__", "marshal.loads", "marshal.load",
            "cpython._PySys_ClearAuditHooks", "sqlite3.enable_load_extension", "sqlite3.load_extension",
        ))
        # frames: hidden, with the ValueError that stdlib callers (namedtuple, typing, enum,
        # logging) already expect from sys._getframe, and not counted as a violation
        HIDE = frozenset(("sys._getframe", "sys._current_frames", "sys._current_exceptions"))
        FRAME_ATTRS = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))
        NO_IMPORT = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "posix", "_signal", "_io", "os", "io",
                               "_imp", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
                               "_interpchannels", "_interpqueues", "_ctypes_test")
                              + _tuple_of(cfg["deny_imports"]))
        FRESH_BUILTIN = frozenset(("posix", "_signal", "_imp", "sys", "builtins", "_io", "marshal", "gc",
                                   "_thread", "_weakref"))
        PATHS = {  # event -> (index of a path argument, index of its dir_fd argument or None)
            "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
            "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
            "os.truncate": ((0, None),), "os.utime": ((0, 3),), "os.chmod": ((0, 2),),
            "os.chown": ((0, 3),), "os.chdir": ((0, None),), "shutil.chown": ((0, None),),
        }
        ROOTS = _tuple_of(os.path.realpath(r) for r in cfg["roots"]) + (ROOT,)
        DYNLOAD = os.path.realpath(os.path.dirname(resource.__file__)) if hasattr(resource, "__file__") else None
        STD = {"stdout": 1, "stderr": 2}
        MAX_OPENS = cfg["max_files"]
        _realpath, _fsdecode, _fspath, _readlink, _getpid = (os.path.realpath, os.fsdecode, os.fspath,
                                                             os.readlink, os.getpid)
        _posix_open, _real_signal = posix.open, _signal.signal
        _real_create_builtin, _real_exec_builtin = _imp.create_builtin, _imp.exec_builtin
        _strip = _mtp_strip
        opens, refusals = itertools.count(1), itertools.count()

        class SandboxViolation(_PermissionError):
            pass

        class SandboxHidden(_ValueError):
            pass

        class Spec:
            pass

        def refuse(what):
            if _next(refusals) == 0:  # the first refusal is reported at once: swallowing it is no use
                try:
                    _write(report_fd, ("blocked " + what.replace("\n", " ")[:300] + " is not allowed\n").encode(
                        "utf-8", "replace"))
                except _BaseException:
                    pass
            raise SandboxViolation("sandbox: " + what + " is not allowed")

        def text(path):
            if _type(path) is _str:
                return path
            if _type(path) is _bytes:
                return _fsdecode(path)
            return _fsdecode(_fspath(path))

        def fd_target(fd):
            try:
                return _readlink("/proc/self/fd/%d" % fd)
            except _BaseException:
                return None

        def resolve(path, dir_fd=None):
            if _isinstance(path, _int):  # a file descriptor: what it refers to
                target = fd_target(path)
                return None if target is None or not target.startswith("/") else _realpath(target)
            p = text(path)
            if dir_fd is not None and dir_fd not in (-1, -100) and not p.startswith("/"):  # none, AT_FDCWD
                base = fd_target(dir_fd)
                if base is None or not base.startswith("/"):
                    return None
                p = base + "/" + p
            return _realpath(p)

        def inside(p):
            if p is None:
                return False
            for r in ROOTS:
                if p == r or p.startswith(r + "/"):
                    return True
            return p == "/dev/null"

        def std_stream(p):
            # /dev/stdout, /dev/fd/2, /proc/self/fd/1 ...: allowed when that descriptor is a pipe
            if p.startswith("/dev/") and p[5:] in STD:
                fd = STD[p[5:]]
            elif p.startswith("/dev/fd/") and p[8:].isdigit():
                fd = _int(p[8:])
            elif p.startswith("/proc/self/fd/") and p[14:].isdigit():
                fd = _int(p[14:])
            else:
                return False
            t = fd_target(fd)
            return t is not None and (t.startswith("pipe:") or t.startswith("socket:") or t == "/dev/null"
                                      or inside(_realpath(t)))

        def check_write(path, dir_fd, what):
            if _isinstance(path, _int):
                ok = inside(resolve(path))
            else:
                p = text(path)
                ok = std_stream(p) or inside(resolve(p, dir_fd))
            if not ok:
                refuse(what + " " + _repr(path if _isinstance(path, _int) else text(path)))

        def count_write():
            if _next(opens) > MAX_OPENS:
                refuse("opening files for writing more than %d times" % MAX_OPENS)

        def check_read(path):
            if _isinstance(path, _int):
                return
            p = _realpath(text(path)).split("/")
            if _len(p) > 2 and p[1] == "proc" and p[2].isdigit():
                if _int(p[2]) != _getpid() or p[-1] == "mem":
                    refuse("reading " + _repr(text(path)))

        def hook(event, args):
            if event in DENY:
                refuse(event)
            elif event == "open":
                path, flags = args[0], args[2]
                if flags & W:
                    if not _isinstance(path, _int):
                        check_write(path, None, "writing")
                        count_write()
                else:
                    check_read(path)
            elif event == "object.__getattr__":
                if _len(args) > 1 and args[1] in FRAME_ATTRS:
                    raise SandboxHidden("sandbox: frames are hidden (." + _str(args[1]) + ")")
            elif event == "object.__setattr__":
                if _len(args) > 1 and args[1] == "__code__":
                    refuse("replacing a function's __code__")
            elif event in HIDE:
                raise SandboxHidden("sandbox: frames are hidden (" + event + ")")
            elif event == "import":
                name = args[0]
                if name in NO_IMPORT or (_type(name) is _str and name.startswith("_test")):
                    refuse("import " + _str(name))
                filename = args[1] if _len(args) > 1 else None
                if filename is not None:  # an extension module, from _imp.create_dynamic
                    p = _realpath(text(filename))
                    if DYNLOAD is None or not p.startswith(DYNLOAD + "/"):
                        refuse("loading the extension module " + _repr(p))
            elif event in PATHS:
                for i, j in PATHS[event]:
                    if i < _len(args):
                        check_write(args[i], args[j] if j is not None and j < _len(args) else None, event + " on")
                if event == "os.mkdir":
                    count_write()
            elif event == "mtp.open":
                path, flags, mode, dir_fd, box = args
                if flags & W:
                    check_write(path, dir_fd, "writing")
                    count_write()
                elif dir_fd is None:
                    check_read(path)
                box.append(_posix_open(path, flags, mode, dir_fd=dir_fd))
            elif event == "mtp.signal":
                signalnum, handler, box = args
                box.append(_real_signal(signalnum, _strip(handler) if _callable(handler) else handler))
            elif event == "mtp.create_builtin":
                spec, box = args
                name = _getattr(spec, "name", None)
                if _type(name) is not _str or name in FRESH_BUILTIN or name in _sys.modules:
                    refuse("a second copy of the module " + _repr(name))
                s = Spec()
                s.name = name
                box.append(_real_create_builtin(s))
            elif event == "mtp.exec_builtin":
                mod, box = args
                name = _getattr(mod, "__name__", None)
                if _type(name) is not _str or name in FRESH_BUILTIN:
                    refuse("re-initialising the module " + _repr(name))
                box.append(_real_exec_builtin(mod))

        for mod in (os, posix):
            mod.open = _mtp_open
            for name in ("mkfifo", "mknod", "pidfd_open", "chroot", "setuid", "setgid", "setresuid",
                         "setresgid", "setreuid", "setregid", "setgroups", "memfd_create", "openpty",
                         "login_tty"):
                if hasattr(mod, name):
                    setattr(mod, name, _mtp_refusal("os." + name))
            mod._exit = _mtp_exit_early
        _signal.signal = _mtp_signal
        if hasattr(_signal, "pidfd_send_signal"):
            _signal.pidfd_send_signal = _mtp_refusal("signal.pidfd_send_signal")
        _imp.create_builtin = _mtp_create_builtin
        _imp.exec_builtin = _mtp_exec_builtin
        sys.pycache_prefix = "/nonexistent/mtp-sandbox"  # no .pyc is read: marshal.loads is refused
        sys.addaudithook(hook)
        del hook, mod

    main = _type(sys)("__main__")
    _sys.modules["__main__"] = main
    _sys.argv = ["program.py"]
    try:
        for code in codes:
            _exec(code, main.__dict__)
    except _BaseException as e:
        del codes, main
        where = None
        try:
            tb = e.__traceback__
            while tb is not None:  # the line that raised (program.py's numbering)
                if tb.tb_next is None:
                    n = tb.tb_lineno
                    where = lines[n - 1].strip() if _type(n) is _int and 0 < n <= _len(lines) else None
                tb = tb.tb_next
            if C_TRACEBACK:  # printed in C, without the frames the hook hides, nor ours
                e = e.with_traceback(e.__traceback__.tb_next)
                _sys.__excepthook__(_type(e), e, e.__traceback__)
        except _BaseException:
            pass
        try:
            msg = _str(e).strip().splitlines()
            msg = msg[0][:200] if msg else ""
        except _BaseException:
            msg = ""
        if _isinstance(e, _AssertionError):
            finish("failed", (where or "AssertionError") + (" (" + msg + ")" if msg else ""))
        try:
            name = _str(_type(e).__name__)
        except _BaseException:
            name = "exception"
        finish("error", name + (": " + msg if msg else ""))
    finish("passed")


def _mtp_strip(handler):
    def handler_without_frame(signum, frame):
        return handler(signum, None)
    return handler_without_frame


def _tuple_of(names):
    return tuple(str(n) for n in names)


if __name__ == "__main__":  # run with -c; importing this file (a package walk) must do nothing
    _sandbox()
