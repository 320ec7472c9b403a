"""The README's evidence comes from the committed reports: every interval figure "x [lo, hi]" and every claim's verdict
in each study's section of "What the evidence shows" appears in the report of the results folder the section links to
first; a section that says its study is still running shows no figure, and its study's report is not complete. (The
claim × env table that opens the evidence is checked against the committed claims.csv files in test_evidence.py.)"""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERVAL = re.compile(r"([+−-]?\d+(?:\.\d+)?) \[(?:(\d+% CI) )?([+−-]?\d+(?:\.\d+)?), ([+−-]?\d+(?:\.\d+)?)\]")
FOLDER_LINK = re.compile(r"\]\((results/[^)]+/)\)")
RUNNING = "**Running: no verdict yet**"
VERDICTS = ("supported", "contradicted", "inconclusive", "not judged", "not measured")


def ascii_minus(text: str) -> str:
    return text.replace("−", "-")


def evidence_sections() -> list:
    """(heading, text, report path) per study in "What the evidence shows": the text up to the next heading."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    start = readme.index("## What the evidence shows")
    end = readme.find("\n## ", start + 1)
    evidence = readme[start : end if end > 0 else None]
    parts = re.split(r"\n(?=### )", evidence)[1:]  # the first is the claim × env table (test_evidence.py)
    out = []
    for part in parts:
        folder = FOLDER_LINK.search(part)
        assert folder, f"no results folder linked in README section {part.splitlines()[0]!r}"
        out.append((part.splitlines()[0], part, os.path.join(ROOT, folder.group(1), "report.md")))
    return out


def test_the_readme_evidence_names_two_studies_with_their_reports():
    sections = evidence_sections()
    assert len(sections) >= 2
    for heading, text, report in sections:
        if RUNNING in text:  # a study still running has its manifest committed, its report not yet
            manifest = os.path.join(os.path.dirname(report), "study.json")
            assert os.path.isfile(manifest), f"{heading}: {manifest} is not committed"
        else:
            assert os.path.isfile(report), f"{heading}: {report} is not committed"


def test_a_study_still_running_shows_no_figure_and_its_report_is_not_complete():
    running = [(h, t, r) for h, t, r in evidence_sections() if RUNNING in t]
    for heading, text, report_path in running:
        assert not INTERVAL.findall(text) and not re.search(r"\| [1-4]\. ", text), heading
        if os.path.isfile(report_path):
            with open(report_path) as f:
                assert "Status: complete" not in f.read(), f"{heading}: its study is complete; give its evidence"


def test_every_interval_in_the_readme_evidence_is_in_its_report():
    for heading, text, report_path in (s for s in evidence_sections() if RUNNING not in s[1]):
        with open(report_path) as f:
            report = ascii_minus(f.read())
        figures = INTERVAL.findall(text)
        assert len(figures) >= 10, heading
        for point, level, lo, hi in figures:
            # an equivalence test's interval: "x [lo, hi] (94% CI" in the report, "x [94% CI lo, hi]" in the README
            expected = ascii_minus(f"{point} [{lo}, {hi}]" + (f" ({level}" if level else ""))
            assert expected in report, f"{heading}: {expected!r} is not in {report_path}"


def test_every_claim_verdict_in_the_readme_is_the_reports():
    for heading, text, report_path in (s for s in evidence_sections() if RUNNING not in s[1]):
        with open(report_path) as f:
            claims = {ln[:2]: ln for ln in f.read().splitlines() if re.match(r"[1-4]\. ", ln)}
        rows = [ln for ln in text.splitlines() if re.match(r"\| [1-4]\. ", ln)]
        assert len(rows) == 4, heading
        for row in rows:
            verdict = row.rstrip(" |").rsplit("|", 1)[1].strip().strip("*")
            word = next(v for v in VERDICTS if verdict.startswith(v))
            assert word in claims[row[2:4]], f"{heading}: claim {row[2]} is {word!r} in the README, not in the report"
