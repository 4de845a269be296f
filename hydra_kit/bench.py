"""``hydra-kit bench``: throughput and memory of recipes side by side, measured honestly.

The file is a little over 400 lines on purpose: the timing loop, the memory probe and the per-component
breakdown share one model-building and interleaving path, and splitting them would pass that state between modules.

Every figure is a measurement: models are timed in one process, interleaved length by length, after warm-up,
as the median of several repeats, and the ratios are taken between numbers of the same run. The machine's
float32 matmul rate is measured in the same run (the roof), so each model's achieved GFLOP/s is also reported
as a share of it. Peak memory is the peak resident set size of a fresh subprocess that builds the model and runs
one step (sampled every 0.5 ms by a thread), minus its size just before that step (so it covers activations,
workspaces and, for training, gradients and optimizer-free backward buffers; the weights are in the baseline).

Which FLOPs are counted (:func:`flops_per_token`): the model's own accounting (:mod:`hydra_kit.accounting`),
i.e. the forward FLOPs per token each component reports (a multiply-add counts 2: two per active weight for the
projections and experts, plus what attention and the scans do at that length) and the output head. A training
step counts 3x the forward (the backward costs about two forwards); recomputation in backward is not counted,
so a model that recomputes shows a lower rate for the same speed. Decoding counts the forward FLOPs per token of
a causal forward over twice the mid-run context (the average causal query there sees the context a decoded token
sees); decoding is bound by reading weights and caches, so its GFLOP/s is far below the roof by nature. A model whose
routers skip tokens under a gate threshold (``recipes/full-29m-skip.yaml``) is credited with its dense FLOPs, so its
rate is dense-equivalent, and the share of tokens each gated component computed in the step is measured beside it
(``kept``): untrained, its gates sit near 0.5, so at threshold 0.5 about half the tokens skip each component.

With ``--compile``, each recipe is also built with ``compile=True`` (:class:`hydra_kit.model.HydraLM`) and timed
in the same interleaved loop as ``NAME+compile``, with its speed-up over the eager model of the same run.

Outputs (:mod:`hydra_kit.bench_report`): a rich table with the ratio of the first recipe to the second per
length and mode, the target checks, ``bench.csv``, ``bench.json`` (records with ``model``, ``seq_len``,
``mode``, ``tokens_per_s``, ``gflops``, ``roof_share``, ``peak_mem_mb``, ...), ``bench_components.csv`` (the
per-component breakdown) and PNG plots of throughput and memory against length (log-log) when matplotlib is
installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from hydra_kit.accounting import state_nbytes
from hydra_kit.bench_report import Record
from hydra_kit.config.lightning import model_config
from hydra_kit.model import IGNORE_INDEX, HydraLM
from hydra_kit.ops import native
from hydra_kit.ops.linear import LIBRARY as LINEAR_LIBRARY

DEFAULT_RECIPES = ["recipes/full-29m.yaml", "recipes/transformer-29m.yaml"]
DEFAULT_LENGTHS = [1024, 2048, 4096, 8192, 16384]
COMPILED_SUFFIX = "+compile"  # name of a recipe's compiled model in the records: "full-29m+compile"


def native_unavailable_reason() -> str | None:
    """Why the C decoding kernels cannot run on this machine (the matrix-vector one stands for all), or None."""
    return LINEAR_LIBRARY.unavailable_reason()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(n: int = 1536, repeats: int = 5, device: torch.device | None = None) -> float:
    """Measured float32 matmul rate of this machine (median of repeats), the compute roof of the run."""
    device = device or torch.device("cpu")
    if device.type == "cuda":
        n = 8192  # large enough to fill a GPU
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def build_model(recipe: str, device: torch.device | None = None, *, compile: bool | None = None) -> HydraLM:
    """The model of ``recipe`` (parsed and checked like ``fit``'s), initialised with seed 0, in float32 on ``device``.

    ``compile`` overrides the recipe's ``model.compile`` (None keeps it); the same seed gives the same weights.
    """
    config = model_config([recipe], prog="hydra-kit bench")
    if compile is not None:
        config["compile"] = compile
    torch.manual_seed(0)
    model = HydraLM(**config)
    return model.float().to(device or torch.device("cpu"))


def make_tokens(model: HydraLM, seq_len: int, batch: int, text: bytes | None) -> torch.Tensor:
    """(batch, seq_len) token ids: the bytes of ``text`` (repeated as needed), or random ids seeded by the length."""
    vocab = model.hparams["vocab_size"]
    device = model.embed.weight.device
    if text is None:
        return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seq_len)).to(device)
    if vocab < 256:
        raise ValueError(f"--text needs byte-level models (vocab_size >= 256); this recipe has vocab_size={vocab}")
    need = batch * seq_len
    if len(text) < need:
        text = text * (need // max(1, len(text)) + 1)
    return torch.frombuffer(bytearray(text[:need]), dtype=torch.uint8).long().view(batch, seq_len).to(device)


DECODE_TOKENS = 128


class DecodeRun:
    """Greedy decoding of DECODE_TOKENS tokens after a prefilled prompt, restartable from the same context.

    The prompt is processed once, at construction. :meth:`reset` (untimed) gives the next run a fresh copy of
    the state after the prompt, so copying a large key/value cache is never counted as decoding time, and every
    repeat decodes after exactly the same context.

    Attributes:
        cache_bytes: bytes held by the recurrent state or key/value cache: the larger of its size after the
            prompt and after the last decoded token (buffers may grow while decoding).
    """

    def __init__(self, model: HydraLM, prompt: torch.Tensor) -> None:
        model.eval()
        self.model = model
        with torch.inference_mode():
            self.prefill = model(prompt, model.init_state(prompt.shape[0]), collect_aux=False)
        self.first = self.prefill.logits[:, -1].argmax(-1)
        self.prompt_cache_bytes = state_nbytes(self.prefill.state)
        self.state: Any = None
        self.final_state: Any = None

    @property
    def cache_bytes(self) -> int:
        final = 0 if self.final_state is None else state_nbytes(self.final_state)
        return max(self.prompt_cache_bytes, final)

    def reset(self) -> None:
        import copy

        self.state = copy.deepcopy(self.prefill.state)

    def __call__(self) -> None:
        if self.state is None:
            self.reset()
        state, token, self.state = self.state, self.first, None
        with torch.inference_mode():
            for _ in range(DECODE_TOKENS):
                out = self.model(token[:, None], state, collect_aux=False)
                state, token = out.state, out.logits[:, -1].argmax(-1)
        self.final_state = state


def training_batch(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch a data module would give for ``tokens`` (B, L): every position predicts the next token, the last none."""
    targets = torch.full_like(tokens, IGNORE_INDEX)
    targets[:, :-1] = tokens[:, 1:]
    return {"input_ids": tokens, "targets": targets}


def step_fn(model: HydraLM, tokens: torch.Tensor, mode: str) -> Callable[[], None]:
    """A closure that runs one inference forward, or one training step's loss and backward.

    The training loss is the model's own (:meth:`HydraLM.training_step`: the task loss plus the auxiliary losses,
    as in ``fit``), computed outside a Trainer, so nothing is logged.
    """
    if mode == "infer":
        model.eval()

        def run() -> None:
            with torch.inference_mode():
                model(tokens)

        return run
    model.train()
    batch = training_batch(tokens)

    def run_train() -> None:
        with warnings.catch_warnings():
            # self.log() without a Trainer: Lightning says it logs nothing, which is what a benchmark wants.
            warnings.filterwarnings("ignore", message=r"You are trying to `self\.log\(\)` but the `self\.trainer` reference")
            loss = model.training_step(batch, 0)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run_train


def flops_per_token(model: HydraLM, seq_len: int, mode: str) -> float:
    """FLOPs one token costs in ``mode`` at ``seq_len``, from the model's accounting (see the module docstring).

    infer: the forward FLOPs per token at ``seq_len``; train: 3x that; decode: the forward FLOPs per token at
    ``2 * (seq_len + DECODE_TOKENS // 2)``, whose causal average is the context of the middle decoded token.
    """
    if mode == "decode":
        return float(model.parameter_report(2 * (seq_len + DECODE_TOKENS // 2))["flops_per_token"])
    forward = float(model.parameter_report(seq_len)["flops_per_token"])
    return 3 * forward if mode == "train" else forward


def kept_shares(model: HydraLM, tokens: torch.Tensor, mode: str) -> dict[str, float]:
    """Component -> share of ``tokens`` it computed in ``mode`` ("infer" or "train"), for a model whose routers skip
    tokens under a gate threshold (the routers' ``kept_*`` statistics, averaged over blocks); empty otherwise."""
    if not any(getattr(block.router, "gate_threshold", 0.0) > 0 for block in model.blocks):
        return {}
    model.train(mode == "train")  # the threshold is in force in training only for routers that skip there
    with torch.no_grad():
        stats = model(tokens).stats
    prefix = ".kept_"
    return {k.split(prefix, 1)[1]: float(v) for k, v in stats.items() if prefix in k}


OTHER = "other (embedding, norms, head)"  # the breakdown's row for what no component instance covers


def component_breakdown(model: HydraLM, tokens: torch.Tensor) -> dict[str, float]:
    """Seconds of one inference forward spent in each component instance (forward hooks with timers).

    Returns:
        instance name -> seconds, plus :data:`OTHER` (the rest: embedding, norms, head, Python between them)
        and ``"total"`` (the whole forward).
    """
    spent: dict[str, float] = defaultdict(float)
    starts: dict[int, float] = {}
    handles = []
    for block in model.tri_path_blocks:
        modules: dict[str, torch.nn.Module] = dict(block.components())
        if block.router is not None and block.router_name is not None:
            modules[block.router_name] = block.router
        for name, module in modules.items():

            def pre(mod: torch.nn.Module, args: Any, key: int = id(module)) -> None:
                starts[key] = time.perf_counter()

            def post(mod: torch.nn.Module, args: Any, out: Any, key: int = id(module), name: str = name) -> None:
                spent[name] += time.perf_counter() - starts.pop(key)

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
            if module is block.router:  # routers are called through route(), not forward()
                original = module.route

                def timed_route(x: torch.Tensor, original: Any = original, name: str = name, **kwargs: Any) -> Any:
                    start = time.perf_counter()
                    result = original(x, **kwargs)
                    spent[name] += time.perf_counter() - start
                    return result

                module.route = timed_route  # type: ignore[method-assign]
    model.eval()
    try:
        with torch.inference_mode():
            start = time.perf_counter()
            model(tokens)
            total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
        for block in model.tri_path_blocks:
            if block.router is not None and "route" in vars(block.router):
                del block.router.route
    seconds = dict(spent)
    seconds[OTHER] = max(0.0, total - sum(spent.values()))
    seconds["total"] = total
    return seconds


def breakdown_rates(seconds: dict[str, float], report: dict[str, Any], tokens: int) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per instance: its share of the forward time, its achieved GFLOP/s and its FLOPs in the forward.

    Args:
        seconds: :func:`component_breakdown`'s result.
        report: the model's :meth:`~hydra_kit.model.HydraLM.parameter_report` at the measured length.
        tokens: tokens in the measured forward (batch x length).

    Returns:
        (time share, GFLOP/s, FLOPs), each keyed by instance name; :data:`OTHER` is credited with the head's
        FLOPs (the report's total less its components').
    """
    total = seconds["total"]
    flops = {name: float(row["flops_per_token"]) * tokens for name, row in report["components"].items()}
    flops[OTHER] = max(0.0, float(report["flops_per_token"]) * tokens - sum(flops.values()))
    shares = {name: t / total for name, t in seconds.items() if name != "total"}
    gflops = {name: flops[name] / t / 1e9 for name, t in seconds.items() if name in flops and t > 0}
    return shares, gflops, flops


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_peak_memory(recipe: str, seq_len: int, mode: str, batch: int, text_path: str | None) -> float | None:
    """Peak RSS growth (MB) of one step in a fresh subprocess: activations and workspaces, not the weights."""
    code = (
        "import json,sys; from hydra_kit.bench import _memory_probe; "
        f"print(json.dumps(_memory_probe({recipe!r}, {seq_len}, {mode!r}, {batch}, {text_path!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        return None
    return float(json.loads(result.stdout.strip().splitlines()[-1]))


def _memory_probe(recipe: str, seq_len: int, mode: str, batch: int, text_path: str | None) -> float:
    import threading

    model = build_model(recipe)
    text = Path(text_path).read_bytes() if text_path else None
    tokens = make_tokens(model, seq_len, batch, text)
    run = step_fn(model, tokens, mode)
    before = _rss_mb()
    peak = [before]
    done = threading.Event()

    def poll() -> None:  # torch ops release the GIL, so this thread samples RSS while the step runs
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.0005)

    sampler = threading.Thread(target=poll, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_mb()) - before


def gpu_peak_memory_mb(run: Callable[[], None], device: torch.device) -> float:
    """Peak allocated CUDA memory (MB) of one step above what was allocated before it (the weights, the inputs)."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def run_bench(args: argparse.Namespace, console: Console) -> tuple[list[Record], float]:
    """Measure every recipe of ``args.recipes`` at every length and mode; the records and the matmul roof (GFLOP/s).

    ``args`` holds the options of ``hydra-kit bench`` (:mod:`hydra_kit.commands.bench`). With ``args.compile``,
    each recipe's compiled model is timed beside its eager one (inference and training only: decoding runs
    eager by design), after at least one untimed call per length and mode, which compiles.
    """
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    native.set_enabled(args.cpu_kernels == "on")
    if args.cpu_kernels == "on" and device.type == "cpu" and (reason := native_unavailable_reason()) is not None:
        console.print(f"[yellow]{reason}[/]")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    # The recipes first: a mistake in one is reported before anything is measured.
    compile_too = getattr(args, "compile", False)
    models: dict[str, HydraLM] = {}
    paths: dict[str, str] = {}
    for recipe in args.recipes:
        name = Path(recipe).stem
        models[name] = build_model(recipe, device, compile=False if compile_too else None)
        paths[name] = recipe
        if compile_too:
            models[name + COMPILED_SUFFIX] = build_model(recipe, device, compile=True)
    roof = matmul_gflops(device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    console.print(f"float32 matmul roof measured in this run: [bold]{roof:.1f} GFLOP/s[/] on {where}")
    console.print(f"C kernels (hydra_kit.ops: decoding steps, the SSM's sequence stages): {'on' if native.enabled() else 'off'}, for every model")
    text = Path(args.text).read_bytes() if args.text else None
    records: list[Record] = []
    for seq_len in args.seq_lens:
        for mode in args.modes:
            timings: dict[str, list[float]] = defaultdict(list)
            runs: dict[str, Callable[[], None]] = {}
            for name, m in models.items():
                if mode == "decode" and name.endswith(COMPILED_SUFFIX):
                    continue
                tokens_in = make_tokens(m, seq_len, args.batch, text)
                runs[name] = DecodeRun(m, tokens_in) if mode == "decode" else step_fn(m, tokens_in, mode)
            for name, run in runs.items():  # warm-up: allocator, caches, lazy init, compilation
                for _ in range(max(args.warmup, 1) if name.endswith(COMPILED_SUFFIX) else args.warmup):
                    run()
            for _ in range(args.repeats):  # interleaved, so drift hits every model alike
                for name, run in runs.items():
                    if isinstance(run, DecodeRun):
                        run.reset()  # untimed: a fresh copy of the state after the prompt
                    synchronize(device)
                    start = time.perf_counter()
                    run()
                    synchronize(device)
                    timings[name].append(time.perf_counter() - start)
            for name in runs:
                model = models[name]
                compiled = name.endswith(COMPILED_SUFFIX)
                seconds = statistics.median(timings[name])
                tokens = args.batch * (DECODE_TOKENS if mode == "decode" else seq_len)
                gflops = flops_per_token(model, seq_len, mode) * tokens / seconds / 1e9
                record = Record(name, seq_len, mode, tokens / seconds, seconds, timings[name], gflops, roof_share=gflops / roof, compiled=compiled)
                if compiled:
                    eager = statistics.median(timings[name.removesuffix(COMPILED_SUFFIX)])
                    record.compile_speedup = eager / seconds
                if mode != "decode" and not compiled:
                    record.kept = kept_shares(model, make_tokens(model, seq_len, args.batch, text), mode)
                if mode == "decode":
                    decoded = runs[name]
                    assert isinstance(decoded, DecodeRun)
                    record.cache_mb = decoded.cache_bytes / 2**20
                # Hook timers need a synchronous device, and hooks would break a compiled graph.
                if mode == "infer" and args.breakdown and device.type == "cpu" and not compiled:
                    spent = component_breakdown(model, make_tokens(model, seq_len, args.batch, text))
                    record.breakdown, record.breakdown_gflops, flops = breakdown_rates(spent, model.parameter_report(seq_len), tokens)
                    record.roof_seconds = {k: f / (roof * 1e9) for k, f in flops.items()}
                if args.memory and mode != "decode":
                    if device.type == "cuda":
                        record.peak_mem_mb = gpu_peak_memory_mb(runs[name], device)
                    elif not compiled:  # a fresh process would measure the compiler, not the step
                        record.peak_mem_mb = measure_peak_memory(paths[name], seq_len, mode, args.batch, args.text)
                records.append(record)
                mem = f"{record.peak_mem_mb:.0f} MB" if record.peak_mem_mb is not None else "-"
                kept = "  kept " + " ".join(f"{k} {v:.2f}" for k, v in record.kept.items()) if record.kept else ""
                console.print(
                    f"  {name:>18} L={seq_len:>6} {mode:>6}: {record.tokens_per_s:9.1f} tok/s  {record.gflops:6.1f} GFLOP/s "
                    f"({record.roof_share:.0%} of roof)  peak {mem}{kept}"
                )
    return records, roof
