"""raycxr: hyperparameter search and model selection for chest X-ray classification on Ray.

The `raycxr` command: parse arguments, build a config, call one stage. No logic lives here.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from raycxr.errors import ConfigError


def _source(text: str) -> tuple[str, Path]:
    key, sep, path = text.partition("=")
    if not sep or not key or not path:
        raise argparse.ArgumentTypeError(f"expected KEY=PATH (e.g. kermany=~/data/chest_xray), got {text!r}")
    return key, Path(path).expanduser()


def _source_option(text: str) -> tuple[str, str, str]:
    key, sep, value = text.partition("=")
    source, dot, name = key.partition(".")
    if not sep or not dot or not source or not name:
        raise argparse.ArgumentTypeError(f"expected SOURCE.NAME=VALUE (e.g. mimic.uncertain=zeros), got {text!r}")
    return source, name, value


def _ingest(args) -> int:
    from raycxr.ingest import IngestConfig, ingest

    options: dict[str, dict[str, str]] = {}
    for key, name, value in args.source_option or []:
        options.setdefault(key, {})[name] = value
    s = ingest(IngestConfig(sources=dict(args.source), out=args.out, image_size=args.image_size,
                            resize=args.resize, val_fraction=args.val_fraction,
                            holdout_fraction=args.holdout_fraction, seed=args.seed, workers=args.workers,
                            views=args.views, near_duplicate_bits=args.near_duplicate_bits,
                            twin_similarity=args.twin_similarity,
                            allow_empty_splits=args.allow_empty_splits, max_file_mb=args.max_file_mb,
                            source_options=options, resume=args.resume, address=args.address))
    print(f"Ingested {s.files_in} files -> {s.rows_written} rows written + {s.quarantined} quarantined "
          f"(files in = rows + quarantined: {s.files_in == s.rows_written + s.quarantined})")
    for split, c in s.counts.items():
        print(f"  {split:8s} {c['images']:6d} images, {c['patients']:5d} patients, by label {c['by_label']}")
    if s.cross_source_twins:
        pairs = ", ".join(f"{k} {v}" for k, v in s.twins_by_source_pair.items())
        print(f"  {s.cross_source_twins} twin pairs across sources ({pairs}): each pair shares a split")
    if s.exact_duplicates or s.near_duplicate_pairs:
        print(f"  {s.exact_duplicates} byte-identical copies and {s.near_duplicate_pairs} near-duplicate pairs; "
              f"{s.merged_duplicate_groups} patient groups merged so that copies share a split")
    if s.quarantined:
        print(f"  quarantined by reason: {s.quarantine_reasons} (see {s.out}/quarantine.csv"
              f"{'' if args.list_quarantined else '; --list-quarantined prints the file names here'})")
    if args.list_quarantined:
        # The console only: quarantine.csv keeps pseudonyms because file names can carry patient IDs.
        for source, path, reason in s.quarantined_files:
            shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # names need not be UTF-8
            print(f"  quarantined {source}:{shown}: {reason}", file=sys.stderr)
    print(f"Dataset {s.out} (fingerprint {s.fingerprint})")
    return 0


def _search(args) -> int:
    from raycxr.runs import format_leaderboard
    from raycxr.search import SearchConfig, resume_search, run_search

    if args.resume:
        board = resume_search(args.resume, address=args.address, num_cpus=args.num_cpus, trust_run=args.trust_run,
                              verbosity=_verbosity_level(args))
        print("\nLeaderboard (validation AUC; the holdout is untouched):")
        print(format_leaderboard(board))
        return 0
    if not args.data or not args.space:
        raise ConfigError("a new search needs --data and --space (or --resume runs/NAME)", source="raycxr search")
    board = run_search(SearchConfig(data=args.data, space=args.space, name=args.name, runs_dir=args.runs_dir,
                                    trials=args.trials, max_epochs=args.max_epochs, address=args.address,
                                    storage=args.storage, max_failures=args.max_failures,
                                    time_budget_min=args.time_budget, num_cpus=args.num_cpus, target=args.target,
                                    searcher=args.searcher, early_stopping=not args.no_early_stopping,
                                    scheduler=args.scheduler,
                                    objective=args.objective, weights_dir=args.weights_dir, mlflow=args.mlflow,
                                    sites=tuple(args.site or ()), site_test_fraction=args.site_test_fraction,
                                    site_seed=args.site_seed, verbosity=_verbosity_level(args),
                                    data_path=args.data_path))
    print("\nLeaderboard (validation AUC; the holdout is untouched):")
    print(format_leaderboard(board))
    return 0


def _verbosity_level(args) -> int:
    return 0 if args.quiet else 2 if args.verbose else 1


def _status(args) -> int:
    import time

    from raycxr.runs import format_leaderboard, format_summary, leaderboard, run_summary

    summary = run_summary(args.run)
    print(format_summary(summary), flush=True)
    while args.watch and not summary["finished"]:
        time.sleep(args.watch)
        summary = run_summary(args.run)
        print(format_summary(summary), flush=True)
    # the board the last summary read; none yet: leaderboard() says why (no Tune state yet)
    print(format_leaderboard(summary["leaderboard"] or leaderboard(args.run), top=args.top))
    return 0


def _promote(args) -> int:
    from raycxr.card import format_promotion
    from raycxr.promote import PromoteConfig, promote

    card = promote(PromoteConfig(run=args.run, out=args.out, data=args.data, threshold_rule=args.threshold_rule,
                                 target_sensitivity=args.target_sensitivity,
                                 target_specificity=args.target_specificity, prevalence=args.prevalence,
                                 n_boot=args.bootstrap, force=args.force, tta=args.tta, select=args.select,
                                 finalists=args.finalists, ensemble=args.ensemble,
                                 fastest_within=args.fastest_within, register=args.register,
                                 serving_onnx=args.serving_onnx, quantize=args.quantize,
                                 mlflow=args.mlflow))
    print(format_promotion(card, args.out))
    return 0


def _evaluate(args) -> int:
    from raycxr.card import format_metrics
    from raycxr.evaluate import evaluate_model

    r = evaluate_model(args.model, args.data, split=args.split, n_boot=args.bootstrap)
    pooled = r["metrics"]["pooled"]
    print(f"{args.model} on {args.data} ({args.split}, {pooled['n']} images with a known {r['target']} label), "
          f"threshold {r['threshold']:.4f}:")
    print(format_metrics(pooled))
    for source, m in r["metrics"]["per_source"].items():
        print(f"  {source}: n {m['n']}, AUC {m['auc']:.3f}, sensitivity {m['sensitivity']:.3f}, "
              f"specificity {m['specificity']:.3f}")
    print(f"Written to {r['written_to']}")
    return 0


def _cell(text: str) -> str:
    """A CSV cell a spreadsheet will not run: a leading = + - @ (or tab / CR) starts a formula in
    Excel and LibreOffice, so such cells get a leading apostrophe (OWASP's advice for CSV export)."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _predict(args) -> int:
    import csv
    import dataclasses
    import json

    from raycxr.predict import predict

    if args.benchmark:
        from raycxr.serving import benchmark_model, format_latency

        print(f"CPU latency of {args.model}'s ONNX exports (ONNX Runtime, median of 30 after warm-up):")
        print(format_latency(benchmark_model(args.model)))
        if not args.files:
            return 0
    if not args.files:
        print("raycxr predict: give files or folders to classify (or --benchmark alone)", file=sys.stderr)
        return 2
    rows = predict(args.model, args.files, saliency_dir=args.saliency)
    if args.format == "json":
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
    else:
        w = csv.writer(sys.stdout)
        w.writerow(["file", "probability", "label", "error", "warning", "saliency", "logit"])
        # Numbers at full float64 precision (repr round-trips): 4 decimals tied many films at 1.0000
        # and moved an ROC of this CSV. They are raycxr's own numbers, never escaped: a negative
        # logit is a number to a spreadsheet, not a formula.
        for r in rows:
            w.writerow([_cell(r.file), "" if r.probability is None else repr(r.probability), _cell(r.label or ""),
                        _cell(r.error), _cell(r.warning), _cell(r.saliency), "" if r.logit is None else repr(r.logit)])
    failed = sum(bool(r.error) for r in rows)
    if failed:
        print(f"{failed} of {len(rows)} files could not be read", file=sys.stderr)
    return 1 if failed or not rows else 0


def _default(cls, name: str):
    """A config class's default for one field: the CLI's defaults are the library's."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def build_parser() -> argparse.ArgumentParser:
    from raycxr import __version__

    p = argparse.ArgumentParser(prog="raycxr", description=__doc__.splitlines()[0] if __doc__ else None,
                                parents=[_verbosity(argparse.SUPPRESS)])
    p.add_argument("--version", action="version", version=f"raycxr {__version__}", help="print the version and exit")
    p.set_defaults(verbose=False, quiet=False)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_verbosity(argparse.SUPPRESS)]  # -v / -q after the command too; the top level's value kept otherwise
    for add in (_ingest_options, _search_options, _status_options, _promote_options, _evaluate_options,
                _predict_options):
        add(sub, common)
    return p


def _ingest_options(sub, common) -> None:
    from raycxr.imaging import RESIZE_POLICIES
    from raycxr.ingest import VIEWS, IngestConfig

    def d(name):
        return _default(IngestConfig, name)

    i = sub.add_parser("ingest", parents=common, help="pool X-ray datasets into patient-disjoint Parquet shards")
    i.add_argument("--source", action="append", type=_source, required=True, metavar="KEY=PATH",
                   help="a dataset root; KEY is one of kermany, nih, rsna, mimic, openi, montgomery, shenzhen, "
                        "jsrt, csv (PATH: the manifest file). Repeat to pool several")
    i.add_argument("--source-option", action="append", type=_source_option, metavar="KEY.NAME=VALUE",
                   help="adapter options, e.g. mimic.uncertain=zeros, csv.labels=finding, csv.name=kit")
    i.add_argument("--max-file-mb", type=float, default=d("max_file_mb"),
                   help=f"quarantine, unread, any file larger than this (default {d('max_file_mb'):g} MB)")
    i.add_argument("--views", choices=VIEWS, default=d("views"),
                   help="frontal keeps PA/AP (and unknown) views; laterals are listed in quarantine.csv")
    i.add_argument("--near-duplicate-bits", type=int, default=d("near_duplicate_bits"),
                   help="images whose 256-bit dHash differs in at most this many bits share a split (-1: off)")
    i.add_argument("--twin-similarity", type=float, default=d("twin_similarity"), metavar="COS",
                   help="pooled sources: images of two sources whose centre thumbnails (16x16, any crop that undoes a "
                        "squash) match at this cosine or more are one film and share a split (default "
                        f"{d('twin_similarity')}; 0: off)")
    i.add_argument("--allow-empty-splits", action="store_true",
                   help="write the dataset even if train, val or holdout ends up empty (default: refuse, saying why)")
    i.add_argument("--list-quarantined", action="store_true",
                   help="print the real names of quarantined files on this console (never written to disk)")
    i.add_argument("--out", required=True, help="dataset folder to write, or a URI every node of a cluster reaches "
                                               "(s3://BUCKET/data/NAME, gs://...)")
    i.add_argument("--resume", action="store_true",
                   help="reuse the decoded batches a killed ingest of the same files and settings left beside --out")
    i.add_argument("--address", metavar="HEAD:6379",
                   help="decode as Ray tasks across this cluster (default $RAY_ADDRESS, set inside `ray job submit`; "
                        "'local': a Ray on this machine); the sources must be readable on every node")
    i.add_argument("--image-size", type=int, default=d("image_size"),
                   help=f"stored square size in px (default {d('image_size')})")
    i.add_argument("--resize", choices=RESIZE_POLICIES, default=d("resize"),
                   help=f"pad keeps the aspect ratio with black borders; squash stretches (default {d('resize')})")
    i.add_argument("--val-fraction", type=float, default=d("val_fraction"),
                   help=f"share of patients in the validation split (default {d('val_fraction')})")
    i.add_argument("--holdout-fraction", type=float, default=d("holdout_fraction"),
                   help=f"share of patients in the holdout, read once by promote (default {d('holdout_fraction')})")
    i.add_argument("--seed", type=int, default=d("seed"), help=f"split seed (default {d('seed')})")
    i.add_argument("--workers", type=int, default=d("workers"), help="decode processes (default: one per core)")
    i.set_defaults(fn=_ingest)


def _search_options(sub, common) -> None:
    from raycxr.config import list_spaces
    from raycxr.search import DATA_PATHS, OBJECTIVES, SCHEDULERS, SEARCHERS, SearchConfig

    def d(name):
        return _default(SearchConfig, name)

    s = sub.add_parser("search", parents=common, help="Ray Tune search (Optuna TPE, optional ASHA) over Ray Train trials")
    s.add_argument("--data", help="a folder or URI (s3://...) written by `raycxr ingest`")
    s.add_argument("--space", help=f"a bundled space ({', '.join(list_spaces())}) or a YAML file's path")
    s.add_argument("--resume", metavar="RUN",
                   help="continue a stopped or killed search (runs/NAME, or STORAGE/NAME): finished trials are kept")
    s.add_argument("--trust-run", action="store_true",
                   help="with --resume: resume a run this account's raycxr did not sign (resuming unpickles the "
                        "run's state: only for folders whose origin you trust)")
    s.add_argument("--trials", type=int, help="override the space's number of trials")
    s.add_argument("--max-epochs", type=int, help="override the space's max_epochs")
    s.add_argument("--name", help="run name (default SPACE-DATE-TIME)")
    s.add_argument("--runs-dir", type=Path, default=d("runs_dir"), help=f"where runs go (default ./{d('runs_dir')})")
    s.add_argument("--address", help="Ray cluster to join (default $RAY_ADDRESS, else a local Ray)")
    s.add_argument("--storage", metavar="URI",
                   help="where runs go instead of --runs-dir: storage every node reaches, e.g. s3://bucket/raycxr "
                        "(the run is then URI/NAME; status, promote and --resume take that)")
    s.add_argument("--max-failures", type=int, default=d("max_failures"), help="retries of a trial whose worker dies")
    s.add_argument("--time-budget", type=float, metavar="MINUTES", help="stop starting trials after this long")
    s.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all cores)")
    s.add_argument("--target", default=d("target"),
                   help=f"finding whose validation AUC selects trials (default {d('target')}); all known findings "
                        "are trained, unknown labels masked")
    s.add_argument("--searcher", choices=SEARCHERS, default=d("searcher"),
                   help="Optuna sampler: tpe (default), gp (Gaussian process), cmaes (CMA-ES on the numeric "
                        "parameters), random (the baseline; BENCHMARKS.md compares them), or grid (every "
                        "combination of the space's choices once; the space's trials do not apply)")
    s.add_argument("--objective", choices=list(OBJECTIVES), default=d("objective"),
                   help="auc (default): maximise validation AUC; auc-latency: a Pareto search of validation AUC "
                        "against the batch-1 CPU latency of each trial's ONNX export (for CPU-only clinics); site: "
                        "the AUC on the --site films' site-val part; worst-source: the worst source's validation AUC "
                        "of a pooled dataset. Each trial's best epoch (its kept checkpoint) is chosen by the same figure")
    s.add_argument("--site", action="append", metavar="[NAME=]DATA",
                   help="the deploying site's own labelled films, ingested with `raycxr ingest` at this data's size: "
                        "divided by patient into site-val (scored every epoch as site_auc / site_loss) and site-test "
                        "(read once, by promote: the model card's headline). Repeat for several sites")
    s.add_argument("--site-test-fraction", type=float, default=d("site_test_fraction"), metavar="F",
                   help=f"share of each site's patients kept for site-test (default {d('site_test_fraction')}); "
                        "raycxr warns below 100 positive or 100 negative films there")
    s.add_argument("--site-seed", type=int, default=d("site_seed"),
                   help=f"seed of the site-val / site-test division (default {d('site_seed')})")
    s.add_argument("--weights-dir", type=Path, metavar="DIR",
                   help="offline pretrained weights: DIR/MODEL.safetensors for `pretrained: imagenet` (overrides the "
                        "space's weights_dir; scripts/convert_weights.py makes EfficientNet-Lite's)")
    s.add_argument("--scheduler", choices=list(SCHEDULERS), default=d("scheduler"),
                   help="early stopping: none (default: every trial to max_epochs; it beat ASHA with TPE in "
                        "BENCHMARKS.md), asha, or hyperband (asynchronous, 3 brackets: more trials run long)")
    s.add_argument("--mlflow", metavar="URI",
                   help="also log every trial (parameters, per-epoch metrics) to this MLflow tracking URI, e.g. "
                        "sqlite:///mlflow.db or http://127.0.0.1:5000 (needs the mlflow package)")
    s.add_argument("--no-early-stopping", action="store_true", help="the same as --scheduler none")
    s.add_argument("--data-path", choices=DATA_PATHS, default=d("data_path"),
                   help="how trials read the train split: materialize (once into the object store, shared), stream "
                        "(Ray Data tasks read the shards each epoch where the trial runs: for a dataset larger than "
                        "the object store), or auto (default: materialize up to half the object store; the choice "
                        "is printed)")
    s.set_defaults(fn=_search)


def _status_options(sub, common) -> None:
    st = sub.add_parser("status", parents=common, help="leaderboard of a running or finished search")
    st.add_argument("run", help="runs/NAME, or STORAGE/NAME (e.g. s3://bucket/raycxr/NAME)")
    st.add_argument("--top", type=int, default=20, help="leaderboard rows shown (default 20)")
    st.add_argument("--watch", type=float, nargs="?", const=10.0, metavar="SECONDS",
                    help="print the summary line again every SECONDS (default 10) until every trial has finished, "
                         "then the leaderboard")
    st.set_defaults(fn=_status)


def _promote_options(sub, common) -> None:
    from raycxr.metrics import THRESHOLD_CHOICES
    from raycxr.promote import QUANTIZE_CHOICES, SWITCH_CHOICES, PromoteConfig
    from raycxr.select import SELECTION_RULES

    def d(name):
        return _default(PromoteConfig, name)

    pr = sub.add_parser("promote", parents=common, help="best trial by validation -> holdout once -> exports and model card")
    pr.add_argument("--run", required=True, help="runs/NAME, or STORAGE/NAME (e.g. s3://bucket/raycxr/NAME)")
    pr.add_argument("--out", type=Path, required=True, help="folder for the promoted model")
    pr.add_argument("--data", help="the ingested dataset, when it is not at the path the search read it "
                                   "from (e.g. this machine's copy of a cluster's data); same fingerprint")
    pr.add_argument("--threshold-rule", choices=THRESHOLD_CHOICES, default=d("threshold_rule"),
                    help="which validation operating point the exported model uses: auto (default) is accuracy "
                         "(the fewest errors at the site's own prevalence, on its site-val films) for --select site, "
                         "else youden (sensitivity + specificity); the card shows the holdout metrics at every one")
    pr.add_argument("--target-sensitivity", type=float, default=d("target_sensitivity"),
                    help="for the sensitivity operating point")
    pr.add_argument("--target-specificity", type=float, default=d("target_specificity"),
                    help="for the specificity operating point")
    pr.add_argument("--prevalence", type=float, metavar="P",
                    help="the clinic's share of positives (e.g. 0.3): probabilities, PPV and NPV are corrected "
                         "from the training pool's prevalence to P (prior shift); adds the bayes operating point")
    pr.add_argument("--select", choices=SELECTION_RULES, default=d("select"),
                    help="auto (default): site for a search with --site, else shift-auc. site: finalists, ensemble, "
                         "TTA, calibration and threshold chosen on the site's site-val films, site-test read once "
                         "(the card's headline); shift-auc: finalists scored on validation under acquisition shifts, "
                         "ties by patient bootstrap, then an ensemble or the fastest tied model; val-auc: plain arg-max")
    pr.add_argument("--finalists", type=int, default=d("finalists"),
                    help=f"trials compared by --select shift-auc (default {d('finalists')})")
    pr.add_argument("--ensemble", choices=SWITCH_CHOICES, default=d("ensemble"),
                    help="mean-logit ensemble: auto (default) promotes the tied finalists' ensemble if its shift AUC "
                         "beats the best single model; on forces an ensemble of the best finalists; off never")
    pr.add_argument("--fastest-within", type=float, metavar="AUC_DELTA",
                    help="promote the quickest trial (batch-1 ONNX CPU latency) whose validation AUC is within "
                         "AUC_DELTA of the best, e.g. 0.005")
    pr.add_argument("--bootstrap", type=int, default=d("n_boot"),
                    help=f"bootstrap resamples for CIs (default {d('n_boot')})")
    pr.add_argument("--serving-onnx", action="store_true",
                    help="also export model.serving.onnx: uint8 images at the stored size in, calibrated P(target) "
                         "out (resize, normalisation, TTA and calibration inside), checked against the Python model")
    pr.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=d("quantize"),
                    help="int8: also export model.int8.onnx (static int8, ONNX Runtime's quantiser, calibrated on "
                         "the validation films), kept only if the paired patient bootstrap of its validation AUC "
                         "minus fp32's has a lower bound above -0.005; the card gives both models' holdout AUC")
    pr.add_argument("--register", metavar="NAME",
                    help="log the promoted model to MLflow and register a new version of NAME in its Model Registry")
    pr.add_argument("--mlflow", metavar="URI", help="MLflow tracking URI for --register (default $MLFLOW_TRACKING_URI)")
    pr.add_argument("--force", action="store_true", help="replace an existing --out folder")
    pr.add_argument("--tta", choices=SWITCH_CHOICES, default=d("tta"),
                    help="test-time augmentation (mean logit over 4 views): auto keeps it if it raises the "
                         "validation AUC (default)")
    pr.set_defaults(fn=_promote)


def _evaluate_options(sub, common) -> None:
    from raycxr.data import SPLITS

    ev = sub.add_parser("evaluate", parents=common, help="score a promoted model on any ingested dataset (external validation)")
    ev.add_argument("--model", type=Path, required=True, help="a folder written by `raycxr promote`")
    ev.add_argument("--data", required=True, help="a folder or URI written by `raycxr ingest`")
    ev.add_argument("--split", choices=[*SPLITS, "all"], default="holdout",
                    help="which split of --data to score (default holdout; all for an external dataset)")
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs (default 1000)")
    ev.set_defaults(fn=_evaluate)


def _predict_options(sub, common) -> None:
    pd = sub.add_parser("predict", parents=common, help="classify DICOM/PNG/JPEG files or folders; CSV to stdout")
    pd.add_argument("--model", type=Path, required=True, help="a folder written by `raycxr promote`")
    pd.add_argument("files", nargs="*", help="files or folders")
    pd.add_argument("--benchmark", action="store_true",
                    help="print the batch-1 and batch-16 CPU latency (1 thread and every core) of the model's "
                         "ONNX exports (model.onnx, and model.int8.onnx if promote kept one) first")
    pd.add_argument("--format", choices=["csv", "json"], default="csv", help="output on stdout (default csv)")
    pd.add_argument("--saliency", type=Path, metavar="DIR", help="write a Grad-CAM overlay PNG per image to DIR")
    pd.set_defaults(fn=_predict)


def _verbosity(default) -> argparse.ArgumentParser:
    """-v / -q, accepted before or after the command (argparse parents; SUPPRESS keeps a
    subcommand from resetting what was given before it)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default,
                       help="more detail: debug logs, and the Ray workers' own output during a search")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="warnings, errors and results only: no progress bars or progress lines")
    return parent


class _ConsoleFormat(logging.Formatter):
    """raycxr's own progress as plain lines; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    """The library logs; the console shows raycxr's INFO and up (DEBUG with -v, WARNING with -q),
    other libraries' warnings (INFO with -v). -q also turns off the progress bars."""
    from raycxr import progress

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormat("%(name)s: %(message)s" if verbose else "%(message)s"))
    own = logging.getLogger("raycxr")
    own.handlers[:] = [handler]
    own.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    progress.SHOW = not quiet
    own.propagate = False
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    from raycxr.errors import RaycxrError

    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.fn(args)
    except RaycxrError as exc:
        print(f"raycxr {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
