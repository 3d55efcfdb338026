"""The structure a task result may have when it leaves the site, checked before anything is sent; no search for
known bad values (that is ``outgoing.find_blocked``), so that what is not expected cannot leave at all:

* parameters (``WEIGHTS``, ``WEIGHT_DIFF``): a dict whose keys are names of the job's global model as the site
  first received it from the server (``ModelStructure``, recorded from the task data before any job filter
  runs), each a numeric numpy array (integer or float: ``np.dtype.kind`` in ``iuf``) of exactly the recorded
  shape; no object, string, bytes, bool or complex arrays. Integer and float are interchangeable on purpose:
  integer buffers (BatchNorm's ``num_batches_tracked``, int64 in the trainer's ``state_dict``) reach the site
  as float once the server has averaged them, and the Client API's diff of an int64 buffer against a float
  global model is float, so the kind of the recorded dtype says nothing about what a legitimate result
  carries; what matters is that only numbers of the exact shapes leave (character codes spelt as numbers are
  the identifier matcher's job, ``identifiers.IdentifierIndex.match_codes``).
  Also accepted: a tensor in the sparse encoding of ``sparse_update`` (``{"indices", "values", "shape"}``:
  int indices inside the recorded shape, float values, the recorded shape) when the meta says the result is
  sparse, and CKKS ciphertext bytes for a tensor the meta lists as encrypted (HE);
* metrics (``METRICS`` data, ``initial_metrics`` in meta): finite numbers (python or numpy scalars) under names
  of the site's allow-list (``allowed_metrics`` of the site's privacy scope, else ``DEFAULT_ALLOWED_METRICS``);
  the job cannot widen it, its own configuration is never read. A metric under an allowed name whose value is
  NaN or infinite (tiny data can leave an AUC undefined) is not a reason to block the whole result: a
  non-finite float carries no patient data, so ``drop_non_finite_metrics`` removes it from the result before
  the check and the site logs the metric's name (an allowed name, never job text); the server treats a
  missing key metric as it treats a NaN one (NVFlare's model selector skips it). Anything else that is not a
  finite number (strings, arrays, bools, NaN under a name outside the allow-list) still blocks the result;
* meta: only the keys of ``META_NUMBERS`` (finite numbers), ``META_ENUMS`` (the exact strings NVFlare itself
  writes), ``initial_metrics`` (metrics, above) and HE's ``PROCESSED_KEYS`` (parameter name -> bool);
* nothing else in the DXO (``kind``, ``data``, ``meta``) and nothing beside the DXO in the shareable but its
  headers, whose round numbers must be integers (``check_headers``; their other values are searched for
  identifiers by the caller).

Every reason names the place by position or by a name the site knows, never by text the job chose.
"""

import math
import re

import numpy as np

PARAMETER_KINDS = ("WEIGHTS", "WEIGHT_DIFF")
METRICS_KIND = "METRICS"
DXO_KEYS = {"kind", "data", "meta"}
SHAREABLE_KEYS = {"__headers__", "DXO"}

# The project's key metrics and the CT job's per-organ Dice (names the site accepts unless its scope lists its own).
CT_ORGANS = (
    "spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "portal_and_splenic_veins", "pancreas", "right_adrenal_gland", "left_adrenal_gland",
)  # fmt: skip
DEFAULT_ALLOWED_METRICS = ("val_auc", "val_mean_dice", "val_froc", *(f"val_dice_{organ}" for organ in CT_ORGANS))

INITIAL_METRICS = "initial_metrics"  # NVFlare's FLModel -> DXO conversion: metrics of a result with parameters
PROCESSED_KEYS = "PROCESSED_KEYS"  # NVFlare's HEModelEncryptor: {parameter name: encrypted?}
SPARSE_META = "sparse_update_top_k_percent"  # custom/sparse_update.py
META_NUMBERS = (
    "NUM_STEPS_CURRENT_ROUND",  # NVFlare's MetaKey, set by our trainers (and read by NVFlare's aggregators)
    "dp_epsilon", "dp_delta", "dp_max_grad_norm", "dp_noise_multiplier",  # DP accounting (hcls.dp_sgd)
    "dp_sample_rate", "dp_steps",  # what the site's own DP ledger recomputes epsilon from (hcls.dp_sgd.Accounting)
    SPARSE_META,
)  # fmt: skip
META_ENUMS = {
    "PROCESSED_ALGORITHM": ("CKKS",),  # NVFlare's HEModelEncryptor (nvflare.app_opt.he.constant.HE_ALGORITHM_CKKS)
    "validate_type": ("before_train_validate", "model_validate"),  # NVFlare's ValidateType
}
META_KEYS = {*META_NUMBERS, *META_ENUMS, INITIAL_METRICS, PROCESSED_KEYS}

# Headers. The trainer (job code, in its own process) builds the whole result shareable, so its headers are
# checked too: the ones NVFlare's FLModel conversion writes must be round numbers or NVFlare's validate type;
# every other header value is searched for identifiers, except what the server sent (its FL context, peer
# properties and cookies) and ids NVFlare generates (uuids). Unknown header names are not refused: NVFlare
# adds its own along the way.
ROUND_HEADERS = ("start_round", "current_round", "num_rounds")  # AppConstants
ENUM_HEADERS = {"_validate_type": META_ENUMS["validate_type"]}  # AppConstants.VALIDATE_TYPE
SERVER_HEADERS = {"__peer_ctx__", "__peer_props__", "__cookie_jar__"}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


def _spec(value):
    """(shape, dtype) of a tensor of the global model; (None, None) for one the site cannot read (HE ciphertext)."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return tuple(value.shape), value.dtype.str
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a torch tensor
        array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        return tuple(array.shape), array.dtype.str
    return None, None


class ModelStructure:
    """Names, shapes and dtypes of the global model of a job, as the site first received it."""

    def __init__(self, specs: dict):
        self.specs = specs  # name -> (shape tuple or None, dtype str or None)

    @classmethod
    def from_task_data(cls, dxo_dict) -> "ModelStructure | None":
        """From the DXO dict of task data that carries a model (None if it carries none)."""
        if not isinstance(dxo_dict, dict) or dxo_dict.get("kind") not in PARAMETER_KINDS:
            return None
        data = dxo_dict.get("data")
        if not isinstance(data, dict) or not data or not all(isinstance(k, str) for k in data):
            return None
        return cls({name: _spec(value) for name, value in data.items()})

    def to_json(self) -> dict:
        return {name: [None if shape is None else list(shape), dtype] for name, (shape, dtype) in self.specs.items()}

    @classmethod
    def from_json(cls, data: dict) -> "ModelStructure":
        return cls({name: (None if shape is None else tuple(shape), dtype) for name, (shape, dtype) in data.items()})


def is_number(value) -> bool:
    """A finite python or numpy scalar (not a bool, not an array, not a string)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return math.isfinite(float(value))


def check_metrics(metrics, allowed: tuple[str, ...], where: str) -> str | None:
    if not isinstance(metrics, dict):
        return f"{where} is not a dict of metrics"
    for i, (name, value) in enumerate(metrics.items()):
        if name not in allowed:
            return f"metric #{i} of {where} has a name outside the site's allowed_metrics ({', '.join(allowed)})"
        if not is_number(value):
            kind = "a non-finite number" if isinstance(value, (float, np.floating)) else "not a number"
            return f"metric {name} of {where} is {kind}"
    return None


def _is_non_finite_float(value) -> bool:
    return isinstance(value, (float, np.floating)) and not math.isfinite(float(value))


def drop_non_finite_metrics(shareable: dict, allowed: tuple[str, ...]) -> list[str]:
    """Remove, in place, the metrics under an allowed name whose value is a NaN or infinite float (from the
    ``METRICS`` data and from meta ``initial_metrics``); the names removed, for the site's log. Names outside
    ``allowed`` are left for ``check_metrics`` to block."""
    dxo = shareable.get("DXO") if isinstance(shareable, dict) else None
    if not isinstance(dxo, dict):
        return []
    meta = dxo.get("meta")
    places = [meta.get(INITIAL_METRICS) if isinstance(meta, dict) else None]
    if dxo.get("kind") == METRICS_KIND:
        places.append(dxo.get("data"))
    dropped = []
    for metrics in places:
        if isinstance(metrics, dict):
            for name in [n for n, v in metrics.items() if n in allowed and _is_non_finite_float(v)]:
                del metrics[name]
                dropped.append(name)
    return dropped


def check_meta(meta, allowed_metrics: tuple[str, ...], names: set) -> str | None:
    if not isinstance(meta, dict):
        return "the result's meta is not a dict"
    for i, (key, value) in enumerate(meta.items()):
        if key not in META_KEYS:
            return f"meta key #{i} is not one the site allows ({', '.join(sorted(META_KEYS))})"
        if key in META_NUMBERS and not is_number(value):
            return f"meta {key} is not a finite number"
        if key in META_ENUMS and value not in META_ENUMS[key]:
            return f"meta {key} is not one of {', '.join(META_ENUMS[key])}"
        if key == INITIAL_METRICS:
            reason = check_metrics(value, allowed_metrics, f"meta {INITIAL_METRICS}")
            if reason:
                return reason
        if key == PROCESSED_KEYS and (
            not isinstance(value, dict) or not all(k in names and isinstance(v, bool) for k, v in value.items())
        ):
            return f"meta {PROCESSED_KEYS} must map parameter names of the global model to true/false"
    return None


def _check_array(value, spec, where: str) -> str | None:
    shape, dtype = spec
    if not isinstance(value, np.ndarray):
        return f"{where} is not a numpy array"
    if value.dtype.kind not in "iuf":  # integer and float are both accepted, see the module's docstring
        expected = np.dtype(dtype).name if dtype else "numeric"
        return f"{where} has dtype {value.dtype.name}, not a number array (the global model's is {expected})"
    if shape is not None and tuple(value.shape) != shape:
        return f"{where} has shape {tuple(value.shape)}, the global model's is {shape}"
    return None


def _check_sparse(value, spec, where: str) -> str | None:
    shape, _ = spec
    if set(value) != {"indices", "values", "shape"}:
        return f"{where} is not in the sparse encoding (indices, values, shape)"
    indices, values, sent_shape = value["indices"], value["values"], value["shape"]
    if not isinstance(sent_shape, (list, tuple)) or not all(isinstance(n, int) and n >= 0 for n in sent_shape):
        return f"{where}: the sparse shape is not a list of sizes"
    if shape is not None and tuple(sent_shape) != shape:
        return f"{where}: the sparse shape {tuple(sent_shape)} is not the global model's {shape}"
    if not isinstance(indices, np.ndarray) or indices.dtype.kind not in "iu" or indices.ndim != 1:
        return f"{where}: sparse indices must be a 1-D integer array"
    if not isinstance(values, np.ndarray) or values.dtype.kind != "f" or values.shape != indices.shape:
        return f"{where}: sparse values must be a float array as long as the indices"
    size = int(np.prod(sent_shape))
    if indices.size and (indices.min() < 0 or indices.max() >= size or np.any(np.diff(indices) <= 0)):
        return f"{where}: sparse indices must be increasing positions inside the tensor"
    return None


def check_result(shareable: dict, structure: ModelStructure | None, allowed_metrics: tuple[str, ...]) -> str | None:
    """Why ``shareable`` (a task result) does not have the structure the site allows; None if it does."""
    extra = set(shareable) - SHAREABLE_KEYS
    if extra:
        return f"the result carries {len(extra)} entries beside its DXO"
    dxo = shareable.get("DXO")
    if not isinstance(dxo, dict) or set(dxo) - DXO_KEYS:
        return "the result's DXO carries entries other than kind, data and meta"
    kind, data, meta = dxo.get("kind"), dxo.get("data"), dxo.get("meta") or {}
    names = set(structure.specs) if structure else set()
    reason = check_meta(meta, allowed_metrics, names)
    if reason:
        return reason
    if kind == METRICS_KIND:
        return check_metrics(data, allowed_metrics, "the METRICS data")
    if kind not in PARAMETER_KINDS:
        return "the result is neither parameters (WEIGHTS, WEIGHT_DIFF) nor METRICS"
    if structure is None:
        return "the site has not received this job's global model, so it has no parameter structure to check against"
    if not isinstance(data, dict):
        return "the result's parameters are not a dict"
    sparse = SPARSE_META in meta
    encrypted = meta.get("PROCESSED_ALGORITHM") == "CKKS" and meta.get(PROCESSED_KEYS) or {}
    for i, (name, value) in enumerate(data.items()):
        if name not in structure.specs:
            return f"parameter #{i} of the result is not in the global model's state_dict"
        where = f"parameter {name}"
        if isinstance(value, (bytes, bytearray)) and encrypted.get(name) is True:
            continue
        if isinstance(value, dict) and sparse:
            reason = _check_sparse(value, structure.specs[name], where)
        else:
            reason = _check_array(value, structure.specs[name], where)
        if reason:
            return reason
    return None


def job_headers(headers) -> dict:
    """The headers of a result whose values may come from the job (see ROUND_HEADERS above)."""
    if not isinstance(headers, dict):
        return {}
    return {
        key: value for key, value in headers.items()
        if key not in SERVER_HEADERS and not (isinstance(value, str) and UUID.fullmatch(value))
    }  # fmt: skip


def check_headers(headers) -> str | None:
    if not isinstance(headers, dict):
        return "the result's headers are not a dict"
    for key in ROUND_HEADERS:
        value = headers.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            return f"header {key} is not a round number"
    for key, allowed in ENUM_HEADERS.items():
        if headers.get(key) is not None and headers[key] not in allowed:
            return f"header {key} is not one of {', '.join(allowed)}"
    return None
