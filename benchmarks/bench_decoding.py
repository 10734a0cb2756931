"""Decoding speed: nextgpt's signal-guided, KV-cached loop vs transformers' `generate`.

Both decode the same prompt greedily with the same LLM for the same number of tokens, alternating
runs so machine noise hits both alike; the ratio is what to read. A full forward of the growing
sequence at every step (no KV cache) is timed too, to show what the cache saves.

    .venv/bin/python benchmarks/bench_decoding.py [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nextgpt.config import tiny_config
from nextgpt.conversation import encode_conversation, parse_messages
from nextgpt.model import NextGPT


def build(hidden: int, layers: int) -> NextGPT:
    config = tiny_config()
    config.llm.hidden_size, config.llm.num_layers = hidden, layers
    config.llm.intermediate_size, config.llm.num_heads = hidden * 4, max(hidden // 64, 2)
    return NextGPT.from_config(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args.hidden, args.layers)
    llm, eos = model.llm, model.llm.eos_token_id
    turns, _ = parse_messages("Tell me a long story about the sea.")
    counts = {m: model.num_media_tokens(m) for m in ("image", "audio", "video")}
    ids = encode_conversation(turns, llm, model.template, counts, add_generation_prompt=True)
    prompt = torch.tensor([ids.input_ids])

    def ours() -> None:
        model.generate("Tell me a long story about the sea.", max_new_tokens=args.tokens)

    def reference() -> None:
        with torch.no_grad():
            llm.base_model.generate(
                inputs_embeds=llm.embed(prompt),
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=args.tokens,
                do_sample=False,
                eos_token_id=eos,
            )

    def no_cache() -> None:
        seq = prompt
        with torch.no_grad():
            for _ in range(args.tokens):
                logits, _, _ = llm(llm.embed(seq))
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                if int(nxt) == eos:
                    break
                seq = torch.cat([seq, nxt], dim=1)

    reply = model.generate("Tell me a long story about the sea.", max_new_tokens=args.tokens)
    n = len(reply.token_ids)
    timings: dict[str, list[float]] = {"nextgpt": [], "transformers": [], "no cache": []}
    runs = {"nextgpt": ours, "transformers": reference, "no cache": no_cache}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    base = statistics.median(timings["transformers"])
    print(
        f"LLM hidden {args.hidden}, {args.layers} layers; {n} tokens per reply; "
        f"median of {args.repeats}, torch threads {torch.get_num_threads()}"
    )
    for name, ts in timings.items():
        med = statistics.median(ts)
        print(f"{name:>13}: {med * 1000:8.1f} ms  {n / med:8.1f} tok/s  ratio {med / base:5.2f}")


if __name__ == "__main__":
    main()
