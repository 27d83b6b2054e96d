"""anymodal-radar: 4-D imaging radar returns (x, y, z, Doppler, RCS) as an anymodal sensor."""
from pathlib import Path

import torch
from anymodal.core.data import collate
from anymodal.core.tokens import Tokens
from anymodal.plugins import hookimpl
from anymodal.tokenizers.common import grid_positions

ANYMODAL_API = 1  # the plugin API this package targets
CONFIG = Path(__file__).parent / "configs" / "radar.yaml"
# caption, speed (m/s), Doppler spread (m/s), RCS (dBsm), size (m): told apart by Doppler signature
CLASSES = [("a walking pedestrian", 1.4, 0.6, -8.0, 0.6), ("a cyclist", 5.0, 0.4, -2.0, 1.5),
           ("a moving car", 12.0, 0.2, 10.0, 4.0), ("a parked car", 0.0, 0.05, 10.0, 4.0)]
SCALE = torch.tensor([50.0, 50.0, 2.0, 15.0, 10.0])  # brings x, y, z, Doppler, RCS near [-1, 1]


class RadarObjects(torch.utils.data.Dataset):
    """Generated radar returns of one road user each: 24 to 79 points [N, 5]; label and caption."""
    def __init__(self, split, size=512, seed=0):
        self.size, self.seed = size, seed * 2 + (split == "test")

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        caption, speed, spread, rcs, size = CLASSES[i % len(CLASSES)]
        n, centre = int(torch.randint(24, 80, (1,), generator=g)), (torch.rand(2, generator=g) - 0.5) * 80
        heading = torch.rand(1, generator=g) * 6.2832
        radial = speed * torch.cos(heading - torch.atan2(centre[1], centre[0]))  # velocity towards the sensor
        noise = torch.randn(n, 5, generator=g)
        points = torch.cat([centre + noise[:, :2] * size / 2, 0.8 + noise[:, 2:3] * 0.4,
                            radial + noise[:, 3:4] * (spread + 0.1 * speed), rcs + 3 * noise[:, 4:]], 1)
        return {"radar": points, "label": i % len(CLASSES), "text": f"a radar return of {caption}"}


class RadarBev(torch.nn.Module):
    """Points [B, N, 5] (padded) -> one token per bird's-eye-view cell: the mean of its embedded points.
    Targets: each cell's mean scaled point and its occupancy."""
    pos_axes, target_dim = 2, 6

    def __init__(self, dim, cells=8, extent=50.0, input_key="radar"):
        super().__init__()
        self.dim, self.cells, self.extent, self.input_key, self.grid_size = dim, cells, extent, input_key, (cells, cells)
        self.embed, self.empty = torch.nn.Linear(5, dim), torch.nn.Parameter(torch.zeros(dim))

    @classmethod
    def example_input(cls, batch_size):  # what anymodal checks this tokenizer on when it loads the plugin
        return collate([RadarObjects("train")[i] for i in range(batch_size)])

    def forward(self, points, padding=None):
        b, n, _ = points.shape
        keep = (torch.ones_like(points[..., :1]) if padding is None else (~padding).unsqueeze(-1)).float()
        ij = ((points[..., :2] / self.extent + 1) / 2 * self.cells).long().clamp(0, self.cells - 1)
        cell = (ij[..., :1] * self.cells + ij[..., 1:]).expand(-1, -1, self.dim + 6)
        scaled = points.float() / SCALE.to(points.device)
        values = torch.cat([self.embed(scaled), scaled, torch.ones_like(keep)], -1) * keep
        sums = values.new_zeros(b, self.cells ** 2, self.dim + 6).scatter_add(1, cell, values)
        count = sums[..., -1:]
        mean = sums / count.clamp(min=1)
        x = torch.where(count > 0, mean[..., :self.dim], self.empty)
        targets = torch.cat([mean[..., self.dim:-1], (count > 0).float()], -1)
        return Tokens(x=x, pos=grid_positions(self.grid_size, b, points.device), grid=self.grid_size,
                      targets=targets, modality="radar")


@hookimpl
def register_tokenizers():
    return {"radar_bev": RadarBev}


@hookimpl
def register_datasets():
    return {"radar_objects": RadarObjects}
