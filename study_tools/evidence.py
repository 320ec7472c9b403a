"""The claims' verdicts as a file per study and as the README's claim × env table.

study_report.py writes every judged claim's components to claims.csv beside its report (`claim_rows`). This module's
command reads those files, one study folder per env, and prints the table that opens the README's evidence (or, with
--readme, rewrites it there between two markers):

    python -m study_tools.evidence results/study-hopper-100k results/study-halfcheetah-100k --readme README.md

Each cell is one env's verdict on one claim, with the paired comparison that decided it: for a claim whose
differences all point its way, the component with the largest p (every one must hold); for a claim tested for a
contradiction, the difference against it with the smallest p. A study that is still running, or whose report is
PARTIAL, has no verdict here: its cells say how many of its chains are committed, so a study that looks once is not
looked at early. No verdict is pooled across envs."""

import csv
import glob
import json
import os
import sys
from dataclasses import dataclass

import tyro

from study_tools.claims import CLAIMS, EQUIVALENCE_MARGIN
from study_tools.tables import p_text

BEGIN, END = "<!-- claims-by-env: begin (python -m study_tools.evidence) -->", "<!-- claims-by-env: end -->"


def deciding_component(entry: dict) -> int | None:
    """The index of the component whose p is the claim's (claims.primary_test), or None for an untested claim."""
    results = entry["results"]
    if entry.get("p") is None:
        return None
    if entry["side"] == "for":
        return max(range(len(results)), key=lambda i: results[i][0]["p"])
    against = [i for i, (r, comp) in enumerate(results) if comp.test == "difference" and r["mean"] < 0]
    return min(against, key=lambda i: results[i][0]["p"])


def claim_rows(judged: list, confidence: float, alpha: float, complete: bool, second_look: bool) -> list:
    """One row per (env, claim, component) of judge()'s entries: what claims.csv holds."""
    rows = []
    for e in judged:
        decider = deciding_component(e)
        look = "first" if e.get("first_look") else "second" if second_look else "only"
        for i, (r, comp) in enumerate(e["results"]):
            r = r or {}
            rows.append(
                {
                    "env_id": e["env"],
                    "claim": e["claim"].number,
                    "x": comp.x,
                    "y": comp.y,
                    "endpoint": comp.endpoint,
                    "test": comp.test,
                    "n": r.get("n"),
                    "mean_difference": r.get("mean"),
                    "lo": r.get("lo"),
                    "hi": r.get("hi"),
                    "ci_level": 1 - 2 * alpha if comp.test == "equivalence" else confidence,
                    "x_higher": r.get("up"),
                    "p": r.get("p"),
                    "deciding": int(i == decider),
                    "claim_p": e.get("p"),
                    "side": e.get("side", ""),
                    "p_holm": e.get("p_holm"),
                    "alpha": alpha,
                    "verdict": e.get("verdict") or "",
                    "look": look,
                    "study_status": "complete" if complete else "partial",
                }
            )
    return rows


# The claim × env table
@dataclass
class Args:
    folders: tyro.conf.Positional[tuple[str, ...]]
    """study results folders, one per env, in the table's column order (each with study.json, chains/ and, once its
    report is built from every chain, claims.csv)"""
    readme: str | None = None
    """rewrite the table in this file, between its two markers, instead of printing it"""


class EvidenceError(Exception):
    """A problem with a study folder or the README; printed as one line."""


ENDPOINT_NAMES = {"online_auc": "online AUC", "normal": "normal return", "random": "return under random δ"}


def signed(x: float) -> str:
    return f"{x:+.1f}".replace("-", "−")


def arm(name: str) -> str:
    return name.removeprefix("fine-tuned ")


def running_cell(folder: str, manifest: dict, env: str) -> str:
    chains = len(glob.glob(os.path.join(folder, "chains", f"{env}__seed*.json")))
    return (
        f"running: {chains} of {len(manifest.get('seeds', []))} chains committed; no verdict before the report reads "
        "them all"
    )


def verdict_cell(rows: list) -> str:
    """A claim's cell from its claims.csv rows: verdict, the deciding comparison, the claim's p and Holm's."""
    d = next((r for r in rows if r["deciding"] == "1"), None)
    if d is None:
        return "not measured"
    verdict = f"**{d['verdict']}**" if d["verdict"] else f"not judged ({d['n']} paired seeds)"
    if d["side"] == "against":
        verdict += ", tested for a contradiction"
    if d["look"] == "first":
        verdict += " (first look, kept)"
    mean, lo, hi, level = (float(d[k]) for k in ("mean_difference", "lo", "hi", "ci_level"))
    n_components = "" if len(rows) == 1 else f" (1 of {len(rows)} components)"
    endpoint = ENDPOINT_NAMES.get(d["endpoint"], d["endpoint"])
    comparison = f"{arm(d['x'])} − {arm(d['y'])}, {endpoint}{n_components}"
    interval = f"{signed(mean)} [{signed(lo)}, {signed(hi)}]"
    if d["test"] == "equivalence":
        difference = f"{interval} ({level:.0%} CI; margin ±{EQUIVALENCE_MARGIN:g})"
        p = "TOST p"
    else:
        difference = f"{interval}, higher in {d['x_higher']} of {d['n']} seeds"
        p = "p against the claim" if d["side"] == "against" else "p"
    holm = f"Holm {p_text(float(d['p_holm']))} at α {float(d['alpha']):g}"
    return f"{verdict}<br>{comparison}: {difference}<br>{p} {p_text(float(d['claim_p']))}, {holm}"


def env_cells(folder: str) -> tuple:
    """-> (env, {claim number: cell}) for one study folder."""
    try:
        with open(os.path.join(folder, "study.json")) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise EvidenceError(
            f"{folder}/study.json is unreadable ({type(e).__name__}); name a study's results folder"
        ) from None
    if len(manifest.get("env_ids", [])) != 1:
        raise EvidenceError(f"{folder} holds envs {manifest.get('env_ids')}; the table takes one study folder per env")
    env = manifest["env_ids"][0]
    path = os.path.join(folder, "claims.csv")
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["env_id"] == env]
    try:
        if not rows or any(r["study_status"] != "complete" for r in rows):
            return env, {c.number: running_cell(folder, manifest, env) for c in CLAIMS}
        return env, {c.number: verdict_cell([r for r in rows if r["claim"] == str(c.number)]) for c in CLAIMS}
    except (KeyError, ValueError, TypeError) as e:
        fix = f"rebuild it with python study_report.py --results-dir {folder}"
        raise EvidenceError(f"{path} is damaged ({type(e).__name__}: {e}); {fix}") from None


def claims_table(folders) -> str:
    columns = [env_cells(folder) for folder in folders]
    lines = ["| claim | " + " | ".join(env for env, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for c in CLAIMS:
        lines.append(f"| {c.number}. {c.text} | " + " | ".join(cells[c.number] for _, cells in columns) + " |")
    return "\n".join(lines) + "\n"


def rewrite_readme(path: str, table: str):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise EvidenceError(f"{path} is unreadable ({type(e).__name__}); name the README") from None
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise EvidenceError(f"{path} needs one pair of markers, {BEGIN} then {END}, around the table")
    head, rest = text.split(BEGIN)
    new = head + BEGIN + "\n" + table + END + rest.split(END, 1)[1]
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def main(args: Args):
    if not args.folders:
        raise EvidenceError("name at least one study's results folder, e.g. results/study-hopper-100k")
    table = claims_table(args.folders)
    if args.readme:
        rewrite_readme(args.readme, table)
        print(f"wrote the claim × env table into {args.readme}")
    else:
        print(table, end="")


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except EvidenceError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
