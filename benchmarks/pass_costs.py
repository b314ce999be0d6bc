"""What a pass costs on this device, measured instead of assumed.

`sam/passes_per_step` counts work in passes of F + B with B = 2F. Real devices differ: on a small model on CPU
the training-mode forward measured 39% of a pass rather than 33% (`results/pass_costs_cpu.md`). This script
times the pieces that the efficient methods are built from, on the model `benchmarks/overhead.py` uses, and turns
them into the step cost each method's recipe implies, so a measured step-time ratio can be checked against its parts:

- `full`: forward + backward on the batch (one plain pass)
- `forward`: a no-grad forward on the batch in training mode (ESAM's scoring pass: same dropout masks)
- `teacher`: a no-grad forward in eval mode, no dropout (MESA's EMA teacher)
- `swp`: forward + backward with ESAM's per-tensor draw (a fresh draw per repeat) freezing 1 - beta of the tensors
- `subset`: forward + backward on ceil(gamma |B|) examples (ESAM's descent)

    python benchmarks/pass_costs.py                                   # the overhead benchmark's default model
    python benchmarks/pass_costs.py --hidden 768 --layers 12 --vocab 30522 --seq 128   # BERT-base shapes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.overhead import MODEL_FIELDS, add_model_args, build_model  # noqa: E402


def time_pieces(cfg: dict, repeats: int, beta: float, gamma: float) -> dict[str, float]:
    """Median seconds of each piece, the pieces interleaved so drift hits all alike (first two rounds untimed)."""
    import torch

    from hf_sam.esam import frozen_tensors, kept_tensors, selected_count

    model = build_model(cfg)
    device = torch.device(cfg["device"])
    model.to(device).train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=generator).to(device)
    labels = torch.randint(0, 6, (cfg["batch"],), generator=generator).to(device)
    k = selected_count(cfg["batch"], gamma)
    params = [p for p in model.parameters() if p.requires_grad]
    draws = iter(range(10**9))

    def train_pass(ids: torch.Tensor, y: torch.Tensor) -> None:
        model(input_ids=ids, labels=y).loss.backward()

    def swp_pass() -> None:
        with frozen_tensors(params, kept_tensors(len(params), beta, seed=0, step=next(draws))):
            train_pass(input_ids, labels)

    def forward_only() -> None:
        with torch.no_grad():
            model(input_ids=input_ids, labels=labels)

    def teacher_forward() -> None:
        model.eval()
        try:
            forward_only()
        finally:
            model.train()

    pieces: dict[str, Callable[[], None]] = {
        "full": lambda: train_pass(input_ids, labels),
        "forward": forward_only,
        "teacher": teacher_forward,
        "swp": swp_pass,
        "subset": lambda: train_pass(input_ids[:k], labels[:k]),
    }
    times: dict[str, list[float]] = {name: [] for name in pieces}
    for round_ in range(repeats + 2):
        for name, piece in pieces.items():
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            piece()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def implied_costs(pieces: dict[str, float], beta: float, gamma: float) -> list[tuple[str, float, float]]:
    """(recipe, cost from the measured pieces in plain passes, the pass count hf_sam logs) for each recipe."""
    from hf_sam.esam import clean_pass_cost, step_passes

    full = pieces["full"]
    forward = pieces["forward"] / full
    teacher = pieces["teacher"] / full
    return [
        ("forward share of a pass (F / (F + B))", forward, 1 / 3),
        ("eval-mode forward share (no dropout)", teacher, 1 / 3),
        ("esam clean pass with SWP", pieces["swp"] / full, clean_pass_cost(beta)),
        (f"esam descent on {gamma:g} of the batch", pieces["subset"] / full, gamma),
        ("esam step (clean SWP + no-grad forward + subset)", (pieces["swp"] + pieces["forward"] + pieces["subset"])
         / full, step_passes(beta, gamma)),
        ("mesa step (pass + eval-mode teacher forward)", 1 + teacher, 1 + 1 / 3),
        ("sam step (two passes)", 2.0, 2.0),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--beta", type=float, default=0.6, help="ESAM's SWP keep probability")
    parser.add_argument("--gamma", type=float, default=0.5, help="ESAM's SDS share")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (two more run first, untimed)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the table")
    parser.add_argument("--name", default=None, help="file name of the table (default pass_costs_<device>)")
    cli = parser.parse_args()

    import torch

    device = cli.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = {"device": device, **{field: getattr(cli, field) for field in MODEL_FIELDS}}
    pieces = time_pieces(cfg, cli.repeats, cli.beta, cli.gamma)
    lines = [
        f"Device: {device}; BERT hidden {cli.hidden}, {cli.layers} layers, vocab {cli.vocab}, dropout {cli.dropout:g},"
        f" batch {cli.batch} x seq {cli.seq}; median of {cli.repeats} interleaved rounds. One plain pass (forward +"
        f" backward): {pieces['full'] * 1000:.1f} ms.",
        "",
        "| piece or recipe | measured (plain passes) | pass count (B = 2F) |",
        "|---|---|---|",
    ]
    for name, measured, counted in implied_costs(pieces, cli.beta, cli.gamma):
        lines.append(f"| {name} | {measured:.3f} | {counted:.3f} |")
    table = "\n".join(lines)
    print(table)
    Path(cli.out).mkdir(parents=True, exist_ok=True)
    (Path(cli.out) / f"{cli.name or 'pass_costs_' + device}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
