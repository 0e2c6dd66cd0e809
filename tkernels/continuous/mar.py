"""MAR-style adapter: a causal transformer backbone plus a small diffusion MLP head.

The image is a raster sequence of continuous tokens (8x8 digits -> 16 tokens of 2x2 patches,
4 dims each); the backbone turns the class label and the tokens before position ``i`` into a
condition ``z_i``, and the head (trained with the DDPM noise-prediction loss, as in MAR) draws
token ``i`` by a reverse chain conditioned on ``z_i``. :class:`MARModel` implements
:class:`tkernels.continuous.sampler.ARDiffusionModel`.

:func:`load_or_train_pair` trains a tiny target and a tinier draft on scikit-learn's bundled
digits (no download) on the CPU, and caches the weights (written atomically).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from tkernels.continuous.diffusion import DiffusionSchedule

NUM_CLASSES = 10
PATCH = 2
IMAGE = 8
NUM_TOKENS = (IMAGE // PATCH) ** 2
TOKEN_DIM = PATCH * PATCH


def patchify(images: torch.Tensor) -> torch.Tensor:
    """``[N, 8, 8]`` -> raster tokens ``[N, 16, 4]``."""
    n = images.shape[0]
    g = IMAGE // PATCH
    return images.reshape(n, g, PATCH, g, PATCH).permute(0, 1, 3, 2, 4).reshape(n, g * g, PATCH * PATCH)


def unpatchify(tokens: torch.Tensor) -> torch.Tensor:
    """Raster tokens ``[N, 16, 4]`` -> ``[N, 8, 8]``."""
    n = tokens.shape[0]
    g = IMAGE // PATCH
    return tokens.reshape(n, g, g, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(n, IMAGE, IMAGE)


def load_digits_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8x8 digits as tokens in [-1, 1] ``[N, 16, 4]`` and labels ``[N]``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 8.0 - 1.0  # pixel values 0..16
    return patchify(images), torch.tensor(digits.target, dtype=torch.long)


@dataclass(frozen=True)
class MARConfig:
    width: int  # backbone width (= condition size)
    layers: int
    heads: int
    head_width: int  # diffusion MLP width
    head_blocks: int
    num_steps: int = 20  # diffusion steps, shared by draft and target
    beta_start: float = 0.01
    beta_end: float = 0.35


class MLPDiffusionHead(nn.Module):
    """Noise predictor ``eps(x_t, t, z)``: residual MLP blocks modulated by time and condition."""

    def __init__(self, schedule: DiffusionSchedule, cond_dim: int, width: int, blocks: int):
        super().__init__()
        self.schedule = schedule
        self.token_dim = TOKEN_DIM
        self.inp = nn.Linear(TOKEN_DIM, width)
        self.cond = nn.Linear(cond_dim, width)
        self.time = nn.Embedding(schedule.num_steps, width)  # indexed by reverse step
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width)) for _ in range(blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, TOKEN_DIM))

    def forward(self, x_t: torch.Tensor, step: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(x_t)
        c = self.cond(z) + self.time(step)
        for block in self.blocks:
            h = h + block(h + c)
        return self.out(h)

    @torch.no_grad()
    def mean(self, x_t: torch.Tensor, step: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.schedule.mean_from_eps(x_t, step, self(x_t, step, z))


class CausalBackbone(nn.Module):
    """Class label + tokens before ``i`` -> condition ``z_i`` (a pre-norm causal transformer)."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.label = nn.Embedding(NUM_CLASSES, width)
        self.embed = nn.Linear(TOKEN_DIM, width)
        self.pos = nn.Parameter(torch.randn(NUM_TOKENS, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(NUM_TOKENS), persistent=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Position i sees the label and tokens[:, :i]: shift right by one, label in front.
        h = torch.cat([self.label(labels)[:, None], self.embed(tokens[:, :-1])], dim=1) + self.pos
        return self.norm(self.encoder(h, mask=self.mask, is_causal=True))


class MARModel(nn.Module):
    def __init__(self, config: MARConfig):
        super().__init__()
        self.config = config
        schedule = DiffusionSchedule.linear(config.num_steps, config.beta_start, config.beta_end)
        self.num_tokens = NUM_TOKENS
        self.backbone = CausalBackbone(config.width, config.layers, config.heads)
        self.head = MLPDiffusionHead(schedule, config.width, config.head_width, config.head_blocks)

    @torch.no_grad()
    def conditions(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.backbone(tokens, labels)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, repeats: int = 2) -> torch.Tensor:
        """DDPM noise-prediction loss; each token is noised ``repeats`` times (MAR's trick: the
        head is cheap next to the backbone)."""
        z = self.backbone(tokens, labels).reshape(-1, self.config.width).repeat(repeats, 1)
        x0 = tokens.reshape(-1, TOKEN_DIM).repeat(repeats, 1)
        step = torch.randint(0, self.config.num_steps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = self.head.schedule.add_noise(x0, self.config.num_steps - step, noise)
        return (self.head(x_t, step, z) - noise).square().mean()


TARGET = MARConfig(width=64, layers=2, heads=4, head_width=96, head_blocks=2)
DRAFT = MARConfig(width=32, layers=1, heads=2, head_width=64, head_blocks=1)


def train(config: MARConfig, iterations: int, seed: int, batch: int = 64, lr: float = 2e-3) -> MARModel:
    """Train on all 1797 digits with AdamW and a cosine learning-rate decay."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tokens, labels = load_digits_tokens()
    model = MARModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i / iterations, 1.0))))
    model.train()
    for _ in range(iterations):
        idx = torch.randint(0, tokens.shape[0], (batch,), generator=generator)
        loss = model.loss(tokens[idx], labels[idx], generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def default_cache_dir() -> Path:
    return Path(os.environ.get("TKERNELS_CACHE", Path.home() / ".cache" / "tkernels")) / "continuous"


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never a torn one
    except BaseException:
        os.unlink(tmp)
        raise


def load_or_train(config: MARConfig, iterations: int, seed: int, cache_dir: Path | str | None = None, log=print) -> MARModel:
    """The trained model from ``cache_dir`` (keyed by config, iterations and seed), training
    and caching it on a miss."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = json.dumps({"config": asdict(config), "iterations": iterations, "seed": seed, "version": 1}, sort_keys=True)
    path = cache_dir / f"mar_digits_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    model = MARModel(config)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    start = time.perf_counter()
    model = train(config, iterations, seed)
    log(f"trained {config} for {iterations} iterations in {time.perf_counter() - start:.1f} s -> {path}")
    _atomic_save(model.state_dict(), path)
    return model


def load_or_train_pair(cache_dir: Path | str | None = None, seed: int = 0, quick: bool = False, log=print) -> tuple[MARModel, MARModel]:
    """``(target, draft)`` trained on the digits; ``quick`` trains far less (smoke tests)."""
    target_iters, draft_iters = (10, 10) if quick else (800, 600)
    target = load_or_train(TARGET, target_iters, seed, cache_dir, log)
    draft = load_or_train(DRAFT, draft_iters, seed + 1, cache_dir, log)
    return target, draft
