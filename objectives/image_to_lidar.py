"""Image-to-lidar distillation through the camera-lidar calibration (SLidR: Sautier et al., CVPR 2022,
"Image-to-Lidar Self-Supervised Distillation for Autonomous Driving Data"; ScaLR: Puy et al.,
CVPR 2024, "Three Pillars improving Vision Foundation Model Distillation for Lidar").

A teacher encodes a camera image of the scene; each lidar point that projects into the image
picks up the teacher's feature of the patch it lands in, and those are averaged over the points
of each lidar token. The lidar student's token features (through a projection head) are trained
to match them: cosine regression (ScaLR) or token-level InfoNCE against the other tokens of the
batch (SLidR, with tokens in place of superpixels).

The scene sample carries the calibration: ``<camera>/intrinsics [3, 3]``, ``<camera>/extrinsics``
``[4, 4]`` (camera to ego), ``<lidar>/extrinsics [4, 4]`` (lidar to ego), the lidar points
``<lidar> [N, C]`` (x, y, z first, in the lidar frame) and the image ``<camera> [3, H, W]``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import DataError
from ..core.geometry import check_calibration, link_tokens_to_patches, pool_patch_features, points_to_patches, project_points, to_ego
from ..core.objective import Batch, ObjectiveOutput
from ..core.teachers import teacher_encode

__all__ = ["ImageToLidar", "LOSSES"]

LOSSES = ("cosine", "infonce")


class ImageToLidar(nn.Module):
    """Distil a camera teacher's patch features into the lidar student's tokens.

    Args:
        dim: the student's width (given by the trainer).
        tokenizer: the stage sensor's tokenizer (given by the trainer); it must record each
            point's token (`Tokens.source`), as the pillar tokenizer does.
        teacher_dim: the teacher's width (given by the trainer).
        camera: the camera sensor the teacher encodes (a sample field).
        sensor: the lidar sensor, the stage's (given by the trainer; None: the backbone's first).
        loss: ``cosine`` (1 - cosine similarity, per covered token) or ``infonce``.
        temperature: of ``infonce``.
        max_tokens: covered tokens of the batch ``infonce`` scores against each other (a random
            subset when there are more), which bounds its ``[T, T]`` logits.
        hidden: width of the projection head's hidden layer (0: a single linear layer).
        max_time_offset: seconds the camera's and the lidar's timestamps (``<sensor>/timestamp``,
            where the samples have them) may differ within a frame.

    A frame whose calibration is not a camera (or rigid transform), or whose sensors were
    recorded too far apart, stops the run with an error naming the frame and sensor; a frame whose
    points all miss the image gives no target and is counted (``uncovered_frames``).
    """

    needs_teacher = True
    needs_mask = False
    sensor_args = ("camera",)  # checked against the modality's sensors when the config loads

    def __init__(self, dim: int, tokenizer: nn.Module, teacher_dim: Optional[int] = None, camera: str = "cam_front",
                 sensor: Optional[str] = None, loss: str = "cosine", temperature: float = 0.07, max_tokens: int = 4096,
                 hidden: int = 0, max_time_offset: float = 0.05) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"image_to_lidar loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if not 0.0 < temperature <= 1.0:
            raise ValueError(f"image_to_lidar temperature must be in (0, 1], got {temperature}")
        if max_tokens < 2 or hidden < 0:
            raise ValueError(f"image_to_lidar needs max_tokens >= 2 and hidden >= 0, got {max_tokens} and {hidden}")
        if not max_time_offset >= 0:
            raise ValueError(f"image_to_lidar max_time_offset must be >= 0 seconds, got {max_time_offset}")
        if camera == sensor:
            raise ValueError(f"image_to_lidar camera {camera!r} is the stage's own sensor: name the camera sensor")
        out = teacher_dim or dim
        self.camera, self.sensor, self.loss, self.temperature, self.max_tokens = camera, sensor, loss, temperature, max_tokens
        self.max_time_offset = max_time_offset
        self.head = nn.Linear(dim, out) if hidden == 0 else nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out))

    def targets(self, batch: Batch, teacher: Any, lidar: str) -> tuple[Tensor, Tensor]:
        """Each lidar token's pooled teacher feature ``[B, T, Dt]`` and whether any of its points
        landed in the image ``[B, T]``."""
        raw, tokens = batch.raw, batch.tokens
        if tokens.source is None:
            raise ValueError("image_to_lidar needs a lidar tokenizer that records each point's token (Tokens.source), "
                             "such as pillars")
        image = raw[self.camera]
        seen = teacher_encode(batch, teacher, sensor=self.camera).tokens
        if seen.grid is None or len(seen.grid) != 2:
            raise ValueError(f"image_to_lidar: the teacher's tokens of {self.camera!r} have no 2-D patch grid (grid={seen.grid})")
        size = tuple(image.shape[-2:])
        patch = (size[0] // seen.grid[0], size[1] // seen.grid[1])
        xyz = to_ego(raw[lidar][..., :3].float(), raw[f"{lidar}/extrinsics"].float())
        proj = project_points(xyz, raw[f"{self.camera}/intrinsics"].float()[:, None],
                              raw[f"{self.camera}/extrinsics"].float()[:, None], size, raw.get(f"{lidar}_padding"))
        patches = points_to_patches(proj, patch, size)
        link = link_tokens_to_patches(tokens.source, patches, tokens.num_tokens, seen.grid[0] * seen.grid[1])
        return pool_patch_features(seen.x.float()[:, None], link, tokens.num_tokens)

    def check_batch(self, raw: dict) -> None:
        """Calibrations that are cameras and rigid transforms, and sensors recorded together; run by
        the trainer on the batch while it is on the host, where reading it costs no device sync."""
        lidar = self.sensor
        needed = [f"{self.camera}/intrinsics", f"{self.camera}/extrinsics", *([f"{lidar}/extrinsics"] if lidar else [])]
        missing = [key for key in needed if key not in raw]
        if missing:
            raise DataError(f"image_to_lidar needs the scene fields {', '.join(missing)}, which the batch does not have "
                            f"(it has: {', '.join(sorted(raw))})")
        frames = raw.get("frame")
        check_calibration(raw[needed[0]][:, None], raw[needed[1]][:, None], frames, [self.camera])
        if lidar is None:
            return
        check_calibration(None, raw[needed[2]][:, None], frames, [lidar])
        times = [raw.get(f"{s}/timestamp") for s in (self.camera, lidar)]
        if all(isinstance(t, Tensor) for t in times):
            apart = (times[0].double() - times[1].double()).abs()
            if bool((apart > self.max_time_offset).any()):
                b = int(apart.argmax())
                frame = frames[b] if frames is not None else f"batch item {b}"
                raise DataError(f"frame {frame}: {self.camera} and {lidar} were recorded {float(apart[b]):.3f} s apart, "
                                f"more than image_to_lidar max_time_offset={self.max_time_offset} s")

    def forward(self, batch: Batch, student: Any, teacher: Any = None) -> ObjectiveOutput:
        lidar = self.sensor or student.sensor
        target, covered = self.targets(batch, teacher, lidar)
        encoded = student.encode(batch.tokens)
        pred = self.head(encoded.tokens.x).float()
        if batch.tokens.padding is not None:
            covered = covered & ~batch.tokens.padding
        if self.loss == "cosine":  # masked, not indexed: no device sync
            cosine = (F.normalize(pred, dim=-1) * F.normalize(target, dim=-1)).sum(-1)
            loss = ((1 - cosine) * covered).sum() / covered.sum().clamp_min(1)
        else:
            pred, target = F.normalize(pred[covered], dim=-1), F.normalize(target[covered], dim=-1)
            if pred.shape[0] > self.max_tokens:  # a seeded subset keeps the logits bounded
                keep = torch.randperm(pred.shape[0], generator=batch.generator)[:self.max_tokens].to(pred.device)
                pred, target = pred[keep], target[keep]
            logits = pred @ target.T / self.temperature
            loss = F.cross_entropy(logits, torch.arange(len(pred), device=pred.device)) if len(pred) else logits.sum()
        # a batch whose points all miss the camera gives no target: a zero loss, counted in coverage
        coverage = covered.float().sum() / batch.tokens.valid().float().sum().clamp_min(1)
        uncovered = (~covered.any(1)).float().sum()
        return ObjectiveOutput(loss, {"loss": loss.detach(), "coverage": coverage.detach(), "uncovered_frames": uncovered})
