"""FROC score of box detections, on top of MONAI's detection matching and ``monai.metrics.froc``.

``froc_score`` is the LUNA16-style key metric ``val_froc``: the mean sensitivity at the
given false-positive rates per scan (LUNA16: 1/8, 1/4, 1/2, 1, 2, 4, 8), read off the
FROC curve by linear interpolation (``monai.metrics.compute_froc_score``).

Matching is MONAI's COCO-style ``matching_batch``, as in MONAI's LUNA16 detection
evaluation: per scan, detections are taken by decreasing score and each is matched to the
not yet matched ground-truth box it overlaps most, if that IoU is at least
``iou_threshold`` (0.1 as in MONAI's LUNA16 evaluation). A matched detection is a true
positive; every other detection (including a second hit on an already matched nodule) is a
false positive. A nodule that no detection matches counts as a miss (score 0).

Boxes are ``StandardMode`` (``x1, y1, z1, x2, y2, z2``) in any common frame, voxel or
millimetre: IoU of axis-aligned boxes does not change under per-axis scaling. Detections
with a score <= 0 count as no detection.
"""

import math
import warnings
from collections.abc import Sequence

import numpy as np
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou
from monai.metrics import compute_froc_curve_data, compute_froc_score

LUNA16_FPS_PER_SCAN = (0.125, 0.25, 0.5, 1, 2, 4, 8)
LUNA16_IOU_THRESHOLD = 0.1


def _as_boxes(boxes) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 6)


def match_detections(
    pred_boxes: Sequence, pred_scores: Sequence, gt_boxes: Sequence, iou_threshold: float = LUNA16_IOU_THRESHOLD
) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-nodule and false-positive scores over all scans, as ``monai.metrics.froc`` takes them.

    Returns ``(fp_probs, tp_probs, num_targets)``: the scores of the false positives, one
    score per ground-truth nodule (its matched detection's score, 0 if missed), and the
    number of nodules.
    """
    if not len(pred_boxes) == len(pred_scores) == len(gt_boxes):
        raise ValueError(
            f"pred_boxes, pred_scores and gt_boxes must have one entry per scan, "
            f"got {len(pred_boxes)}, {len(pred_scores)}, {len(gt_boxes)}"
        )
    preds, scores, gts = [], [], []
    for boxes, score in zip(pred_boxes, pred_scores):
        boxes, score = _as_boxes(boxes), np.asarray(score, dtype=np.float64).reshape(-1)
        if len(boxes) != len(score):
            raise ValueError(f"a scan has {len(boxes)} predicted boxes but {len(score)} scores")
        keep = score > 0
        preds.append(boxes[keep])
        scores.append(score[keep])
    gts = [_as_boxes(boxes) for boxes in gt_boxes]
    results = matching_batch(
        iou_fn=box_iou,
        iou_thresholds=[iou_threshold],
        pred_boxes=preds,
        pred_classes=[np.zeros(len(p), dtype=int) for p in preds],
        pred_scores=scores,
        gt_boxes=gts,
        gt_classes=[np.zeros(len(g), dtype=int) for g in gts],
        max_detections=max([len(p) for p in preds] + [1]),  # evaluate every detection
    )
    fp_probs, tp_probs = [], []
    for result, gt in zip(results, gts):
        match = result.get(0)  # class 0; absent when a scan has neither detections nor nodules
        if match is None:
            continue
        matched = match["dtMatches"][0].astype(bool) & ~match["dtIgnore"][0].astype(bool)
        tp_probs.extend(match["dtScores"][matched])
        fp_probs.extend(match["dtScores"][~matched])
        tp_probs.extend([0.0] * (len(gt) - int(matched.sum())))  # missed nodules
    return np.asarray(fp_probs, dtype=np.float64), np.asarray(tp_probs, dtype=np.float64), sum(len(g) for g in gts)


def froc_curve(
    pred_boxes: Sequence, pred_scores: Sequence, gt_boxes: Sequence, iou_threshold: float = LUNA16_IOU_THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """``(fps_per_scan, sensitivity)`` of the FROC curve (``monai.metrics.compute_froc_curve_data``)."""
    fp_probs, tp_probs, num_targets = match_detections(pred_boxes, pred_scores, gt_boxes, iou_threshold)
    if num_targets == 0:
        raise ValueError("FROC is undefined without ground-truth nodules")
    # compute_froc_curve_data thresholds at every distinct score but the lowest one (it
    # expects a 0 among them, the score of a missed target); a 0 false positive, which no
    # threshold > 0 counts, makes sure the lowest real score is used as a threshold too.
    fp_probs = np.append(fp_probs, 0.0)
    return compute_froc_curve_data(fp_probs, tp_probs, num_targets, len(gt_boxes))


def froc_score(
    pred_boxes: Sequence,
    pred_scores: Sequence,
    gt_boxes: Sequence,
    fps_per_scan: Sequence[float] = LUNA16_FPS_PER_SCAN,
    iou_threshold: float = LUNA16_IOU_THRESHOLD,
) -> float:
    """Mean sensitivity at ``fps_per_scan`` false positives per scan; nan (with a warning) without nodules.

    ``pred_boxes``, ``pred_scores`` and ``gt_boxes`` hold one entry per scan: ``(D, 6)``
    boxes, ``(D,)`` scores, ``(G, 6)`` ground-truth boxes (numpy arrays or tensors on CPU).
    """
    if sum(len(_as_boxes(g)) for g in gt_boxes) == 0:
        warnings.warn("FROC is nan: no ground-truth nodule in the evaluated scans", stacklevel=2)
        return math.nan
    fps, sensitivity = froc_curve(pred_boxes, pred_scores, gt_boxes, iou_threshold)
    return float(compute_froc_score(fps, sensitivity, eval_thresholds=tuple(fps_per_scan)))
