"""NExT-GPT / LLaVA training records, read into `Sample`s: turns of text and media parts.

A data file is a JSON list of records (or JSON Lines, one record a line). Media paths in a record
are relative to the data root (by default the data file's folder) unless absolute. Every record
becomes one `Sample`; a user media part's value is the media file's path, an assistant media
part's value is an `OutputTarget` (what that signal-token group must produce) whose `media` and
`embedding` are still file paths here: `SampleEncoder` loads them.

How each format is read:

**Conversations (LLaVA style)**: `{"conversations": [{"from": "human" | "gpt", "value": str}, ...]}`
("user" / "assistant" are accepted as roles too).
- Input media: `image` / `image_name` / `input_image` (likewise `video...`, `audio...`), one path or
  a list. Each `<image>` in a human turn takes the record's next image, in order; when no human turn
  has a placeholder, the media go at the start of the first human turn (as LLaVA does). Text around
  a placeholder is plain text. Comprehension data (stage 1: X -> caption) is this form with one
  medium and the caption as the gpt answer.
- Output media: each `<image>` in a gpt turn is the image signal-token group. Its target is the
  record's next `image_captions` entry (or `caption` when only one modality is generated), the next
  `output_image` (the file the diffusion loss reconstructs) and the next `image_caption_embeddings`
  (a precomputed `.npy` or `.safetensors` file); each is optional, but a group needs at least one.
  When the record names outputs and no gpt turn has a placeholder, the groups go at the end of the
  last gpt turn. Generation data (stage 2: caption -> media) and T2M instruction data are this form;
  text-only instruction data has no media at all.

**MosIT (raw form)**: `{"conversation": [...], "image_list": [...], "video_list": [...],
"audio_list": [...]}`. Placeholders in all turns, human and gpt alike, take the record's lists in
order of occurrence (a human `<image>` is an input, a gpt `<image>` an output whose file is the
diffusion target). A turn with its own `image_list` uses that list instead, and when its text has no
placeholder its media go at the start (human) or the end (gpt) of the turn. A gpt output's caption
comes from the turn's `caption` / `image_caption` / `image_captions`, else from the record's
`image_captions`, in order. Every listed medium must be used.

A bad record raises `DataError("<file>: record <i>: <what>")`; `read_samples(skip_bad=True)` skips
such records and returns their messages instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nextgpt.batch import OutputTarget
from nextgpt.config import MODALITIES
from nextgpt.conversation import Part, Turn

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
INPUT_KEYS = {m: (m, f"{m}_name", f"input_{m}") for m in MODALITIES}
PLACEHOLDER = re.compile(r"<(image|audio|video)>")


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file and the record."""


@dataclass
class Sample:
    """One training conversation; `source` (`file: record i`) names it in error messages."""

    turns: list[Turn]
    source: str


@dataclass
class ReadResult:
    samples: list[Sample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one message per skipped record


def path_keys(modality: str) -> tuple[str, ...]:
    """Record keys whose values are media or embedding file paths (used to repack records)."""
    return (*INPUT_KEYS[modality], f"output_{modality}", f"{modality}_caption_embeddings") + (
        f"{modality}_list",
    )


def read_records(path: str | Path) -> list[Any]:
    """The records of a JSON list or JSON Lines file; a broken JSON line stays a bad record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    if path.suffix == ".jsonl":
        records: list[Any] = []
        # JSON Lines ends lines with \n only: `splitlines` would also cut at U+2028, U+0085, ...
        # which JSON allows unescaped inside strings
        for i, line in enumerate(text.split("\n")):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                records.append(_BadJSON(f"line {i + 1} is not valid JSON ({e.msg})", line))
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); expected a list of records") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


@dataclass
class _BadJSON:
    reason: str
    line: str = ""  # the text as read, so that `pack_shards` can pass the bad record on


def read_samples(
    path: str | Path,
    root: str | Path | None = None,
    skip_bad: bool = False,
    check_files: bool = True,
) -> ReadResult:
    """Read every record of `path`; with `skip_bad`, bad records are counted instead of raised."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    result = ReadResult()
    for i, record in enumerate(read_records(path)):
        try:
            result.samples.append(parse_record(record, root, f"{path}: record {i}", check_files))
        except DataError as e:
            if not skip_bad:
                raise
            result.skipped.append(str(e))
    return result


def parse_record(record: Any, root: Path, where: str, check_files: bool = True) -> Sample:
    """One record of any supported format -> a Sample; `where` prefixes every error."""
    ctx = _Context(root, where, check_files)
    if isinstance(record, _BadJSON):
        ctx.fail(record.reason)
    if not isinstance(record, dict):
        ctx.fail(f"expected a JSON object, got {type(record).__name__}")
    if "conversation" in record:
        turns = _read_mosit(record, ctx)
    elif "conversations" in record:
        turns = _read_llava(record, ctx)
    else:
        ctx.fail("no 'conversations' (LLaVA form) or 'conversation' (MosIT form) key")
    if not any(t.role == "assistant" for t in turns):
        ctx.fail("no gpt turn: nothing to learn from")
    return Sample(turns, where)


@dataclass
class _Context:
    root: Path
    where: str
    check_files: bool

    def fail(self, what: str) -> None:
        raise DataError(f"{self.where}: {what}")

    def path(self, value: Any, what: str) -> Path:
        if not isinstance(value, str) or not value:
            self.fail(f"{what}: expected a file path, got {value!r}")
        path = Path(value)
        path = path if path.is_absolute() else self.root / path
        if self.check_files and not path.is_file():
            self.fail(f"{what} file not found: {path}")
        return path

    def strings(self, record: dict, key: str) -> list[Any] | None:
        """A str-or-list field as a list (None when absent)."""
        if key not in record or record[key] is None:
            return None
        value = record[key]
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, str):
                self.fail(f"'{key}' must be a string or a list of strings, got {value!r}")
        return list(items)


def _turns(raw: Any, key: str, ctx: _Context) -> list[tuple[int, str, str, dict]]:
    """(index, role, text, turn dict) of each turn, validated."""
    if not isinstance(raw, list) or not raw:
        ctx.fail(f"'{key}' must be a non-empty list of turns")
    out = []
    for t, turn in enumerate(raw):
        if not isinstance(turn, dict):
            ctx.fail(f"turn {t}: expected an object with 'from' and 'value'")
        sender = turn.get("from")
        role = ROLES.get(sender) if isinstance(sender, str) else None
        if role is None:
            ctx.fail(f"turn {t}: unknown 'from' {sender!r}; use human or gpt")
        if not isinstance(turn.get("value"), str):
            ctx.fail(f"turn {t}: 'value' must be a string, got {turn.get('value')!r}")
        out.append((t, role, turn["value"], turn))
    return out


def _split(text: str) -> list[tuple[str, str]]:
    """Text -> ("text", piece) and (modality, "") items, in order; blank text dropped."""
    items: list[tuple[str, str]] = []
    for i, piece in enumerate(PLACEHOLDER.split(text)):
        if i % 2:
            items.append((piece, ""))
        elif piece.strip():
            items.append(("text", piece.strip()))
    return items


def _count(items: list[tuple[str, str]], modality: str) -> int:
    return sum(kind == modality for kind, _ in items)


def _read_llava(record: dict, ctx: _Context) -> list[Turn]:
    turns = _turns(record["conversations"], "conversations", ctx)
    split = [(role, _split(text)) for _, role, text, _ in turns]
    inputs: dict[str, list[Path]] = {}
    for m in MODALITIES:
        paths = []
        for key in INPUT_KEYS[m]:
            paths += [ctx.path(p, f"'{key}'") for p in ctx.strings(record, key) or []]
        inputs[m] = paths
        used = sum(_count(items, m) for role, items in split if role == "user")
        if used == 0 and paths:
            users = [items for role, items in split if role == "user"]
            if not users:
                ctx.fail(f"the record has input {m}s but no human turn")
            users[0][:0] = [(m, "")] * len(paths)
        elif used != len(paths):
            ctx.fail(
                f"human turns have {used} <{m}> placeholder(s) but the record has {len(paths)}"
            )

    generated = [m for m in MODALITIES if any(_count(i, m) for r, i in split if r == "assistant")]
    targets: dict[str, list[OutputTarget]] = {}
    for m in MODALITIES:
        captions = ctx.strings(record, f"{m}_captions")
        media = ctx.strings(record, f"output_{m}")
        embeds = ctx.strings(record, f"{m}_caption_embeddings")
        if captions is None and record.get("caption") is not None:
            named = [x for x in MODALITIES if f"output_{x}" in record] or generated
            if named == [m]:
                captions = ctx.strings(record, "caption")
        given = [x for x in (captions, media, embeds) if x is not None]
        used = sum(_count(items, m) for role, items in split if role == "assistant")
        if used == 0 and given:
            last = [items for role, items in split if role == "assistant"]
            if not last:
                ctx.fail(f"the record has {m} outputs but no gpt turn")
            last[-1].extend([(m, "")] * len(given[0]))
            used = len(given[0])
        named_lists = (
            (f"{m}_captions", captions),
            (f"output_{m}", media),
            (f"{m}_caption_embeddings", embeds),
        )
        for name, values in named_lists:
            if values is not None and len(values) != used:
                ctx.fail(f"gpt turns have {used} <{m}> group(s) but '{name}' has {len(values)}")
        targets[m] = [
            _target(
                ctx,
                m,
                captions[k] if captions else None,
                media[k] if media else None,
                embeds[k] if embeds else None,
            )
            for k in range(used)
        ]

    out = []
    for role, items in split:
        parts = []
        for kind, text in items:
            if kind == "text":
                parts.append(Part("text", text))
            elif role == "user":
                parts.append(Part(kind, inputs[kind].pop(0)))
            else:
                parts.append(Part(kind, targets[kind].pop(0)))
        out.append(Turn(role, parts))
    return out


def _target(
    ctx: _Context, modality: str, caption: str | None, media: str | None, embedding: str | None
) -> OutputTarget:
    if caption is None and media is None and embedding is None:
        ctx.fail(f"a <{modality}> output has no caption, file or caption embedding")
    return OutputTarget(
        caption=caption,
        embedding=ctx.path(embedding, f"{modality} caption embedding") if embedding else None,
        media=ctx.path(media, f"output {modality}") if media else None,
    )


def _read_mosit(record: dict, ctx: _Context) -> list[Turn]:
    turns = _turns(record["conversation"], "conversation", ctx)
    pools = {m: ctx.strings(record, f"{m}_list") or [] for m in MODALITIES}
    captions = {m: ctx.strings(record, f"{m}_captions") or [] for m in MODALITIES}
    out = []
    for t, role, text, turn in turns:
        items = _split(text)
        own = {m: ctx.strings(turn, f"{m}_list") for m in MODALITIES}
        for m, paths in own.items():
            if paths and not _count(items, m):
                group = [(m, "")] * len(paths)
                items = group + items if role == "user" else items + group
        turn_captions = {
            m: (
                ctx.strings(turn, f"{m}_captions")
                or ctx.strings(turn, f"{m}_caption")
                or (ctx.strings(turn, "caption") if _generated_only(items, m) else None)
                or []
            )
            for m in MODALITIES
        }
        parts = []
        for kind, piece in items:
            if kind == "text":
                parts.append(Part("text", piece))
                continue
            pool = own[kind] if own[kind] is not None else pools[kind]
            source = f"turn {t}'s '{kind}_list'" if own[kind] is not None else f"'{kind}_list'"
            if role == "user":
                if not pool:
                    ctx.fail(f"turn {t}: a <{kind}> placeholder but {source} has no {kind} left")
                parts.append(Part(kind, ctx.path(pool.pop(0), f"turn {t}: {kind}")))
                continue
            caption_pool = turn_captions[kind] or captions[kind]
            caption = caption_pool.pop(0) if caption_pool else None
            media = pool.pop(0) if pool else None
            parts.append(Part(kind, _target(ctx, kind, caption, media, None)))
        for m, paths in own.items():
            if paths:
                ctx.fail(f"turn {t}: {len(paths)} unused entr(ies) in its '{m}_list'")
        out.append(Turn(role, parts))
    for m, paths in pools.items():
        if paths:
            ctx.fail(f"{len(paths)} unused entr(ies) in '{m}_list'; add <{m}> placeholders")
    return out


def _generated_only(items: list[tuple[str, str]], modality: str) -> bool:
    """A bare `caption` belongs to `modality` when it is the only modality the turn holds."""
    kinds = {kind for kind, _ in items if kind != "text"}
    return kinds == {modality}
