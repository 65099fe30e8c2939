"""The ``sqlab`` command: fetch, eval, bench, demo.

Every subcommand is a thin wrapper over the public API; bad input ends in one
``sqlab: error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import SqlabError

log = logging.getLogger("sqlab")


def fast_mode() -> bool:
    """``SQLAB_FAST=1`` shrinks the demo and the notebooks to seconds (for tests)."""
    return os.environ.get("SQLAB_FAST", "") not in ("", "0")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _write_json(path: str, payload: dict) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, target)


def _default_seqlen(model) -> int:
    from .evaluate import _device

    return 2048 if _device(model).type == "cuda" else 512


def cmd_fetch(args) -> int:
    from .assets import fetch

    paths = fetch()
    print(f"default model: {paths['model']}")
    print(f"default corpus: {paths['corpus']}")
    return 0


def cmd_eval(args) -> int:
    from . import data, evaluate, models

    # the text first: a bad dataset fails before the slow model load
    tokenizer = models.load_tokenizer(args.model)
    text = data.eval_text(args.dataset)
    model = models.load_model(args.model)
    seqlen = args.seqlen or _default_seqlen(model)
    tokens = data.eval_tokens(tokenizer, args.dataset, seqlen, text=text)
    result = evaluate.perplexity(model, tokens, seqlen, max_windows=args.max_windows)
    print(f"{args.model} on {args.dataset}: perplexity {result.ppl:.3f} "
          f"({result.windows} windows of {seqlen} tokens)")
    if args.json:
        _write_json(args.json, {"model": args.model, "dataset": args.dataset, "seqlen": seqlen,
                                "windows": result.windows, "ppl": result.ppl})
    return 0


def cmd_bench(args) -> int:
    from . import evaluate, models

    model = models.load_model(args.model)
    tokenizer = models.load_tokenizer(args.model)
    bench = evaluate.generation_benchmark(model, tokenizer, args.tokens)
    print(f"{args.model} on {bench.device}: {bench.tokens_per_s:.1f} tokens/s "
          f"({bench.decode_ms_per_token:.1f} ms/token, prefill {bench.prefill_ms:.0f} ms), "
          f"weights {bench.weights_mb:.1f} MB, {bench.peak_memory_kind} {bench.peak_memory_mb:.0f} MB")
    if args.json:
        _write_json(args.json, {"model": args.model, **bench.as_dict()})
    return 0


def cmd_demo(args) -> int:
    from . import data, evaluate, models

    model = models.load_model("default")
    tokenizer = models.load_tokenizer("default")
    seqlen = args.seqlen or _default_seqlen(model)
    windows = args.max_windows or (4 if fast_mode() else 32)
    tokens = data.eval_tokens(tokenizer, "shakespeare", seqlen)
    result = evaluate.perplexity(model, tokens, seqlen, max_windows=windows)
    print(f"SmolLM2-135M-Instruct (dequantized Q4_1 reference weights) on the Shakespeare "
          f"evaluation plays ({', '.join(data.EVAL_TEXTS)}): perplexity {result.ppl:.3f} "
          f"({result.windows} windows of {seqlen} tokens)")
    if args.json:
        _write_json(args.json, {"model": "default", "dataset": "shakespeare", "seqlen": seqlen,
                                "windows": result.windows, "ppl": result.ppl})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqlab", description="SqueezeLLM experiment workbench")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fetch", help="download the default model and corpus into data/cache/")
    p.set_defaults(run=cmd_fetch)

    p = sub.add_parser("eval", help="perplexity of a model on a dataset")
    p.add_argument("--model", default="default", help="default, a local directory, a .gguf file or a hub id")
    p.add_argument("--dataset", default="shakespeare", help="shakespeare, wikitext2, ptb, c4 or text:PATH")
    p.add_argument("--seqlen", type=_positive, help="window length (default: 512 on CPU, 2048 on GPU)")
    p.add_argument("--max-windows", type=_positive, help="score at most this many evenly spaced windows")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("bench", help="greedy generation speed and memory at batch 1")
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", type=_positive, default=64, help="new tokens to generate (default 64)")
    p.add_argument("--json", metavar="FILE")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("demo", help="the main job on the embedded default model")
    p.add_argument("--seqlen", type=_positive)
    p.add_argument("--max-windows", type=_positive, help="evaluation windows (default 32; 4 with SQLAB_FAST=1)")
    p.add_argument("--json", metavar="FILE", help="write the table as JSON")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except SqlabError as exc:
        print(f"sqlab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sqlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
