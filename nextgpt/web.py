"""`nextgpt web`: a Gradio chat page with image, audio and video uploads and generated media.

Gradio's queue runs one generation at a time (the model is not thread-safe) and refuses requests
past `queue_size`. Uploads go through the same limit checks as the HTTP API, and every bad input
shows as an error message on the page while the server keeps serving. The page loads nothing from
outside the server (Gradio's default theme uses local fonts; analytics are off).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nextgpt.cli import DEFAULT_MODEL, UsageError, load_model
from nextgpt.config import MODALITIES
from nextgpt.serving.limits import Limits

if TYPE_CHECKING:
    import gradio as gr

    from nextgpt.model import NextGPT

OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


class WebChat:
    """The page's one callback: a user turn in, the streamed reply and its media out."""

    def __init__(self, model: NextGPT, out_dir: Path, limits: Limits):
        from nextgpt.serving.codec import last_output_number

        self.model = model
        self.out_dir = out_dir
        self.limits = limits
        self.saved = last_output_number(out_dir)  # generated files are numbered on from here

    def check_upload(self, path: str) -> str:
        """The upload's modality, after the same readability and size checks as the API."""
        from nextgpt.serving.codec import Blob, load_input, modality_of

        blob = Blob(Path(path).read_bytes(), None, Path(path).name)
        modality = modality_of(blob, Path(path).name)
        load_input(modality, blob, self.limits, Path(path).name)
        return modality

    def respond(
        self,
        message: dict[str, Any],
        wants: list[str],
        steps: float,
        guidance: float,
        size: float,
        max_new_tokens: float,
        temperature: float,
        seed: float | None,
        history: list[dict[str, Any]],
        chat: list[dict[str, Any]],
    ) -> Iterator[tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
        """Yields (chat shown, model history) as the reply streams in."""
        import gradio as gr

        from nextgpt.model import GeneratedMedia, Reply, TextDelta
        from nextgpt.serving.codec import decoder_options, save_output

        text = (message.get("text") or "").strip()
        files = list(message.get("files") or [])
        if not text and not files:
            raise gr.Error("Type a message or attach a file.", print_exception=False)
        if size % 8 or size > 1024:
            raise gr.Error(
                f"Size {size:g}: use a multiple of 8 up to 1024 (0: native).", print_exception=False
            )
        if not 0 <= steps <= self.limits.max_steps:
            raise gr.Error(
                f"Steps {steps:g}: use 1 to {self.limits.max_steps} (0: default).",
                print_exception=False,
            )
        if len(files) > self.limits.max_media_items:
            raise gr.Error(
                f"At most {self.limits.max_media_items} files per message.", print_exception=False
            )
        try:
            uploads = [(self.check_upload(p), p) for p in files]
        except (ValueError, OSError) as e:  # MediaError, LimitExceeded, an unknown file type
            raise gr.Error(str(e), print_exception=False) from e

        user = {
            "role": "user",
            "content": [*({"type": m, m: p} for m, p in uploads), {"type": "text", "text": text}],
        }
        chat = [*chat, *({"role": "user", "content": {"path": p}} for _, p in uploads)]
        if text:
            chat.append({"role": "user", "content": text})
        answer = {"role": "assistant", "content": ""}
        chat.append(answer)
        outputs: list[dict[str, Any]] = []
        options = decoder_options(int(steps) or None, guidance or None, int(size) or None)
        try:
            for event in self.model.stream(
                [*history, user],
                modalities=list(wants) or None,
                max_new_tokens=int(max_new_tokens),
                temperature=float(temperature),
                seed=int(seed or 0),
                decoder_options=options,
            ):
                if isinstance(event, TextDelta):
                    answer["content"] = (answer["content"] + event.text).lstrip()
                elif isinstance(event, GeneratedMedia):
                    self.saved += 1
                    stem = self.out_dir / f"{self.saved:04d}_{event.modality}"
                    path = save_output(event.modality, event.data, stem)
                    outputs.append({"type": event.modality, event.modality: str(path)})
                    chat.append({"role": "assistant", "content": {"path": str(path)}})
                elif isinstance(event, Reply):
                    answer["content"] = event.text
                    if not event.text:  # a reply of media only: no empty bubble
                        chat.remove(answer)
                    history = [
                        *history,
                        user,
                        {
                            "role": "assistant",
                            "content": [{"type": "text", "text": event.text}, *outputs],
                        },
                    ]
                yield chat, history
        except ValueError as e:  # e.g. a model without the wanted decoder
            raise gr.Error(str(e), print_exception=False) from e


def build_demo(model: NextGPT, out_dir: Path, limits: Limits | None = None) -> gr.Blocks:
    """The page for `model`; generated files are written under `out_dir` (served from there)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    import gradio as gr

    limits = limits or Limits()
    out_dir.mkdir(parents=True, exist_ok=True)
    web = WebChat(model, out_dir, limits)
    outputs = [m for m in MODALITIES if m in model.decoders]

    with gr.Blocks(title="NExT-GPT", analytics_enabled=False) as demo:
        gr.Markdown("## NExT-GPT\nAny-to-any chat: attach media, ask for images, audio or video.")
        chat = gr.Chatbot(label="Conversation", height=460, elem_id="chat")
        history = gr.State([])
        message = gr.MultimodalTextbox(
            label="Message",
            placeholder="Ask anything; attach images, audio or video with the clip",
            file_types=["image", "audio", "video"],
            file_count="multiple",
            sources=["upload"],
            elem_id="message",
        )
        reset = gr.Button("New conversation", elem_id="reset")
        with gr.Accordion("Generation settings", open=True):
            wants = gr.CheckboxGroup(
                outputs, label="The reply must contain (none: the model decides)", elem_id="wants"
            )
            with gr.Row():  # 0 leaves each decoder's own default
                steps = gr.Slider(
                    0,
                    limits.max_steps,
                    value=0,
                    step=1,
                    label="Diffusion steps (0: default)",
                    elem_id="steps",
                )
                guidance = gr.Slider(
                    0, 20, value=0, step=0.5, label="Guidance (0: default)", elem_id="guidance"
                )
                size = gr.Slider(
                    0,
                    1024,
                    value=0,
                    step=8,
                    label="Image/video size, px (0: native)",
                    elem_id="size",
                )
            with gr.Row():
                max_new_tokens = gr.Slider(
                    1,
                    limits.max_new_tokens,
                    value=128,
                    step=1,
                    label="Max new tokens",
                    elem_id="max-new-tokens",
                )
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature")
                seed = gr.Number(0, label="Seed", precision=0)

        settings = [wants, steps, guidance, size, max_new_tokens, temperature, seed]
        message.submit(
            web.respond,
            [message, *settings, history, chat],
            [chat, history],
            concurrency_limit=1,
            concurrency_id="model",
        ).success(lambda: None, None, message)
        reset.click(lambda: ([], []), None, [chat, history])
    demo.queue(max_size=limits.queue_size)
    return demo


def launch(
    demo: gr.Blocks, host: str, port: int, out_dir: Path, block: bool, max_file_mb: float
) -> None:
    """Serve the page on `host:port`; `block=False` returns once it is up (tests)."""
    demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        allowed_paths=[str(out_dir.resolve())],
        max_file_size=int(max_file_mb * 2**20),
        show_error=True,
        quiet=not block,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        footer_links=[],
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("web", help="a chat page in the browser (Gradio), with media")
    p.add_argument("--model", default=DEFAULT_MODEL, help="preset name or model directory")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--out", type=Path, default=Path("out/web"), help="where generated media go")
    p.add_argument("--queue-size", type=int, default=Limits().queue_size)
    p.add_argument("--max-file-mb", type=float, default=Limits().max_request_bytes / 2**20)
    p.set_defaults(handler=_web)


def _web(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: expected 0..65535")
    if args.queue_size < 1 or args.max_file_mb <= 0:
        raise UsageError("--queue-size and --max-file-mb must be positive")
    limits = Limits(max_request_bytes=int(args.max_file_mb * 2**20), queue_size=args.queue_size)
    demo = build_demo(load_model(args.model), args.out, limits)
    print(f"nextgpt web: http://{args.host}:{args.port}", flush=True)
    launch(demo, args.host, args.port, args.out, block=True, max_file_mb=args.max_file_mb)
    return 0
