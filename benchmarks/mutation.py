"""Mutation score of the rule modules (mutmut 3), per module, with the surviving mutants.

    .venv/bin/python benchmarks/mutation.py [--modules cost,budgets,similarity,lower_bound,ratelimit,smart]
                                            [--max-children N] [--budget-min M] [--workdir DIR] [--diffs]

mutmut changes one thing at a time in a rule module (a ``<`` for a ``<=``, a ``-`` for a ``+``, a constant) and
runs the unit tests that reach the changed function; a mutant the tests do not notice *survives*. The score is
killed / total per module. Not part of CI (tens of minutes on two cores); docs/testing.md records the figures.

Each module is judged by its own fast unit tests (``MODULES`` below), in a copy of its own: the tracked and
untracked (not ignored) files of the checkout go to ``--workdir/<module>`` (a new scratch directory by
default) and mutmut runs there, with the ``[mutmut]`` section of setup.cfg narrowed to that module and its
tests. The checkout is never touched. The modules share ``--budget-min``; give the same ``--workdir`` again
to resume a run that hit it (mutants already judged are not run again).
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (file, the fast unit tests that check its rules): the rule modules of issue 15, and the runtime
# kernel. Each module is judged by its own tests only: a mutant that survives them
# is a rule that no test of that module states.
MODULES = {
    "cost": ("engine/core/cost.py", ["tests/unit/test_cost.py", "tests/unit/test_budgets.py"]),
    "cost_cache": ("engine/core/_cost_cache.py", ["tests/unit/test_cost.py", "tests/unit/test_budgets.py"]),
    "budgets": ("engine/core/budgets.py", ["tests/unit/test_budgets.py", "tests/unit/test_rules.py",
                                      "tests/unit/test_actors.py"]),
    "budget_windows": ("engine/core/_budget_windows.py", ["tests/unit/test_budgets.py", "tests/unit/test_rules.py",
                                                      "tests/unit/test_actors.py"]),
    "similarity": ("engine/core/similarity.py", ["tests/unit/test_rules.py", "tests/unit/test_cache.py"]),
    "lower_bound": ("engine/sim/lower_bound.py", ["tests/unit/test_lower_bound.py"]),
    "ratelimit": ("engine/runtime/ratelimit.py", ["tests/unit/test_limits.py"]),
    "smart": ("policies/smart.py", ["tests/unit/test_rules_timing.py", "tests/unit/test_policies.py",
                                    "tests/unit/test_rules.py", "tests/unit/test_value_of_time.py"]),
    "conversation": ("policies/_conversation.py", ["tests/unit/test_rules_timing.py", "tests/unit/test_policies.py",
                                                   "tests/unit/test_rules.py", "tests/unit/test_value_of_time.py"]),
    # The runtime kernel: what both runtimes take from one copy.
    "admission": ("engine/runtime/admission.py", ["tests/unit/test_admission.py", "tests/unit/test_outcomes.py",
                                                  "tests/unit/test_rules.py", "tests/unit/test_cache.py"]),
    "reservation": ("engine/runtime/reservation.py", ["tests/unit/test_outcomes.py", "tests/unit/test_budgets.py",
                                                      "tests/unit/test_simulator.py", "tests/unit/test_actors.py"]),
    "outcomes": ("engine/runtime/outcomes.py", ["tests/unit/test_outcomes.py", "tests/unit/test_simulator.py",
                                                "tests/unit/test_actors.py", "tests/unit/test_rules.py"]),
}
KILLED = {"killed", "timeout", "caught by type check"}  # the tests (or the CPU limit) noticed the change
NOT_RUN = {"not checked", "check was interrupted by user"}  # the budget ran out before this mutant


def copy_checkout(dst: Path) -> int:
    """The checkout as ``git`` sees it (tracked and new files, nothing ignored) into ``dst``."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout.decode()
    n = 0
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if rel.startswith("mutants/") or not src.is_file():
            continue  # deleted in the working tree, or mutmut's own output
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        n += 1
    return n


def narrow_config(workdir: Path, file: str, tests: list[str]) -> None:
    """Mutate only ``file``, judged by ``tests``, in the copy (the checkout's setup.cfg lists every rule module
    and the union of their tests, for a plain ``mutmut run``)."""
    cfg = configparser.ConfigParser()
    cfg.read(workdir / "setup.cfg")
    if not cfg.has_section("mutmut"):
        sys.exit("setup.cfg has no [mutmut] section: restore it from the checkout")
    cfg["mutmut"]["only_mutate"] = "\n" + file
    cfg["mutmut"]["pytest_add_cli_args_test_selection"] = "\n" + "\n".join(tests)
    with open(workdir / "setup.cfg", "w") as f:
        cfg.write(f)


def run_mutmut(workdir: Path, max_children: int, budget_s: float, log: Path) -> bool:
    """Run mutmut in ``workdir`` until done or ``budget_s`` seconds; returns whether it exited by itself."""
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.exists():
        sys.exit(f"mutmut is not installed in {sys.executable}'s environment: "
                 f"{sys.executable} -m pip install 'mutmut>=3.8,<4'")
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    # An editable install (``pip install -e .``) maps ``engine.*`` to the checkout ahead of the copy on
    # sys.path, so the tests would import the unmutated code and every mutant would "survive". A
    # sitecustomize on PYTHONPATH drops that finder in mutmut's process and its test workers.
    shim = workdir / "_no_editable"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path\n"
        "                    if not getattr(f, '__module__', '').startswith('__editable__')]\n")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH")]))
    # The copy lives outside the checkout's parent: point the real-trace tests at the same data.
    env.setdefault("SMARTBATCH_DATA_DIR", str(ROOT.parent / "shared" / "data" / "real"))
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(exe), "run", "--max-children", str(max_children)], cwd=workdir, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            # mutmut stops its workers on Ctrl-C and keeps every verdict reached so far.
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return False
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(f"mutmut failed (exit {proc.returncode}); the end of {log}:\n{tail}")
    return True


def read_verdicts(workdir: Path, files: list[str]) -> dict[str, dict[str, str]]:
    """file -> {mutant name: status}, from mutmut's per-file records."""
    from mutmut.stats import status_by_exit_code

    out: dict[str, dict[str, str]] = {}
    for f in files:
        meta = workdir / "mutants" / (f + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        out[f] = {name: status_by_exit_code[code] for name, code in codes.items()}
    return out


def report(verdicts: dict[str, dict[str, str]], workdir: Path, diffs: bool) -> dict:
    """Print and return the score per file (``workdir``: the run's directory, one sub-directory per module)."""
    where = {file: workdir / name for name, (file, _) in MODULES.items()}
    rows = {}
    print(f"\n{'module':<24} {'killed / total':>15} {'score':>7}   other verdicts")
    for f, by_name in verdicts.items():
        counts = Counter(by_name.values())
        total = sum(n for s, n in counts.items() if s not in NOT_RUN)
        killed = sum(counts[s] for s in KILLED)
        other = ", ".join(f"{s} {n}" for s, n in sorted(counts.items()) if s not in KILLED)
        score = killed / total if total else float("nan")
        print(f"{f:<24} {killed:>7} / {total:<6} {score:>7.1%}   {other}")
        rows[f] = {"killed": killed, "total": total, "score": round(score, 4), "counts": dict(counts),
                   "survivors": sorted(n for n, s in by_name.items() if s not in KILLED | NOT_RUN)}
    all_killed = sum(r["killed"] for r in rows.values())
    all_total = sum(r["total"] for r in rows.values())
    if all_total:
        print(f"{'all':<24} {all_killed:>7} / {all_total:<6} {all_killed / all_total:>7.1%}")
    for f, r in rows.items():
        if not r["survivors"]:
            continue
        print(f"\nsurvivors in {f} ({len(r['survivors'])}):")
        for name in r["survivors"]:
            print(f"  {name}  [{verdicts[f][name]}]")
            if diffs:
                shown = subprocess.run([str(Path(sys.executable).with_name("mutmut")), "show", name],
                                       cwd=where[f], capture_output=True, text=True).stdout
                print("    " + "\n    ".join(line for line in shown.splitlines()[1:] if line.strip()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", default=",".join(MODULES), help=f"comma-separated, of {list(MODULES)}")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    ap.add_argument("--budget-min", type=float, default=240.0,
                    help="stop after this many minutes in all, shared by the modules left (resumable)")
    ap.add_argument("--workdir", type=Path, help="scratch directory to use or resume (default: a new one)")
    ap.add_argument("--diffs", action="store_true", help="print each survivor's diff")
    args = ap.parse_args()

    names = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        sys.exit(f"unknown module(s) {unknown}; choose from {list(MODULES)}")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="smartbatch-mutation-"))).resolve()
    if ROOT == workdir or ROOT in workdir.parents:
        sys.exit(f"--workdir {workdir} is inside the checkout; give a scratch directory outside {ROOT}")
    t0 = time.monotonic()
    verdicts: dict[str, dict[str, str]] = {}
    finished: dict[str, bool] = {}
    for k, name in enumerate(names):
        file, tests = MODULES[name]
        wd = workdir / name  # one copy per module: its own mutants, test selection and stats
        if (wd / "mutants").exists():
            print(f"{name}: resuming in {wd}")
        else:
            wd.mkdir(parents=True, exist_ok=True)
            print(f"{name}: copied {copy_checkout(wd)} files of {ROOT} to {wd}")
        narrow_config(wd, file, tests)
        left_s = args.budget_min * 60 - (time.monotonic() - t0)
        share_s = max(left_s / (len(names) - k), 60.0)
        t1 = time.monotonic()
        run_mutmut(wd, args.max_children, share_s, wd / "mutmut.log")
        verdicts[file] = read_verdicts(wd, [file])[file]
        left = sum(s in NOT_RUN for s in verdicts[file].values())
        finished[name] = bool(verdicts[file]) and not left  # every mutant judged (stopped or not)
        print(f"{name}: {'every mutant judged' if finished[name] else f'{left} mutants not run yet'} after "
              f"{(time.monotonic() - t1) / 60:.1f} min; log: {wd / 'mutmut.log'}")
    minutes = (time.monotonic() - t0) / 60
    print(f"\n{minutes:.1f} min in all, {args.max_children} mutants at once")
    rows = report(verdicts, workdir, args.diffs)
    (workdir / "mutation-score.json").write_text(json.dumps(
        {"modules": rows, "finished": finished, "minutes": round(minutes, 1), "max_children": args.max_children},
        indent=2))
    if not all(finished.values()):
        print(f"\nnot finished: {[n for n, ok in finished.items() if not ok]}; resume with --workdir {workdir}")


if __name__ == "__main__":
    main()
