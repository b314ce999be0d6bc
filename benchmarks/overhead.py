"""What each method costs: mean step time relative to the plain Trainer, passes per step, and peak memory.

Every (method, repeat) runs in its own subprocess so peak memory is per configuration. Repeats are interleaved and
every other one runs in reverse order (none, sam, asam, asam, sam, none, ...), so machine drift hits every method
alike, and each method's time is divided by `none`'s time in the same repeat before averaging (a paired ratio: a
repeat that ran slow for everyone does not count against one method). Runs on CPU, and unchanged on CUDA.

    python benchmarks/overhead.py                       # all methods, 5.3M-parameter BERT, CPU
    python benchmarks/overhead.py --methods none sam --steps 30 --repeats 5 --hidden 256 --layers 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(cfg: dict):
    """The benchmark's BERT classifier from `cfg` (hidden, layers, vocab, seq, dropout), 6 labels, seeded."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=max(1, cfg["hidden"] // 64),
        intermediate_size=4 * cfg["hidden"],
        max_position_embeddings=max(cfg["seq"], 64),
        num_labels=6,
        # BERT's 0.1 by default; 0 gives a model without dropout (ViT's and most LLMs' default), whose
        # forward is a smaller share of a pass on CPU, where drawing dropout masks is slow.
        hidden_dropout_prob=cfg.get("dropout", 0.1),
        attention_probs_dropout_prob=cfg.get("dropout", 0.1),
    )
    return BertForSequenceClassification(config)


MODEL_FIELDS = ("hidden", "layers", "vocab", "seq", "batch", "dropout")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The benchmark model's shape and batch (`build_model`), shared with `pass_costs.py`."""
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout (BERT's 0.1)")


def run_one(cfg: dict) -> dict:
    """Train `cfg["steps"]` steps of one method in this process and report its step times and memory."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from hf_sam import SAMTrainer, SAMTrainingArguments

    device_is_cuda = cfg["device"] == "cuda"
    model = build_model(cfg)
    n = cfg["batch"] * (cfg["steps"] + cfg["warmup"]) * cfg["ga"]
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {
            "input_ids": torch.randint(1, cfg["vocab"], (n, cfg["seq"]), generator=generator).tolist(),
            "labels": torch.randint(0, 6, (n,), generator=generator).tolist(),
        }
    )

    times: list[float] = []
    kinds: list[bool] = []  # whether each step ran SAM (LookSAM / SS-SAM mix one-pass steps in)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if device_is_cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device_is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)
            kinds.append(trainer.args.sam_enabled and trainer._sam.window_is_sam)

    method_args = dict(cfg["method_args"])
    args = SAMTrainingArguments(
        output_dir=cfg["output_dir"],
        report_to="none",
        use_cpu=not device_is_cuda,
        per_device_train_batch_size=cfg["batch"],
        gradient_accumulation_steps=cfg["ga"],
        max_steps=cfg["steps"] + cfg["warmup"],
        logging_steps=cfg["steps"] + cfg["warmup"],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        bf16=cfg["bf16"],
        **method_args,
    )
    trainer = SAMTrainer(model=model, args=args, train_dataset=data, callbacks=[StepTimer()])
    if device_is_cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    measured = times[cfg["warmup"] :]
    measured_kinds = kinds[cfg["warmup"] :]
    sam_times = [t for t, k in zip(measured, measured_kinds) if k]
    plain_times = [t for t, k in zip(measured, measured_kinds) if not k]
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device_is_cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    # Exact bytes the method keeps between steps, against the trainable parameters: SAM's weight backup and
    # micro-mode stash, MESA's EMA teacher, SAF's logit bank.
    held = list(getattr(trainer._sam.perturbation, "_backup", {}).values()) + list(trainer._sam.stash.values())
    if trainer._sam.loss_term is not None:
        held += list(trainer._sam.loss_term.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {
        "held_copies": sum(t.numel() * t.element_size() for t in held) / trainable,
        "mean_step_s": statistics.mean(measured),
        "sam_step_s": statistics.mean(sam_times) if sam_times else None,
        "plain_step_s": statistics.mean(plain_times) if plain_times else None,
        "passes_per_step": logs[-1].get("sam/passes_per_step", 1.0) if logs else None,
        "peak_mib": peak,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def method_args(method: str) -> dict:
    """The method's preset; SAF's term from step 0 (a one-epoch run would never reach its default start epoch,
    and before its lag epochs pass the term is computed in full but finds no target: the same work)."""
    return {"sam_method": method, **({"saf_start_epoch": 0.0} if method == "saf" else {})}


def parse_overrides(pairs: list[str]) -> dict:
    """`--set` values: `KEY=VALUE`, VALUE read as JSON when it parses (0.4, true, null), as a string otherwise."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {pair!r}: write it as KEY=VALUE, e.g. --set esam_gamma=0.4")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def paired_ratios(times: list[float], base_times: list[float]) -> list[float]:
    """Each repeat's step time over the plain Trainer's in the same repeat (machine drift between repeats cancels)."""
    return [t / base for t, base in zip(times, base_times, strict=True)]


def main() -> None:
    from hf_sam import METHODS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="methods to compare (none is added)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per method")
    add_model_args(parser)
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE",
        help="SAMTrainingArguments fields for every method but none, e.g. --set esam_gamma=0.4 esam_beta=0.5",
    )  # fmt: skip
    parser.add_argument("--ga", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the table and json")
    parser.add_argument("--name", default=None, help="file name of the table and json (default overhead_<device>)")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every configuration in this one process: less process-to-process timing noise (on a shared CPU"
        " it dominates), but no per-method peak memory",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    cli = parser.parse_args()

    if cli.worker:  # child process: one configuration
        print(json.dumps(run_one(json.loads(cli.worker))))
        return

    import torch

    device = cli.device or ("cuda" if torch.cuda.is_available() else "cpu")
    methods = ["none"] + [m for m in cli.methods if m != "none"]
    overrides = parse_overrides(cli.set)
    results: dict[str, list[dict]] = {m: [] for m in methods}

    def config(method: str) -> dict:
        return {
            "device": device, "steps": cli.steps, "warmup": cli.warmup, "ga": cli.ga, "bf16": cli.bf16,
            **{field: getattr(cli, field) for field in MODEL_FIELDS},
            "method_args": {**method_args(method), **(overrides if method != "none" else {})},
            "output_dir": os.path.join(cli.out, "_tmp"),
        }  # fmt: skip

    if cli.in_process:  # the first Trainer in a process pays one-off costs (imports, allocator growth): untimed
        run_one(config("none"))
    for repeat in range(cli.repeats):
        for method in methods if repeat % 2 == 0 else methods[::-1]:
            cfg = config(method)
            if cli.in_process:
                row = run_one(cfg)
            else:
                env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, env=env
                )
                if out.returncode != 0:
                    raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
            results[method].append(row)
            print(f"repeat {repeat} {method:>10}: {row['mean_step_s'] * 1000:8.1f} ms/step", flush=True)

    base_times = [r["mean_step_s"] for r in results["none"]]
    base_mem = statistics.mean(r["peak_mib"] for r in results["none"])
    params_m = results["none"][0]["params_m"]
    lines = [
        f"Device: {device} ({os.cpu_count()} cores visible); BERT {params_m:.1f}M params, dropout {cli.dropout:g},"
        f" batch {cli.batch} x seq {cli.seq}, GA {cli.ga}{', bf16' if cli.bf16 else ''}; {cli.steps} timed steps"
        f" x {cli.repeats} interleaved repeats (every other one reversed), ratios paired within each repeat"
        f"{'; methods with ' + ' '.join(cli.set) if cli.set else ''}"
        f"{' in one process (memory column not per method)' if cli.in_process else ''}.",
        "",
        "| method | mean step (ms) | time vs plain | passes/step | one-pass steps (ms) | SAM steps (ms) |"
        " buffers held (x trainable params) |"
        f" peak {'CUDA allocated' if device == 'cuda' else 'RSS'} above plain (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for method in methods:
        times = [r["mean_step_s"] for r in results[method]]
        ratios = paired_ratios(times, base_times)
        ratio = statistics.mean(ratios)
        spread = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        mem = statistics.mean(r["peak_mib"] for r in results[method]) - base_mem
        passes = results[method][0]["passes_per_step"]
        held = results[method][0]["held_copies"]
        summary[method] = {
            "time_ratio": ratio, "time_ratio_std": spread, "passes_per_step": passes, "mem_mib": mem,
            "held_copies": held,
        }  # fmt: skip
        kind_ms = {}
        for kind in ("plain_step_s", "sam_step_s"):
            values = [r[kind] for r in results[method] if r[kind] is not None]
            kind_ms[kind] = f"{statistics.mean(values) * 1000:.1f}" if values else "-"
        summary[method].update({k: v for k, v in kind_ms.items()})
        lines.append(
            f"| {method} | {statistics.mean(times) * 1000:.1f} | {ratio:.3f} ± {spread:.3f} | {passes:.3g} |"
            f" {kind_ms['plain_step_s']} | {kind_ms['sam_step_s']} | {held:.2f} | {mem:+.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    Path(cli.out).mkdir(parents=True, exist_ok=True)
    name = cli.name or f"overhead_{device}"
    (Path(cli.out) / f"{name}.md").write_text(table + "\n")
    (Path(cli.out) / f"{name}.json").write_text(json.dumps({"config": vars(cli), "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
