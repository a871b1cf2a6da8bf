"""One run per stage directory (issue 15, "Why" item 7), with two real processes: the second
is refused naming the holder's host and PID; the lock of a killed holder is taken over."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from pipeline import config, manifest

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pipeline import manifest
    with manifest.stage_lock(Path(sys.argv[1]), "prepare"):
        print("locked", flush=True)
        time.sleep(600)
""")


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock of ``tmp_path/tiny/prepare`` until killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "tiny" / "prepare")], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "locked\n"
    yield process
    process.kill()
    process.wait()


def _cfg(root):
    return config.load(overrides=[f"experiment.runs_dir={root}"])


def test_a_second_run_is_refused_naming_the_holder_and_changes_nothing(tmp_path, holder):
    directory = tmp_path / "tiny" / "prepare"
    manifest.write(directory, {"status": manifest.COMPLETE})
    before = (directory / manifest.MANIFEST).read_bytes()
    with (
        pytest.raises(
            manifest.StageBusyError,
            match=rf"locked by host {socket.gethostname()} pid {holder.pid} since .*in progress",
        ),
        manifest.stage_run(_cfg(tmp_path), "prepare", ("data",)),
    ):
        raise AssertionError("the body must not run")
    assert (directory / manifest.MANIFEST).read_bytes() == before


def test_the_lock_of_a_killed_holder_is_taken_over_and_released_on_exit(tmp_path, holder, caplog):
    directory = tmp_path / "tiny" / "prepare"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with manifest.stage_lock(directory, "prepare"):
        assert f"pid {os.getpid()}" in (directory / manifest.LOCK).read_text()
    assert f"taking over the lock of host {socket.gethostname()} pid {holder.pid}" in caplog.text
    assert (directory / manifest.LOCK).read_text() == ""
    with manifest.stage_lock(directory, "prepare"):  # released: taken again without a warning
        pass
