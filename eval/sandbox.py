"""Run untrusted, model-written Python and say whether it ran to the end: the engine of HumanEval/MBPP pass@1.

Each program runs in its own fresh temporary folder (its cwd, HOME and TMPDIR), in a new session, under a
supervisor process (:mod:`eval.sandbox_child`) that kills and reaps the whole process tree after a wall-clock
timeout. Layers, from strongest:

* resource limits (``RLIMIT_AS`` memory, ``RLIMIT_CPU``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``);
* when the harness runs as root: a separate unprivileged uid per worker slot, so ``RLIMIT_NPROC`` applies (root is
  exempt from it) and nothing outside the folder is writable; ``no_new_privs`` so setuid binaries give nothing back;
* when the kernel allows it (root, or unprivileged user namespaces): a fresh network namespace, i.e. no network;
* always: a Python-level guard (sockets, writes/deletes outside the folder, subprocesses, signals) — a tripwire for
  accidents, not a boundary (ctypes walks around it);
* the supervisor's SIGKILL of every descendant, plus the session's process group as a backstop.

A program passes only if it exits 0 *and* the supervisor's end-of-program nonce is its last output line, so an early
``exit(0)`` is a failure. POSIX (Linux) only.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from tqdm.auto import tqdm

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
TIMEOUT_STATUS = 124
SETUP_FAILED_STATUS = 125
ENV_MARKER = "BALORA_SANDBOX"  # in every sandboxed process's environment, so tests can look for leftovers
_TAIL = 4000


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): every result would be wrong, so the run stops."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 16  # processes + threads of the program's uid (its own slot when run as root)
    max_file_mb: int = 64
    max_open_files: int = 256


@dataclass(frozen=True)
class Result:
    status: str  # "passed" | "failed" | "timeout"
    returncode: int
    duration_s: float
    stdout: str
    stderr: str

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


class Sandbox:
    """Runs programs under :class:`Limits`, ``workers`` at a time (threads, each waiting on one subprocess)."""

    def __init__(self, limits: Limits = Limits(), workers: int | None = None, isolate_network: bool = True,
                 python_guard: bool = True):
        if os.name != "posix" or not sys.platform.startswith("linux"):
            raise RuntimeError("The code sandbox needs Linux (process groups, rlimits, /proc).")
        self.limits = limits
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.isolate_network = isolate_network
        self.python_guard = python_guard
        self.as_root = os.geteuid() == 0
        # Interpreters installed under a 0700 home (pyenv in /root) stay readable through CAP_DAC_READ_SEARCH only.
        self._keep_read_search = self.as_root and not all(
            _world_traversable(p) for p in {sys.executable, sys.prefix, sys.base_prefix, CHILD, *sys.path} if p
            and os.path.exists(p))
        # One uid per worker slot: RLIMIT_NPROC counts per uid, so one program's fork loop cannot starve another's.
        base = 2_000_000 + (os.getpid() % 100_000) * 64
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(self.workers):
            self._slots.put(base + slot)

    def run(self, program: str) -> Result:
        uid = self._slots.get()
        try:
            return self._run(program, uid if self.as_root else None)
        finally:
            self._slots.put(uid)

    def run_many(self, programs: list[str], desc: str = "executing") -> list[Result]:
        with ThreadPoolExecutor(self.workers) as pool:
            futures = [pool.submit(self.run, p) for p in programs]
            for _ in tqdm(as_completed(futures), total=len(futures), desc=desc, leave=False,
                          disable=len(programs) < 2):
                pass
            return [f.result() for f in futures]

    def _run(self, program: str, uid: int | None) -> Result:
        limits = self.limits
        nonce = secrets.token_hex(16)
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
            spec = dict(
                program=program_path, cwd=cwd, uid=uid, keep_read_search=self._keep_read_search,
                guard=self.python_guard, isolate_network=self.isolate_network,
                timeout_s=limits.timeout_s, cpu_s=max(1, int(limits.timeout_s) + 1),
                memory_bytes=limits.memory_mb * 2**20, file_bytes=limits.max_file_mb * 2**20,
                open_files=limits.max_open_files, nproc=nproc,
            )
            env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8", ENV_MARKER: nonce[:8],
                   # one BLAS thread: numpy's per-thread buffers would otherwise eat the address-space limit
                   "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            out_path, err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
            start = time.monotonic()
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", CHILD, json.dumps(spec)], stdin=subprocess.PIPE, stdout=out,
                    stderr=err, cwd=cwd, env=env, start_new_session=True, close_fds=True,
                )
                try:
                    proc.stdin.write((nonce + "\n").encode())
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                try:  # the supervisor enforces the timeout; this is the backstop if it is itself stuck
                    returncode = proc.wait(timeout=limits.timeout_s + 10)
                except subprocess.TimeoutExpired:
                    returncode = TIMEOUT_STATUS
                finally:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # the whole session's process group
                    except (ProcessLookupError, PermissionError):
                        pass
                    proc.wait()
            duration = time.monotonic() - start
            stdout, stderr = _tail(out_path), _tail(err_path)
        if returncode == SETUP_FAILED_STATUS and f"sandbox setup failed {nonce}" in stderr:
            raise SandboxError(f"The sandbox could not be set up (nothing was run): {stderr.strip()}")
        if returncode == TIMEOUT_STATUS:
            status = "timeout"
        elif returncode == 0 and stdout.rstrip("\n").rsplit("\n", 1)[-1] == nonce:
            status = "passed"
        else:
            status = "failed"
        return Result(status, returncode, duration, stdout.replace(nonce, "").rstrip("\n"), stderr)
