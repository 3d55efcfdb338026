"""Reading the JSON files that configure jobs and sites, with errors that name the file."""

import json
from pathlib import Path


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; a missing or malformed file, or one that is not an object, raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data
