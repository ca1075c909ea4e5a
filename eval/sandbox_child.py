"""The process that runs one untrusted program: started by :mod:`eval.sandbox`, never imported by the harness.

Run as ``python -I -B sandbox_child.py SPEC_JSON`` in a new session, with a nonce on stdin. Standard library only,
since it must start fast and trust nothing outside itself.

Two processes, so that whatever the program does, someone privileged is left to clean up:

* the **supervisor** (this process, the session leader) makes itself a child subreaper, so every orphan the program
  leaves (double forks, ``setsid`` escapes) is reparented to it; enters a fresh network namespace when allowed;
  forks the worker; waits at most ``timeout_s``; then SIGKILLs every descendant still alive, reaps them all, and
  exits with the worker's status (124 on timeout).
* the **worker** sets resource limits, drops to a per-slot unprivileged uid when started as root (so that
  RLIMIT_NPROC and file permissions bite: the kernel exempts root from RLIMIT_NPROC), installs the Python-level
  guard, runs the program as ``__main__`` and, only if it ran to the end, prints the nonce. A program that calls
  ``exit(0)`` half way therefore does not pass.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time
import traceback

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
PR_SET_KEEPCAPS = 8
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
CAP_DAC_READ_SEARCH = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
TIMEOUT_STATUS = 124
SETUP_FAILED_STATUS = 125

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option, arg):
    return _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def _unshare(flags: int) -> bool:
    if hasattr(os, "unshare"):  # Python >= 3.12
        try:
            os.unshare(flags)
            return True
        except OSError:
            return False
    return _libc.unshare(ctypes.c_int(flags)) == 0


def _enter_network_namespace() -> bool:
    """A namespace with only a (down) loopback: no route anywhere, not even to the host's 127.0.0.1.

    Root may create one directly; other users only inside a new user namespace, where the kernel allows that.
    """
    return _unshare(CLONE_NEWNET) or _unshare(CLONE_NEWUSER | CLONE_NEWNET)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _keep_only_read_search() -> None:
    """Effective = permitted = {CAP_DAC_READ_SEARCH}: read the interpreter under a 0700 home, write nothing."""
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = 1 << CAP_DAC_READ_SEARCH
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _set_limits(spec: dict) -> None:
    def cap(kind, value):
        resource.setrlimit(kind, (value, value))  # soft == hard: the program cannot raise it back

    cap(resource.RLIMIT_AS, spec["memory_bytes"])
    cap(resource.RLIMIT_CPU, spec["cpu_s"])
    cap(resource.RLIMIT_FSIZE, spec["file_bytes"])
    cap(resource.RLIMIT_NOFILE, spec["open_files"])
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_NPROC, spec["nproc"])


def _drop_privileges(uid: int, keep_read_search: bool) -> None:
    if keep_read_search:
        _prctl(PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if keep_read_search:
        _keep_only_read_search()


def _install_guard(root: str) -> None:
    """Python-level tripwires against programs that write or delete outside ``root``, spawn, signal or open sockets.

    This is NOT a security boundary: ctypes, ``_io.FileIO`` or raw syscalls walk around it. It turns the accidents
    a model's code makes (``shutil.rmtree('/')``, ``os.system``, ``requests.get``) into a clean PermissionError. The
    boundary is below it: the separate uid (no write access to anything it does not own), the rlimits, the network
    namespace and the supervisor's kill of the whole process tree.
    """
    import builtins
    import io
    import posix
    import shutil
    import socket
    import subprocess
    import _socket

    root = os.path.realpath(root)

    def deny(what):
        def denied(*args, **kwargs):
            raise PermissionError(f"{what} is disabled in the sandbox")

        return denied

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):
            return True  # an already open descriptor
        path = os.fsdecode(path)
        if dir_fd is not None and not os.path.isabs(path):
            base = os.readlink(f"/proc/self/fd/{dir_fd}")
        else:
            base = os.getcwd()
        full = os.path.realpath(os.path.join(base, path))
        return full == root or full.startswith(root + os.sep) or full == os.devnull

    def check(path, dir_fd=None):
        if not inside(path, dir_fd):
            raise PermissionError(f"writing outside the sandbox folder is disabled: {path!r}")

    real_open, real_os_open = builtins.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    builtins.open = io.open = guarded_open
    os.open = posix.open = guarded_os_open

    def one_path(name):
        real = getattr(os, name)

        def guarded(path, *args, dir_fd=None, **kwargs):
            check(path, dir_fd)
            if dir_fd is not None:
                kwargs["dir_fd"] = dir_fd
            return real(path, *args, **kwargs)

        return guarded

    def two_paths(name):
        real = getattr(os, name)

        def guarded(src, dst, *args, src_dir_fd=None, dst_dir_fd=None, **kwargs):
            check(src, src_dir_fd)
            check(dst, dst_dir_fd)
            return real(src, dst, *args, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, **kwargs)

        return guarded

    for name in ("remove", "unlink", "rmdir", "mkdir", "truncate", "chmod", "chown", "lchown", "utime", "mkfifo", "mknod"):
        if hasattr(os, name):
            guarded = one_path(name)
            setattr(os, name, guarded)
            setattr(posix, name, guarded)
    for name in ("rename", "replace", "link"):
        guarded = two_paths(name)
        setattr(os, name, guarded)
        setattr(posix, name, guarded)
    real_symlink = os.symlink

    def guarded_symlink(src, dst, target_is_directory=False, *, dir_fd=None):
        check(dst, dir_fd)
        return real_symlink(src, dst, target_is_directory, dir_fd=dir_fd)

    os.symlink = posix.symlink = guarded_symlink
    real_rmtree = shutil.rmtree

    def guarded_rmtree(path, *args, **kwargs):
        check(path)
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = guarded_rmtree

    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "setsid", "posix_spawn", "posix_spawnp",
                 "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"):
        if hasattr(os, name):
            setattr(os, name, deny(f"os.{name}"))
            if hasattr(posix, name):
                setattr(posix, name, deny(f"os.{name}"))

    class NoPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            raise PermissionError("subprocesses are disabled in the sandbox")

    subprocess.Popen = NoPopen

    # Subclasses rather than functions, so that modules subclassing socket.socket (ssl, ...) still import.
    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")

    class NoRawSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError("network access is disabled in the sandbox")

    socket.socket = socket.SocketType = NoSocket
    _socket.socket = _socket.SocketType = NoRawSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname",
                 "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(socket, name):
            setattr(socket, name, deny(f"socket.{name}"))


def _worker(spec: dict, nonce: str) -> None:
    """Runs in the forked child; never returns."""
    code = 1
    try:
        try:  # setup failures are the harness's problem, not the program's: say so, with the nonce as proof
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.chdir(spec["cwd"])
            _set_limits(spec)
            if spec["uid"] is not None:
                _drop_privileges(spec["uid"], spec["keep_read_search"])
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
            with open(spec["program"]) as f:
                source = f.read()
            if spec["guard"]:
                _install_guard(spec["cwd"])
        except BaseException as e:
            sys.stderr.write(f"sandbox setup failed {nonce}: {type(e).__name__}: {e}\n")
            code = SETUP_FAILED_STATUS
            return
        sys.argv = [spec["program"]]
        exec(compile(source, spec["program"], "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        sys.stdout.flush()
        sys.__stdout__.flush()
        os.write(1, f"\n{nonce}\n".encode())
        code = 0
    except SystemExit as e:  # the program exited before its end: never a pass
        code = e.code if isinstance(e.code, int) and 0 < e.code < TIMEOUT_STATUS else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _descendants(ancestor: int) -> list[int]:
    """Pids of all live descendants of ``ancestor``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [ancestor]
    while stack:
        for pid in children.get(stack.pop(), []):
            found.append(pid)
            stack.append(pid)
    return found


def _kill_tree() -> None:
    """SIGKILL every descendant and reap them; loops because a fork loop may be mid-fork during a pass."""
    me = os.getpid()
    for _ in range(1000):
        pids = _descendants(me)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:  # reap everything that is ours (orphans come to us: we are the subreaper)
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
        if not pids:
            time.sleep(0.005)
            if not _descendants(me):
                return
        time.sleep(0.002)


def _wait(pid: int, timeout: float) -> int | None:
    """The worker's wait status, or None if it is still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if fd is not None:
                select.select([fd], [], [], left)
            else:
                time.sleep(min(left, 0.01))
    finally:
        if fd is not None:
            os.close(fd)


def main() -> int:
    spec = json.loads(sys.argv[1])
    nonce = sys.stdin.readline().strip()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    if spec["isolate_network"]:
        _enter_network_namespace()
    if spec["uid"] is not None:
        os.chown(spec["cwd"], spec["uid"], spec["uid"])
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        _worker(spec, nonce)
    status = _wait(pid, spec["timeout_s"])
    _kill_tree()
    if status is None:
        return TIMEOUT_STATUS
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main())
