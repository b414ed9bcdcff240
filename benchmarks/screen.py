"""A change to the recipe, screened as a default must be: two corpora, two seeds, val loss at
chosen steps, against the config as it is.

    python benchmarks/screen.py --name=today
    python benchmarks/screen.py --name=wsd --change="--lr_schedule=wsd --cooldown_frac=0.5"
    python benchmarks/screen.py --table today wsd         # the markdown rows of finished screens
    python benchmarks/screen.py --name=wsd --change="..." --seeds=1339   # a seed more, same screen

Each screen is four runs of `launch.py --config=shakespeare_char_cpu --eval_interval=50` plus the
change: Tiny Shakespeare and a second corpus (CPython's standard library, which no recipe was
fitted to), seeds 1337 and 1338. They run --jobs at a time, each pinned to one core (taskset), so
these are losses, not times: time to a loss is benchmarks/time_to_loss.py's, on a quiet machine.
Every evaluation of every run goes to runs/screen/<name>/results.json; the table prints val at
--steps (default 400 / 500 / 2000) per run, and the mean change at the last step against the
first screen named. --seeds runs other seeds and adds them to the screen's results (the change
must be the one it was screened with); the table shows the seeds of the first screen named.

The second corpus is made on first use: the first 1,115,394 characters (Tiny Shakespeare's
length) of this Python's Lib/*.py in name order, ASCII files only, as data/pystdlib_char.
"""

import argparse
import json
import re
import shlex
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPORA = {"shakespeare": "data/shakespeare_char", "stdlib": "data/pystdlib_char"}
SEEDS = (1337, 1338)
EVAL_LINE = re.compile(r"step (\d+) \| eval: train [\d.]+ \| val (\d+\.\d+)")
SHAKESPEARE_CHARACTERS = 1_115_394


def make_stdlib_corpus(data_dir: Path) -> None:
    lib = Path(sysconfig.get_paths()["stdlib"])
    text = []
    for path in sorted(lib.glob("*.py")):
        source = path.read_bytes()
        if source.isascii():
            text.append(source.decode("ascii"))
    corpus = "".join(text)[:SHAKESPEARE_CHARACTERS]
    source_file = data_dir.parent / "pystdlib.txt"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    source_file.write_text(corpus)
    subprocess.run([sys.executable, "prepare_shakespeare.py", "--input", str(source_file),
                    "--out_dir", str(data_dir)], cwd=REPO, check=True)


def one_run(name: str, corpus: str, seed: int, change: list[str], core: int | None) -> dict:
    rundir = REPO / "runs" / "screen" / name / f"{corpus}-{seed}"
    command = [sys.executable, "launch.py", "--config=shakespeare_char_cpu", "--eval_interval=50",
               f"--data_dir={CORPORA[corpus]}", f"--seed={seed}", f"--rundir={rundir}", *change]
    if core is not None:
        command = ["taskset", "-c", str(core), *command]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
    log = (rundir / "log.txt").read_text()
    return {"corpus": corpus, "seed": seed, "command": shlex.join(command),
            "val": {int(m[1]): float(m[2]) for m in EVAL_LINE.finditer(log)}}


def screen(name: str, change: list[str], jobs: int, seeds=SEEDS) -> list[dict]:
    if not (REPO / CORPORA["stdlib"] / "meta.json").exists():
        make_stdlib_corpus(REPO / CORPORA["stdlib"])
    out = REPO / "runs" / "screen" / name / "results.json"
    earlier = json.loads(out.read_text()) if out.exists() else {"change": change, "runs": []}
    if earlier["change"] != change:
        raise SystemExit(f"{out} was screened with another --change: give the new runs a new --name")
    runs = [(corpus, seed) for corpus in CORPORA for seed in seeds]
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(one_run, name, corpus, seed, change, i % jobs if jobs > 1 else None)
                   for i, (corpus, seed) in enumerate(runs)]
        new = [f.result() for f in futures]
    results = [r for r in earlier["runs"] if (r["corpus"], r["seed"]) not in runs] + new
    out.write_text(json.dumps({"name": name, "change": change, "runs": results}, indent=1) + "\n")
    return results


def table(names: list[str], steps: list[int]) -> str:
    screens = [json.loads((REPO / "runs" / "screen" / n / "results.json").read_text()) for n in names]
    seeds = sorted({r["seed"] for r in screens[0]["runs"]})
    header = " | ".join(f"{corpus} {seed}" for corpus in CORPORA for seed in seeds)
    lines = [f"| run | {header} | mean at {steps[-1]} vs {names[0]} |",
             "|---" * (len(CORPORA) * len(seeds) + 2) + "|"]
    base = {(r["corpus"], r["seed"]): r["val"][str(steps[-1])] for r in screens[0]["runs"]}
    for s in screens:
        cells, deltas = [], []
        for corpus in CORPORA:
            for seed in seeds:
                run = next(r for r in s["runs"] if (r["corpus"], r["seed"]) == (corpus, seed))
                cells.append(" / ".join(f"{run['val'][str(step)]:.3f}" for step in steps))
                deltas.append(run["val"][str(steps[-1])] - base[(corpus, seed)])
        change = " ".join(s["change"]) or "(the config)"
        mean = sum(deltas) / len(deltas)
        lines.append(f"| {s['name']}: `{change}` | {' | '.join(cells)} | {mean:+.4f} |")
    return "\n".join(lines)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", help="the screen's name: runs/screen/<name>/")
    parser.add_argument("--change", default="", help="launch.py overrides, as one string")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one core each")
    parser.add_argument("--steps", default="400,500,2000", help="the evaluations the table shows")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="the seeds to run")
    parser.add_argument("--table", nargs="+", metavar="NAME", help="print the rows of these screens")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    if args.table:
        print(table(args.table, steps))
        return
    if not args.name:
        parser.error("--name is needed to run a screen")
    screen(args.name, shlex.split(args.change), args.jobs, [int(s) for s in args.seeds.split(",")])
    print(table([args.name], steps))


if __name__ == "__main__":
    main(sys.argv[1:])
