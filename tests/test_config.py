import pytest

from raycxr.config import PARAMS, list_spaces, load_space, parse_space
from raycxr.errors import ConfigError

GOOD = {"trials": 2, "max_epochs": 1, "params": {"model": ["test_resnet"], "lr": {"loguniform": [1e-4, 1e-2]}}}


@pytest.mark.parametrize("name", list_spaces())
def test_shipped_spaces_load(name):
    space = load_space(name)
    assert space.trials >= 1 and "model" in space.params and "lr" in space.params


def test_shipped_spaces_include_demo_and_default():
    assert {"demo", "default"} <= set(list_spaces())


def test_defaults_fill_unset_params():
    space = parse_space(GOOD, name="t")
    assert set(space.params) == set(PARAMS) - {"image_size"}
    assert space.params["augment"].values == ("light",)


@pytest.mark.parametrize("params, expected", [
    ({"model": ["resnet9000"]}, ["params.model.choice[0]: 'resnet9000' is invalid; allowed: test_resnet"]),
    ({"augment": "extreme"}, ["params.augment: 'extreme' is invalid; allowed: none, light, heavy, robust"]),
    ({"equalize": "clahe"}, ["params.equalize: 'clahe' is invalid; allowed: none, hist"]),
    ({"equalize": [False, True]}, ["params.equalize.choice[0]: False is not a string"]),
    ({"optimizer": ["adamw", "lion"]}, ["params.optimizer.choice[1]: 'lion' is invalid; allowed: adamw, sgd"]),
    ({"lr": {"loguniform": [0, 0.1]}}, ["params.lr.loguniform: 0 is invalid; must be in (0, 1)"]),
    ({"lr": {"loguniform": [0.1, 0.01]}}, ["params.lr.loguniform: low 0.1 must be below high 0.01"]),
    ({"batch_size": {"uniform": [8, 64]}}, ["params.batch_size.uniform: batch_size is an integer; use randint"]),
    ({"lr": {"randint": [1, 2]}}, ["params.lr.randint: lr is a number; use uniform or loguniform"]),
    ({"momentum": 0.9}, ["params.momentum: unknown hyperparameter; allowed: model, lr"]),
    ({"image_size": "big"}, ["params.image_size: 'big' is not an integer"]),
    ({"lr": {"normal": [0, 1]}}, ["params.lr: {'normal': [0, 1]} must be a value, a list, or one of"]),
    ({"ema_decay": [0.0, 0.5]}, ["params.ema_decay.choice[1]: 0.5 is invalid; must be 0 (off) or in [0.9, 1)"]),
    ({"mixup": -0.2}, ["params.mixup: -0.2 is invalid; must be in 0..2 (0: off)"]),
    ({"source_balance": ["none", "inverse"]},
     ["params.source_balance.choice[1]: 'inverse' is invalid; allowed: none, sqrt, equal"]),
])
def test_param_errors_name_key_and_allowed_values(params, expected):
    raw = {**GOOD, "params": {**GOOD["params"], **params}}
    with pytest.raises(ConfigError) as exc:
        parse_space(raw, name="t")
    for text in expected:
        assert any(p.startswith(text) for p in exc.value.problems), exc.value.problems


def test_all_problems_reported_at_once():
    raw = {"trials": 0, "colour": "blue", "resources": {"gpus": 1}, "params": {"model": "nope"}}
    with pytest.raises(ConfigError) as exc:
        parse_space(raw, name="t")
    text = str(exc.value)
    for fragment in ["trials: 0 must be an integer in 1..10000", "colour: unknown key", "resources.gpus: unknown key",
                     "params.model: 'nope' is invalid", "params.lr: required"]:
        assert fragment in text


def test_trainer_is_auto_or_ray_train_and_decides_where_one_worker_trials_train():
    from raycxr.cluster import plan_resources

    capacity = {"total": {"CPU": 2.0}, "free": {"CPU": 2.0}, "ceiling": None, "node_cpus": 2.0, "autoscaler": False}
    plans = {}
    for resources in ({}, {"trainer": "ray-train"}, {"workers_per_trial": 2}):
        space = parse_space({**GOOD, "resources": resources}, name="t")
        plans[str(resources)] = plan_resources(space, trials=2, capacity=capacity)["in_process"]
    assert plans == {"{}": True, "{'trainer': 'ray-train'}": False, "{'workers_per_trial': 2}": False}
    with pytest.raises(ConfigError, match="resources.trainer: 'ddp' must be one of auto, ray-train"):
        parse_space({**GOOD, "resources": {"trainer": "ddp"}}, name="t")


def test_unknown_space_name_lists_known_ones():
    with pytest.raises(ConfigError, match="one of: .*demo"):
        load_space("no-such-space")


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("params: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(f)


@pytest.mark.parametrize("spec,ok", [
    ("none", True), ("imagenet", True), ("tag:a1_in1k", True), ("hf-hub:timm/resnet18.a1_in1k", True),
    ("file:/w/resnet10t.safetensors", True), ("yes", False), ("tag:", False), ("http://x", False)])
def test_pretrained_is_a_searchable_parameter(spec, ok):
    from raycxr.config import parse_space
    from raycxr.errors import ConfigError

    raw = {"params": {"model": "resnet10t", "lr": 0.01, "pretrained": ["none", spec]}}
    if ok:
        assert parse_space(raw, name="p").values_of("pretrained") == ["none", spec]
    else:
        with pytest.raises(ConfigError, match="params.pretrained.choice"):
            parse_space(raw, name="p")


def test_old_top_level_pretrained_switch_and_missing_offline_weights(tmp_path):
    from raycxr.config import parse_space
    from raycxr.search import _check_weights

    old = parse_space({"pretrained": True, "params": {"model": "resnet10t", "lr": 0.01}}, name="old")
    assert old.values_of("pretrained") == ["imagenet"]
    assert parse_space({"params": {"model": "resnet10t", "lr": 0.01}}, name="d").values_of("pretrained") == ["none"]
    (tmp_path / "resnet10t.safetensors").write_bytes(b"")
    space = parse_space({"weights_dir": str(tmp_path), "params": {"model": ["resnet10t", "resnet18"], "lr": 0.01,
                                                                  "pretrained": ["imagenet", "file:/nope.pth"]}},
                        name="w")
    problems = _check_weights(space)
    assert len(problems) == 2 and "resnet18.safetensors is missing" in problems[1] and "/nope.pth" in problems[0]


def test_yaml_aliases_and_huge_or_deep_files_are_refused_before_they_expand(tmp_path):
    """A 'billion laughs' file: a few hundred bytes whose aliases expand to 10^9 list items."""
    from raycxr.config import load_space

    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
              f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]"
              for i in range(8)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1000
    with pytest.raises(ConfigError, match="aliases"):
        load_space(bomb)
    big = tmp_path / "big.yaml"
    big.write_text("description: " + "x" * 70_000 + "\n")
    with pytest.raises(ConfigError, match="at most 65536"):
        load_space(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("params: " + "[" * 20_000 + "]" * 20_000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply|not valid YAML"):
        load_space(deep)
