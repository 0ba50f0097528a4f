"""The code-execution sandbox: every kind of misbehaviour is contained and reported as a failure,
and a good program run right after it still passes."""

from __future__ import annotations

import base64
import os
import pathlib
import shutil
import subprocess
import time
import uuid

import pytest

from mtp.evals import sandbox
from mtp.evals.sandbox import LAYERS, SandboxUnavailable, isolation_status, run_many, run_program

STATUS = isolation_status()
BEST = next(layer for layer in LAYERS if not STATUS[layer])
AVAILABLE = [layer for layer in LAYERS if not STATUS[layer]]

GOOD = "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n"


def assert_good_still_passes():
    r = run_program(GOOD, timeout=5)
    assert r.passed and r.status == "passed" and r.output.strip() == "ok", r


def live_in_group(pgid: int) -> list[int]:
    """Processes (not zombies) whose process group is pgid."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_statuses_of_ordinary_programs():
    ok = run_program(GOOD)
    assert ok.passed and ok.status == "passed" and ok.detail == "" and ok.returncode == 0
    bad = run_program("def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n")
    assert not bad.passed and bad.status == "failed" and "add(2, 3) == 5" in bad.detail
    syntax = run_program("def add(a, b)\n    return a + b\n")
    assert not syntax.passed and syntax.status == "error" and "SyntaxError" in syntax.detail
    crash = run_program("x = {}['missing']\n")
    assert crash.status == "error" and "KeyError" in crash.detail
    # leaving early is not passing: the tests after it never ran
    for early in ("import sys\nsys.exit(0)\nassert False\n", "import os\nos._exit(0)\nassert False\n", "exit()\n"):
        r = run_program(early)
        assert not r.passed and r.status == "error", (early, r)


def test_infinite_loop_times_out():
    t0 = time.perf_counter()
    r = run_program("while True:\n    pass\n", timeout=1.0)
    assert time.perf_counter() - t0 < 3.0
    assert not r.passed and r.status == "timeout" and r.seconds < 3.0
    assert_good_still_passes()


@pytest.mark.parametrize("bomb", [
    "import os\nwhile True:\n    os.fork()\n",
    "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n",
    "import os\nwhile True:\n    os.posix_spawn('/bin/sh', ['sh', '-c', 'sleep 100'], {})\n",
])
def test_fork_bomb_is_refused(bomb):
    for layer in AVAILABLE:
        r = run_program("import os\nprint('PGID', os.getpgid(0), flush=True)\n" + bomb, timeout=5, isolation=layer)
        assert not r.passed and r.status == "blocked", (layer, r)
        if layer != "bwrap":  # bwrap's pids are another namespace's (and die with it)
            pgid = int(r.output.split()[r.output.split().index("PGID") + 1])
            assert live_in_group(pgid) == []
    assert_good_still_passes()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not os.path.isdir("/proc"),
                    reason="as a non-root user RLIMIT_NPROC = 0 already stops the children this test leaves behind")
def test_whole_process_group_is_killed_even_without_the_audit_hook(tmp_path):
    """The layer under the audit hook: children left behind (forked, started by subprocess, or
    gone to their own session) are all killed when the program ends, and when it times out."""
    prog = (
        "import os, subprocess, sys, time\n"
        "print('PGID', os.getpgid(0), flush=True)\n"
        "for _ in range(4):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "subprocess.Popen(['sleep', '60'])\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"  # leaves the process group: found by its working directory
        "    print('ESCAPED', os.getpid(), flush=True)\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "time.sleep(0.3)\n"
    )
    for src, timeout in ((prog, 5.0), (prog + "time.sleep(60)\n", 1.5)):
        t0 = time.perf_counter()
        r = run_program(src, timeout=timeout, guard=False, isolation="audit-hook")
        assert time.perf_counter() - t0 < timeout + 2
        assert r.status == ("passed" if timeout == 5.0 else "timeout"), r
        words = r.output.split()
        pgid = int(words[words.index("PGID") + 1])
        escaped = int(words[words.index("ESCAPED") + 1])
        deadline = time.time() + 2
        while (live_in_group(pgid) or alive(escaped)) and time.time() < deadline:
            time.sleep(0.05)
        assert live_in_group(pgid) == [] and not alive(escaped)
    assert_good_still_passes()


@pytest.mark.parametrize("alloc", ["b = b'x' * 50 * 2**30\n", "b = bytearray(50 * 2**30)\n"])
def test_huge_allocation_fails(alloc):
    r = run_program(alloc, timeout=5)
    assert not r.passed and r.status == "error" and "MemoryError" in r.detail
    assert_good_still_passes()


def test_writing_outside_the_temporary_directory_is_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("mine")
    keep_dir = tmp_path / "keepdir"
    keep_dir.mkdir()
    attempts = [
        f"open({str(target)!r}, 'w').write('x')\n",
        f"open({str(target)!r}, 'a').write('x')\n",
        f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))\n",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
        f"import pathlib\npathlib.Path({str(target)!r}).touch()\n",
        f"open({str(keep)!r}, 'r+').write('x')\n",
        f"import os\nos.remove({str(keep)!r})\n",
        f"import os\nos.rename({str(keep)!r}, {str(target)!r})\n",
        f"import os\nos.truncate({str(keep)!r}, 0)\n",
        f"import os\nos.chmod({str(keep)!r}, 0o777)\n",
        f"import os\nos.utime({str(keep)!r}, (0, 0))\n",
        f"import shutil\nshutil.rmtree({str(keep_dir)!r})\n",
        f"import shutil\nshutil.copy({str(keep)!r}, {str(target)!r})\n",
        f"import os\nos.mkdir({str(target)!r})\n",
        f"import os\nos.symlink('/etc/passwd', {str(target)!r})\n",
        f"import os\nos.link({str(keep)!r}, 'here')\n",  # a hard link would let it write the file
        f"import os\nos.symlink({str(keep)!r}, 'here')\nopen('here', 'w').write('x')\n",
        f"import os\nos.mkfifo({str(target)!r})\n",
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\nos.open('pwned.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)\n",
        "import os\nos.chdir('/')\n",
        # swallowing the refusal does not help
        f"try:\n    open({str(target)!r}, 'w')\nexcept Exception:\n    pass\n",
    ]
    for layer in AVAILABLE:
        results = run_many(attempts + [GOOD], timeout=5, workers=2, isolation=layer)
        for src, r in zip(attempts, results):
            if layer == "bwrap" and src.startswith("try:"):
                continue  # our /tmp is not there at all inside bwrap (its /tmp is private): nothing to refuse
            # ... so there the other writes fail with an OSError, or are refused; as nobody the
            # kernel may say no before the hook is asked
            assert not r.passed and r.status in (("blocked",) if layer == "audit-hook" else ("blocked", "error")), \
                (layer, src, r)
        assert results[-1].passed
    assert not target.exists() and not target.is_symlink()
    assert keep.read_text() == "mine" and keep_dir.is_dir()
    assert oct(keep.stat().st_mode & 0o777) != oct(0o777)


def test_writing_inside_the_temporary_directory_works_and_it_is_removed():
    src = ("import os\n"
           "open('a.txt', 'w').write('hello')\n"
           "os.mkdir('d')\n"
           "os.rename('a.txt', 'd/b.txt')\n"
           "assert open('d/b.txt').read() == 'hello'\n"
           "print('CWD', os.getcwd())\n")
    for layer in LAYERS:
        if STATUS[layer]:
            continue
        r = run_program(src, isolation=layer)
        assert r.passed and r.isolation == layer, r
        cwd = r.output.split()[r.output.split().index("CWD") + 1]
        if layer == "bwrap":  # a private tmpfs: nothing of it is visible here
            assert cwd == sandbox.BOX_DIR
        else:
            assert os.path.basename(cwd).startswith("mtp-sandbox-") and not os.path.exists(cwd)


def test_disk_use_is_bounded():
    many = run_program("for i in range(1000):\n    open(f'f{i}', 'w').write('x')\n", max_files=32)
    assert many.status == "blocked" and "for writing more than 32 times" in many.detail
    big = run_program("open('big', 'w').write('x' * 20 * 2**20)\n", file_mb=8)
    assert not big.passed and big.status == "error" and "File too large" in big.detail
    assert_good_still_passes()


def test_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("MTP_TEST_SECRET", "hunter2-secret-value")
    r = run_program("import os\nprint(dict(os.environ))\nassert 'MTP_TEST_SECRET' not in os.environ\n")
    assert r.passed, r
    assert "hunter2" not in r.output and "PATH" not in r.output
    # nor through our own /proc entry
    r = run_program("import os\nprint(open(f'/proc/{os.getppid()}/environ').read())\n")
    assert not r.passed and r.status == "blocked" and "hunter2" not in r.output
    assert_good_still_passes()


def test_os_system_does_not_run(tmp_path):
    target = tmp_path / "touched"
    r = run_program(f"import os\nos.system('touch {target}')\n")
    assert not r.passed and r.status == "blocked" and "os.system" in r.detail
    time.sleep(0.1)
    assert not target.exists()
    assert_good_still_passes()


def test_other_audited_operations_are_refused():
    attempts = [
        "import os\nos.execv('/bin/true', ['true'])\n",
        "import os\nos.spawnv(os.P_WAIT, '/bin/true', ['true'])\n",
        "import os\nos.forkpty()\n",
        "import os\nos.kill(os.getppid(), 0)\n",
        "import os\nos.killpg(os.getpgid(0), 0)\n",
        "import socket\nsocket.socket()\n",
        "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
        "import socket\nsocket.getaddrinfo('localhost', 80)\n",
        "import ctypes\n",
        "import importlib\nimportlib.import_module('_ctypes')\n",
        "import resource\nresource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n",
        "import fcntl, termios\nfcntl.ioctl(1, termios.FIONREAD, b'    ')\n",
        "import syslog\nsyslog.syslog('x')\n",
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), 0)\n",
        "import sys\ndel sys.modules['posix']\nimport posix\n",
    ]
    results = run_many(attempts + [GOOD], timeout=5, workers=2)
    for src, r in zip(attempts, results):
        assert not r.passed and r.status == "blocked", (src, r)
    assert results[-1].passed


def test_very_large_output_is_capped_and_never_hangs():
    t0 = time.perf_counter()
    big = run_program("import sys\nsys.stdout.write('x' * 50_000_000)\n", timeout=10, max_output=10_000)
    assert big.passed, big
    assert big.output.startswith("x" * 10_000) and len(big.output) < 11_000 and "dropped" in big.output
    endless = run_program("import sys\nwhile True:\n    sys.stdout.write('y' * 65536)\n", timeout=1.0,
                          max_output=10_000)
    assert endless.status == "timeout" and len(endless.output) < 11_000
    assert time.perf_counter() - t0 < 8
    assert_good_still_passes()


def test_run_many_keeps_order():
    progs = [f"assert {i} % 2 == 0\n" for i in range(6)]
    results = run_many(progs, timeout=5, workers=3)
    assert [r.passed for r in results] == [i % 2 == 0 for i in range(6)]
    assert [r.status for r in results] == ["passed", "failed"] * 3


# ---- the operating-system layer, the verdict, and the escapes of issue 13 ------------------------

@pytest.fixture(params=LAYERS)
def layer(request):
    """Each isolation layer this machine can run (the fallbacks forced by name); a layer that
    cannot run here is skipped, saying why."""
    if STATUS[request.param]:
        pytest.skip(f"the {request.param} layer cannot run on this machine: {STATUS[request.param]}")
    return request.param


def test_the_best_layer_runs_and_is_reported(monkeypatch):
    if shutil.which("bwrap"):
        assert STATUS["bwrap"] == "", STATUS["bwrap"]  # installed: it must work (user namespaces)
    r = run_program(GOOD)
    assert r.passed and r.isolation == BEST and r.to_dict()["isolation"] == BEST
    assert run_program(GOOD, guard=False, isolation="audit-hook").isolation == "none"
    # where bwrap is missing: "auto" falls back, and asking for it by name says why it cannot
    monkeypatch.setattr(sandbox, "_bwrap_status", lambda python: (None, "bubblewrap (bwrap) is not installed"))
    with pytest.raises(SandboxUnavailable, match="not installed"):
        run_program(GOOD, isolation="bwrap")
    fallback = run_program(GOOD)
    assert fallback.passed and fallback.isolation == ("uid" if not STATUS["uid"] else "audit-hook")
    monkeypatch.setattr(sandbox, "_uid_status", lambda python: (None, "needs root"))
    assert run_program(GOOD).isolation == "audit-hook"
    with pytest.raises(ValueError, match="isolation must be"):
        run_program(GOOD, isolation="docker")


def test_tests_run_after_the_program_and_are_compiled_on_their_own(layer):
    ok = run_program("def f():\n    return 1\n", tests="assert f() == 1\n", isolation=layer)
    assert ok.passed, ok
    bad = run_program("def f():\n    return 2\n", tests="\nassert f() == 1\n", isolation=layer)
    assert bad.status == "failed" and bad.detail == "assert f() == 1", bad
    # an unclosed string cannot swallow the tests
    swallow = run_program("def f():\n    return 2\nx = '''\n", tests="assert f() == 1\n'''\n", isolation=layer)
    assert not swallow.passed and swallow.status == "error" and "SyntaxError" in swallow.detail


BENIGN = [
    "import tempfile, os\nwith tempfile.TemporaryDirectory() as d:\n    open(os.path.join(d, 'x'), 'w').write('1')\n"
    "    os.mkdir(os.path.join(d, 'sub'))\nassert not os.path.exists(d)\n",
    "import tempfile\nwith tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\n",
    "f = open('/dev/stdout', 'w')\nf.write('to stdout\\n')\nf.flush()\nopen('/dev/stderr', 'w').write('to stderr\\n')\n",
    "import pathlib\np = pathlib.Path('x.txt')\np.write_text('hi')\nassert p.read_text() == 'hi'\np.unlink()\n",
    "import collections, typing, enum, dataclasses\nP = collections.namedtuple('P', 'a b')\nT = typing.TypeVar('T')\n"
    "E = enum.Enum('E', 'A B')\n@dataclasses.dataclass\nclass D:\n    x: int = 1\nassert P(1, 2).b == 2 and D().x == 1\n",
    "import logging\nlogging.warning('logged %d', 1)\n",
    "import signal\nhits = []\nsignal.signal(signal.SIGALRM, lambda s, f: hits.append(s))\nsignal.setitimer(signal.ITIMER_REAL, 0.01)\n"
    "import time\nt = time.time()\nwhile not hits and time.time() - t < 2:\n    pass\nassert hits == [signal.SIGALRM]\n",
    "import shutil, os\nos.makedirs('a/b')\nopen('a/b/c', 'w').write('x')\nshutil.rmtree('a')\nassert not os.path.exists('a')\n",
]


def test_benign_programs_pass(layer):
    results = run_many(BENIGN, timeout=5, workers=2, isolation=layer)
    for src, r in zip(BENIGN, results):
        assert r.passed, (layer, src, r)
    assert "to stdout" in results[2].output and "to stderr" in results[2].output


@pytest.fixture(scope="module")
def evil_extension(tmp_path_factory):
    """A C extension whose init calls _exit(0): loaded, it would end the process 'successfully'."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler here to build the extension")
    d = tmp_path_factory.mktemp("evil")
    (d / "evil.c").write_text("extern void _exit(int);\nvoid *PyInit_evil(void) { _exit(0); return 0; }\n")
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(d / "evil.so"), str(d / "evil.c")], check=True)
    return base64.b64encode((d / "evil.so").read_bytes()).decode()


def forgeries(evil_b64):
    """Programs that try to pass without the tests passing (the tests always fail)."""
    return {
        "real exit saved in __main__": "import __main__\n__main__._real_exit(0)\n",
        "deny list in __main__ emptied": "import __main__\n__main__._DENY = frozenset()\n__main__._state = {}\n"
                                         "import os\nos._exit(0)\n",
        "C extension written here": f"import base64, sys, os\nopen('evil.so', 'wb').write(base64.b64decode({evil_b64!r}))\n"
                                    "sys.path.insert(0, os.getcwd())\nimport evil\n",
        "fresh posix via _imp": "import _imp, importlib.machinery as m\n_imp.create_builtin(m.ModuleSpec('posix', None))._exit(0)\n",
        "reload posix": "import importlib, posix\nimportlib.reload(posix)\nposix._exit(0)\n",
        "a report line of its own": "import os\nfd = int(open('/proc/self/cmdline').read().split('\\0')[-2])\n"
                                    "os.write(fd, b'0123456789abcdef0123456789abcdef passed \\n')\nos.write(1, b'WROTE\\n')\n",
        "frames from a traceback": "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    f = e.__traceback__.tb_frame\n"
                                   "print(f.f_back.f_locals['nonce'])\n",
        "frames from sys._getframe": "import sys\nprint(sys._getframe(1).f_locals['nonce'])\n",
        "frames from a signal handler": "import signal, time\nfound = []\n"
                                        "def h(sig, frame):\n    while frame is not None:\n"
                                        "        found.extend(k for k in frame.f_locals if k == 'nonce')\n        frame = frame.f_back\n"
                                        "signal.signal(signal.SIGALRM, h)\nsignal.setitimer(signal.ITIMER_REAL, 0.01)\ntime.sleep(0.1)\n"
                                        "print('FOUND' if found else 'NOTHING')\n",
        "a tracer jumping over the tests": "import sys\nsys.settrace(lambda *a: None)\n",
        "heap walk": "import gc\n[o for o in gc.get_objects() if isinstance(o, dict) and 'nonce' in o]\n",
        "forged bytecode": "import marshal\nmarshal.loads(marshal.dumps(compile('1', 'x', 'eval')))\n",
    }


def test_the_verdict_cannot_be_forged(layer, evil_extension):
    cases = forgeries(evil_extension)
    results = run_many(list(cases.values()), timeout=5, workers=2, isolation=layer,
                       tests=["assert False, 'the tests ran and failed'\n"] * len(cases))
    for (name, src), r in zip(cases.items(), results):
        assert not r.passed, (layer, name, r)
        assert "nonce" not in r.output.replace("'nonce'", ""), (name, r.output)
    by = dict(zip(cases, results))
    assert by["C extension written here"].status == "blocked" and "extension" in by["C extension written here"].detail
    assert "WROTE" in by["a report line of its own"].output  # it did write: the parent did not believe it
    assert by["frames from a signal handler"].status == "failed" and "NOTHING" in by["frames from a signal handler"].output
    # without the audit hook the process can reach a real exit(0), or load the extension: still no pass
    for src in ("import os\nos._exit(0)\n", cases["C extension written here"]):
        r = run_program(src, tests="assert False\n", guard=False, isolation=layer)
        assert not r.passed and r.status == "error" and "before the tests finished" in r.detail, (layer, r)


def test_deny_list_in_main_cannot_be_emptied(layer, tmp_path):
    target = tmp_path / "touched"
    r = run_program(f"import __main__\n__main__._DENY = frozenset()\n__main__._NO_IMPORT = frozenset()\n"
                    f"import os\nos.system('touch {target}')\n", isolation=layer)
    assert r.status == "blocked" and "os.system" in r.detail, r
    assert not target.exists()


def _shm_names():
    return {p.name for p in pathlib.Path("/dev/shm").iterdir()} if os.path.isdir("/dev/shm") else set()


def library_escapes(tmp_path):
    """(name, program, escaped?) for the ordinary library calls that wrote outside the old sandbox."""
    tag = uuid.uuid4().hex[:8]
    db, vac, victim = tmp_path / f"x{tag}.db", tmp_path / f"v{tag}.db", tmp_path / f"hist{tag}"
    victim.write_text("precious")
    shm_victim = pathlib.Path(f"/dev/shm/mtp-victim-{tag}")
    shm_victim.write_text("mine")
    before = _shm_names()
    return [
        ("sqlite3.connect outside", f"import sqlite3\nsqlite3.connect({str(db)!r}).execute('create table t(x)')\n",
         lambda: db.exists()),
        ("VACUUM INTO outside", f"import sqlite3\nc = sqlite3.connect(':memory:')\nc.execute('create table t(x)')\n"
                                f"c.execute(\"VACUUM INTO '{vac}'\")\n", lambda: vac.exists()),
        ("readline history over a file", f"import readline\nreadline.add_history('x')\n"
                                         f"readline.write_history_file({str(victim)!r})\n",
         lambda: victim.read_text() != "precious"),
        ("shm_open + write", f"import _posixshmem, os\nfd = _posixshmem.shm_open('/mtp-{tag}', os.O_CREAT | os.O_RDWR, 0o600)\n"
                             "os.write(fd, b'x' * 2**20)\n", lambda: bool(_shm_names() - before - {shm_victim.name})),
        ("shm_unlink of a file there", f"import _posixshmem\n_posixshmem.shm_unlink('/{shm_victim.name}')\n",
         lambda: not shm_victim.exists()),
        ("SemLock", f"import _multiprocessing\n_multiprocessing.SemLock(1, 1, 1, '/mtp-{tag}', False)\n",
         lambda: bool(_shm_names() - before - {shm_victim.name})),
    ]


def test_library_calls_cannot_write_outside(layer, tmp_path):
    cases = library_escapes(tmp_path)
    guards = (True, False) if layer == "bwrap" else (True,)  # bwrap holds them without the hook too
    try:
        for guard in guards:
            results = run_many([src for _, src, _ in cases], timeout=5, workers=2, isolation=layer, guard=guard)
            for (name, src, escaped), r in zip(cases, results):
                assert not escaped(), (layer, guard, name, r)
                if layer != "bwrap":
                    assert r.status == "blocked", (layer, name, r)
    finally:
        for p in pathlib.Path("/dev/shm").glob("*mtp-*"):
            p.unlink()


FILL = ("import os\nn = 0\nkeep = []\ntry:\n    for i in range(100):\n        f = open('f', 'wb')\n"
        "        f.write(b'x' * 2**20)\n        f.flush()\n        if i % 2:\n            os.rename('f', 'g%d' % i)\n"
        "            f.close()\n        else:\n            os.unlink('f')\n            keep.append(f)\n        n += 1\n"
        "finally:\n    print('WROTE', n, flush=True)\n")  # renamed and unlinked-but-open files, 1 MiB each


def test_disk_use_is_bounded_in_total(layer):
    guards = (True, False) if layer == "bwrap" else (True,)
    for guard in guards:
        r = run_program(FILL, timeout=10, file_mb=1, disk_mb=8, max_files=32, isolation=layer, guard=guard)
        words = r.output.split()
        wrote = int(words[words.index("WROTE") + 1])
        assert not r.passed, r
        # the kernel's tmpfs (bwrap), or the hook's count of opens for writing
        assert wrote <= (8 if not guard else 32), (layer, guard, wrote, r)


@pytest.mark.skipif(bool(STATUS["bwrap"]), reason=f"the bwrap layer cannot run here: {STATUS['bwrap']}")
def test_bwrap_layer_no_network_read_only_root_and_nothing_left_running():
    tag = f"60.{uuid.uuid4().int % 10**6:06d}"
    prog = ("import os, socket\n"
            "print('IFACES', sorted(n for _, n in socket.if_nameindex()), flush=True)\n"
            "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=1)\nexcept OSError as e:\n    print('NONET', flush=True)\n"
            "for p in ('/etc/mtp-probe', '/usr/mtp-probe', '/var/mtp-probe'):\n"
            "    try:\n        open(p, 'w')\n    except OSError as e:\n        print('RO', e.errno, flush=True)\n"
            "print('UID', os.getuid(), 'PID', os.getpid(), flush=True)\n"
            f"for _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n        os.execv('/bin/sleep', ['sleep', '{tag}'])\n")
    r = run_program(prog, timeout=5, guard=False, isolation="bwrap")
    assert r.passed, r
    assert "IFACES ['lo']" in r.output and "NONET" in r.output and r.output.count("RO 30") == 3, r.output
    assert f"UID {sandbox.NOBODY}" in r.output
    time.sleep(0.2)
    left = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and tag in open(f"/proc/{entry}/cmdline").read():
                left.append(entry)
        except OSError:
            pass
    assert left == []
