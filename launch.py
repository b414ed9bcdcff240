"""The command line: pick a config, override any field, train (or resume) in a run directory.

    python launch.py --config=shakespeare_char
    python launch.py --config=shakespeare_char --max_steps=200 --model.n_layer=4
    python launch.py --rundir=runs/shakespeare_char-20261122-101500      # resume
    python launch.py --config=shakespeare_char --help                     # every field, its default

A config is a Python file in configs/ (or any path to one) that defines `config = TrainConfig(...)`.
"""

import argparse
import dataclasses
import datetime
import gc
import inspect
import os
import re
import sys
from pathlib import Path

from cli import ArgumentParser, UserError, apply_overrides, load_config, run_cli


def field_docs(cls) -> dict[str, str]:
    """The comment at the end of each field's line in the dataclass source: the --help text."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        if match := re.match(r"\s+(\w+): [^=]+=[^#]*#\s*(.+)$", line):
            docs[match[1]] = match[2]
    return docs


def describe(config, prefix: str = "") -> list[str]:
    docs = field_docs(type(config))
    lines = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            lines += describe(value, f"{prefix}{field.name}.")
        else:
            doc = docs.get(field.name, "")
            lines.append(f"  {f'--{prefix}{field.name}={value!r}':<40} {doc}".rstrip())
    return lines


def main(argv=None):
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False
    )
    parser.add_argument("--config", help="a name in configs/ or a path to a .py config file")
    parser.add_argument("--rundir", help="run directory; an existing one is resumed "
                        "(default: a new runs/<config>-<time>)")
    parser.add_argument("--debug", action="store_true",
                        help="write a profiler trace of a few steps to rundir/profile; no checkpoints")
    parser.add_argument("--multihost", action="store_true",
                        help="call jax.distributed.initialize(); every host runs the same command")
    parser.add_argument("--coordinator", help="with --multihost: host:port of process 0 "
                        "(default: detected from the cluster environment)")
    parser.add_argument("--num_processes", type=int, help="with --multihost: number of processes")
    parser.add_argument("--process_id", type=int, help="with --multihost: this process's index")
    parser.add_argument("--heartbeat_timeout", type=int, default=100,
                        help="with --multihost: seconds after which a silent process is taken for "
                        "dead (JAX's heartbeat timeout); the others stop at a quarter of it")
    parser.add_argument("-h", "--help", action="store_true", help="show this and every config field")
    args, overrides = parser.parse_known_args(argv)

    from config import TrainConfig  # imported here, as below: argparse's errors come at once

    if args.config:
        config = load_config(args.config, TrainConfig)
    elif args.rundir and (Path(args.rundir) / "config.json").exists():
        from checkpoints import read_run_config

        config = read_run_config(Path(args.rundir))  # resume with the run's own config
    elif args.help:
        config = TrainConfig()
    else:
        raise UserError("say what to train: --config=NAME (a file in configs/) or --rundir=RUN to resume")
    config = apply_overrides(config, overrides)
    if config.init_from and not args.help:
        # Fine-tuning: the model's shapes come from the checkpoint, the rest of its settings
        # (dropout, compute_dtype, ...) from the config file and the overrides.
        import gpt2

        checkpoint, _ = gpt2.read_config(gpt2.resolve(config.init_from))
        config = dataclasses.replace(config, model=gpt2.with_shapes_of(config.model, checkpoint))
    if args.help:
        parser.print_help()
        print("\nconfig fields (override with --key=value):")
        print("\n".join(describe(config)))
        return

    if config.deterministic:  # read when the backend starts: before anything touches a device
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_deterministic_ops=true"
    import multihost  # here: jax, after --help and the config's checks

    if args.multihost:
        if not args.rundir:
            raise UserError("--multihost needs --rundir: every host must write to the same place")
        multihost.join(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = Path(args.config).stem if args.config else "run"
    rundir = Path(args.rundir or f"runs/{name}-{stamp}")
    from train import train

    # What the imports made lives as long as the run: full collections stop scanning it again
    # (the garbage collector's time in a race to nanoGPT's loss: 0.44 -> 0.18 s, BENCHMARKS.md round 8)
    gc.freeze()
    with multihost.stop_together(rundir, args.heartbeat_timeout):  # one process: does nothing
        train(config, rundir, debug=args.debug)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
