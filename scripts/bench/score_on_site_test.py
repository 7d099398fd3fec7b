"""Score a promoted model on the site-test films of another run's --site (the value-of-site-data comparison).

Usage: .venv/bin/python scripts/bench/score_on_site_test.py MODEL RUN_WITH_SITE

MODEL is a `raycxr promote` folder (e.g. the model of a search *without* --site); RUN_WITH_SITE a search
run whose run.json divided a site. The model's own calibration and exported threshold are used, as
`raycxr evaluate` does, on exactly the films that run's promote read as site-test. A benchmark
comparison, not a selection: nothing here is chosen on these films.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from raycxr.metrics import calibrate_logits, report  # noqa: E402
from raycxr.predict import load_promoted, target_logits  # noqa: E402
from raycxr.runs import RunRecord  # noqa: E402
from raycxr.sites import site_arrays  # noqa: E402
from raycxr.storage import RunStore  # noqa: E402

model_dir, run = Path(sys.argv[1]), Path(sys.argv[2])
model, promoted = load_promoted(model_dir)
spec = promoted.spec
for site in RunRecord.load(RunStore(run)).site_records():
    test = site_arrays(site, "site-test", spec.target)
    p = calibrate_logits(target_logits(model, spec, test.images), promoted.calibration)
    m = report(test.y, p, groups=test.groups, sources=test.sources, threshold=promoted.threshold)["pooled"]
    ci = m["ci95"]
    print(f"{model_dir} on site-test of {site.name} ({m['n']} films, {m['positives']} positive), threshold "
          f"{promoted.threshold:.4f} (the model's own):")
    for k in ("auc", "accuracy", "sensitivity", "specificity", "brier", "ece"):
        print(f"  {k:12s} {m[k]:.3f}  95% CI {ci[k][0]:.3f} - {ci[k][1]:.3f}")
    print(f"  probability range {np.min(p):.4f} - {np.max(p):.4f}")
