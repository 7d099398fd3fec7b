"""A run folder is data, not code: status and promote never unpickle what it holds, and --resume
(which must hand Ray its pickles) refuses a folder this user's raycxr did not sign."""

from __future__ import annotations

import json
import pickle
import shutil
import stat
from pathlib import Path

import pytest

from raycxr.cli import main

pytestmark = pytest.mark.slow


class _Planted:
    """A pickle that, when loaded, creates ``marker``: what an attacker would put in a run folder."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def _plant(run: Path, marker: Path) -> None:
    """Put a pickle where Ray Tune's own reader decodes one: a trial's state in experiment_state."""
    (state_file,) = (run / "tune").glob("experiment_state-*.json")
    doc = json.loads(state_file.read_text())
    trial = json.loads(doc["trial_data"][0][0])
    trial["storage"] = {"_type": "CLOUDPICKLE_FALLBACK", "value": pickle.dumps(_Planted(marker)).hex()}
    doc["trial_data"][0][0] = json.dumps(trial)
    state_file.write_text(json.dumps(doc))


@pytest.fixture
def finished_run(promoted_run):
    """A finished, signed search: the session's shared run (tests copy it before changing anything)."""
    return promoted_run["run"]


def test_status_and_promote_never_run_a_pickle_planted_in_the_run(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    marker = tmp_path / "pwned"
    _plant(run, marker)

    assert main(["status", str(run)]) == 0
    assert "rank" in capsys.readouterr().out
    assert main(["promote", "--run", str(run), "--out", str(tmp_path / "model"), "--bootstrap", "50",
                 "--tta", "off"]) == 0
    assert (tmp_path / "model" / "model_card.json").is_file()
    assert not marker.exists(), "reading the run executed the planted pickle"

    # the plant is live: Ray Tune's own reader of the same folder runs it
    from ray.tune import ExperimentAnalysis

    try:
        ExperimentAnalysis(str(run / "tune"))
    except Exception:
        pass  # the planted object is no StorageContext: Tune may fail after loading it
    assert marker.exists()


def test_resume_refuses_a_run_this_user_did_not_sign(finished_run, tmp_path, capsys):
    from raycxr.signing import key_path, verify
    from raycxr.storage import RunStore

    verify(RunStore(finished_run))  # the search signed its own state as it went
    assert stat.S_IMODE(key_path().stat().st_mode) == 0o600

    tampered = tmp_path / "tampered"
    shutil.copytree(finished_run, tampered)
    marker = tmp_path / "pwned"
    _plant(tampered, marker)
    assert main(["search", "--resume", str(tampered)]) == 2
    err = capsys.readouterr().err
    assert "experiment_state-" in err and "is not as raycxr wrote it" in err and "--trust-run" in err, err

    added = tmp_path / "added"  # a pickle dropped beside Tune's files
    shutil.copytree(finished_run, added)
    (added / "tune" / "searcher-state-2099-01-01_00-00-00.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    assert main(["search", "--resume", str(added)]) == 2
    assert "searcher-state-2099" in capsys.readouterr().err
    assert not marker.exists()

    unsigned = tmp_path / "unsigned"  # e.g. from a raycxr before signing, or another account
    shutil.copytree(finished_run, unsigned)
    (unsigned / "signature.json").unlink()
    assert main(["search", "--resume", str(unsigned)]) == 2
    assert "has no signature.json" in capsys.readouterr().err
    # the user vouches for it: it resumes (every trial had finished: nothing is trained again)
    board = json.loads(json.dumps(_resume_trusted(unsigned)))
    assert len(board) == 2 and all(r["status"] == "ok" for r in board)
    verify(RunStore(unsigned))  # and it is signed from now on


def test_a_file_from_another_run_does_not_verify_and_run_json_is_signed(finished_run, tmp_path):
    """Issue 27: each MAC binds the run's id and the file's path: run.json copied in from another run
    of the same user (signed by the same key) is refused, as is an edit of run.json."""
    from raycxr.signing import RunSigner, UntrustedRunError, verify
    from raycxr.storage import RunStore

    other = tmp_path / "other"  # a second run of this user: its own id, its own run.json
    shutil.copytree(finished_run, other)
    (other / "signature.json").unlink()
    doc = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**doc, "ended": "2099-01-01T00:00:00+0000: finished"}))
    signer = RunSigner(RunStore(other))
    signer.sign(other / "tune")
    signer.sign_in_store("run.json")
    verify(RunStore(other))

    spliced = tmp_path / "spliced"
    shutil.copytree(finished_run, spliced)
    verify(RunStore(spliced))
    shutil.copyfile(other / "run.json", spliced / "run.json")  # signed, but for the other run
    with pytest.raises(UntrustedRunError, match="run.json is not as raycxr wrote it for this run"):
        verify(RunStore(spliced))
    edited = tmp_path / "edited"
    shutil.copytree(finished_run, edited)
    (edited / "run.json").write_text(json.dumps({**json.loads((edited / "run.json").read_text()), "max_failures": 9}))
    with pytest.raises(UntrustedRunError, match="run.json"):
        verify(RunStore(edited))


def test_a_second_driver_on_a_run_is_refused_and_a_dead_ones_lease_is_taken_over(finished_run, tmp_path, capsys):
    """Issue 27: --resume holds the run's lease; one held by a live process is refused with the
    holder named; one left by a process that died on this host is taken over."""
    import os
    import socket
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    holder = {"what": "raycxr search --resume r", "host": socket.gethostname(), "pid": os.getpid(),
              "since": "2026-12-03T10:00:00+0000", "token": "x"}
    (run / "lease.json").write_text(json.dumps(holder))
    assert main(["search", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"is in use by raycxr search --resume r on {socket.gethostname()} (pid {os.getpid()}" in err, err
    assert json.loads((run / "lease.json").read_text()) == holder  # the holder's lease is left alone

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / "lease.json").write_text(json.dumps({**holder, "pid": int(gone.stdout)}))
    board = _resume_trusted(run)
    assert len(board) == 2 and not (run / "lease.json").exists()  # taken over, then given back


def test_resume_hands_ray_the_bytes_it_verified_not_what_is_there_later(finished_run, tmp_path):
    """Issue 27: --resume reads the run through a filesystem that serves what verify() checked: a
    pickle swapped into tuner.pkl or dropped beside Tune's state after the check (while Ray starts,
    minutes later on a cluster) is not what Ray reads, lists or copies."""
    import pyarrow.fs

    from raycxr.signing import verified_filesystem, verify
    from raycxr.storage import RunStore

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    checked = verify(RunStore(run))
    assert "tune/tuner.pkl" in checked and "run.json" in checked
    marker = tmp_path / "pwned"
    (run / "tune" / "tuner.pkl").write_bytes(pickle.dumps(_Planted(marker)))  # the swap, after the check
    (run / "tune" / "searcher-state-2099-01-01_00-00-00.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    fs = verified_filesystem(RunStore(run), checked)
    with fs.open_input_stream(f"{run}/tune/tuner.pkl") as f:
        assert f.read() == checked["tune/tuner.pkl"]
    listed = {i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(f"{run}/tune"))}
    assert "tuner.pkl" in listed and "searcher-state-2099-01-01_00-00-00.pkl" not in listed
    # what Ray does with an experiment folder on restore: copy it down to its own staging folder
    pyarrow.fs.copy_files(f"{run}/tune", str(tmp_path / "staging"), source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())
    assert (tmp_path / "staging" / "tuner.pkl").read_bytes() == checked["tune/tuner.pkl"]
    assert not (tmp_path / "staging" / "searcher-state-2099-01-01_00-00-00.pkl").exists()
    # a file Ray writes itself is read back as written
    with fs.open_output_stream(f"{run}/tune/tuner.pkl") as f:
        f.write(b"new state")
    with fs.open_input_stream(f"{run}/tune/tuner.pkl") as f:
        assert f.read() == b"new state"
    assert pickle.loads(pickle.dumps(fs)).open_input_stream(f"{run}/run.json").read() == checked["run.json"]
    assert not marker.exists()


def test_resume_gets_one_whole_save_of_tunes_state_never_a_mix_or_an_old_one(tmp_path):
    """Issue 27: Ray uploads its saved state file by file in the background, so a run's tune/ may hold
    a mix of two saves, each file signed. What --resume hands Ray is the newest save raycxr signed whole
    (tune-state.json), never the mix, with the Optuna study as it was at that save; a save older than
    the last two, an edited one or another run's is refused."""
    import base64

    from raycxr.signing import STATE_FILE, RunSigner, UntrustedRunError, verified_filesystem, verify
    from raycxr.storage import RunStore

    def a_run(folder: Path) -> tuple[Path, RunSigner, list[bytes]]:
        (folder / "tune").mkdir(parents=True)
        (folder / "staging").mkdir()
        (folder / "run.json").write_text('{"name": "r"}')
        (folder / "tune" / "tuner.pkl").write_bytes(b"tuner")
        signer = RunSigner(RunStore(folder))
        signer.sign_in_store("run.json")
        signer.sign_in_store("tune/tuner.pkl")
        saves = []
        for n in range(4):  # four saves by Tune, each signed as the callback does after Tune saves
            for name in ("experiment_state-s.json", "searcher-state-s.pkl"):
                (folder / "staging" / name).write_bytes(f"{name} of save {n} ".encode() * (n + 1))
            (folder / "optuna.db").write_bytes(f"study at save {n}".encode())
            signer.sign(folder / "staging")
            saves.append((folder / STATE_FILE).read_bytes())
        return folder, signer, saves

    run, _, saves = a_run(tmp_path / "run")
    # what the storage holds after a driver was killed mid-upload: save 3's state, save 2's searcher
    (run / "tune" / "experiment_state-s.json").write_bytes(b"experiment_state-s.json of save 3 " * 4)
    (run / "tune" / "searcher-state-s.pkl").write_bytes(b"searcher-state-s.pkl of save 2 " * 3)
    checked = verify(RunStore(run))
    assert checked["tune/searcher-state-s.pkl"] == b"searcher-state-s.pkl of save 3 " * 4
    assert checked["tune/experiment_state-s.json"] == b"experiment_state-s.json of save 3 " * 4
    assert checked["tune/tuner.pkl"] == b"tuner" and checked["run.json"] == b'{"name": "r"}'
    (run / "optuna.db").write_bytes(b"study after save 3")  # Optuna wrote on; the driver was killed
    assert verify(RunStore(run))["optuna.db"] == b"study at save 3"
    fs = verified_filesystem(RunStore(run), checked)
    with fs.open_input_stream(f"{run}/tune/searcher-state-s.pkl") as f:
        assert f.read() == b"searcher-state-s.pkl of save 3 " * 4
    (run / "tune" / "searcher-state-s.pkl").unlink()  # not uploaded yet: Ray still lists and reads it
    fs = verified_filesystem(RunStore(run), verify(RunStore(run)))
    import pyarrow.fs

    listed = {i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(f"{run}/tune"))}
    assert listed == {"tuner.pkl", "experiment_state-s.json", "searcher-state-s.pkl"}

    (run / STATE_FILE).write_bytes(saves[2])  # the save before: a driver killed between sign and write
    assert verify(RunStore(run))["tune/searcher-state-s.pkl"] == b"searcher-state-s.pkl of save 2 " * 3
    (run / STATE_FILE).write_bytes(saves[1])  # rolled back further
    with pytest.raises(UntrustedRunError, match="tune-state.json is not a save raycxr signed for this run"):
        verify(RunStore(run))
    doc = json.loads(saves[3])
    doc["files"]["searcher-state-s.pkl"] = base64.b64encode(b"searcher-state-s.pkl of save 1 " * 2).decode()
    (run / STATE_FILE).write_text(json.dumps(doc, sort_keys=True) + "\n")  # spliced by hand
    with pytest.raises(UntrustedRunError, match="tune-state.json is not a save"):
        verify(RunStore(run))
    _, _, other_saves = a_run(tmp_path / "other")  # another run of this user's, same key
    (run / STATE_FILE).write_bytes(other_saves[3])
    with pytest.raises(UntrustedRunError, match="tune-state.json is not a save"):
        verify(RunStore(run))
    (run / STATE_FILE).unlink()
    with pytest.raises(UntrustedRunError, match="tune-state.json is missing"):
        verify(RunStore(run))


def _resume_trusted(run: Path) -> list[dict]:
    from raycxr.search import resume_search

    return resume_search(run, trust_run=True)


def test_weights_that_would_run_code_are_refused_before_any_trial_and_run_nothing(dataset, tmp_path, capsys):
    """A space's `file:` weights are data too (issue 27): a .pth whose pickle would create a file is
    refused by the search before Ray starts (exit 2, the file named), and nothing ran. Plain tensors
    saved with torch.save are read without unpickling code, and load into the network as timm would."""
    import torch

    from raycxr.models import create_model, safe_weights

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Planted(marker)}, evil)
    space = tmp_path / "space.yaml"
    space.write_text(f"trials: 1\nmax_epochs: 1\nparams: {{model: test_resnet, image_size: 64, lr: 0.001, "
                     f"pretrained: 'file:{evil}'}}\n")
    code = main(["search", "--data", str(dataset), "--space", str(space), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and str(evil) in err and "refused" in err and not marker.exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

    good = tmp_path / "good.pth"
    reference = create_model("test_resnet")
    torch.save(reference.state_dict(), good)
    converted = safe_weights(good)
    assert converted.suffix == ".safetensors" and safe_weights(good) == converted  # cached by content
    loaded = create_model("test_resnet", pretrained=f"file:{good}")
    body = {k: v for k, v in reference.state_dict().items() if not k.startswith(("fc.", "conv1.", "stem."))}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in body.items())


def test_a_run_cannot_point_promote_at_checkpoints_outside_itself(promoted_run, tmp_path):
    """Issue 27: a trial's result.json is unsigned, so the checkpoint it names is confined to the run: a
    path elsewhere (or climbing out with ..) is refused and that trial named; a path from where the
    run used to live (a moved or copied run) is read from this run's own tune/ folder."""
    from raycxr.errors import NoEligibleTrialError
    from raycxr.promote import PromoteConfig, promote
    from raycxr.runs import leaderboard

    run = shutil.copytree(promoted_run["run"], tmp_path / "run")
    trials = sorted((run / "tune").glob("trial_*"))
    first, second = trials[0], trials[1]
    kept = sorted(p.name for p in first.glob("checkpoint_*"))[-1]

    def point(trial, where):
        lines = [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]
        (trial / "result.json").write_text("".join(json.dumps({**r, "checkpoint_path": where}) + "\n" for r in lines))

    point(first, f"/somewhere/else/tune/{first.name}/{kept}")  # moved: read from this run
    point(second, str(tmp_path / "elsewhere"))                 # outside: refused
    board = {r["trial_id"]: r for r in leaderboard(run)}
    moved = next(r for r in board.values() if first.name.endswith(r["trial_id"]))
    outside = next(r for r in board.values() if second.name.endswith(r["trial_id"]))
    assert moved["checkpoint"] == str(run / "tune" / first.name / kept) and moved["status"] == "ok"
    assert outside["checkpoint"] is None and outside["status"] == "refused: checkpoint outside the run"
    point(first, str(run / "tune" / first.name / ".." / ".." / ".." / "elsewhere"))
    with pytest.raises(NoEligibleTrialError):
        promote(PromoteConfig(run=str(run), out=tmp_path / "model", n_boot=20, tta="off"))
