"""balora_trl.claims: how two workers of one benchmark command split its runs (claim files holding the owner's
pid)."""

import os
import subprocess
import sys

import pytest

from balora_trl import claims


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_a_live_claim_is_respected_a_dead_one_taken_over_and_only_own_claims_released(tmp_path):
    path = tmp_path / "run.claim"
    path.write_text(str(os.getppid()))  # a live process that is not this one
    assert not claims.claim(path)
    claims.release(path)
    assert path.read_text() == str(os.getppid())  # not ours to release

    path.write_text(str(_dead_pid()))
    assert claims.claim(path) and path.read_text() == str(os.getpid())
    assert claims.claim(path)  # already ours
    claims.release(path)
    assert not path.exists()

    path.write_text("")  # unreadable owner (a worker killed between create and write): taken over
    assert claims.claim(path)


def test_share_does_the_free_tasks_in_order_waits_for_the_held_one_and_returns_when_all_are_done(tmp_path,
                                                                                                 monkeypatch):
    done, order, sleeps = set(), [], []
    held = tmp_path / "b.claim"
    held.write_text(str(os.getppid()))  # task b is another live worker's

    def sleep(seconds):  # while this worker waits, the other finishes b and drops its claim
        sleeps.append(seconds)
        done.add("b")
        held.unlink()

    monkeypatch.setattr(claims.time, "sleep", sleep)

    def task(name):
        return (tmp_path / f"{name}.claim", lambda: name in done, lambda: (order.append(name), done.add(name)))

    claims.share([task("a"), task("b"), task("c")])
    assert order == ["a", "c"] and done == {"a", "b", "c"} and len(sleeps) == 1
    assert not list(tmp_path.glob("*.claim"))  # every claim released


def test_share_releases_the_claim_when_a_task_fails(tmp_path):
    path = tmp_path / "x.claim"

    def fail():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        claims.share([(path, lambda: False, fail)])
    assert not path.exists()  # another worker (or a restart) can take it


def test_share_skips_a_task_finished_between_the_two_looks(tmp_path):
    looks, did = [], []

    def done():  # unfinished at the first look, finished (by another worker) at the second
        looks.append(1)
        return len(looks) >= 2

    claims.share([(tmp_path / "x.claim", done, lambda: did.append(1))])
    assert did == [] and len(looks) == 3
