"""What a search's time went to, from its run folder: trials started and reporting, epochs trained,
and training compute against the time its trial slots had (the quality benchmarks print this).

Usage: .venv/bin/python scripts/bench/search_summary.py RUN
RUN is a `raycxr search` run folder (runs/NAME). The search wall is from run.json's start to the
leaderboard.csv the search writes when it stops; slots are the search's concurrent trials.
"""

import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from raycxr.runs import RunRecord, run_history  # noqa: E402
from raycxr.storage import RunStore  # noqa: E402

run = Path(sys.argv[1])
record = RunRecord.load(RunStore(run))
start = datetime.strptime(record.started, "%Y-%m-%dT%H:%M:%S%z").timestamp()
wall = (run / "leaderboard.csv").stat().st_mtime - start
slots = record.resources["concurrent"]
history = run_history(run)
frames = [history.frames[r["trial_id"]] for r in history.board]
reported = [df for df in frames if df is not None and len(df)]
epochs = sum(len(df) for df in reported)
compute = sum(float(df["train_compute_s"].sum()) for df in reported)
epoch_wall = sum(float(df["time_this_iter_s"].sum()) for df in reported)
validation = sum(float(df["val_time_s"].sum()) for df in reported if "val_time_s" in df)
print(f"search {record.name}: wall {wall:.0f} s, {slots} trial slots; trials started {len(frames)}, "
      f"reported {len(reported)}; epochs {epochs}")
print(f"training compute {compute:.0f} s = {100 * compute / (slots * wall):.0f}% of the slots' time "
      f"({slots} x {wall:.0f} s); validation {validation:.0f} s ({100 * validation / (slots * wall):.0f}%); "
      f"reported epochs' wall {epoch_wall:.0f} s ({100 * epoch_wall / (slots * wall):.0f}%)")
for r, df in zip(history.board, frames):
    if df is None or not len(df):
        print(f"  {r['trial_id']}: no result")
        continue
    print(f"  {r['trial_id']}: {r.get('pretrained') or '-'} {r.get('image_size')} px, {len(df)} epochs, best val AUC "
          f"{r['val_auc']:.4f}, compute {df['train_compute_s'].sum():.0f} s ({df['train_compute_s'].mean():.0f} s "
          f"per epoch), validation {df['val_time_s'].mean():.1f} s per epoch, {r['tune_status']}")

# With --site: every trial's site-val AUC per epoch (optimistic once the search chose on it), printed
# and plotted beside the run folder (site_auc_per_epoch.png).
sited = [(r, df) for r, df in zip(history.board, frames) if df is not None and "site_auc" in df]
if sited:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print("site-val AUC per epoch (the search chose on these: optimistic):")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r, df in sited:
        print(f"  {r['trial_id']}: {r.get('model')} {r.get('image_size')} px {r.get('augment')}/"
              f"{r.get('equalize')}: " + " ".join(f"{v:.4f}" for v in df["site_auc"]))
        ax.plot(df["epoch"], df["site_auc"], marker="o", label=f"{r['trial_id']} {r.get('image_size')}px "
                f"{r.get('augment')}/{r.get('equalize')}")
        ax.plot(df["epoch"], df["val_auc"], linestyle=":", color=ax.lines[-1].get_color())
    ax.set(xlabel="epoch", ylabel="AUC", title="site-val AUC (solid) and internal val AUC (dotted) per epoch")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run.parent / "site_auc_per_epoch.png")
    print(f"plot: {run.parent / 'site_auc_per_epoch.png'}")
