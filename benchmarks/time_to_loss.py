"""Time to a val loss, eqxgpt against nanoGPT's own train.py, one run right after the other.

Each command runs as a subprocess; every line it prints is stamped with the seconds since that
command started, and the first evaluation at or below --target gives the time to it: wall clock
from the command's start (imports, compilation and evaluations included). Prints a markdown
table for BENCHMARKS.md.

    python benchmarks/time_to_loss.py --nanogpt=path/to/nanoGPT --target=1.886 \\
        --run "eqxgpt AdamW=python launch.py --config=shakespeare_char_cpu --optimizer=adamw" \\
        --run "eqxgpt Muon=python launch.py --config=shakespeare_char_cpu"

--nanogpt runs that checkout's train.py with its Tiny Shakespeare config at this repo's CPU
shapes, or as written with --nanogpt_config=gpu (it needs torch, and data/shakespeare_char
prepared there by its own prepare.py). Each eqxgpt run gets a fresh --rundir under --out.
Another corpus: prepare it in nanoGPT's data/NAME with its prepare.py, pass --nanogpt_dataset=NAME,
--target=first (nanoGPT's final val) and the same text prepared here as each run's --data_dir.
"""

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# nanoGPT's train.py at the shapes and schedule of configs/shakespeare_char_cpu.py
NANOGPT_CPU = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
               "--eval_iters=20", "--log_interval=50", "--block_size=64", "--batch_size=12",
               "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
               "--lr_decay_iters=2000", "--dropout=0.0"]
# nanoGPT's own Tiny Shakespeare config as it is written: a GPU, torch.compile, 5000 iterations
NANOGPT_GPU = ["config/train_shakespeare_char.py"]
# "step 250: train loss 2.1, val loss 2.2" (nanoGPT) and "step 250 | eval: train 2.1 | val 2.2"
EVAL_LINE = re.compile(r"step (\d+)(?:: train loss [\d.]+, val loss | \| eval: train [\d.]+ \| val )"
                       r"(\d+\.\d+)")


def timed_run(command: list[str], cwd: Path) -> dict:
    """Runs command to the end, reading its evaluations as they are printed."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    evals = []
    for line in process.stdout:
        seconds = time.perf_counter() - start
        if match := EVAL_LINE.search(line):
            evals.append((int(match[1]), float(match[2]), seconds))
    process.wait()
    if process.returncode != 0 or not evals:
        raise SystemExit(f"{shlex.join(command)} failed (exit {process.returncode})")
    return {"evals": evals, "total": time.perf_counter() - start}


def first_reaching(evals: list, target: float):
    """(step, val, seconds) of the first evaluation at or below target, or None."""
    return next((e for e in evals if e[1] <= target), None)


def val_target(text: str) -> float | str:
    return text if text == "first" else float(text)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, help="a karpathy/nanoGPT checkout, run first")
    parser.add_argument("--nanogpt_config", choices=("cpu", "gpu"), default="cpu",
                        help="cpu: shakespeare_char_cpu's shapes; gpu: its own config")
    parser.add_argument("--target", type=val_target, default=1.886,
                        help="the val loss to reach, or 'first': the first run's last val")
    parser.add_argument("--nanogpt_dataset", default="shakespeare_char",
                        help="the folder of nanoGPT's data/ it trains on (its prepare.py's output)")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=COMMAND",
                        help="an eqxgpt command (run from this repo), repeatable")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="ttl_")),
                        help="where the eqxgpt runs' directories go")
    args = parser.parse_args(argv)

    runs = []
    if args.nanogpt:
        nanogpt_config = NANOGPT_CPU if args.nanogpt_config == "cpu" else NANOGPT_GPU
        runs.append(("nanoGPT (its train.py)", args.nanogpt, [sys.executable, "train.py",
                     *nanogpt_config, f"--dataset={args.nanogpt_dataset}",
                     f"--out_dir={args.out / 'nanogpt'}"]))
    repo = Path(__file__).resolve().parents[1]
    for i, spec in enumerate(args.run):
        name, _, command = spec.partition("=")
        runs.append((name, repo, [*shlex.split(command), f"--rundir={args.out / f'run{i}'}"]))

    rows = []
    for name, cwd, command in runs:
        result = timed_run(command, cwd)
        print(f"# {name}: {shlex.join(command)}", flush=True)
        for step, val, seconds in result["evals"]:
            print(f"#   step {step}: val {val:.4f} at {seconds:.1f}s", flush=True)
        rows.append((name, result))
    target = rows[0][1]["evals"][-1][1] if args.target == "first" else args.target
    first = first_reaching(rows[0][1]["evals"], target)
    reference = first[2] if first else None

    print(f"\n| run | first val <= {target:.4f} | wall to it | vs the first run | last val | "
          "total wall |\n|---|---|---:|---:|---:|---:|")
    for name, result in rows:
        step, val, seconds = first_reaching(result["evals"], target) or (None, None, None)
        last_step, last_val, _ = result["evals"][-1]
        reached = f"step {step} ({val:.4f})" if step is not None else "not reached"
        wall = f"{seconds:.1f} s" if seconds is not None else "-"
        ratio = f"{seconds / reference:.2f}x" if seconds is not None and reference else "-"
        print(f"| {name} | {reached} | {wall} | {ratio} | {last_val:.4f} (step {last_step}) | "
              f"{result['total']:.1f} s |")


if __name__ == "__main__":
    main(sys.argv[1:])
