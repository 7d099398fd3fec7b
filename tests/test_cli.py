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

    with pytest.raises(ConfigError, match="unknown searcher 'bayes'"):  # refused before Ray starts
        run_search(SearchConfig(data=tmp_path, space="demo", searcher="bayes"))


def test_version_and_every_option_has_help_text(capsys):
    from raycxr import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"raycxr {__version__}"
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {a.option_strings or a.dest}" for name, sub in commands.items() for a in sub._actions
               if not a.help]
    assert not missing, missing


@pytest.mark.parametrize("argv, verbose, quiet", [
    (["-v", "status", "RUN"], True, False),
    (["status", "RUN", "-v"], True, False),
    (["status", "-q", "RUN"], False, True),
    (["-q", "predict", "--model", "M", "f.png"], False, True),
    (["predict", "--model", "M", "f.png"], False, False),
])
def test_verbose_and_quiet_are_accepted_before_or_after_the_command(argv, verbose, quiet):
    args = build_parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


def test_verbose_and_quiet_together_are_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["status", "RUN", "-v", "-q"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_search_help_lists_the_bundled_spaces(capsys):
    from raycxr.config import list_spaces

    with pytest.raises(SystemExit):
        main(["search", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert {"demo", "cpu", "default", "mnist"} <= set(list_spaces()) and ", ".join(list_spaces()) in out
