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
import importlib.util
import inspect
import os
import re
import sys
import traceback
from pathlib import Path

from cli import ArgumentParser, UserError, run_cli

CONFIG_DIR = Path(__file__).parent / "configs"


def load_config(name: str):
    from train import TrainConfig

    path = Path(name) if name.endswith(".py") else CONFIG_DIR / f"{name}.py"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.py")))
        raise UserError(f"no config file {path}: use one of {available} or a path to a .py file")
    spec = importlib.util.spec_from_file_location(f"configs.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a config is code: any mistake in it is the user's to fix
        raise UserError(f"{path}, line {error_line(e, path)}: {type(e).__name__}: {e}") from None
    config = getattr(module, "config", None)
    if not isinstance(config, TrainConfig):
        raise UserError(f"{path} must define `config = TrainConfig(...)`")
    return config


def check_attention(config) -> None:
    """attention="cudnn" runs only on NVIDIA GPUs: say so before the run directory is made."""
    import jax

    if config.model.attention == "cudnn" and jax.devices()[0].platform != "gpu":
        raise UserError(f"model.attention=cudnn needs an NVIDIA GPU with cuDNN, and this machine "
                        f"runs on {jax.devices()[0].platform}: use --model.attention=auto or xla")


def error_line(error: Exception, path: Path):
    """The line of path where error was raised: the last frame in that file (or, for a
    SyntaxError, the line it points at)."""
    if isinstance(error, SyntaxError) and error.filename == str(path):
        return error.lineno
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == str(path)]
    return frames[-1].lineno if frames else "?"


def parse_value(text: str, like, key: str):
    """Parses text as the type of the field's current value."""
    kind = type(like)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return kind(text)
    except ValueError:
        raise UserError(f"--{key}={text}: expected {kind.__name__} (like {like!r})") from None


def parse_override(config, path: list[str], text: str, key: str):
    """The value of the field at path (nested dataclasses too), parsed from text as its type."""
    fields = {f.name for f in dataclasses.fields(config)}
    name = path[0]
    current = getattr(config, name, None)
    if name not in fields or (len(path) > 1 and not dataclasses.is_dataclass(current)):
        raise UserError(f"unknown config key '{key}': see --help for every field")
    if len(path) > 1:
        return parse_override(current, path[1:], text, key)
    if dataclasses.is_dataclass(current):
        raise UserError(f"'{key}' is a group of settings: set one of its fields, e.g. --{key}.n_layer=4")
    return parse_value(text, current, key)


def with_changes(config, changes: dict):
    """A copy of config with changes ({field: value or {nested field: ...}}), checked once."""
    values = {name: with_changes(getattr(config, name), value) if isinstance(value, dict) else value
              for name, value in changes.items()}
    return dataclasses.replace(config, **values)


def apply_overrides(config, overrides: list[str]):
    """All overrides are applied before the config checks itself, so relations between fields
    (warmup_steps <= max_steps, ...) see the final values whatever the order on the line."""
    changes = {}
    for item in overrides:
        key, sep, text = item.removeprefix("--").partition("=")
        if not sep or not key:
            raise UserError(f"cannot read '{item}': write overrides as --key=value")
        path = key.split(".")
        node = changes
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = parse_override(config, path, text, key)
    try:
        return with_changes(config, changes)
    except ValueError as e:  # the dataclasses' own checks, e.g. heads that do not divide n_embd
        raise UserError(f"bad config value: {e}") from None


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
    parser.add_argument("-h", "--help", action="store_true", help="show this and every config field")
    args, overrides = parser.parse_known_args(argv)

    from train import TrainConfig, read_run_config, train

    if args.config:
        config = load_config(args.config)
    elif args.rundir and (Path(args.rundir) / "config.json").exists():
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
    if args.multihost:
        import jax

        if not args.rundir:
            raise UserError("--multihost needs --rundir: every host must write to the same place")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only clusters
        try:
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        except (ValueError, RuntimeError) as e:  # no cluster environment, coordinator unreachable
            raise UserError(f"--multihost: cannot join a cluster ({str(e).splitlines()[0]}): pass "
                            "--coordinator, --num_processes and --process_id, or run under a "
                            "scheduler JAX detects (SLURM, Open MPI, ...)") from None
    check_attention(config)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = Path(args.config).stem if args.config else "run"
    rundir = Path(args.rundir or f"runs/{name}-{stamp}")
    train(config, rundir, debug=args.debug)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
