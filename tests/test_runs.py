"""raycxr.runs, the read side of a run folder (issue 27 item 0): status, promote, report and evaluate
read a run without importing the search's write side or Ray Tune."""

import subprocess
import sys

READERS = ("raycxr.runs", "raycxr.promote", "raycxr.evaluate", "raycxr.report", "raycxr.card")


def test_reading_a_run_imports_neither_the_search_nor_ray_tune():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in READERS) +
            "print(sorted(m for m in sys.modules if m == 'raycxr.search' or m == 'ray.tune' "
            "or m.startswith('ray.tune.')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_the_shared_run_reads_through_raycxr_runs(promoted_run):
    from raycxr.runs import RunRecord, run_history, run_summary
    from raycxr.storage import RunStore

    record = RunRecord.load(RunStore(promoted_run["run"]))
    history = run_history(promoted_run["run"])
    assert record.name == "shared" and len(history.board) == record.trials == 2
    assert {r["trial_id"] for r in history.board} == set(history.frames)
    assert run_summary(promoted_run["run"])["finished"]
