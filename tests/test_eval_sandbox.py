"""Hostile programs are contained and scored as failures, while the programs around them still pass.

Everything is bounded so the (shared) machine stays safe: a 3 s timeout, 1 GB address space, at most 16 processes
per program; the unbounded fork loop only runs after a bounded probe shows the process limit really bites.
"""

import os
import socket
import time

import pytest

from eval.sandbox import ENV_MARKER, Limits, Sandbox, SandboxError

pytestmark = pytest.mark.skipif(not os.uname().sysname == "Linux", reason="the sandbox is Linux-only")

LEGIT = "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n"


def leftover_sandbox_processes() -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if f"{ENV_MARKER}=".encode() in f.read():
                        count += 1
            except OSError:
                pass
    return count


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    yield server
    server.close()


def received_connection(server) -> bool:
    try:
        conn, _ = server.accept()
        conn.close()
        return True
    except socket.timeout:
        return False


@pytest.fixture
def outside(tmp_path):
    """A folder outside every sandbox folder, with a sentinel file in it."""
    folder = tmp_path / "outside"
    folder.mkdir()
    sentinel = folder / "sentinel.txt"
    sentinel.write_text("precious")
    return folder, sentinel


def process_limit_bites(sandbox: Sandbox) -> bool:
    """Bounded probe: try 40 forks (children sleep, then the supervisor kills them); the limit is 16."""
    probe = ("import ctypes, time\nlibc = ctypes.CDLL(None)\nn = 0\nfor _ in range(40):\n    pid = libc.fork()\n"
             "    if pid == 0:\n        time.sleep(30)\n        libc._exit(0)\n    n += pid > 0\nprint('forked', n)\n")
    result = sandbox.run(probe)
    forked = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("forked")]
    return result.passed and forked and forked[0] < 40


def test_hostile_programs_are_contained_and_fail_while_the_run_goes_on(listener, outside):
    folder, sentinel = outside
    port = listener.getsockname()[1]
    sandbox = Sandbox(Limits(timeout_s=3.0, memory_mb=1024, max_processes=16), workers=4)
    assert process_limit_bites(sandbox), "RLIMIT_NPROC does not bite here: refusing to run a fork loop"
    hostile = {
        "infinite loop": "while True:\n    pass\n",
        "fork loop": "import os\nwhile True:\n    os.fork()\n",
        # ctypes walks around the Python guard: only the process limit and the tree kill contain this one,
        # and setsid() takes each child out of the session's process group.
        "raw fork loop": "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    if libc.fork() == 0:\n"
                         "        libc.setsid()\n",
        "10 GB allocation": "block = bytearray(10 * 1024 ** 3)\nprint(len(block))\n",
        "write outside": f"open({str(sentinel)!r}, 'w').write('pwned')\n",
        "create outside": f"import pathlib\npathlib.Path({str(folder / 'new.txt')!r}).write_text('x')\n",
        "delete outside": f"import os\nos.remove({str(sentinel)!r})\n",
        "rmtree outside": f"import shutil\nshutil.rmtree({str(folder)!r})\n",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n",
        "subprocess": "import subprocess\nsubprocess.run(['rm', '-rf', '/tmp'])\n",
    }
    programs = [LEGIT, *hostile.values(), LEGIT]
    start = time.monotonic()
    results = sandbox.run_many(programs)
    elapsed = time.monotonic() - start
    named = dict(zip(hostile, results[1:-1]))

    assert results[0].passed and results[-1].passed and results[0].stdout == "ok"
    assert {name: r.status for name, r in named.items() if r.passed} == {}
    assert named["infinite loop"].status == "timeout" and named["infinite loop"].duration_s < 3.0 + 5
    assert named["raw fork loop"].status == "timeout"
    assert "PermissionError" in named["fork loop"].stderr
    assert "MemoryError" in named["10 GB allocation"].stderr
    assert "PermissionError" in named["socket"].stderr
    assert elapsed < 60, "the hostile programs held up the run"
    assert sentinel.read_text() == "precious"
    assert sorted(p.name for p in folder.iterdir()) == ["sentinel.txt"]
    assert not received_connection(listener)
    time.sleep(0.2)
    assert leftover_sandbox_processes() == 0


def test_each_program_gets_a_fresh_private_folder():
    sandbox = Sandbox(Limits(timeout_s=5.0), workers=2)
    program = ("import os, tempfile\nassert os.listdir('.') == ['program.py'], os.listdir('.')\n"
               "assert os.path.expanduser('~') == os.getcwd() == os.path.realpath(tempfile.gettempdir())\n"
               "open('scratch.txt', 'w').write('mine')\nprint(os.getcwd())\n")
    first, second = sandbox.run_many([program, program])
    assert first.passed and second.passed, (first.stderr, second.stderr)
    assert first.stdout != second.stdout
    assert not os.path.exists(first.stdout)  # removed after the run


@pytest.mark.skipif(os.geteuid() != 0, reason="the OS layers (own uid, network namespace) need root")
def test_os_layers_hold_without_the_python_guard(listener, outside):
    """With the Python tripwires off, the separate uid and the network namespace still stop the same programs."""
    folder, sentinel = outside
    port = listener.getsockname()[1]
    sandbox = Sandbox(Limits(timeout_s=5.0), workers=3, python_guard=False)
    who, write, remove, connect = sandbox.run_many([
        "import os\nprint(os.getuid())\n",
        f"open({str(sentinel)!r}, 'w').write('pwned')\n",
        f"import os\nos.remove({str(sentinel)!r})\n",
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
    ])
    assert who.passed and int(who.stdout) != 0
    assert not write.passed and "Permission denied" in write.stderr
    assert not remove.passed and "Permission denied" in remove.stderr
    assert not connect.passed and ("unreachable" in connect.stderr or "refused" in connect.stderr)
    assert sentinel.read_text() == "precious"
    assert not received_connection(listener)


def test_a_broken_sandbox_stops_the_run_instead_of_failing_every_sample():
    # Three descriptors allowed: the worker cannot even open the program. That is the harness's fault, not the
    # program's, so it must not be scored as a failure.
    with pytest.raises(SandboxError, match="could not be set up"):
        Sandbox(Limits(max_open_files=3)).run(LEGIT)
