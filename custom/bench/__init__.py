"""`make bench`: reproducible side-by-side measurements of this deployment on this machine (issue "make bench").

Each row module has ``run(quick: bool, work: Path) -> list[Measurement]``; ``python -m bench`` runs the chosen rows
and writes the table as JSON and Markdown under bench/results/. Benchmarks are not tests: ``make test`` only runs
``make bench ONLY=<row> QUICK=1`` to check that a row still produces its numbers.
"""
