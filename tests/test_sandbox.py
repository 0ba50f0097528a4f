"""The code-execution sandbox: every kind of misbehaviour is contained and reported as a failure,
and a good program run right after it still passes."""

from __future__ import annotations

import os
import time

import pytest

from mtp.evals.sandbox import run_many, run_program

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
    r = run_program("import os\nprint('PGID', os.getpgid(0), flush=True)\n" + bomb, timeout=5)
    assert not r.passed and r.status == "blocked", r
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
        r = run_program(src, timeout=timeout, guard=False)
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
    results = run_many(attempts + [GOOD], timeout=5, workers=2)
    for src, r in zip(attempts, results):
        assert not r.passed and r.status == "blocked", (src, r)
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
    r = run_program(src)
    assert r.passed, r
    cwd = r.output.split()[r.output.split().index("CWD") + 1]
    assert os.path.basename(cwd).startswith("mtp-sandbox-") and not os.path.exists(cwd)


def test_disk_use_is_bounded():
    many = run_program("for i in range(1000):\n    open(f'f{i}', 'w').write('x')\n", max_files=32)
    assert many.status == "blocked" and "more than 32 files" in many.detail
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
