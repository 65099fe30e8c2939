"""The main job on the embedded default: one comparison table.

Rows: the unquantized reference; RTN per-channel at 3 and 4 bits; SqueezeLLM
dense-only and with 0.45% outliers + 0.05% sensitive values at 3 and 4 bits.
Columns: effective bits per weight (indices + LUT + sparse part, or RTN's codes +
scales + zeros), size of the quantized linears, perplexity on the Shakespeare
evaluation plays.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from . import baselines, data, evaluate, models
from .config import QuantConfig
from .quantize import quantize_model
from .sensitivity import compute_fisher

REFERENCE_NOTE = ("reference weights: SmolLM2-135M-Instruct dequantized from its published Q4_1 GGUF; "
                  "computed in fp32 on the CPU, sized as fp16")


@dataclass
class Row:
    method: str
    wbits: int | None
    bits_per_weight: float
    size_mb: float
    ppl: float
    seconds: float


@dataclass
class DemoTable:
    seqlen: int
    windows: int
    calibration: dict
    quantized_blocks: str
    rows: list[Row] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"model": "default (SmolLM2-135M-Instruct)", "dataset": "shakespeare", "seqlen": self.seqlen,
                "windows": self.windows, "calibration": self.calibration,
                "quantized_blocks": self.quantized_blocks, "note": REFERENCE_NOTE,
                "rows": [asdict(r) for r in self.rows]}

    def render(self) -> str:
        head = f"{'method':<36} {'bits/weight':>11} {'size MB':>8} {'perplexity':>10} {'time s':>7}"
        lines = [f"SqueezeLLM demo: perplexity on the Shakespeare evaluation plays ({', '.join(data.EVAL_TEXTS)}), "
                 f"{self.windows} windows of {self.seqlen} tokens",
                 f"calibration: {self.calibration['nsamples']} x {self.calibration['seqlen']} tokens of "
                 f"{self.calibration['corpus']}; quantized blocks: {self.quantized_blocks}",
                 head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.method:<36} {r.bits_per_weight:>11.3f} {r.size_mb:>8.1f} {r.ppl:>10.3f} "
                         f"{r.seconds:>7.1f}")
        lines.append(f"({REFERENCE_NOTE})")
        return "\n".join(lines)


def run_demo(max_windows: int | None = None, seqlen: int | None = None, fast: bool = False,
             progress: bool = True) -> DemoTable:
    """Build the comparison table. ``fast`` shrinks it to seconds: 2 blocks, 2 windows."""
    tokenizer = models.load_tokenizer("default")
    base = models.load_model("default")
    seqlen = seqlen or (2048 if base.device.type == "cuda" else 512)
    windows = max_windows or (2 if fast else 32)
    calib = {"corpus": "shakespeare", "nsamples": 2 if fast else 16, "seqlen": 128 if fast else 512}
    blocks = [0, 1] if fast else None
    n_blocks = len(models.decoder_blocks(base))
    table = DemoTable(seqlen, windows, calib, "0-1 (fast mode)" if fast else f"all {n_blocks}")
    tokens = data.eval_tokens(tokenizer, "shakespeare", seqlen)
    names = list(models.quantizable_linears(base))
    if blocks is not None:
        prefixes = {models.decoder_blocks(base)[b][0] + "." for b in blocks}
        names = [n for n in names if any(n.startswith(p) for p in prefixes)]
    linears = models.quantizable_linears(base)
    weights = sum(linears[n].weight.numel() for n in names)

    def score(model) -> float:
        return evaluate.perplexity(model, tokens, seqlen, max_windows=windows, progress=progress).ppl

    start = time.perf_counter()
    table.rows.append(Row("unquantized (fp16 size)", None, 16.0, weights * 2 / 2**20, score(base),
                          time.perf_counter() - start))
    fisher = compute_fisher(base, tokenizer, calib["corpus"], calib["nsamples"], calib["seqlen"], progress=progress)
    del base
    for wbits in (3, 4):
        start = time.perf_counter()
        model = models.load_model("default")
        report = baselines.rtn_quantize_model(model, wbits, only=set(names))
        table.rows.append(Row(f"RTN per-channel {wbits}-bit", wbits, report.bits_per_weight, report.size_mb,
                              score(model), time.perf_counter() - start))
    for wbits in (3, 4):
        for outlier_pct, sensitive_pct, label in ((0.0, 0.0, "dense-only"), (0.45, 0.05, "0.45% + 0.05% sparse")):
            start = time.perf_counter()
            model = models.load_model("default")
            config = QuantConfig(wbits=wbits, outlier_pct=outlier_pct, sensitive_pct=sensitive_pct,
                                 calib=calib["corpus"], nsamples=calib["nsamples"], seqlen=calib["seqlen"])
            report = quantize_model(model, config, fisher, blocks=blocks, progress=progress)
            table.rows.append(Row(f"SqueezeLLM {wbits}-bit {label}", wbits, report.bits_per_weight,
                                  report.size_mb, score(model), time.perf_counter() - start))
    return table
