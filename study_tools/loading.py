"""A study's inputs, loaded and checked: its manifest (study.json), each policy's evaluation rows and each fine-tune's
learning curve, from the runs' own files or from the per-seed CSVs a report wrote before. Every problem is a
ReportError, printed as one line."""

import contextlib
import csv
import glob
import json
import os
from collections import Counter, defaultdict

import numpy as np

from study_tools.claims import CURVE_CONDITIONS, OFFLINE


class ReportError(Exception):
    """A problem with the study's files; printed as one line."""


# Inputs: per-seed evaluations (one row per env, policy, seed, evaluation condition) and learning curves
CURVE_KEYS = {  # curves.csv column <- metrics.jsonl key
    **{f"{c}_{k}": f"eval/{c}_{k}" for c in CURVE_CONDITIONS for k in ("return", "normalized")},
    "q": "curriculum/q",
    "perturbed_episode_fraction": "charts/perturbed_fraction",
    "perturbed_step_fraction": "charts/perturbed_step_fraction",
}


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path} is unreadable ({type(e).__name__}); run the study again to rewrite it") from None


@contextlib.contextmanager
def reading(path: str, fix: str):
    """Any read of one input file (a missing file, a torn line, a missing column, a value that is not a number) ends
    in one line that names the file and `fix`, instead of a traceback."""
    try:
        yield
    except (OSError, KeyError, ValueError, TypeError, IndexError, csv.Error, UnicodeDecodeError) as e:
        detail = f"{type(e).__name__}: {str(e).strip()[:120]}" if str(e).strip() else type(e).__name__
        raise ReportError(f"{path} is missing or damaged ({detail}); {fix}") from None


MANIFEST_KEYS = {
    "study": str,
    "scale": str,
    "env_ids": list,
    "epsilon": (int, float),
    "policies": list,
    "runs_root": str,
}
POLICY_KEYS = ("env_id", "seed", "run_dir", "stage", "matrix")


def check_manifest(manifest, path: str):
    """study.json holds what the report reads: its keys, and each policy's."""
    fix = "run the study's command again to rewrite it (finished stages are skipped)"
    if not isinstance(manifest, dict):
        raise ReportError(f"{path} is not a study manifest; {fix}")
    for key, kind in MANIFEST_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise ReportError(f"{path} lacks '{key}' or it is malformed; {fix}")
    for p in manifest["policies"]:
        if not isinstance(p, dict) or any(k not in p for k in POLICY_KEYS):
            raise ReportError(f"{path} lists a policy without {', '.join(POLICY_KEYS)}; {fix}")


def check_finite(rows: list, curves: dict):
    """A NaN or inf among the inputs is not a result: refused, naming the policy and seed, never aggregated."""
    for r in rows:
        if not (np.isfinite(r["mean_return"]) and np.isfinite(r["normalized_mean"])):
            raise ReportError(
                f"non-finite score for {r['policy']}, seed {r['seed']}, {r['eval_condition']}; re-evaluate that "
                f"policy: a NaN is not a result"
            )
    for (env, policy), by_seed in curves.items():
        for seed, run in by_seed.items():
            for row in run:
                bad = [k for k, v in row.items() if v is not None and not np.isfinite(v)]
                if bad:
                    raise ReportError(
                        f"non-finite {bad[0]} in the learning curve of {policy} on {env}, seed {seed}, at step "
                        f"{row['step']}; "
                        f"that fine-tune's log is not a result: rerun it"
                    )


def load_runs(manifest: dict, root: str):
    """The runs' files -> (evaluation rows, curves {(env, policy): {seed: [eval rows]}}, policies not evaluated yet)."""
    rows, curves, missing = [], defaultdict(dict), []
    for p in manifest["policies"]:
        path = os.path.join(root, p["matrix"])
        if not os.path.isfile(path):
            missing.append(p)
            continue
        with reading(path, "re-run evaluate_matrix.py on that policy (or the study's command)"), open(path) as f:
            mine = [
                {
                    "env_id": r["env_id"],
                    "policy": r["policy"],
                    "seed": int(r["seed"]),
                    "eval_condition": r["eval_condition"],
                    "mean_return": float(r["mean_return"]),
                    "normalized_mean": float(r["normalized_mean"]),
                    "attack_budget": r.get("attack_budget", ""),
                }
                for r in csv.DictReader(f)
            ]
        rows += mine
        if p["stage"] == "finetune":
            log = os.path.join(root, p["run_dir"], "metrics.jsonl")
            with reading(log, "the fine-tune's log is its learning curve: rerun that fine-tune"), open(log) as f:
                evals = [r for r in map(json.loads, f) if "eval/normal_return" in r]
                curves[(p["env_id"], mine[0]["policy"])][p["seed"]] = [
                    {"step": int(r["step"]), **{col: number(r.get(key)) for col, key in CURVE_KEYS.items()}}
                    for r in evals
                ]
    return rows, curves, missing


def number(value) -> float | None:
    """A logged value as a float (None stays None: a key that row does not log); a string that is no number raises."""
    return None if value is None else float(value)


def csv_inputs(results_dir: str) -> tuple:
    """The per-seed tables: the finished chains' files (chains/*__evaluations.csv and *__curves.csv, which study.py
    writes as each (env, seed) chain finishes) where there are any, else evaluations.csv and curves.csv."""
    chains = sorted(glob.glob(os.path.join(results_dir, "chains", "*__evaluations.csv")))
    if chains:
        return chains, [p.replace("__evaluations.csv", "__curves.csv") for p in chains]
    return [os.path.join(results_dir, "evaluations.csv")], [os.path.join(results_dir, "curves.csv")]


def load_csvs(results_dir: str):
    """The per-seed tables a report or study wrote -> (evaluation rows, curves). Curves from before the normalized
    columns get them from the linear map that the evaluations show between returns and normalized scores (exact)."""
    rows = []
    evaluation_files, curve_files = csv_inputs(results_dir)
    fix = "restore it from git (`git checkout -- <file>`) or rebuild it from the runs (--source runs)"
    for path in evaluation_files:
        with reading(path, fix), open(path) as f:
            for r in csv.DictReader(f):
                rows.append(
                    {
                        **r,
                        "seed": int(r["seed"]),
                        "mean_return": float(r["mean_return"]),
                        "normalized_mean": float(r["normalized_mean"]),
                        "attack_budget": r.get("attack_budget", ""),
                    }
                )

    def normalized(env: str, ret: float) -> float:  # normalized = a · return + b, read off the evaluations
        pairs = np.array([(r["mean_return"], r["normalized_mean"]) for r in rows if r["env_id"] == env])
        return float(np.polyval(np.polyfit(pairs[:, 0], pairs[:, 1], 1), ret))

    curves = defaultdict(dict)
    for path in (p for p in curve_files if os.path.isfile(p)):
        with reading(path, fix), open(path) as f:
            for r in csv.DictReader(f):
                row = {"step": int(r["step"])}
                for col in CURVE_KEYS:
                    row[col] = float(r[col]) if r.get(col) not in (None, "") else None
                for c in CURVE_CONDITIONS:
                    if row[f"{c}_normalized"] is None:
                        row[f"{c}_normalized"] = normalized(r["env_id"], row[f"{c}_return"])
                curves[(r["env_id"], r["policy"])].setdefault(int(r["seed"]), []).append(row)
    return rows, curves


def missing_curves(rows: list, curves: dict) -> list:
    """Each evaluated fine-tune (every policy but offline-only) whose learning curve is not among the inputs, as
    'policy, env, seed s' (a chain's curves file lost beside its evaluations)."""
    fine_tuned = sorted({(r["env_id"], r["policy"], r["seed"]) for r in rows if r["policy"] != OFFLINE})
    return [f"{pol}, {env}, seed {s}" for env, pol, s in fine_tuned if s not in curves.get((env, pol), {})]


def evaluated(listed: list, rows: list) -> tuple:
    """(n_done, n_total): how many of the policies the manifests list (`listed`, their `policies`) have rows, and how
    many they list. Counted per (env, seed) chain, since a manifest names a policy by its run and a row by its label:
    a chain's listed policies are evaluated as far as its rows name distinct policies. Rows of a chain that no
    manifest lists (an extension's seeds whose manifest was lost with the machine that ran them) count in neither
    number."""
    per_chain = Counter((p["env_id"], p["seed"]) for policies in listed for p in policies)
    labels = {(r["env_id"], r["seed"], r["policy"]) for r in rows}
    have = Counter((env, seed) for env, seed, _ in labels)
    return sum(min(n, have[chain]) for chain, n in per_chain.items()), sum(per_chain.values())


def load(args):
    path = os.path.join(args.results_dir, "study.json")
    if not os.path.isfile(path):
        raise ReportError(f"{path} not found; run `python study.py --results-dir {args.results_dir}` first")
    manifest = read_json(path)
    check_manifest(manifest, path)
    root = args.runs_root or manifest["runs_root"]
    on_disk = any(os.path.isfile(os.path.join(root, p["matrix"])) for p in manifest["policies"])
    source = args.source if args.source != "auto" else ("runs" if on_disk else "csv")
    if source == "runs":
        rows, curves, _ = load_runs(manifest, root)
    else:
        if not all(os.path.isfile(p) for p in csv_inputs(args.results_dir)[0]):
            raise ReportError(
                f"neither the study's runs (under {root}) nor {args.results_dir}/evaluations.csv are here; "
                f"pass --runs-root, or let the study finish"
            )
        rows, curves = load_csvs(args.results_dir)
    if not rows:
        raise ReportError(
            f"no evaluated policy yet among the {len(manifest['policies'])} in {path}; let the study finish"
        )
    check_finite(rows, curves)
    return manifest, source, rows, curves


def seed_ranges(seeds) -> str:
    """1 2 3 5 -> '1-3, 5'."""
    seeds, runs = sorted(seeds), []
    for s in seeds:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def plain_td3_reference(results_dir: str) -> list:
    """The plain-TD3 runs beside claim 2 (benchmarks/plain_td3_reference.py writes plain_td3_reference.csv), or []."""
    path = os.path.join(results_dir, "plain_td3_reference.csv")
    if not os.path.isfile(path):
        return []
    try:
        rows = list(csv.DictReader(open(path)))
        return [
            {
                **r,
                "seed": int(r["seed"]),
                **{k: float(r[k]) for k in ("online_auc", "final_normalized")},
                "wall_s": float(r["wall_s"]) if r.get("wall_s") else None,  # older files and resumed runs: none
            }
            for r in rows
        ]
    except (KeyError, ValueError) as e:
        fix = "write it again with benchmarks/plain_td3_reference.py"
        raise ReportError(f"{path} is malformed ({type(e).__name__}: {e}); {fix}") from None
