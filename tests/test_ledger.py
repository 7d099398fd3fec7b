"""raycxr.ledger: every read of a dataset's holdout films, kept with the dataset (issue 26), counted
across runs, promote and evaluate; write-ahead and tolerant of a torn line."""

from __future__ import annotations

import json
import os
import pytest

from raycxr.ledger import FILE, ledger_paths, reads, record_read, split_digest


def test_reads_of_the_same_films_are_counted_and_a_torn_line_is_never_continued(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    first = record_read(data, fingerprint="f1", split="holdout", digest="d1", by="promote", run="a")
    assert first == []
    (data / FILE).write_text((data / FILE).read_text() + '{"time": "2026-12-01", "split": "hold')  # a killed writer
    second = record_read(data, fingerprint="f1", split="holdout", digest="d1", by="evaluate")
    assert [e["run"] for e in second] == ["a"]
    # other films (another digest) and another split are other reads
    assert record_read(data, fingerprint="f1", split="holdout", digest="d2", by="promote") == []
    assert record_read(data, fingerprint="f1", split="site-test", digest="d1", by="promote") == []
    lines = (data / FILE).read_text().splitlines()
    assert lines[1] == '{"time": "2026-12-01", "split": "hold' and json.loads(lines[2])["by"] == "evaluate"
    assert [e["by"] for e in reads(data / FILE, split="holdout", digest="d1")] == ["promote", "evaluate"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_a_read_only_dataset_keeps_its_ledger_in_the_user_cache(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.delenv("RAYCXR_LEDGER_DIR")
    monkeypatch.setenv("RAYCXR_CACHE", str(tmp_path / "cache"))
    data.chmod(0o555)
    try:
        record_read(data, fingerprint="f9", split="holdout", digest="d", by="promote")
        assert ledger_paths(data, split="holdout", digest="d") == [tmp_path / "cache" / "ledgers" / "films-holdout-d.jsonl"]
        assert len(record_read(data, fingerprint="f9", split="holdout", digest="d", by="promote")) == 1
    finally:
        data.chmod(0o755)


@pytest.mark.slow
def test_promote_and_evaluate_count_every_earlier_read_of_the_holdout_whichever_run_made_it(promoted_run,
                                                                                           second_promotion):
    """The shared run's promote read the dataset's holdout; a copy of the run (as a second search over
    the same data would) promoted again is told so, as is a later evaluate of that holdout."""
    from raycxr.evaluate import evaluate_model

    data, card, model = promoted_run["data"], second_promotion["card"], second_promotion["model"]
    entries = reads(data / FILE, split="holdout", digest=split_digest(data, "holdout"))
    mine = [i for i, e in enumerate(entries) if e.get("out") == str(model.resolve())]
    assert len(mine) == 1 and card.holdout_previously_read == mine[0] >= 1
    assert str(promoted_run["model"].resolve()) in {e.get("out") for e in entries[:mine[0]]}  # the fixture's own
    assert "had already been read" in (model / "model_card.md").read_text()
    result = evaluate_model(model, data, split="holdout", n_boot=20)
    after = reads(data / FILE, split="holdout", digest=split_digest(data, "holdout"))
    assert result["holdout_previously_read"] == len(after) - 1 >= len(entries)
    assert after[-1]["by"] == "evaluate" and after[-1]["model"] == str(model.resolve())


def test_a_re_ingest_keeps_the_ledger_of_the_films_it_replaces(sample_dir, tmp_path):
    from raycxr.data import read_manifest
    from raycxr.ingest import IngestConfig, ingest

    out = tmp_path / "data"
    ingest(IngestConfig(sources={"kermany": sample_dir}, out=out, image_size=32, seed=0, workers=1))
    fingerprint, digest = read_manifest(out).fingerprint, split_digest(out, "holdout")
    record_read(out, fingerprint=fingerprint, split="holdout", digest=digest, by="promote", run="first")
    ingest(IngestConfig(sources={"kermany": sample_dir}, out=out, image_size=32, seed=0, workers=1))
    assert split_digest(out, "holdout") == digest  # the same films: their earlier read still counts
    assert [e["run"] for e in reads(out / FILE, split="holdout", digest=digest)] == ["first"]


def test_the_same_films_ingested_into_another_folder_share_their_reads(sample_dir, tmp_path):
    """A read through one copy of the films counts for every other copy (the user-level ledger is
    named by the films' content digest), at another image size too; a read kept in both ledgers
    counts once; other films are not affected."""
    from raycxr.data import read_manifest
    from raycxr.ingest import IngestConfig, ingest

    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    ingest(IngestConfig(sources={"kermany": sample_dir}, out=first, image_size=32, seed=0, workers=1))
    ingest(IngestConfig(sources={"kermany": sample_dir}, out=second, image_size=48, seed=0, workers=1))
    ingest(IngestConfig(sources={"kermany": sample_dir}, out=other, image_size=32, seed=1, workers=1))
    digest = split_digest(first, "holdout")
    assert split_digest(second, "holdout") == digest != split_digest(other, "holdout")

    def read(data, **details):
        return record_read(data, fingerprint=read_manifest(data).fingerprint, split="holdout",
                           digest=split_digest(data, "holdout"), by="promote", **details)

    assert read(first, run="one") == []
    assert [e["run"] for e in read(second, run="two")] == ["one"]  # the other folder's read counts
    assert [e["run"] for e in read(first, run="three")] == ["one", "two"]  # in both ledgers, counted once
    assert read(other, run="four") == []  # seed 1 holds other films out
    assert not (second / FILE).read_text().count('"one"')  # each folder's own ledger keeps its own reads


def test_log_read_writes_the_runs_ledger_and_each_datasets_and_returns_the_longest_history(tmp_path):
    """One read of two sites' site-test films by a run: one entry in the run's ledger naming both,
    one in each site's own; a second read is told of the first, whichever ledger remembers it."""
    from raycxr.ledger import Films, log_read, run_reads
    from raycxr.storage import RunStore

    run, a, b = tmp_path / "run", tmp_path / "a", tmp_path / "b"
    for d in (run, a, b):
        d.mkdir()
    store = RunStore(run)
    films = [Films(a, "fa", "site-test", "da", site="north"), Films(b, "fb", "site-test", "db", site="south")]
    assert log_read(films, store=store, by="promote", run="r1", trial_id="t1", out="m1") == []
    (entry,) = run_reads(store, "site-test")
    assert entry["sites"] == {"north": "da", "south": "db"} and entry["trial_id"] == "t1" and entry["out"] == "m1"
    assert run_reads(store, "holdout") == []
    (north,) = reads(a / FILE, split="site-test", digest="da")
    assert north["site"] == "north" and north["run"] == "r1" and north["by"] == "promote"
    # the run's ledger lost (a copied run folder), the sites' own still count the first read
    (run / FILE).unlink()
    earlier = log_read(films, store=store, by="promote", run="r2", trial_id="t2", out="m2")
    assert [e["run"] for e in earlier] == ["r1"]
    # evaluate reads without a run: only the dataset's ledgers
    later = log_read([Films(a, "fa", "site-test", "da", site="north")], by="evaluate", model="m2")
    assert [e["run"] for e in later] == ["r1", "r2"] and len(run_reads(store, "site-test")) == 1
