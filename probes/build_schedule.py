"""Simulate `nextgpt mini build`'s two-lane schedule from measured part times.

The numbers behind docs/mini-design.md section 7, "Where the time goes". Like `build_parallel`,
a part starts as soon as its prerequisites are done, in list order, two at a time; a part left
running with nothing else ready goes `WIDENED` times faster (two threads do about 1.4 times one
thread's work on these machines). Times are one-thread minutes measured by session 20's build
(`build/s20/*/done.json`); the stages and the eval ran on two threads there, so their one-thread
minutes are the two-thread times times `ONE_THREAD` (1.4; `--one-thread 1.6` for the pessimistic
case). The split schedule trains each decoder as a front (autoencoder, vocoder, text encoder)
and a UNet, with the stages needing only the fronts.

    python probes/build_schedule.py [--one-thread 1.4]
"""

from __future__ import annotations

import argparse

WIDENED = 1.4
Parts = dict[str, tuple[float, tuple[str, ...]]]


def simulate(parts: Parts, order: list[str]) -> float:
    """Minutes until every part is done."""
    done: set[str] = set()
    pending, running, now = list(order), {}, 0.0
    while pending or running:
        ready = [p for p in pending if all(n in done for n in parts[p][1])]
        for p in ready[: 2 - len(running)]:
            pending.remove(p)
            running[p] = parts[p][0]
        still_ready = [p for p in pending if all(n in done for n in parts[p][1])]
        speed = WIDENED if len(running) == 1 and not still_ready else 1.0
        name = min(running, key=running.__getitem__)
        step = running[name] / speed
        now += step
        for key in running:
            running[key] -= step * speed
        del running[name]
        done.add(name)
    return now


def session20(one_thread: float) -> tuple[Parts, Parts]:
    """Main's parts and the split schedule's, from session 20's measured minutes."""
    two = {"stage2": 16.3, "stage3": 24.2, "eval": 9.5}
    stages = {k: v * one_thread for k, v in two.items()}
    decoders = ("image-decoder", "video-decoder", "audio-decoder")
    main: Parts = {
        "data": (1.9, ()),
        "judges": (2.6, ()),
        "encoder": (12.0, ()),
        "llm": (4.5, ("data",)),
        "stage1": (7.4, ("data", "encoder", "llm")),
        "stage1-grouping": (6.7, ("data", "encoder", "llm")),
        "image-decoder": (26.2, ("judges",)),
        "video-decoder": (45.7, ("judges",)),
        # 49.9 minutes on one thread, then 10.0 on two
        "audio-decoder": (49.9 + 10.0 * WIDENED, ("judges",)),
        "stage2": (stages["stage2"], ("stage1", *decoders)),
        "stage3": (stages["stage3"], ("stage2",)),
        "package": (0.0, ("stage3",)),
        "eval": (stages["eval"], ("package", "stage1", "stage1-grouping")),
    }
    split = dict(main)
    # fronts: autoencoder (+ vocoder) and text encoder, from each part's recorded phase seconds
    for modality, front in (("image", 4.5), ("video", 3.9), ("audio", 18.7)):
        whole = main[f"{modality}-decoder"][0]
        split[f"{modality}-decoder-front"] = (front, ("judges",))
        split[f"{modality}-decoder"] = (whole - front, (f"{modality}-decoder-front",))
    fronts = tuple(f"{m}-decoder-front" for m in ("image", "video", "audio"))
    split["stage2"] = (stages["stage2"], ("stage1", *fronts))
    split["package"] = (0.0, ("stage3", *decoders))
    return main, split


MAIN_ORDER = [
    "data", "judges", "image-decoder", "video-decoder", "audio-decoder", "encoder", "llm",
    "stage1", "stage1-grouping", "stage2", "stage3", "package", "eval",
]  # fmt: skip
SPLIT_ORDER = [
    "data", "judges", "encoder", "image-decoder-front", "video-decoder-front",
    "audio-decoder-front", "llm", "stage1", "stage2", "stage3", "audio-decoder",
    "video-decoder", "image-decoder", "stage1-grouping", "package", "eval",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one-thread", type=float, default=1.4, help="one-thread / two-thread")
    args = parser.parse_args()
    main_parts, split_parts = session20(args.one_thread)
    work = sum(w for w, _ in split_parts.values())
    print(f"one-thread work: {work:.0f} min")
    print(f"main's order:   {simulate(main_parts, MAIN_ORDER):.1f} min")
    print(f"split schedule: {simulate(split_parts, SPLIT_ORDER):.1f} min")


if __name__ == "__main__":
    main()
