"""The group committer: diffs that come together share one commit, and none waits forever."""

import threading

from meshfl.hosted._commits import MAX_BATCH, GroupCommit


class Recorder:
    """Stands in for the host's commit: keeps each batch and signals when one lands."""

    def __init__(self) -> None:
        self.batches: list[list] = []
        self.landed = threading.Condition()

    def __call__(self, batch: list) -> None:
        with self.landed:
            self.batches.append(list(batch))
            self.landed.notify_all()

    def wait_batches(self, n: int) -> bool:
        with self.landed:
            return self.landed.wait_for(lambda: len(self.batches) >= n, timeout=10)


def test_a_diff_reaching_an_idle_committer_commits_at_once_and_later_ones_share_a_commit():
    runs = Recorder()
    commits = GroupCommit(runs, "t", interval=60.0)  # far longer than the test: only a flush or a full batch commits
    try:
        commits.put(0)
        assert runs.wait_batches(1) and runs.batches == [[0]]
        for i in range(1, 11):
            commits.put(i)
    finally:
        commits.close()  # what waits is committed before close returns
    assert runs.batches == [[0], list(range(1, 11))]


def test_a_full_batch_commits_without_waiting_out_the_interval():
    runs = Recorder()
    commits = GroupCommit(runs, "t", interval=60.0)
    try:
        commits.put("first")
        assert runs.wait_batches(1)
        for i in range(MAX_BATCH + 3):
            commits.put(i)
        assert runs.wait_batches(2)  # within the bounded wait, not after 60 s
        assert runs.batches[1] == list(range(MAX_BATCH))
    finally:
        commits.close()
    assert runs.batches[2:] == [[MAX_BATCH, MAX_BATCH + 1, MAX_BATCH + 2]]


def test_a_failing_commit_is_logged_and_the_committer_goes_on(caplog):
    done, tried = [], threading.Event()

    def run(batch):
        if batch == ["bad"]:
            tried.set()
            raise RuntimeError("disk full")
        done.extend(batch)

    commits = GroupCommit(run, "t", interval=0.0)
    commits.put("bad")
    assert tried.wait(10)
    commits.put("good")
    commits.close()
    assert done == ["good"] and "committing 1 diff(s) failed" in caplog.text
