"""Judges: small classifiers that name the attributes of a world medium, real or generated.

Evaluation scores generated media by asking a judge what it sees (shape, colour, size; pitch,
timbre, rhythm; shape, colour, direction) and comparing with what was asked for. A judge is
trained on real world samples only, never on generated ones, so it cannot learn a generator's
quirks; it is trained on every attribute combination, held-out ones included, so that it is not
biased against the combinations the model never saw (the judge is a measuring tool, not part of
the model). Images and videos go through a small CNN (a video's frames stacked as channels, so
motion is a colour-channel pattern), audio through a 1-D CNN over log-mel frames.

`python -m nextgpt.mini.judges --out DIR` trains the full judges and reports per-attribute
accuracy on fresh real samples (train and held-out combinations, and after a file round trip).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from nextgpt.encoders.preprocess import kaldi_fbank, resample
from nextgpt.media import load_audio, load_image, load_video
from nextgpt.mini.dialogues import save_media
from nextgpt.mini.world import MODALITIES, Sample, World, WorldConfig

# log-mel floor below the clip's peak (natural log, 30 dB): quieter detail, e.g. a vocoder's noise
# floor, is not part of any attribute, and the weakest harmonic that tells timbres apart is louder
LOG_RANGE = 7.0


@dataclass
class JudgeConfig:
    """What a judge reads and predicts; saved as JSON beside its weights."""

    modality: str
    attributes: dict[str, list[str]]  # attribute -> values, in the order of the head's logits
    width: int = 32
    image_size: int = 32
    frames: int = 8  # video frames the judge looks at (spread over the clip)
    sample_rate: int = 16000
    seconds: float = 1.0
    mel_bins: int = 40

    @classmethod
    def for_world(cls, world: World, modality: str, width: int = 32) -> JudgeConfig:
        c = world.config
        return cls(
            modality=modality,
            attributes={a.name: list(a.values) for a in world.attributes(modality)},
            width=width,
            image_size=c.image_size,
            frames=c.video_frames,
            sample_rate=c.sample_rate,
            seconds=c.audio_seconds,
        )


class JudgeNet(nn.Module):
    """A small CNN trunk and one linear head per attribute."""

    def __init__(self, config: JudgeConfig) -> None:
        super().__init__()
        w = config.width
        if config.modality == "audio":
            self.trunk = nn.Sequential(
                nn.Conv1d(config.mel_bins, w, 5, padding=2),
                nn.ReLU(),
                nn.Conv1d(w, 2 * w, 5, padding=2),
                nn.ReLU(),
                nn.MaxPool1d(2),
                nn.Conv1d(2 * w, 2 * w, 5, padding=4, dilation=2),
                nn.ReLU(),
            )
            features = 4 * w  # mean and max over time
        else:  # pictures; a video's frames are stacked as channels, in time order
            channels = 3 * (config.frames if config.modality == "video" else 1)
            self.trunk = nn.Sequential(
                nn.Conv2d(channels, w, 3, padding=1),
                nn.BatchNorm2d(w),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(w, 2 * w, 3, padding=1),
                nn.BatchNorm2d(2 * w),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(2 * w, 2 * w, 3, padding=1),
                nn.BatchNorm2d(2 * w),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
            )
            features = 2 * w * (config.image_size // 8) ** 2
        self.audio = config.modality == "audio"
        self.hidden = nn.Sequential(nn.Linear(features, 128), nn.ReLU())
        self.heads = nn.ModuleDict(
            {name: nn.Linear(128, len(values)) for name, values in config.attributes.items()}
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Audio (B, mel, frames); pictures (B, 3 * frames, H, W)."""
        h = self.trunk(x)
        if self.audio:
            h = torch.cat([h.mean(-1), h.amax(-1)], dim=-1)
        h = self.hidden(h)
        return {name: head(h) for name, head in self.heads.items()}


class Judge:
    """One modality's judge: turns media into features and features into attribute values."""

    def __init__(self, config: JudgeConfig, net: JudgeNet | None = None) -> None:
        self.config = config
        self.net = (net or JudgeNet(config)).eval()

    # ---- features ------------------------------------------------------------------------
    def features(self, media: Any) -> torch.Tensor:
        """One medium (anything nextgpt.media loads: a path, PIL image, array, (wave, rate),
        (frames, fps)) -> the network's input for it."""
        c = self.config
        if c.modality == "image":
            return _pixels(np.asarray(load_image(media))[None], c.image_size)[0]
        if c.modality == "video":
            frames, _ = load_video(media)
            picks = np.linspace(0, len(frames) - 1, c.frames).round().astype(int)
            return _pixels(frames[picks], c.image_size).reshape(-1, c.image_size, c.image_size)
        wave, rate = load_audio(media)
        return self._log_mel(torch.from_numpy(wave), rate)

    def _log_mel(self, wave: torch.Tensor, rate: int) -> torch.Tensor:
        """Peak-normalised log-mel (mel_bins, frames), relative to its maximum: level-free."""
        c = self.config
        if rate != c.sample_rate:
            wave = resample(wave, rate, c.sample_rate)
        n = int(round(c.sample_rate * c.seconds))
        wave = F.pad(wave[:n], (0, max(0, n - wave.numel())))
        wave = wave / (wave.abs().max() + 1e-8)
        mel = kaldi_fbank(wave, c.sample_rate, c.mel_bins).T
        mel = (mel - mel.max()).clamp(min=-LOG_RANGE)
        return mel / (LOG_RANGE / 2) + 1

    def batch(self, media: list[Any]) -> torch.Tensor:
        return torch.stack([self.features(m) for m in media])

    # ---- prediction ----------------------------------------------------------------------
    @torch.no_grad()
    def predict_features(self, x: torch.Tensor) -> list[dict[str, str]]:
        logits = self.net.eval()(x)
        picks = {name: out.argmax(-1).tolist() for name, out in logits.items()}
        return [
            {name: self.config.attributes[name][picks[name][i]] for name in picks}
            for i in range(x.shape[0])
        ]

    def predict(self, media: list[Any], batch_size: int = 256) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for i in range(0, len(media), batch_size):
            out += self.predict_features(self.batch(media[i : i + batch_size]))
        return out

    def __call__(self, media: Any) -> dict[str, str]:
        return self.predict([media])[0]

    # ---- saving --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        name = self.config.modality
        save_file(self.net.state_dict(), str(directory / f"{name}_judge.safetensors"))
        (directory / f"{name}_judge.json").write_text(json.dumps(asdict(self.config), indent=1))

    @classmethod
    def load(cls, directory: str | Path, modality: str) -> Judge:
        directory = Path(directory)
        config_path = directory / f"{modality}_judge.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: no {modality} judge saved here")
        config = JudgeConfig(**json.loads(config_path.read_text()))
        net = JudgeNet(config)
        net.load_state_dict(load_file(str(directory / f"{modality}_judge.safetensors")))
        return cls(config, net)


def _pixels(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, size, size), centred (x - 0.5) / 0.25."""
    x = torch.from_numpy(np.array(frames, dtype=np.uint8)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x - 0.5) / 0.25


class Judges:
    """The judges of every modality, as evaluation uses them: `judge(modality, media)`."""

    def __init__(self, judges: dict[str, Judge]) -> None:
        self.judges = judges

    def judge(self, modality: str, media: Any) -> dict[str, str]:
        if modality not in self.judges:
            raise ValueError(f"no {modality} judge; have {sorted(self.judges)}")
        return self.judges[modality](media)

    def save(self, directory: str | Path) -> None:
        for judge in self.judges.values():
            judge.save(directory)

    @classmethod
    def load(cls, directory: str | Path, modalities: tuple[str, ...] = MODALITIES) -> Judges:
        return cls({m: Judge.load(directory, m) for m in modalities})


# ---- training ----------------------------------------------------------------------------------
@dataclass
class JudgeTraining:
    """How a judge is trained. The defaults are the full judges (about a minute each on 2 cores);
    tests use a thousand samples and 5 epochs."""

    samples: int = 6000
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 32
    seed: int = 0


def _augment(x: torch.Tensor, modality: str, generator: torch.Generator) -> torch.Tensor:
    """Noise of random strength, and blur on half of the pictures: generated media are noisier
    and softer than rendered ones, and a judge must not depend on crisp edges."""
    if modality == "audio":
        return x + 0.05 * torch.randn(x.shape, generator=generator)
    n = x.shape[0]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(n, 1, 1, 1, generator=generator) < 0.5).float()
    x = pick * blurred + (1 - pick) * x
    scale = 0.2 * torch.rand(n, 1, 1, 1, generator=generator)
    return x + scale * torch.randn(x.shape, generator=generator)


def _noisy(clips: list[tuple[np.ndarray, int]], rng: np.random.Generator) -> list[Any]:
    """Half of the clips with white noise at 15-50 dB SNR: generated audio has a noise floor."""
    out = []
    for wave, rate in clips:
        if rng.random() < 0.5:
            power = np.mean(wave**2) / 10 ** (rng.uniform(15, 50) / 10)
            wave = wave + rng.normal(0, np.sqrt(power), wave.shape).astype(np.float32)
        out.append((wave, rate))
    return out


def _targets(judge: Judge, samples: list[Sample]) -> dict[str, torch.Tensor]:
    return {
        name: torch.tensor([values.index(s.attributes[name]) for s in samples])
        for name, values in judge.config.attributes.items()
    }


def train_judge(
    world: World, modality: str, training: JudgeTraining | None = None, progress: bool = False
) -> Judge:
    """A judge trained on `training.samples` real samples of every combination."""
    t = training or JudgeTraining()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        judge = Judge(JudgeConfig.for_world(world, modality, t.width))
    samples = world.samples(modality, t.samples, "all", "judge-train", t.seed)
    media = [s.media for s in samples]
    if modality == "audio":
        media = _noisy(media, world.rng("judge-noise", t.seed))
    x = judge.batch(media)
    y = _targets(judge, samples)
    generator = torch.Generator().manual_seed(t.seed)
    steps = t.epochs * ((len(samples) + t.batch_size - 1) // t.batch_size)
    opt = torch.optim.AdamW(judge.net.parameters(), lr=t.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, t.lr, total_steps=steps)
    judge.net.train()
    bar = tqdm(total=steps, desc=f"{modality} judge", disable=not progress)
    for _ in range(t.epochs):
        order = torch.randperm(len(samples), generator=generator)
        for i in range(0, len(samples), t.batch_size):
            idx = order[i : i + t.batch_size]
            logits = judge.net(_augment(x[idx], modality, generator))
            loss = sum(F.cross_entropy(logits[k], y[k][idx]) for k in logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    judge.net.eval()
    return judge


def accuracy(
    judge: Judge, samples: list[Sample], media: list[Any] | None = None
) -> dict[str, float]:
    """Per-attribute accuracy on `samples` (judging `media` instead of theirs when given)."""
    predictions = judge.predict(media if media is not None else [s.media for s in samples])
    return {
        name: float(np.mean([p[name] == s.attributes[name] for p, s in zip(predictions, samples)]))
        for name in judge.config.attributes
    }


def write_media(samples: list[Sample], directory: Path) -> list[Path]:
    """Write media as the dataset does (PNG, 16-bit WAV, H.264 MP4) and return the paths."""
    return [directory / save_media(s, directory, str(i)) for i, s in enumerate(samples)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the judges and report their accuracy.")
    parser.add_argument("--out", required=True, help="directory for the judges' weights")
    parser.add_argument("--seed", type=int, default=0, help="world seed")
    parser.add_argument("--samples", type=int, default=JudgeTraining.samples)
    parser.add_argument("--epochs", type=int, default=JudgeTraining.epochs)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--modalities", default=",".join(MODALITIES))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 on a shared, busy machine)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    world = World(WorldConfig(seed=args.seed))
    training = JudgeTraining(samples=args.samples, epochs=args.epochs)
    report: dict[str, Any] = {}
    for modality in args.modalities.split(","):
        start = time.perf_counter()
        judge = train_judge(world, modality, training, progress=True)
        seconds = time.perf_counter() - start
        judge.save(args.out)
        rows = {}
        for split in ("train", "heldout"):
            samples = world.samples(modality, args.eval_samples, split, "judge-eval")
            rows[split] = accuracy(judge, samples)
            with tempfile.TemporaryDirectory() as tmp:
                paths = write_media(samples[:300], Path(tmp))
                rows[f"{split} (files)"] = accuracy(judge, samples[:300], paths)
        report[modality] = {"train_seconds": round(seconds, 1), "accuracy": rows}
        print(f"{modality}: trained in {seconds:.0f} s")
        for split, accs in rows.items():
            print(f"  {split:>16}: " + "  ".join(f"{k} {v:.3f}" for k, v in accs.items()))
    (Path(args.out) / "judges_report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
