"""`nextgpt chat`: a multi-turn terminal chat with attachments and generated media.

The history is kept in `NextGPT.generate`'s own message format, media as file paths, so a saved
transcript can be passed straight back to `model.generate`. A generated medium is written to disk
and can be attached to a later message (`/image` with no path), which feeds it through the encoder
like any upload; in the assistant's turn it stays as the signal tokens the model emitted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from nextgpt.cli import DEFAULT_MODEL, UsageError, load_model
from nextgpt.config import MODALITIES

HELP = """\
Type a message and press Enter. Commands:
  /image PATH    attach an image to your next message (no PATH: the last image generated)
  /audio PATH    attach audio (no PATH: the last audio generated)
  /video PATH    attach a video (no PATH: the last video generated)
  /want image,audio   the next reply must contain these outputs
  /reset         start a new conversation
  /save PATH     write the conversation as JSON (NextGPT.generate's message format)
  /help          this text
  /quit          leave (also Ctrl-D)"""


@dataclass
class ChatSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    decoder_options: dict[str, dict[str, Any]] = field(default_factory=dict)


class ChatSession:
    """One conversation: pending attachments, the history, and where generated media go."""

    def __init__(
        self, model: Any, out_dir: Path, settings: ChatSettings, stdout: TextIO | None = None
    ):
        from nextgpt.serving.codec import last_output_number

        self.model = model
        self.out_dir = out_dir
        self.settings = settings
        self.stdout = stdout or sys.stdout
        self.messages: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []
        self.want: list[str] | None = None
        self.last_generated: dict[str, Path] = {}
        self.saved = last_output_number(out_dir)  # generated files are numbered on from here

    def say(self, text: str = "", end: str = "\n") -> None:
        self.stdout.write(text + end)
        self.stdout.flush()

    def handle(self, line: str) -> bool:
        """Run one line of input; False when the user asked to leave."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.send(line)
            return True
        command, _, arg = line.partition(" ")
        arg = arg.strip()
        actions: dict[str, Callable[[str], None]] = {
            "/image": lambda a: self.attach("image", a),
            "/audio": lambda a: self.attach("audio", a),
            "/video": lambda a: self.attach("video", a),
            "/want": self.set_want,
            "/reset": lambda _: self.reset(),
            "/save": self.save,
            "/help": lambda _: self.say(HELP),
        }
        if command in ("/quit", "/exit"):
            return False
        if command not in actions:
            self.say(f"error: unknown command {command}; /help lists them")
            return True
        try:
            actions[command](arg)
        except (UsageError, ValueError, OSError) as e:
            self.say(f"error: {e}")
        return True

    def attach(self, modality: str, arg: str) -> None:
        from nextgpt import media as media_io

        if arg:
            path = Path(arg).expanduser()
        elif modality in self.last_generated:
            path = self.last_generated[modality]
        else:
            raise UsageError(f"no {modality} has been generated yet: give a path")
        loader = {
            "image": media_io.load_image,
            "audio": media_io.load_audio,
            "video": media_io.load_video,
        }[modality]
        loader(path)  # an unreadable file is refused now, not after the next message
        self.pending.append({"type": modality, modality: str(path)})
        self.say(f"attached {modality} {path}")

    def set_want(self, arg: str) -> None:
        names = [m.strip() for m in arg.replace(" ", ",").split(",") if m.strip()]
        for m in names:
            if m != "text" and m not in MODALITIES:
                raise UsageError(f"unknown modality {m!r}; use text, {', '.join(MODALITIES)}")
        self.want = [m for m in names if m != "text"] if names else None
        if self.want is None:
            self.say("the model decides the next reply's outputs")
        else:
            self.say(f"the next reply must contain: {', '.join(['text', *self.want])}")

    def reset(self) -> None:
        self.messages, self.pending, self.want = [], [], None
        self.say("new conversation")

    def save(self, arg: str) -> None:
        if not arg:
            raise UsageError("/save needs a file path, e.g. /save chat.json")
        path = Path(arg).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"messages": self.messages}, indent=2) + "\n")
        self.say(f"saved {len(self.messages)} messages to {path}")

    def send(self, text: str) -> None:
        """One turn: stream the reply's text, write its media, then extend the history."""
        from nextgpt.model import GeneratedMedia, Reply, TextDelta
        from nextgpt.serving.codec import save_output

        user = {"role": "user", "content": [*self.pending, {"type": "text", "text": text}]}
        want, self.want = self.want, None
        outputs: list[dict[str, Any]] = []
        reply = None
        started = False  # the reply's leading whitespace is not shown
        self.say("nextgpt> ", end="")
        try:
            for event in self.model.stream(
                [*self.messages, user],
                modalities=want,
                max_new_tokens=self.settings.max_new_tokens,
                temperature=self.settings.temperature,
                seed=self.settings.seed,
                decoder_options=self.settings.decoder_options,
            ):
                if isinstance(event, TextDelta):
                    text = event.text if started else event.text.lstrip()
                    started = started or bool(text)
                    self.say(text, end="")
                elif isinstance(event, GeneratedMedia):
                    self.saved += 1
                    stem = self.out_dir / f"{self.saved:03d}_{event.modality}"
                    path = save_output(event.modality, event.data, stem)
                    self.last_generated[event.modality] = path
                    outputs.append({"type": event.modality, event.modality: str(path)})
                    self.say(f"\n  [{event.modality}] {path}", end="")
                elif isinstance(event, Reply):
                    reply = event
        except KeyboardInterrupt:
            self.say("\n[interrupted: the turn is dropped]")
            return
        except ValueError as e:  # unreadable media, a model that lacks a decoder, ...
            self.say(f"\nerror: {e}")
            return
        self.say()
        assert reply is not None
        self.pending = []
        assistant = [{"type": "text", "text": reply.text}, *outputs]
        self.messages += [user, {"role": "assistant", "content": assistant}]


def run_chat(session: ChatSession, lines: Iterable[str]) -> None:
    for line in lines:
        if not session.handle(line):
            break


def _prompt_lines(prompt: str) -> Iterable[str]:
    """Lines typed at the terminal (with line editing where readline exists) until Ctrl-D."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (input() gains history and editing)
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="a multi-turn chat in the terminal, with media")
    p.add_argument("--model", default=DEFAULT_MODEL, help="preset name or model directory")
    p.add_argument("--out", type=Path, default=Path("out/chat"), help="where generated media go")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="diffusion steps (decoder default)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance")
    p.add_argument("--size", type=int, default=None, help="side of images and videos, pixels")
    p.set_defaults(handler=_chat)


def _chat(args: argparse.Namespace) -> int:
    from nextgpt.serving.codec import decoder_options

    if args.size is not None and (args.size < 8 or args.size % 8):
        raise UsageError(f"--size {args.size}: expected a positive multiple of 8")
    settings = ChatSettings(
        args.max_new_tokens,
        args.temperature,
        args.seed,
        decoder_options(args.steps, args.guidance, args.size),
    )
    session = ChatSession(load_model(args.model), args.out, settings)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"nextgpt chat ({args.model}); /help lists the commands")
    run_chat(session, _prompt_lines("you> ") if interactive else sys.stdin)
    return 0
