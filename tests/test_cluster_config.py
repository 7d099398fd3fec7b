import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)  # raises jsonschema.ValidationError on any schema problem
    assert config["available_node_types"]["worker.gpu"]["min_workers"] == 0
    head_cmds = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds  # dashboard only through `ray dashboard`
    # token auth on every node, with the token shipped to it
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in cmds)
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]
    # only SSH open, and only to a range the user must set: never the whole internet by default
    rules = config["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(22, 22)]
    ranges = [ip["CidrIp"] for r in rules for ip in r["IpRanges"]] + [
        ip.get("CidrIpv6") for r in rules for ip in r.get("Ipv6Ranges", [])]
    assert ranges == ["SET-YOUR-SSH-SOURCE-RANGE"]
    assert "0.0.0.0/0" not in (ROOT / "cluster.yaml").read_text().replace("Never 0.0.0.0/0", "")
    # patient data, runs, models and the venv never leave the laptop
    assert {"data/", "runs/", "models/", "demo-output/", ".venv/"} <= set(config["rsync_exclude"])
    assert config["docker"]["image"].startswith("rayproject/ray:2.60.0-")  # an exact Ray release


def test_the_cluster_runs_a_digest_pinned_image_and_installs_only_hashed_files():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    # a re-pushed tag cannot change the image: it is named by digest (the user sets it, see the comment)
    image = config["docker"]["image"]
    assert image.startswith("rayproject/ray:2.60.0-") and "@sha256:" in image
    assert any("--require-hashes -r requirements.lock" in c for c in config["setup_commands"])
    assert "--require-hashes -r requirements.lock" in (ROOT / "scripts" / "setup").read_text()
    # every pin of the lock carries at least one hash (pip refuses the whole file otherwise), in
    # pip's format: "name==version \\" then "--hash=sha256:HEX" continuation lines
    lines = (ROOT / "requirements.lock").read_text().replace("\\\n", " ").splitlines()
    pins = {}
    for line in (l for l in lines if l.strip() and not l.startswith("#")):
        req, *options = line.split()
        assert "==" in req and options and all(re.fullmatch(r"--hash=sha256:[0-9a-f]{64}", o) for o in options), line
        pins[req] = options
    assert len(pins) > 100 and len(pins["torch==2.14.1"]) > 1 and "ray==2.60.0" in pins
