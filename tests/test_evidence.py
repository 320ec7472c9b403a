"""The claims' verdicts as files (claims.csv beside each report) and as the README's claim × env table
(study_tools/evidence.py); and the per-seed tables of a report built from its chains' files."""

import json
import re
import subprocess
import sys

import pytest
from test_study import fake_study

import study_report as sr
from conftest import ROOT
from study_tools import claims, costs, evidence, loading
from study_tools.tables import per_seed_tables

README_FOLDERS = ("results/study-hopper-100k", "results/study-halfcheetah-100k")  # the README's columns
SEEDS = tuple(range(1, 9))
ARMS = {  # claim 1 holds on every seed; claim 3 is contradicted (the adversarial arm wins every condition)
    claims.OFFLINE: ("offline", "", "", lambda s, c: 30.0 + s),
    claims.NORMAL_FT: ("offline", "normal", "fixed", lambda s, c: 40.0 + s % 3),
    claims.RANDOM_FT: ("offline", "random", "fixed", lambda s, c: 38.0 + s % 2),
    claims.ADV_FIXED: ("offline", "adversarial", "fixed", lambda s, c: 45.0 + (s * 7) % 5),
}


def test_claims_csv_and_the_table_carry_the_report_s_verdicts_and_name_the_deciding_comparison(tmp_path):
    res = fake_study(tmp_path, ARMS, seeds=SEEDS)
    sr.main(sr.Args(results_dir=str(res), reps=200))
    report = (res / "report.md").read_text()
    assert "Holm-adjusted p = 0.016: **supported**" in report and "Holm-adjusted p = 0.047: **contradicted**" in report
    env, cells = evidence.env_cells(str(res))  # robustness differences 16 17 13 14 10 11 12 8: t(7) CI by hand
    assert env == "Hopper-v5"
    assert cells[1] == (
        "**supported**<br>adversarial (fixed) − offline-only, robustness: +12.6 [+10.1, +15.2], higher in 8 of 8 "
        "seeds<br>p 0.008, Holm 0.016 at α 0.05"
    )
    # claim 3: the first difference against the claim with the smallest p (2 / 2^8, times its 6 differences)
    assert cells[3].startswith("**contradicted**, tested for a contradiction<br>normal − adversarial (fixed), normal ")
    assert "(1 of 6 components)" in cells[3] and "p against the claim 0.047, Holm 0.047 at α 0.05" in cells[3]
    assert cells[2] == cells[4] == "not measured"  # no scratch, no curricula in this study
    rows = (res / "claims.csv").read_text().splitlines()
    assert len(rows) == 1 + 1 + 1 + 6 + 2 and sum(r.split(",")[13] == "1" for r in rows[1:]) == 2  # one per tested


def test_a_study_that_is_not_complete_shows_its_chains_and_no_verdict(tmp_path):
    """A one-look study is not looked at early: while its report is PARTIAL (or not built), no cell shows a number."""
    res = fake_study(tmp_path, ARMS, seeds=SEEDS)
    (res / "chains").mkdir()
    for seed in (1, 2, 3):
        (res / "chains" / f"Hopper-v5__seed{seed}.json").write_text("{}")
    running = "running: 3 of 8 chains committed; no verdict before the report reads them all"
    assert set(evidence.env_cells(str(res))[1].values()) == {running}  # no report yet
    (tmp_path / "runs" / "fine-tuned_normal_8" / "matrix.csv").unlink()
    with pytest.raises(sr.ReportError, match="seed1.json lacks env_id, seed, commit, machine, stages, wall_s, fin"):
        sr.main(sr.Args(results_dir=str(res), reps=200))  # a damaged chain file: one line, not a KeyError
    for seed in (1, 2, 3):  # a finished chain's provenance, as study.py writes it
        chain = {"env_id": "Hopper-v5", "seed": seed, "commit": "abc", "machine": "vm", "stages": 9, "wall_s": 60.0}
        (res / "chains" / f"Hopper-v5__seed{seed}.json").write_text(json.dumps({**chain, "finished": 0.0}))
    sr.main(sr.Args(results_dir=str(res), reps=200))
    assert "PARTIAL: 31 of 32 policies evaluated" in (res / "report.md").read_text()
    assert "**contradicted**" in (res / "report.md").read_text()  # the report itself shows it, labelled PARTIAL
    assert set(evidence.env_cells(str(res))[1].values()) == {running}


def test_the_readme_table_is_the_command_s_output_on_the_committed_folders():
    """The table that opens the README's evidence is what `python -m study_tools.evidence` prints from the committed
    claims.csv files; after a chain or a report lands, rerun it with --readme README.md."""
    text = (ROOT / "README.md").read_text()
    block = text.split(evidence.BEGIN + "\n")[1].split(evidence.END)[0]
    folders = [str(ROOT / f) for f in README_FOLDERS]
    assert block == evidence.claims_table(folders)


def test_the_command_rewrites_only_the_marked_table_and_refuses_in_one_line(tmp_path):
    res = fake_study(tmp_path, ARMS, seeds=SEEDS)
    sr.main(sr.Args(results_dir=str(res), reps=200))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{evidence.BEGIN}\nold table\n{evidence.END}\n\nbelow\n")
    cmd = [sys.executable, "-m", "study_tools.evidence", str(res), "--readme", str(readme)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert readme.read_text() == (
        f"# title\n\n{evidence.BEGIN}\n{evidence.claims_table([str(res)])}{evidence.END}\n\nbelow\n"
    )
    readme.write_text("no markers\n")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and proc.stderr.startswith("error:") and "markers" in proc.stderr
    assert readme.read_text() == "no markers\n" and [p.name for p in tmp_path.glob("README.md*")] == ["README.md"]
    manifest = json.loads((res / "study.json").read_text())
    (res / "study.json").write_text(json.dumps({**manifest, "env_ids": ["Hopper-v5", "Walker2d-v5"]}))
    proc = subprocess.run(cmd[:4], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "one study folder per env" in proc.stderr
    (res / "study.json").write_text(json.dumps(manifest))
    claims_csv = (res / "claims.csv").read_text()
    (res / "claims.csv").write_text(claims_csv.replace(",complete", ",").replace("study_status", "status"))
    proc = subprocess.run(cmd[:4], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and proc.stderr.startswith("error: ") and "claims.csv is damaged" in proc.stderr
    (res / "claims.csv").write_text(claims_csv.replace(",1,0.0078125,", ",1,eight,", 1))  # claim 1: claim_p a word
    proc = subprocess.run(cmd[:4], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "claims.csv is damaged (ValueError" in proc.stderr
    proc = subprocess.run(cmd[:3], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and proc.stderr.startswith("error: name at least one study")


def test_a_report_from_the_chains_files_rewrites_the_per_seed_tables_with_every_seed_it_read(tmp_path):
    """Part 1's top-level evaluations.csv once held seeds 1-10 while its report read 20 chains: a report built from
    chains/ now writes the per-seed tables from exactly what it read."""
    res = fake_study(tmp_path, ARMS, seeds=SEEDS)
    sr.main(sr.Args(results_dir=str(res), reps=200))
    every_seed = (res / "evaluations.csv").read_text(), (res / "curves.csv").read_text()
    rows, curves, _ = loading.load_runs(json.loads((res / "study.json").read_text()), str(tmp_path))
    (res / "chains").mkdir()
    for seed in SEEDS:  # each chain's files, as study.py exports them
        mine = [r for r in rows if r["seed"] == seed]
        evaluations, curve_table = per_seed_tables(mine, {k: {seed: v[seed]} for k, v in curves.items()})
        (res / "chains" / f"Hopper-v5__seed{seed}__evaluations.csv").write_text(evaluations)
        (res / "chains" / f"Hopper-v5__seed{seed}__curves.csv").write_text(curve_table)
    first_four = [ln for ln in every_seed[0].splitlines(keepends=True) if ln.split(",")[2] in ("seed", "1", "2")]
    (res / "evaluations.csv").write_text("".join(first_four))  # a stale table, as part 1's was
    sr.main(sr.Args(results_dir=str(res), reps=200, source="csv"))
    assert "Read from the finished chains' per-seed CSVs" in (res / "report.md").read_text()
    assert ((res / "evaluations.csv").read_text(), (res / "curves.csv").read_text()) == every_seed


def test_part_2_s_cost_outside_its_chains_repeats_the_committed_files_it_names():
    rows = costs.outside_chains(f"{ROOT}/results/study-halfcheetah-100k")
    outside = {r["item"]: r["core_s"] for r in rows}
    with open(f"{ROOT}/results/chain-cost-halfcheetah/chains/HalfCheetah-v5__seed101.json") as f:
        assert outside["cost pilot: the chain of seed 101 at the study's budgets"] == json.load(f)["cpu_s"]
    for row in loading.plain_td3_reference(f"{ROOT}/results/study-halfcheetah-100k"):
        assert outside[f"plain TD3 reference, seed {row['seed']}"] == row["wall_s"]
    (dataset,) = [r for r in rows if r["item"].startswith("dataset")]
    user, system = (
        float(x) for x in re.search(r"user ([\d.]+) s \+ system ([\d.]+) s", dataset["measured_as"]).groups()
    )
    with open(f"{ROOT}/docs/protocol-part2.md") as f:  # the protocol's cost table gives the same measurement
        assert f"| {round(user)} s |" in f.read() and dataset["core_s"] == pytest.approx(user + system)
    assert len(outside) == 4
