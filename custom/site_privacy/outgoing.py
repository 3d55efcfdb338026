"""Checks of anything about to leave the site. A finding says where (a path into the payload) and
which blocked field matched, never the matched value, so that the site's own logs stay clean."""

import math

import numpy as np

from site_privacy.policy import DifferentialPrivacy

DP_ACCOUNTING_KEYS = ("dp_epsilon", "dp_delta", "dp_max_grad_norm")  # meta a DP result must carry
PARAMETER_KINDS = ("WEIGHTS", "WEIGHT_DIFF")  # DXO kinds that carry trained parameters


def _strings(node, path: str):
    """(path, text) of every string in ``node``: dict keys and values, list items, string arrays."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            key_path = f"{path}/{key}" if isinstance(key, str) else f"{path}/#{key!r}"
            if isinstance(key, str):
                yield f"{path} (a key)", key
            yield from _strings(value, key_path)
    elif isinstance(node, (list, tuple, set)):
        for i, item in enumerate(node):
            yield from _strings(item, f"{path}[{i}]")
    elif isinstance(node, np.ndarray) and node.dtype.kind in "USO":
        for i, item in enumerate(node.ravel().tolist()):
            yield from _strings(item, f"{path}[{i}]")
    elif isinstance(node, bytes):
        yield path, node.decode("utf-8", errors="replace")


def find_blocked(payload, fields: tuple[str, ...], values: dict[str, str]) -> str | None:
    """Where ``payload`` carries a blocked field name or a known identifier value; None if nowhere.

    ``values`` maps identifier values from the site's manifests to their origin, e.g. ``PatientID (train.csv)``.
    """
    lowered = [(field, field.lower()) for field in fields]
    for path, text in _strings(payload, ""):
        low = text.lower()
        for field, field_low in lowered:
            if field_low in low:
                return f"blocked field name {field} at {path or '/'}"
        for value, origin in values.items():
            if value in text:
                return f"a value of blocked field {origin} at {path or '/'}"
    return None


def dp_violation(data_kind: str, meta: dict, dp: DifferentialPrivacy) -> str | None:
    """Why a result breaks the site's DP requirement (None if it does not or DP is off).

    A result that carries parameters must report its DP accounting (``dp_epsilon`` spent so far by the
    library's accountant, ``dp_delta``, ``dp_max_grad_norm``) within the site's budget.
    """
    if not dp.enabled or data_kind not in PARAMETER_KINDS:
        return None
    missing = [key for key in DP_ACCOUNTING_KEYS if not _is_number(meta.get(key))]
    if missing:
        return f"the site requires differential privacy and the result lacks DP accounting ({', '.join(missing)})"
    if meta["dp_epsilon"] > dp.epsilon:
        return f"DP epsilon spent {meta['dp_epsilon']:.3f} exceeds the site's budget {dp.epsilon}"
    if meta["dp_delta"] > dp.delta:
        return f"DP delta {meta['dp_delta']} exceeds the site's delta {dp.delta}"
    if meta["dp_max_grad_norm"] > dp.max_grad_norm:
        return f"DP clipping norm {meta['dp_max_grad_norm']} exceeds the site's max_grad_norm {dp.max_grad_norm}"
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
