import argparse
from pathlib import Path

import pytest

from raycxr.cli import _source, _source_option, build_parser, main


def test_ingest_arguments_reach_the_config(monkeypatch, tmp_path):
    seen = {}

    def fake_ingest(cfg):  # stands in for the stage only to capture what the CLI built
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("raycxr.ingest.ingest", fake_ingest)
    with pytest.raises(SystemExit):
        main(["ingest", "--source", "kermany=/data/k", "--source", "csv=/data/kit.csv", "--out", str(tmp_path),
              "--image-size", "128", "--seed", "7", "--views", "all", "--source-option", "csv.name=kit",
              "--source-option", "csv.labels=finding"])
    cfg = seen["cfg"]
    assert cfg.sources == {"kermany": Path("/data/k"), "csv": Path("/data/kit.csv")}
    assert (cfg.image_size, cfg.seed, cfg.views) == (128, 7, "all")
    assert cfg.source_options == {"csv": {"name": "kit", "labels": "finding"}}


@pytest.mark.parametrize("text", ["kermany", "=path", "kermany="])
def test_bad_source_argument(text):
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=PATH"):
        _source(text)


def test_bad_source_option():
    with pytest.raises(argparse.ArgumentTypeError, match="SOURCE.NAME=VALUE"):
        _source_option("uncertain=zeros")


def test_search_needs_data_and_space_unless_resuming(capsys):
    assert main(["search", "--space", "demo"]) == 2
    assert "--data and --space" in capsys.readouterr().err


def test_errors_exit_2_with_a_next_step(tmp_path, capsys):
    assert main(["promote", "--run", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "pass --run runs/NAME" in capsys.readouterr().err


def test_every_command_has_help():
    parser = build_parser()
    for cmd in ("ingest", "search", "status", "promote", "evaluate", "predict"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([cmd, "--help"])
        assert exc.value.code == 0


def test_search_baseline_flags_parse_and_an_unknown_searcher_is_refused(tmp_path):
    args = build_parser().parse_args(["search", "--data", "d", "--space", "demo", "--searcher", "random",
                                      "--no-early-stopping"])
    assert (args.searcher, args.no_early_stopping) == ("random", True)
    from raycxr.errors import ConfigError
    from raycxr.search import SearchConfig, run_search

    with pytest.raises(ConfigError, match="unknown searcher 'grid'"):  # refused before Ray starts
        run_search(SearchConfig(data=tmp_path, space="demo", searcher="grid"))
