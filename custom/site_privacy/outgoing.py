"""Checks of anything about to leave the site: identifier values and blocked field names anywhere in it
(DP accounting: ``dp_ledger``; the result's structure: ``structure``). A finding says where (a path into
the payload) and which blocked field matched, never the matched value, so that the site's own logs stay
clean."""


import numpy as np

from site_privacy.identifiers import IdentifierIndex, normalise



SCALARS = (int, float, np.integer, np.floating)


def _key_path(path: str, key, index: int, known) -> str:
    """``path/key`` for a key the site knows (parameter, metric and meta names it allows), else ``path/#index``:
    a reason that goes back to the server never repeats text the job chose."""
    return f"{path}/{key}" if isinstance(key, str) and (known is None or key in known) else f"{path}/#{index}"


def _items(node, path: str, known):
    """(path, kind, item) of what ``node`` carries: "text" (strings, dict keys, bytes), "number" (scalars) and
    "codes" (numeric sequences and arrays, which may spell text as character codes)."""
    if isinstance(node, str):
        yield path, "text", node
    elif isinstance(node, (bytes, bytearray)):
        yield path, "text", bytes(node).decode("utf-8", errors="replace")
    elif isinstance(node, bool) or node is None:
        return
    elif isinstance(node, SCALARS):
        yield path, "number", node
    elif isinstance(node, dict):
        for i, (key, value) in enumerate(node.items()):
            if isinstance(key, str):
                yield f"{path or ''} (a key)", "text", key
            elif isinstance(key, SCALARS) and not isinstance(key, bool):
                yield f"{path or ''} (a key)", "number", key
            yield from _items(value, _key_path(path, key, i, known), known)
    elif isinstance(node, (list, tuple, set, frozenset)):
        items = list(node)
        if items and all(isinstance(x, SCALARS) and not isinstance(x, bool) for x in items):
            yield path, "codes", items
        for i, item in enumerate(items):
            yield from _items(item, f"{path}[{i}]", known)
    elif isinstance(node, np.ndarray):
        if node.dtype.kind in "USO":
            for i, item in enumerate(node.ravel().tolist()):
                yield from _items(item, f"{path}[{i}]", known)
        elif node.dtype.kind in "iuf" and node.ndim == 0:
            yield path, "number", node.item()
        elif node.dtype.kind in "iuf":
            yield path, "codes", node


def find_blocked(payload, fields: tuple[str, ...], index: IdentifierIndex, known=None) -> str | None:
    """Where ``payload`` carries a blocked field name or an identifier value of the site's manifests (as
    ``index`` matches them: normalised, any word order, dates in any format, numbers, character codes);
    None if nowhere. ``known``: the keys a finding's path may name (None: all)."""
    normalised_fields = [(field, normalise(field)) for field in fields]
    for path, kind, item in _items(payload, "", known):
        where = path or "/"
        if kind == "text":
            low = normalise(item)
            for field, field_norm in normalised_fields:
                if field_norm and field_norm in low:
                    return f"blocked field name {field} at {where}"
            origin = index.match_text(item)
        elif kind == "number":
            origin = index.match_number(item)
        else:
            origin = index.match_codes(item)
        if origin:
            return f"a value of blocked field {origin} at {where}"
    return None
