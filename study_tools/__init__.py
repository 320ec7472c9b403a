"""The study tools behind study.py and study_report.py, split by concern: the claims with their endpoints and tests
(claims.py, to be read beside paired_stats.py), loading and validating a study's files (loading.py), the report's
tables (tables.py), learning-curve statistics (curves.py), plots (plots.py), and stage costs and provenance
(costs.py), the claims' verdicts as claims.csv and the README's claim × env table (evidence.py)."""
