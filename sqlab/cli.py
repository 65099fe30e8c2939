"""The ``sqlab`` command: fetch, eval, bench, quantize, export, import, sweep, plan, report, demo.

Every subcommand is a thin wrapper over the public API; bad input ends in one
``sqlab: error: ...`` line and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from . import files
from .errors import SqlabError
from .preset import fast_mode

log = logging.getLogger("sqlab")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


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
    from . import checkpoint, data, evaluate, models

    if args.json:
        files.writable_file(args.json, "--json")  # before the work, not after printing its result
    dataset = args.dataset or (None if args.tasks else "shakespeare")
    # the text and the task names first: bad ones fail before the slow model load
    tokenizer = models.load_tokenizer(args.model)
    text = data.eval_text(dataset) if dataset else None
    if args.tasks:
        from .tasks import task_manager

        task_manager(args.tasks, args.include_path)
    model = checkpoint.load(args.model)
    result = {"model": args.model}
    if dataset:
        seqlen = args.seqlen or _default_seqlen(model)
        tokens = data.eval_tokens(tokenizer, dataset, seqlen, text=text)
        ppl = evaluate.perplexity(model, tokens, seqlen, max_windows=args.max_windows)
        print(
            f"{args.model} on {dataset}: perplexity {ppl.ppl:.3f} "
            f"({ppl.windows} windows of {seqlen} tokens)"
        )
        result.update(dataset=dataset, seqlen=seqlen, windows=ppl.windows, ppl=ppl.ppl)
    if args.tasks:
        result["tasks"] = _run_tasks(args, model, tokenizer)
    if args.json:
        files.write_json(args.json, result)
    return 0


def _run_tasks(args, model, tokenizer) -> dict:
    from .tasks import evaluate_tasks

    if not args.verbose:  # lm-eval warns that it was handed a model object, as intended
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    found = evaluate_tasks(
        model,
        tokenizer,
        args.tasks,
        include_path=args.include_path,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
    )
    for result in found:
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in result.metrics.items())
        print(f"{args.model} on {result.task}: {metrics} ({result.samples} examples)")
    return {r.task: {**r.metrics, "samples": r.samples} for r in found}


def cmd_bench(args) -> int:
    from . import checkpoint, evaluate, models

    if args.json:
        files.writable_file(args.json, "--json")
    model = checkpoint.load(args.model)
    tokenizer = models.load_tokenizer(args.model)
    bench = evaluate.generation_benchmark(model, tokenizer, args.tokens, repeats=args.repeats)
    low, high = bench.decode_ms_spread
    print(
        f"{args.model} on {bench.device}: {bench.new_tokens} tokens after a "
        f"{bench.prompt_tokens}-token prompt, "
        f"median of {bench.repeats} runs after a warm-up (min-max)"
    )
    print(
        f"  eager generate(): {bench.tokens_per_s:.1f} tokens/s, {bench.decode_ms_per_token:.2f} "
        f"ms/token ({low:.2f}-{high:.2f}), prefill {bench.prefill_ms:.0f} ms"
    )
    if bench.graph_decode_ms_per_token is not None:
        low, high = bench.graph_decode_ms_spread
        speedup = bench.decode_ms_per_token / bench.graph_decode_ms_per_token
        print(
            f"  CUDA graph:       {bench.graph_tokens_per_s:.1f} tokens/s, "
            f"{bench.graph_decode_ms_per_token:.2f} ms/token ({low:.2f}-{high:.2f}), "
            f"{speedup:.2f}x eager"
        )
    else:
        print(f"  CUDA graph:       not measured ({bench.graph_note})")
    print(
        f"  weights {bench.weights_mb:.1f} MB, "
        f"{bench.peak_memory_kind} {bench.peak_memory_mb:.0f} MB"
    )
    if args.json:
        files.write_json(args.json, {"model": args.model, **bench.as_dict()})
    return 0


def _common(args) -> dict:
    """The calibration and method options given on the command line
    (those left out take the config's defaults).
    """
    given = dict(
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        kmeans=args.kmeans,
        act_order=args.act_order,
        weighted=False if args.no_weighting else None,
    )
    return {k: v for k, v in given.items() if v is not None}


def _quant_config(args):
    from .config import config_for

    return config_for(
        args.method,
        args.wbits,
        strict=True,
        outlier_pct=args.outlier_pct,
        sensitive_pct=args.sensitive_pct,
        outlier_range=args.outlier_range,
        groupsize=args.groupsize or None,
        **_common(args),
    )


def cmd_quantize(args) -> int:
    from . import checkpoint, data

    config = _quant_config(args)  # bad settings fail before anything slow
    if hasattr(config, "calib"):
        data.parse_corpus(config.calib)
    out = files.writable_dir(args.out, "--out")
    with files.exclusive(out, f"--out {args.out!r}"):
        checkpoint.check_target(out, args.overwrite, f"--out {args.out!r}")
        work = out.with_name(out.name + ".work")
        try:
            report = _quantize_into(args, config, out, work if config.packed else None)
        except BaseException:
            if work.is_dir() and not any(work.glob("block_*.safetensors")):
                shutil.rmtree(work, ignore_errors=True)  # nothing to resume from
            raise
        shutil.rmtree(work, ignore_errors=True)
    sparse = (
        f", {report.outlier_pct:.3f}% outliers (r = {report.outlier_range}), "
        f"{report.sparse_pct:.3f}% sparse"
        if config.packed
        else " (reconstructed weights, stored unpacked)"
    )
    print(
        f"{config.label()} of {args.model}: {report.bits_per_weight:.3f} bits/weight, "
        f"{report.size_mb:.1f} MB of quantized linears{sparse} -> {args.out}"
    )
    return 0


def _quantize_into(args, config, out: Path, work: Path | None):
    from . import checkpoint, models, streaming
    from .experiments import quantize

    if config.method == "squeezellm" and not args.in_memory:
        try:
            return _quantize_streamed(args, config, out, work)
        except streaming.Unstreamable as exc:
            log.debug("loading the whole model: %s", exc)
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_model(args.model)
    report = quantize(model, tokenizer, config, work_dir=work)
    meta = {
        **config.relevant(),
        "label": config.label(),
        "outlier_range": report.outlier_range,
        "bits_per_weight": report.bits_per_weight,
        "base_model": args.model,
    }
    if config.packed:
        checkpoint.save_quantized(
            model,
            out,
            meta,
            tokenizer,
            overwrite=args.overwrite,
            report=report.as_dict(),
            dtype=args.dtype,
        )
    else:
        checkpoint.save_simulated(
            model, out, meta, tokenizer, overwrite=args.overwrite, report=report.as_dict()
        )
    return report


def _quantize_streamed(args, config, out: Path, work: Path):
    """SqueezeLLM streamed block by block from the model's safetensors shards (sqlab.streaming):
    the model is never in memory whole; the Fisher, if not cached yet, is computed first on the
    loaded model, which is freed before quantizing."""
    import gc

    from . import checkpoint, models, plan, streaming
    from .memory import release_freed_tensors
    from .sensitivity import compute_fisher, fisher_cache_path

    source = streaming.ShardedModel(args.model)  # Unstreamable: the caller loads the model
    release_freed_tensors()  # so the resident memory follows the tensors alive
    models.check_seqlen(source.meta, config.seqlen)
    digest = source.fingerprint()
    fisher = None
    if config.needs_fisher:
        path = fisher_cache_path(digest, config.calib, config.nsamples, config.seqlen, config.seed)
        shapes = {n: s for _, block in source.blocks() for n, s in block.items()}
        try:
            fisher = streaming.fisher_file(path, shapes) if path.exists() else None
        except SqlabError as exc:  # a damaged cache entry is computed again, not trusted
            log.warning("%s; computing the Fisher information again", exc)
        if fisher is None:  # with the strategy sqlab plan chooses on this machine
            strategy, placement = plan.fisher_setup(args.model, config.seqlen, config.nsamples)
            log.info("Fisher: %s", strategy)
            model = models.load_model(args.model, **placement)
            compute_fisher(
                model,
                models.load_tokenizer(args.model),
                config.calib,
                config.nsamples,
                config.seqlen,
                config.seed,
                strategy=strategy,
            )
            del model
            gc.collect()
            fisher = streaming.fisher_file(path, shapes)
    device = streaming.kmeans_device(config)
    log.info(
        "quantizing %s block by block from its weight files (k-means: %s on %s)",
        args.model,
        config.kmeans,
        device,
    )
    report, blocks = streaming.quantize_streamed(
        source, config, fisher, work, fingerprint=digest, device=device
    )
    meta = {
        **config.relevant(),
        "label": config.label(),
        "outlier_range": report.outlier_range,
        "bits_per_weight": report.bits_per_weight,
        "base_model": args.model,
    }
    tokenizer = models.load_tokenizer(args.model)  # only now: it holds ~100 MB for its files
    checkpoint.save_streamed(
        source,
        blocks,
        out,
        meta,
        tokenizer,
        overwrite=args.overwrite,
        report=report.as_dict(),
        dtype=args.dtype,
    )
    return report


def cmd_export(args) -> int:
    from . import checkpoint

    files.writable_file(args.out, "--out")
    model = checkpoint.load(args.model, device="cpu")
    path = checkpoint.export_squeezellm(
        model,
        args.out,
        balanced=args.balanced,
        nnz_per_thread=args.nnz_per_thread,
        dtype=args.dtype,
        padded=args.padded,
    )
    print(
        f"{args.model} -> {path} and {path.parent / checkpoint.QUANT_CONFIG} "
        "(the original SqueezeLLM format)"
    )
    return 0


def cmd_import(args) -> int:
    from . import checkpoint, models

    out = files.writable_dir(args.out, "--out")
    with files.exclusive(out, f"--out {args.out!r}"):
        checkpoint.check_target(out, args.overwrite, f"--out {args.out!r}")
        model = checkpoint.import_squeezellm(args.file, args.base)
        tokenizer = models.load_tokenizer(args.base)
        meta = {"source": str(args.file), "base_model": args.base}
        checkpoint.save_quantized(
            model, out, meta, tokenizer, overwrite=args.overwrite, dtype=args.dtype
        )
    print(f"{args.file} on {args.base} -> {args.out}")
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _ints(text: str) -> list[int]:
    values = _floats(text)
    if any(v != int(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return [int(v) for v in values]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def cmd_sweep(args) -> int:
    from . import data, experiments

    common = _common(args)
    if args.preset == "paper":
        configs = experiments.paper_configs(args.wbits, **common)
    else:
        bad = [m for m in args.methods if m not in ("squeezellm", "rtn", "gptq")]
        if bad:
            raise SqlabError(f"unknown method {bad[0]!r}; --methods takes squeezellm, rtn, gptq")
        configs = experiments.sweep_configs(
            args.methods, args.wbits, args.outlier_pct, args.sensitive_pct, args.groupsize, **common
        )
    files.writable_dir(args.out, "--out")
    evaluation = experiments.EvalSettings(
        tuple(args.datasets),
        args.eval_seqlen,
        args.max_windows,
        tasks=tuple(args.tasks),
        task_limit=args.limit,
        include_path=args.include_path,
    )
    if args.tasks and not args.verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if args.ray is not None:
        from .cluster import run_on_ray

        for name in evaluation.datasets:  # bad names fail here, not on every worker
            data.parse_corpus(name)
        frame = run_on_ray(
            args.model, configs, evaluation, address=args.ray or None, workers=args.workers
        )
    else:
        frame = experiments.Sweeper(args.model, evaluation).run(configs)
    table = experiments.tidy(frame)
    out = Path(args.out)
    files.write_text(out / "results.csv", table.to_csv(index=False))
    files.write_text(out / "results.json", frame.to_json(orient="records", indent=1))
    print(experiments.render(frame))
    print(f"written to {out / 'results.csv'} and {out / 'results.json'}")
    return 0


def cmd_plan(args) -> int:
    from . import plan

    if args.json not in (None, "-"):
        files.writable_file(args.json, "--json")
    found = plan.plan(
        args.model,
        gpus=args.gpus,
        gpu_mem_gb=args.gpu_mem,
        cpu_mem_gb=args.cpu_mem,
        seqlen=args.seqlen,
        nsamples=args.nsamples,
        wbits=args.wbits,
    )
    if args.json == "-":
        print(json.dumps(found.as_dict(), indent=1))
        return 0
    print(plan.render(found))
    if args.json:
        files.write_json(args.json, found.as_dict())
    return 0


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of GB, got {text!r}")
    return value


def cmd_report(args) -> int:
    from .report import write_report

    files.writable_dir(args.out, "--out")
    path = write_report(args.out, fast=args.fast or fast_mode())
    print(f"report written to {path}")
    return 0


def cmd_demo(args) -> int:
    from .experiments import render, run_demo, tidy

    files.writable_file(args.json, "--json")
    frame, settings = run_demo(max_windows=args.max_windows, seqlen=args.seqlen, fast=fast_mode())
    print(
        f"SqueezeLLM demo on {settings['model']}: perplexity on the Shakespeare evaluation plays "
        f"({', '.join(settings['eval_texts'])}), "
        f"{settings['windows']} windows of {settings['seqlen']} tokens"
    )
    print(
        f"calibration: {settings['calibration']['nsamples']} x {settings['calibration']['seqlen']} "
        f"tokens of {settings['calibration']['calib']}; quantized blocks: "
        f"{settings['quantized_blocks']}"
    )
    print(render(frame))
    print(f"({settings['note']})")
    files.write_json(args.json, {**settings, "rows": tidy(frame).to_dict(orient="records")})
    print(f"written to {args.json}")
    return 0


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-weighting", action="store_true", help="plain k-means (ablation: no Fisher weighting)"
    )
    p.add_argument(
        "--kmeans",
        choices=("optimal", "fast"),
        help="SqueezeLLM clustering: the exact optimum per row (default) or the faster heuristic",
    )
    p.add_argument(
        "--act-order",
        action="store_true",
        help="GPTQ: quantize columns by decreasing Hessian diagonal",
    )
    p.add_argument("--calib", help="calibration corpus (default shakespeare)")
    p.add_argument("--nsamples", type=_positive, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=_positive, help="calibration window length (default 512)")
    p.add_argument("--seed", type=int, help="calibration sampling seed (default 0)")


def _add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default="float16",
        help="dtype of the tensors that are not quantized (default float16)",
    )


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=("squeezellm", "rtn", "gptq"), default="squeezellm")
    p.add_argument("--wbits", type=int, choices=(3, 4), default=3)
    p.add_argument(
        "--outlier-pct", type=float, default=0.0, help="model-wide %% of weights kept as outliers"
    )
    p.add_argument(
        "--sensitive-pct", type=float, default=0.0, help="%% of each matrix kept by Fisher"
    )
    p.add_argument(
        "--outlier-range",
        type=float,
        help="fix the IQR range r instead of solving for --outlier-pct",
    )
    p.add_argument(
        "--groupsize", type=int, default=0, help="rtn/gptq: inputs per scale (0: per channel)"
    )
    _add_calib_args(p)


def _add_task_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--tasks",
        type=_names,
        default=[],
        help=f"lm-eval tasks {what}, comma-separated: names lm-eval knows, "
        "shakespeare_next_line (built in, offline), or YAML files",
    )
    p.add_argument("--include-path", metavar="DIR", help="a folder of your own lm-eval task YAMLs")
    p.add_argument("--limit", type=_positive, help="score at most this many examples per task")


class _Parser(argparse.ArgumentParser):
    """Usage errors end like every other error: one ``sqlab: error:`` line and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"sqlab: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sqlab", description="SqueezeLLM experiment workbench")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fetch", help="download the default model and corpus into data/cache/")
    p.set_defaults(run=cmd_fetch)

    p = sub.add_parser("eval", help="perplexity of a model on a dataset, accuracy on lm-eval tasks")
    p.add_argument(
        "--model", default="default", help="default, a local directory, a .gguf file or a hub id"
    )
    p.add_argument(
        "--dataset",
        help="perplexity on shakespeare (the default without --tasks), "
        "wikitext2, ptb, c4 or text:PATH",
    )
    p.add_argument(
        "--seqlen", type=_positive, help="window length (default: 512 on CPU, 2048 on GPU)"
    )
    p.add_argument(
        "--max-windows", type=_positive, help="score at most this many evenly spaced windows"
    )
    _add_task_args(p, "to score (accuracy)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--batch-size", type=_positive, default=1, help="lm-eval batch size (default 1)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("bench", help="greedy generation speed and memory at batch 1")
    p.add_argument("--model", default="default")
    p.add_argument(
        "--tokens", type=_positive, default=64, help="new tokens to generate (default 64)"
    )
    p.add_argument(
        "--repeats",
        type=_positive,
        default=5,
        help="timed runs after a warm-up; the median is "
        "reported with the min-max spread (default 5)",
    )
    p.add_argument("--json", metavar="FILE")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("quantize", help="SqueezeLLM-quantize a model into a packed checkpoint")
    p.add_argument("--model", default="default")
    _add_quant_args(p)
    p.add_argument("--out", required=True, help="checkpoint directory to write (new, or empty)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the checkpoint in --out (files sqlab did not write are kept)",
    )
    p.add_argument(
        "--in-memory",
        action="store_true",
        help="SqueezeLLM: load the whole model "
        "instead of streaming a local model directory block by block (same result)",
    )
    _add_dtype_arg(p)
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("export", help="write a checkpoint in the original SqueezeLLM .pt format")
    p.add_argument("--model", required=True, help="a checkpoint written by sqlab quantize")
    p.add_argument("--out", required=True, help="the .pt file; quant_config.json goes beside it")
    p.add_argument(
        "--balanced",
        action="store_true",
        help="also write startrows for the original's balanced sparse kernel",
    )
    p.add_argument(
        "--nnz-per-thread",
        type=_positive,
        default=10,
        help="sparse values per thread of that kernel (default 10, the original's)",
    )
    p.add_argument(
        "--padded",
        action="store_true",
        help="write layers whose inputs are not a "
        "multiple of 32 padded (sqlab reads them; the original loader does not)",
    )
    _add_dtype_arg(p)
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("import", help="an original SqueezeLLM .pt file into a sqlab checkpoint")
    p.add_argument("--file", required=True, help="the .pt file (sq-llama-7b-w3-s0.pt style)")
    p.add_argument("--base", required=True, help="the unquantized model it was made from")
    p.add_argument("--out", required=True, help="checkpoint directory to write (new, or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint in --out")
    _add_dtype_arg(p)
    p.set_defaults(run=cmd_import)

    p = sub.add_parser("sweep", help="evaluate a grid of methods and settings (cached, resumable)")
    p.add_argument("--model", default="default")
    p.add_argument(
        "--preset",
        choices=("paper",),
        help="paper: RTN/GPTQ per-channel and g128, SqueezeLLM "
        "dense, 0.05%%, 0.45%%+0.05%% (replaces the grid options)",
    )
    p.add_argument(
        "--methods",
        type=_names,
        default=["squeezellm"],
        help="comma-separated: squeezellm,rtn,gptq",
    )
    p.add_argument("--wbits", type=_ints, default=[3, 4], help="comma-separated, e.g. 3,4")
    p.add_argument(
        "--outlier-pct", type=_floats, default=[0.0], help="SqueezeLLM, e.g. 0,0.05,0.45"
    )
    p.add_argument("--sensitive-pct", type=_floats, default=[0.0], help="SqueezeLLM, e.g. 0,0.05")
    p.add_argument(
        "--groupsize", type=_ints, default=[0], help="baselines, e.g. 0,128 (0: per channel)"
    )
    p.add_argument(
        "--datasets",
        type=_names,
        default=["shakespeare"],
        help="evaluation corpora, comma-separated",
    )
    p.add_argument(
        "--eval-seqlen", type=_positive, help="evaluation window (default 512 on CPU, 2048 on GPU)"
    )
    p.add_argument(
        "--max-windows",
        type=_positive,
        default=32,
        help="evaluation windows per dataset (default 32)",
    )
    _add_task_args(p, "whose accuracy goes beside perplexity")
    _add_calib_args(p)
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run the points on a Ray "
        "cluster (the ray extra): at ADDRESS, or a local one without it",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=2,
        help="Ray workers, each with the model loaded once (default 2)",
    )
    p.add_argument("--out", required=True, help="directory for results.csv and results.json")
    p.set_defaults(run=cmd_sweep)

    p = sub.add_parser(
        "plan",
        help="memory per stage and the strategy for a model, from its "
        "config alone (no weights loaded)",
    )
    p.add_argument(
        "--model",
        default="default",
        help="a model or checkpoint directory, a config.json, a .gguf file, default, or a hub id",
    )
    p.add_argument("--gpus", type=int, default=0, help="GPUs to plan for (default 0: the CPU)")
    p.add_argument("--gpu-mem", type=_gigabytes, help="memory of each GPU in GB, e.g. 80")
    p.add_argument("--cpu-mem", type=_gigabytes, help="host memory in GB (default: this machine's)")
    p.add_argument(
        "--seqlen", type=_positive, help="calibration window (default 2048 with GPUs, 512 without)"
    )
    p.add_argument(
        "--nsamples", type=_positive, help="calibration windows (default 100 with GPUs, 16 without)"
    )
    p.add_argument("--wbits", type=int, choices=(3, 4), default=3)
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="the plan as JSON: on stdout, or into FILE",
    )
    p.set_defaults(run=cmd_plan)

    p = sub.add_parser(
        "report", help="the paper's figures and tables on the default model, as one HTML file"
    )
    p.add_argument("--out", required=True, help="directory for report.html and report.json")
    p.add_argument(
        "--fast", action="store_true", help="seconds instead of an hour: 2 blocks, 2 windows"
    )
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("demo", help="the main job on the embedded default model")
    p.add_argument("--seqlen", type=_positive, help="evaluation window length (default 512 on CPU)")
    p.add_argument(
        "--max-windows", type=_positive, help="evaluation windows (default 32; 2 with SQLAB_FAST=1)"
    )
    p.add_argument(
        "--json", metavar="FILE", default="out/demo.json", help="where to write the table as JSON"
    )
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
