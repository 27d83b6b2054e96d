"""Camera-lidar geometry (core/geometry.py) against plain float64 loops over points: projection into a
six-camera rig, patch indices, the token-to-patch link and the pooled teacher features, plus the
calibration checks that name the frame and the camera."""

import math

import numpy as np
import pytest
import torch

from anymodal.core.errors import DataError
from anymodal.core.geometry import (check_calibration, link_tokens_to_patches, points_to_patches, pool_patch_features,
                                    project_points, to_ego)

H, W, PATCH = 48, 96, 16


def camera_to_ego(yaw: float, pitch: float = 0.0, t=(0.0, 0.0, 1.6)) -> np.ndarray:
    """A camera looking along ego direction ``yaw`` (pitched down by ``pitch``): its z axis forward,
    x right, y down, as columns of the rotation."""
    forward = np.array([math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), -math.sin(pitch)])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.cross(forward, right)
    m = np.eye(4)
    m[:3, :3] = np.stack([right, down, forward], 1)
    m[:3, 3] = t
    return m


def rig(frames: int = 2):
    """Six cameras around the ego (a nuScenes-like rig), slightly different per frame."""
    k = np.array([[60.0, 0, W / 2], [0, 60.0, H / 2], [0, 0, 1]])
    intr = np.stack([np.stack([k * [[1 + 0.05 * f], [1 + 0.05 * f], [1]] for _ in range(6)]) for f in range(frames)])
    intr[..., 2, :] = [0, 0, 1]
    ext = np.stack([np.stack([camera_to_ego(c * math.pi / 3 + 0.1 * f, 0.05, (0.5 * f, 0.2, 1.6)) for c in range(6)])
                    for f in range(frames)])
    return intr, ext


def reference_projection(xyz, intr, ext, padding):
    b, c, n = len(xyz), intr.shape[1], xyz.shape[1]
    uv, depth, valid = np.zeros((b, c, n, 2)), np.zeros((b, c, n)), np.zeros((b, c, n), bool)
    for f in range(b):
        for cam in range(c):
            world_to_cam = np.linalg.inv(ext[f, cam])
            for i in range(n):
                p = world_to_cam @ np.append(xyz[f, i], 1.0)
                depth[f, cam, i] = p[2]
                q = intr[f, cam] @ p[:3]
                uv[f, cam, i] = q[:2] / max(q[2], 0.1)
                u, v = uv[f, cam, i]
                valid[f, cam, i] = p[2] > 0.1 and 0 <= u < W and 0 <= v < H and not padding[f, i]
    return uv, depth, valid


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(0)
    xyz = rng.uniform([-30, -30, -1], [30, 30, 4], (2, 400, 3))
    padding = np.zeros((2, 400), bool)
    padding[1, 350:] = True
    intr, ext = rig()
    return xyz, padding, intr, ext


def test_hand_computed_pixel() -> None:
    # a camera at the ego origin looking along +x: ego (10, -2, -1) is 2 m right and 1 m down of the
    # axis at depth 10, so with f = 100 and the principal point at (48, 24) it lands at
    # u = 48 + 100 * 2 / 10 = 68, v = 24 + 100 * 1 / 10 = 34
    k = torch.tensor([[[[100.0, 0, 48], [0, 100.0, 24], [0, 0, 1]]]], dtype=torch.float64)
    e = torch.from_numpy(camera_to_ego(0.0, 0.0, (0, 0, 0)))[None, None]
    proj = project_points(torch.tensor([[[10.0, -2.0, -1.0], [-10.0, 0.0, 0.0]]], dtype=torch.float64), k, e, (H, W))
    torch.testing.assert_close(proj.uv[0, 0, 0], torch.tensor([68.0, 34.0], dtype=torch.float64))
    assert proj.depth[0, 0].tolist() == pytest.approx([10.0, -10.0])
    assert proj.valid[0, 0].tolist() == [True, False]  # the second point is behind the camera
    assert points_to_patches(proj, (PATCH, PATCH), (H, W))[0, 0].tolist() == [2 * (W // PATCH) + 4, -1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projection_matches_a_loop_over_points(scene, dtype) -> None:
    xyz, padding, intr, ext = scene
    uv, depth, valid = reference_projection(xyz, intr, ext, padding)
    t = lambda a: torch.from_numpy(a).to(dtype)  # noqa: E731
    proj = project_points(t(xyz), t(intr), t(ext), (H, W), torch.from_numpy(padding))
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(proj.depth, torch.from_numpy(depth).to(dtype), **tol)
    inside = torch.from_numpy(valid)
    torch.testing.assert_close(proj.uv[inside], torch.from_numpy(uv).to(dtype)[inside], **tol)
    # float32 may flip a point lying on an image border; float64 agrees exactly
    mismatched = (proj.valid != inside).sum().item()
    assert mismatched == 0 if dtype == torch.float64 else mismatched <= 2
    assert 0.2 < inside.any(1).float().mean() < 1.0  # the rig sees most points, padding none
    assert not proj.valid[1, :, 350:].any()


def test_to_ego_is_the_rigid_transform(scene) -> None:
    xyz, _, _, ext = scene
    ours = to_ego(torch.from_numpy(xyz), torch.from_numpy(ext[:, 0]))
    ref = np.einsum("bij,bnj->bni", ext[:, 0, :3, :3], xyz) + ext[:, 0, None, :3, 3]
    torch.testing.assert_close(ours, torch.from_numpy(ref))


def test_link_and_pooling_match_loops(scene) -> None:
    xyz, padding, intr, ext = scene
    proj = project_points(*(torch.from_numpy(a) for a in (xyz, intr, ext)), (H, W), torch.from_numpy(padding))
    patch = points_to_patches(proj, (PATCH, PATCH), (H, W))
    rng = np.random.default_rng(1)
    tokens = 40
    source = torch.from_numpy(rng.integers(-1, tokens, (2, 400)))
    source[torch.from_numpy(padding)] = -1
    num_patches = (H // PATCH) * (W // PATCH)
    link = link_tokens_to_patches(source, patch, tokens, num_patches)

    counts = np.zeros((2, tokens, 6, num_patches))
    for f in range(2):
        for c in range(6):
            for i in range(400):
                if source[f, i] >= 0 and patch[f, c, i] >= 0:
                    counts[f, source[f, i], c, patch[f, c, i]] += 1
    ours = np.zeros_like(counts)
    ours[link.cloud, link.token, link.camera, link.patch] = link.weight.numpy()
    total = counts.sum((2, 3), keepdims=True)
    expected = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    np.testing.assert_allclose(ours, expected, atol=1e-12)
    assert link.covered.numpy().tolist() == (total[..., 0, 0] > 0).tolist()

    feats = torch.randn(2, 6, num_patches, 5, dtype=torch.float64, requires_grad=True)
    pooled, covered = pool_patch_features(feats, link, tokens)
    ref = np.einsum("btcp,bcpd->btd", expected, feats.detach().numpy())
    np.testing.assert_allclose(pooled.detach().numpy(), ref, atol=1e-12)
    assert (pooled[~covered] == 0).all()
    small = torch.randn(2, 6, num_patches, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: pool_patch_features(f, link, tokens)[0], (small,))


def test_bad_calibration_names_frame_and_camera(scene) -> None:
    _, _, intr, ext = scene
    frames, cams = ["train/000007", "train/000008"], [f"cam_{i}" for i in range(6)]
    check_calibration(torch.from_numpy(intr), torch.from_numpy(ext), frames, cams)
    singular = ext.copy()
    singular[1, 4, :3, :3] = 0.0
    with pytest.raises(DataError, match="frame train/000008, cam_4: extrinsics' rotation is not orthonormal"):
        check_calibration(torch.from_numpy(intr), torch.from_numpy(singular), frames, cams)
    nan = intr.copy()
    nan[0, 2, 0, 0] = float("nan")
    with pytest.raises(DataError, match="frame train/000007, cam_2: intrinsics are not finite"):
        check_calibration(torch.from_numpy(nan), torch.from_numpy(ext), frames, cams)
    flipped = intr.copy()
    flipped[0, 1, 1, 1] = -60.0
    with pytest.raises(DataError, match="batch item 0, camera 1: intrinsics need positive focal lengths"):
        check_calibration(torch.from_numpy(flipped), torch.from_numpy(ext))


def test_strips_beyond_the_last_whole_patch_have_no_patch() -> None:
    # 40 x 40 pixels in 16-pixel patches: a 2 x 2 grid; pixels 32..39 of either axis are in no patch
    k = torch.tensor([[[[10.0, 0, 0], [0, 10.0, 0], [0, 0, 1]]]], dtype=torch.float64)
    e = torch.from_numpy(camera_to_ego(0.0, 0.0, (0, 0, 0)))[None, None]
    # depth 1: u = -10 y, v = -10 z; (u, v) = (35, 5), (5, 35), (20, 20)
    pts = torch.tensor([[[1.0, -3.5, -0.5], [1.0, -0.5, -3.5], [1.0, -2.0, -2.0]]], dtype=torch.float64)
    proj = project_points(pts, k, e, (40, 40))
    assert proj.valid[0, 0].tolist() == [True, True, True]
    assert points_to_patches(proj, (16, 16), (40, 40))[0, 0].tolist() == [-1, -1, 3]
