"""meshfl.store: tables, map growth, the task queue (including SIGKILL crashes), outbox, audit."""

from __future__ import annotations

import hashlib
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import numpy as np
import orjson
import pytest

from meshfl.errors import AuditError, StoreError
from meshfl.store import AuditLog, Outbox, Store, TaskQueue, VerifyResult
from meshfl.store.taskqueue import next_lane

ROOT = Path(__file__).resolve().parents[1]
QUEUE_WRITER = Path(__file__).parent / "helpers" / "store_queue_writer.py"
TINY_MAP = 64 * 1024


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store") as store:
        yield store


def reopen(store: Store) -> Store:
    store.close()
    return Store(store.path)


def child_env() -> dict:
    """The environment for a child Python that imports meshfl from this checkout."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def run_threads(target, count: int) -> None:
    """Run `target(i)` in `count` threads released together; re-raise the first failure."""
    barrier = threading.Barrier(count)
    errors = []

    def run(i):
        barrier.wait()
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "threads hung"
    if errors:
        raise errors[0]


# --- Store and Table ------------------------------------------------------------------------


def test_table_round_trip(store):
    table = store.table("datasets")
    assert store.table("datasets") is table
    assert table.get("x") is None and table.get("x", 7) == 7
    value = {"name": "mnist", "shape": [60000, 28, 28], "ok": True, "ratio": 0.25, "tags": None}
    table.put("mnist", value)
    table.put("ünïcode ✓", [1, "two"])
    assert table.get("mnist") == value
    assert table.get("ünïcode ✓") == [1, "two"]
    assert "mnist" in table and "other" not in table
    assert len(table) == 2
    assert table.delete("mnist") is True
    assert table.delete("mnist") is False
    assert len(table) == 1


def test_items_and_keys_by_prefix_sorted(store):
    table = store.table("t")
    for key in ["b/1", "a/2", "a/10", "a/1", "ab", "a"]:
        table.put(key, key.upper())
    assert table.keys() == ["a", "a/1", "a/10", "a/2", "ab", "b/1"]
    assert table.items("a/") == [("a/1", "A/1"), ("a/10", "A/10"), ("a/2", "A/2")]
    assert table.keys("b") == ["b/1"]
    assert table.keys("c") == [] and store.table("empty").items() == []


def test_bytes_values(store):
    table = store.table("blobs")
    array = np.arange(100_000, dtype=np.float32)
    table.put_bytes("array", array)
    table.put_bytes("view", memoryview(b"hello"))
    table.put_bytes("empty", b"")
    assert np.array_equal(np.frombuffer(table.get_bytes("array"), dtype=np.float32), array)
    assert table.get_bytes("view") == b"hello"
    assert table.get_bytes("empty") == b"" and "empty" in table
    assert table.get_bytes("missing") is None


@pytest.mark.parametrize("key", ["", "k" * 512, "é" * 256, 5, b"bytes", "\ud800"])
def test_bad_keys_are_refused(store, key):
    with pytest.raises(StoreError) as info:
        store.table("t").put(key, 1)
    assert info.value.code == "bad_key"


def test_longest_key_and_bad_value(store):
    table = store.table("t")
    table.put("k" * 511, 1)
    assert table.get("k" * 511) == 1
    with pytest.raises(StoreError) as info:
        table.put("k", {"not json": object()})
    assert info.value.code == "bad_value"


def test_map_grows_from_a_tiny_map(tmp_path):
    blob = os.urandom(100_000)
    with Store(tmp_path / "s", map_size=TINY_MAP) as store:
        table = store.table("t")
        for i in range(50):
            table.put_bytes(f"blob{i:02d}", blob)
            table.put(f"json{i:02d}", {"i": i, "pad": "x" * 20_000})
        table.put_bytes("huge", bytes(3_000_000))  # one value far larger than the map
    with Store(tmp_path / "s", map_size=TINY_MAP) as store:
        table = store.table("t")
        assert all(table.get_bytes(f"blob{i:02d}") == blob for i in range(50))
        assert table.get("json49") == {"i": 49, "pad": "x" * 20_000}
        assert len(table.get_bytes("huge")) == 3_000_000
        table.put_bytes("more", bytes(1_000_000))  # grows again after a reopen
        assert len(table) == 102


def test_map_grows_while_threads_read_and_write(tmp_path):
    with Store(tmp_path / "s", map_size=TINY_MAP, sync=False) as store:
        table = store.table("t")

        def work(i):
            for n in range(40):
                table.put(f"{i}/{n:02d}", {"pad": "y" * 10_000})
                assert table.get(f"{i}/{n:02d}")["pad"] == "y" * 10_000
                assert len(table.items(f"{i}/")) == n + 1

        run_threads(work, 4)
        assert len(table) == 160


def test_map_grown_by_another_process_is_adopted(tmp_path):
    with Store(tmp_path / "s", map_size=TINY_MAP) as store:
        store.table("t").put("mine", 1)
        script = (
            "import sys; from meshfl.store import Store\n"
            "with Store(sys.argv[1], map_size=65536) as s: s.table('t').put_bytes('big', bytes(2**21))"
        )
        subprocess.run([sys.executable, "-c", script, str(store.path)], env=child_env(), check=True,
                       timeout=60)
        assert len(store.table("t").get_bytes("big")) == 2**21
        store.table("t").put_bytes("more", bytes(2**20))
        assert store.table("t").keys() == ["big", "mine", "more"]


def test_persistence_across_reopen(store):
    store.table("a").put("k", {"v": 1})
    store.table("b").put_bytes("k", b"\x00\x01")
    store = reopen(store)
    try:
        assert store.table("a").get("k") == {"v": 1}
        assert store.table("b").get_bytes("k") == b"\x00\x01"
    finally:
        store.close()


def test_atomic_spans_tables(store):
    def move(tx):
        amount = tx.get("from", "acct")
        tx.put("from", "acct", 0)
        tx.put("to", "acct", amount)
        tx.put_bytes("raw", "acct", b"moved")
        return tx.items("to")

    store.table("from").put("acct", 10)
    assert store.atomic(move) == [("acct", 10)]  # "to" and "raw" created on first use
    assert store.table("from").get("acct") == 0
    assert store.table("to").get("acct") == 10
    assert store.table("raw").get_bytes("acct") == b"moved"


def test_atomic_failure_writes_nothing(store):
    store.table("a").put("k", "before")

    def broken(tx):
        tx.put("a", "k", "after")
        tx.put("new_table", "k", 1)
        assert tx.delete("a", "k")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.atomic(broken)
    assert store.table("a").get("k") == "before"
    assert len(store.table("new_table")) == 0


def test_atomic_reruns_after_meeting_a_new_table(store):
    calls = []

    def careless(tx):
        calls.append(None)
        try:
            tx.put("fresh", "k", 1)
        except Exception:  # noqa: BLE001 - swallowing must not lose the write
            pass
        return "ok"

    assert store.atomic(careless) == "ok"
    assert store.table("fresh").get("k") == 1 and len(calls) == 2


def test_nested_calls_join_the_open_transaction(store):
    table, log = store.table("t"), AuditLog(store, "audit")

    def both(tx):
        table.put("k", 1)
        log.append("k.set")
        return tx.get("t", "k")

    assert store.atomic(both) == 1 and len(log) == 1

    def fails_after_writing(tx):
        table.put("k", 2)
        log.append("k.set")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.atomic(fails_after_writing)
    assert table.get("k") == 1 and len(log) == 1  # neither write was kept


def test_misuse_is_reported_not_deadlocked(store, monkeypatch):
    table = store.table("t")
    with pytest.raises(StoreError) as info:
        store.read(lambda tx: table.put("k", 1))
    assert info.value.code == "nested_txn"
    with pytest.raises(StoreError) as info:
        Store(store.path)
    assert info.value.code == "already_open"
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o700
    monkeypatch.setattr(store, "_pid", -1)  # as in a child after fork()
    with pytest.raises(StoreError) as info:
        table.get("k")
    assert info.value.code == "forked"
    monkeypatch.undo()
    store.close()
    store.close()
    assert store.closed
    with pytest.raises(StoreError) as info:
        table.get("k")
    assert info.value.code == "closed"


# --- TaskQueue --------------------------------------------------------------------------------


def test_queue_is_fifo_and_push_is_idempotent(store):
    queue = TaskQueue(store)
    ids = [queue.push({"n": n}) for n in range(5)]
    assert queue.push({"n": "changed"}, task_id=ids[2]) == ids[2]
    assert queue.push({"n": 5}, task_id="mine") == "mine"
    assert queue.push({"n": "again"}, task_id="mine") == "mine"
    assert queue.count() == 6 and queue.get(ids[2]).payload == {"n": 2}
    assert [task.id for task in queue.list()] == ids + ["mine"]
    claimed = [queue.claim() for _ in range(6)]
    assert [task.id for task in claimed] == ids + ["mine"]
    assert all(task.state == "running" and task.attempts == 1 for task in claimed)
    assert queue.claim() is None


def test_queue_transitions(store):
    queue = TaskQueue(store)
    a, b, c = (queue.push({"n": n}) for n in range(3))
    with pytest.raises(StoreError) as info:
        queue.done(a)
    assert info.value.code == "bad_state"
    queue.claim()
    queue.claim()
    assert queue.done(a, {"loss": 0.1}).result == {"loss": 0.1}
    assert queue.fail(b, {"code": "oops"}).error == {"code": "oops"}
    for finish in (queue.done, queue.fail):
        with pytest.raises(StoreError) as info:
            finish(a, {})
        assert info.value.code == "bad_state"
    with pytest.raises(StoreError) as info:
        queue.done("nope")
    assert info.value.code == "not_found"
    assert queue.cancel(a) is False and queue.cancel("nope") is False
    assert queue.cancel(c) is True
    assert queue.claim() is None
    assert [t.state for t in queue.list()] == ["done", "failed", "cancelled"]
    assert queue.count("done") == 1 and queue.count("pending") == 0
    assert [t.id for t in queue.list("failed")] == [b]
    task = queue.get(a)
    assert task.created <= task.updated and queue.get("nope") is None


def test_queue_counts_and_recent_tasks(store):
    queue = TaskQueue(store)
    assert queue.recent(5) == [] and queue.counts() == dict.fromkeys(
        ("pending", "running", "done", "failed", "cancelled"), 0)
    ids = [queue.push({"n": n}) for n in range(5)]
    queue.claim()
    queue.done(ids[0])
    queue.claim()
    queue.cancel(ids[4])
    assert queue.counts() == {"pending": 2, "running": 1, "done": 1, "failed": 0, "cancelled": 1}
    assert [t.id for t in queue.recent(3)] == [ids[4], ids[3], ids[2]]  # newest first
    assert [t.id for t in queue.recent(10)] == ids[::-1]


def test_queue_recover_requeues_at_the_front(store):
    queue = TaskQueue(store)
    ids = [queue.push({"n": n}) for n in range(4)]
    first, second = queue.claim(), queue.claim()
    queue.done(first.id)
    store = reopen(store)  # as after a crash: `second` was left running
    queue = TaskQueue(store)
    try:
        recovered = queue.recover()
        assert [(t.id, t.state, t.attempts) for t in recovered] == [(ids[1], "pending", 1)]
        assert queue.recover() == []
        again = queue.claim()
        assert (again.id, again.attempts) == (ids[1], 2)
        assert queue.claim().id == ids[2]
    finally:
        store.close()


def test_queue_recover_can_fail_interrupted_tasks(store):
    queue = TaskQueue(store)
    ids = [queue.push({"n": n}) for n in range(3)]
    queue.claim()
    queue.claim()
    recovered = queue.recover(requeue=False)
    assert [t.id for t in recovered] == ids[:2]
    assert all(t.state == "failed" and t.error["code"] == "interrupted" for t in recovered)
    assert queue.claim().id == ids[2]


def test_queue_remove_finished(store):
    queue = TaskQueue(store)
    ids = [queue.push({"n": n}) for n in range(4)]
    queue.claim()
    queue.done(ids[0])
    queue.cancel(ids[1])
    assert queue.remove_finished(older_than=3600) == 0
    assert queue.remove_finished() == 2
    assert [t.id for t in queue.list()] == ids[2:]
    assert queue.claim().id == ids[2]
    assert store.table("tasks.order").items() == [("00000000000000000002", ids[2]),
                                                  ("00000000000000000003", ids[3])]


def test_queue_persists_across_reopen(store):
    queue = TaskQueue(store, name="jobs")
    ids = [queue.push({"n": n}) for n in range(3)]
    queue.claim()
    queue.done(ids[0], {"ok": True})
    store = reopen(store)
    queue = TaskQueue(store, name="jobs")
    try:
        assert [(t.id, t.state) for t in queue.list()] == [
            (ids[0], "done"), (ids[1], "pending"), (ids[2], "pending")
        ]
        assert queue.get(ids[0]).result == {"ok": True}
        assert queue.claim().id == ids[1]
        assert queue.push({"n": 3}) not in ids  # sequence numbers continue after the reopen
        assert queue.list()[-1].seq == 3
    finally:
        store.close()


def test_next_lane_serves_lanes_round_robin():
    assert next_lane([], None) is None and next_lane([], "a") is None
    assert next_lane(["b", "a"], None) == "a"
    assert next_lane(["a", "b", "c"], "a") == "b" and next_lane(["a", "b", "c"], "c") == "a"
    assert next_lane(["a", "c"], "b") == "c"  # the lane served last has no work left
    assert next_lane(["", "x"], "") == "x" and next_lane(["", "x"], "x") == ""


def test_queue_serves_each_lane_in_turn_so_a_backlog_starves_no_one(store):
    queue = TaskQueue(store)
    flood = [queue.push({"n": n}, lane="alice") for n in range(5)]
    bob = [queue.push({"n": n}, lane="bob") for n in range(2)]
    plain = queue.push({"n": 0})  # the default lane
    order = [queue.claim().id for _ in range(8)]
    assert order == [plain, flood[0], bob[0], flood[1], bob[1], flood[2], flood[3], flood[4]]
    assert queue.claim() is None and queue.get(bob[0]).lane == "bob"
    with pytest.raises(StoreError) as info:
        queue.push({}, lane="bad\x1flane")
    assert info.value.code == "bad_key"


def test_queue_lanes_survive_cancel_recover_and_reopen(store):
    queue = TaskQueue(store, name="jobs")
    a = [queue.push({"n": n}, lane="a") for n in range(3)]
    b = [queue.push({"n": n}, lane="b") for n in range(2)]
    assert queue.claim().id == a[0]
    assert queue.cancel(b[0]) and queue.recover() == [queue.get(a[0])]  # a[0] back at the front of a
    store = reopen(store)
    queue = TaskQueue(store, name="jobs")
    try:
        assert queue.claim().id == b[1]  # a was served last before the reopen
        assert [queue.claim().id for _ in range(3)] == a and queue.claim() is None
        for task_id in [b[1], *a]:
            queue.done(task_id)
        # A queue written before lanes existed: its pending tasks are indexed on recovery.
        old = queue.push({"n": 9}, lane="c")
        store.atomic(lambda tx: [tx.delete("jobs.lane", k) for k in tx.keys("jobs.lane")]
                     + [tx.delete("jobs.lanes", k) for k in tx.keys("jobs.lanes")])
        assert queue.claim() is None
        queue.recover()
        assert queue.claim().id == old
    finally:
        store.close()


# --- crash: SIGKILL a writer process ------------------------------------------------------------

RANK = {"push": 0, "pending": 0, "claim": 1, "running": 1, "done": 2, "fail": 2, "failed": 2}


def read_lines(proc: subprocess.Popen, wanted: int, deadline: float) -> tuple[list[str], float]:
    """The child's first `wanted` or more lines, and the mean time between them."""
    fd, buffer, lines = proc.stdout.fileno(), b"", []
    first_at = None
    while len(lines) < wanted:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"child reported only {len(lines)} operations in time"
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        assert chunk, f"child exited early: {proc.stderr.read().decode()}"
        first_at = first_at or time.perf_counter()
        *complete, buffer = (buffer + chunk).split(b"\n")
        lines += [line.decode() for line in complete]
    return lines, (time.perf_counter() - first_at) / (len(lines) - 1)


def spin(seconds: float) -> None:
    """Busy-wait (well under a millisecond): a sleep could not be this short or this precise."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def kill_writer(folder: Path, kill_after: int, phase: float) -> list[str]:
    """Run the queue writer on `folder`; SIGKILL it `phase` of an operation's duration after its
    `kill_after`-th report, so the kill lands at that point of the next operation."""
    proc = subprocess.Popen(
        [sys.executable, str(QUEUE_WRITER), str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), bufsize=0,
    )
    try:
        lines, op_time = read_lines(proc, kill_after, time.monotonic() + 60)
        spin(phase * op_time)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return lines


def check_after_crash(folder: Path, lines: list[str]) -> None:
    reported: dict[str, int] = {}
    pushed: list[str] = []
    for line in lines:
        op, task_id = line.split()
        reported[task_id] = max(reported.get(task_id, 0), RANK[op])
        if op == "push":
            pushed.append(task_id)

    with Store(folder) as store:
        records = dict(store.table("tasks").items())
        order = store.table("tasks.order").items()
        pending = store.table("tasks.pending").items()

        # No half-written task: both indexes agree with the records, entry for entry.
        assert [int(key) for key, _ in order] == list(range(len(order)))
        assert sorted(task_id for _, task_id in order) == sorted(records)
        assert all(records[task_id]["seq"] == int(key) for key, task_id in order)
        assert pending == [(key, t) for key, t in order if records[t]["state"] == "pending"]

        # Everything reported committed is there, at least as far along as reported.
        for task_id, rank in reported.items():
            assert RANK[records[task_id]["state"]] >= rank, task_id

        # FIFO kept: reported pushes lead the order and tasks were taken strictly from the front.
        ids_in_order = [task_id for _, task_id in order]
        assert ids_in_order[: len(pushed)] == pushed
        ranks = [RANK[records[task_id]["state"]] for task_id in ids_in_order]
        assert ranks == sorted(ranks, reverse=True)

        queue = TaskQueue(store)
        queue.recover()
        assert queue.count("running") == 0
        assert queue.count("pending") == ranks.count(0) + ranks.count(1)


# The writer reports push, push, claim, then push, push, claim, done|fail over and over, so
# these kill points put the kill in a claim, in a done|fail and in a push; the phases sweep it
# across that operation.
@pytest.mark.parametrize("kill_after", [41, 202, 451])
def test_queue_survives_sigkill(tmp_path, kill_after):
    for i, phase in enumerate([0.0, 0.3, 0.6, 0.9]):
        folder = tmp_path / f"store{i}"
        check_after_crash(folder, kill_writer(folder, kill_after, phase))


# --- Outbox -----------------------------------------------------------------------------------


def test_outbox_keeps_messages_until_acknowledged(store):
    outbox = Outbox(store)
    array = np.linspace(0, 1, 10_000, dtype=np.float64)
    buffers = [array, b"", memoryview(b"\xff" * 3)]
    outbox.put("m1", "node-a", {"type": "result", "round": 1}, buffers)
    outbox.put("m2", "node-b", {"type": "result", "round": 2})
    outbox.put("m3", "node-a", {"type": "result", "round": 3}, [b"x"])
    outbox.put("m1", "node-z", {"type": "changed"}, [b"ignored"])  # idempotent by id
    assert len(outbox) == 3
    assert [item.msg_id for item in outbox.pending()] == ["m1", "m2", "m3"]
    assert [item.msg_id for item in outbox.pending("node-a")] == ["m1", "m3"]
    first = outbox.get("m1")
    assert (first.dest, first.envelope) == ("node-a", {"type": "result", "round": 1})
    assert first.buffers == [array.tobytes(), b"", b"\xff\xff\xff"]
    assert all(type(buffer) is bytes for buffer in first.buffers)
    assert outbox.ack("m3", dest="node-z") is False  # only its addressee acknowledges a message
    assert outbox.ack("m1") is True and outbox.ack("m1") is False
    assert outbox.get("m1") is None
    assert [item.msg_id for item in outbox.pending()] == ["m2", "m3"]
    assert len(store.table("outbox.buffers")) == 1  # m1's buffers went with it


def test_outbox_persists_across_reopen(store):
    outbox = Outbox(store)
    outbox.put("m1", "node-a", {"n": 1}, [b"\x00" * 5000])
    outbox.put("m2", "node-a", {"n": 2})
    outbox.ack("m2")
    store = reopen(store)
    outbox = Outbox(store)
    try:
        [item] = outbox.pending()
        assert (item.msg_id, item.envelope, item.buffers) == ("m1", {"n": 1}, [b"\x00" * 5000])
        outbox.put("m3", "node-b", {"n": 3})
        assert [item.msg_id for item in outbox.pending()] == ["m1", "m3"]
    finally:
        store.close()


# --- AuditLog ---------------------------------------------------------------------------------


def filled_log(store: Store, n: int = 6) -> AuditLog:
    log = AuditLog(store)
    for i in range(n):
        log.append("plan_approved", plan=f"sha-{i}", by="alice", extra=(1, 2.5))
    return log


def test_audit_chain_verifies(store):
    log = AuditLog(store)
    assert log.head() is None and log.verify().ok and len(log) == 0
    first = log.append("start", version="1.0")
    assert (first.index, first.prev, first.fields) == (0, "0" * 64, {"version": "1.0"})
    log = filled_log(store, 5)
    records = log.records()
    assert [r.index for r in records] == list(range(6))
    assert all(r.prev == before.hash for before, r in zip(records, records[1:]))
    assert records[1].fields == {"plan": "sha-0", "by": "alice", "extra": [1, 2.5]}
    assert log.head() == records[-1] and len(log) == 6
    assert log.records(start=2, limit=2) == records[2:4]
    assert log.verify() == log.verify().check()
    assert log.verify().count == 6


def tamper(store: Store, index: int, changes: dict) -> None:
    table = store.table("audit")
    key = f"{index:020d}"
    table.put(key, {**table.get(key), **changes})


@pytest.mark.parametrize(
    "changes",
    [{"fields": {"plan": "evil", "by": "alice", "extra": [1, 2.5]}}, {"event": "x"}, {"ts": 0.0},
     {"prev": "f" * 64}, {"index": 9}, {"hash": "0" * 64}],
)
def test_audit_detects_an_edited_record(store, changes):
    log = filled_log(store)
    tamper(store, 3, changes)
    result = log.verify()
    assert result == VerifyResult(ok=False, count=3, first_bad=3, reason="hash mismatch")
    with pytest.raises(AuditError) as info:
        result.check()
    assert info.value.details["index"] == 3


def test_audit_detects_a_rehashed_edit_at_the_next_link(store):
    log = filled_log(store)
    record = store.table("audit").get(f"{2:020d}")
    record["fields"] = {"plan": "evil"}
    body = {k: record[k] for k in ("index", "ts", "event", "fields", "prev")}
    record["hash"] = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    store.table("audit").put(f"{2:020d}", record)
    assert log.verify() == VerifyResult(False, 3, 3, "broken link")


def test_audit_detects_a_deleted_record(store):
    log = filled_log(store)
    assert store.table("audit").delete(f"{4:020d}")
    result = log.verify()
    assert (result.ok, result.first_bad, result.reason) == (False, 4, "missing record")


def test_audit_detects_raw_byte_edits(store):
    filled_log(store)
    path = store.path
    store.close()
    env = lmdb.open(str(path), max_dbs=64)
    try:
        with env.begin(write=True, db=env.open_db(b"audit")) as txn:
            key = f"{1:020d}".encode()
            txn.put(key, txn.get(key).replace(b"alice", b"mallo"))
    finally:
        env.close()
    with Store(path) as store:
        assert AuditLog(store).verify() == VerifyResult(False, 1, 1, "hash mismatch")


def test_audit_detects_a_malformed_record(store):
    log = filled_log(store)
    store.table("audit").put_bytes(f"{2:020d}", b"{not json")
    assert log.verify() == VerifyResult(False, 2, 2, "malformed record")
    store.table("audit").put(f"{2:020d}", ["a", "list"])
    assert log.verify() == VerifyResult(False, 2, 2, "malformed record")


def test_concurrent_appends_keep_one_chain(store):
    log = AuditLog(store)
    run_threads(lambda i: [log.append("tick", thread=i, n=n) for n in range(50)], 4)
    result = log.verify()
    assert result.ok and result.count == 200 == len(log)
    assert sorted((r.fields["thread"], r.fields["n"]) for r in log.records()) == [
        (i, n) for i in range(4) for n in range(50)
    ]
