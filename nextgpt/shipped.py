"""Models whose weights ship inside the package, so they load with no download.

`nextgpt-mini` is the miniature NExT-GPT trained from scratch by `nextgpt mini build`; it is the
default `--model` of every command. Its folder is an ordinary model directory (config.yaml,
trainable.safetensors and every frozen part), written by `nextgpt.mini.assemble.package_model`.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"
SHIPPED_MODELS: tuple[str, ...] = ("nextgpt-mini",)


def shipped_model_dir(name: str) -> Path | None:
    """The folder of a shipped model, or None when `name` is not one."""
    if name not in SHIPPED_MODELS:
        return None
    directory = MODELS_DIR / name
    if not (directory / "config.yaml").is_file():
        raise FileNotFoundError(
            f"the shipped model {name!r} is missing from {directory}: reinstall nextgpt, or "
            f"rebuild it with `nextgpt mini build` (docs/mini-design.md)"
        )
    return directory
