"""The whole suite's order: the unit and configuration tests first, then tests/e2e, then tests/deploy (each package's
tests together and in their own order). From the end of collection on, tests/deploy/conftest.py builds the
air-gapped image that tests/deploy uses in the background (4-6 min cold); it is ready long before tests/deploy
starts, and the build overlaps the unit tests and the start of tests/e2e (its deploy and the 3D jobs, which wait
for their jobs without timing anything)."""

from pathlib import Path

LAST = [Path(__file__).parent / "e2e", Path(__file__).parent / "deploy"]


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        return next((i + 1 for i, package in enumerate(LAST) if item.path.is_relative_to(package)), 0)

    items.sort(key=rank)  # stable: each package's order stays
