"""The `nextgpt` command: sub-commands map onto typed functions; bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from pathlib import Path

from nextgpt.config import MODALITIES

DEFAULT_MODEL = "nextgpt-mini"  # shipped with the package (nextgpt/models/nextgpt-mini)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def parse_modalities(text: str | None) -> list[str] | None:
    if not text:
        return None
    out = [m.strip() for m in text.split(",") if m.strip()]
    for m in out:
        if m != "text" and m not in MODALITIES:
            raise UsageError(f"unknown modality {m!r} in --want; use {', '.join(MODALITIES)}")
    return out


def run_generate(
    prompt: str,
    out: Path,
    model: str = DEFAULT_MODEL,
    images: list[str] | None = None,
    audios: list[str] | None = None,
    videos: list[str] | None = None,
    want: list[str] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
) -> list[Path]:
    """Answer one prompt with attached media; write reply.txt and every generated file to `out`."""
    from nextgpt import media as media_io

    content: list[dict] = []
    for kind, paths, loader in (
        ("image", images, media_io.load_image),
        ("audio", audios, media_io.load_audio),
        ("video", videos, media_io.load_video),
    ):
        for p in paths or []:
            try:
                content.append({"type": kind, kind: loader(p)})
            except media_io.MediaError as e:
                raise UsageError(str(e)) from e
    content.append({"type": "text", "text": prompt})

    nextgpt_model = load_model(model)
    options = {}
    for m in MODALITIES:
        opts = {}
        if steps is not None:
            opts["steps"] = steps
        if guidance is not None:
            opts["guidance"] = guidance
        options[m] = opts
    reply = nextgpt_model.generate(
        [{"role": "user", "content": content}],
        modalities=want,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        decoder_options=options,
    )
    return write_reply(reply, out)


def write_reply(reply, out: Path) -> list[Path]:
    """Write the reply text and media (PNG, WAV, MP4) into `out`; returns the paths written."""
    from nextgpt import media as media_io
    from nextgpt.decoders.video import OUTPUT_FPS

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "reply.txt"]
    written[0].write_text(reply.text + "\n")
    counts: dict[str, int] = {}
    for item in reply.media:
        i = counts.get(item.modality, 0)
        counts[item.modality] = i + 1
        if item.modality == "image":
            path = out / f"image_{i}.png"
            media_io.save_png(item.data, path)
        elif item.modality == "audio":
            path = out / f"audio_{i}.wav"
            media_io.save_wav(item.data[0], item.data[1], path)
        else:
            path = out / f"video_{i}.mp4"
            media_io.save_mp4(item.data, OUTPUT_FPS, path)
        written.append(path)
    return written


def load_model(name_or_dir: str):
    """`NextGPT.from_pretrained`, with a missing model reported as a usage error."""
    from nextgpt.model import NextGPT

    try:
        return NextGPT.from_pretrained(name_or_dir).eval()
    except FileNotFoundError as e:
        raise UsageError(f"--model: {e}") from e


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="answer one prompt, writing text and media files")
    g.add_argument("prompt")
    g.add_argument("--image", action="append", default=[], help="input image (repeatable)")
    g.add_argument("--audio", action="append", default=[], help="input audio (repeatable)")
    g.add_argument("--video", action="append", default=[], help="input video (repeatable)")
    g.add_argument("--want", default=None, help="output modalities, e.g. image,audio,video")
    g.add_argument("--model", default=DEFAULT_MODEL, help="preset name or model directory")
    g.add_argument("--out", required=True, type=Path, help="directory for the reply files")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=None, help="diffusion steps (decoder default)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance")
    g.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    paths = run_generate(
        args.prompt,
        args.out,
        model=args.model,
        images=args.image,
        audios=args.audio,
        videos=args.video,
        want=parse_modalities(args.want),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
    )
    # the reply on stderr, for the person at the terminal; stdout lists only the files written,
    # one per line, for scripts
    print(f"reply: {paths[0].read_text().strip()}", file=sys.stderr)
    for p in paths:
        print(p)
    return 0


# Each module has `register(subparsers)`, which adds its sub-command with `set_defaults(handler=f)`;
# `f(args) -> int` runs it and raises UsageError for bad input.
COMMAND_MODULES: tuple[str, ...] = (
    "nextgpt.cli",
    "nextgpt.convert",
    "nextgpt.doctor",
    "nextgpt.chat",
    "nextgpt.serving.command",
    "nextgpt.web",
    "nextgpt.training.command",
    "nextgpt.mini.build",
    "nextgpt.mini.evaluate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextgpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def quiet_libraries() -> None:
    """Offline by default; library warnings and progress bars would bury the command's output."""
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("HF_HUB_DISABLE_TELEMETRY", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
    ):
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as e:
        print(f"nextgpt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
