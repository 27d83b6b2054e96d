"""Unit quaternions <-> rigid 4x4 transforms (numpy, float64), for the log formats that store poses
as a translation and a quaternion: ROS writes ``(x, y, z, w)``, nuScenes ``(w, x, y, z)``; both
functions here take and give ``(w, x, y, z)``."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["rigid_from_quaternion", "quaternion_from_rotation", "interpolate_rigid"]


def rigid_from_quaternion(translation: Sequence[float], wxyz: Sequence[float]) -> np.ndarray:
    """The 4x4 transform of a translation and a quaternion ``(w, x, y, z)`` (normalised here: logs
    round their quaternions; a zero one is refused)."""
    q = np.asarray(wxyz, np.float64)
    norm = float(np.linalg.norm(q))
    if not np.isfinite(norm) or norm < 1e-6:
        raise ValueError(f"a rotation quaternion must be finite and non-zero, got {list(map(float, q))}")
    w, x, y, z = q / norm
    m = np.eye(4)
    m[:3, :3] = [[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                 [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                 [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]]
    m[:3, 3] = np.asarray(translation, np.float64)
    return m


def quaternion_from_rotation(rotation: np.ndarray) -> np.ndarray:
    """``(w, x, y, z)`` with ``w >= 0`` of a 3x3 rotation (Shepperd's method: the largest diagonal
    term picks the stable formula)."""
    r = np.asarray(rotation, np.float64)
    trace = np.trace(r)
    if trace > max(r[0, 0], r[1, 1], r[2, 2]):
        s = 2 * np.sqrt(1 + trace)
        q = [s / 4, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(r)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2 * np.sqrt(1 + r[i, i] - r[j, j] - r[k, k])
        q = [0.0] * 4
        q[0] = (r[k, j] - r[j, k]) / s
        q[1 + i] = s / 4
        q[1 + j] = (r[j, i] + r[i, j]) / s
        q[1 + k] = (r[k, i] + r[i, k]) / s
    q = np.asarray(q)
    return q if q[0] >= 0 else -q


def interpolate_rigid(a: np.ndarray, b: np.ndarray, fraction: float) -> np.ndarray:
    """The transform ``fraction`` of the way from ``a`` to ``b``: translation linearly, rotation by
    normalised quaternion interpolation (close to slerp for the small turns between two poses of a log)."""
    qa, qb = quaternion_from_rotation(a[:3, :3]), quaternion_from_rotation(b[:3, :3])
    if qa @ qb < 0:
        qb = -qb
    return rigid_from_quaternion(a[:3, 3] + fraction * (b[:3, 3] - a[:3, 3]), qa + fraction * (qb - qa))
