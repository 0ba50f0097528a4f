"""Helpers shared by the CLI tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from mtp.cli import main


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `mtp` with these arguments."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *needles):
    """Exit code 2, one `mtp: error:` line on stderr, no traceback, naming every needle."""
    assert rc == 2
    assert err.startswith("mtp: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for n in needles:
        assert n in err, err
