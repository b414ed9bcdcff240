"""What every script shares on the command line: bad input is one line and exit code 2, and
a config file with --key=value overrides.

A script raises UserError for anything the user can fix (a bad argument, a missing file, a
config value out of range); run_cli turns it into `error: ...` on stderr, with no traceback.
launch.py and bench.py read a config as load_config(name, TrainConfig), then
apply_overrides(config, rest).
"""

import argparse
import ctypes
import dataclasses
import importlib.util
import os
import platform
import re
import sys
import traceback
import warnings
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


class UserError(Exception):
    """Bad input from the user: one line on stderr, exit code 2, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are bad input like any other: one line, exit 2 (via run_cli)."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def run_cli(main) -> None:
    """Run a script's main(): a UserError becomes `error: ...` and exit 2; Ctrl-C exits 130 quietly
    (scripts note Ctrl-C where a cut would lose work: train.py saves first)."""
    use_compilation_cache()
    keep_freed_memory()
    try:
        main()
    except UserError as e:
        print("error:", " ".join(str(e).splitlines()), file=sys.stderr)  # one line, whatever e holds
        sys.exit(2)
    except KeyboardInterrupt:
        # Out at once: the interpreter's own teardown would race the XLA threads still running
        # an interrupted computation (a segmentation fault, exit 139, in sample.py and train.py).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    except BrokenPipeError:  # `... | head` closed stdout: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# Memory that XLA:CPU frees at the end of a step, kept for the next one

# glibc's mallopt parameters, and the largest mmap threshold it accepts on a 64-bit machine
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD = -1, -3, 32 << 20


def keep_freed_memory() -> None:
    """XLA:CPU allocates a step's temporaries (~25 MB at shakespeare_char_cpu) at every step and
    frees them after it; glibc hands such blocks back to the kernel and page-faults them in again
    next time. Served from the heap and kept there, the step took 8% less (BENCHMARKS.md, "round
    7"). Linux with glibc only; elsewhere nothing changes."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)  # up to 32 MiB from the heap, not mmap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # and the heap's freed top kept, up to 1 GiB


# ---------------------------------------------------------------------------------------------
# The persistent compilation cache


def use_compilation_cache() -> None:
    """JAX's persistent compilation cache for every script: a rerun, a resume, sample.py or eval.py
    finds the programs compiled before instead of compiling them again (BENCHMARKS.md, "Startup
    and the compilation cache"). It lives in $XDG_CACHE_HOME/eqxgpt/jax (~/.cache/eqxgpt/jax);
    JAX_COMPILATION_CACHE_DIR moves it, and set empty it turns it off."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache_home / "eqxgpt" / "jax")
    # Every program, not only those over JAX's default 1 s: the small ones (init, optimizer state,
    # evaluation) add up to seconds of a CPU's start (BENCHMARKS.md, "Startup and the compilation
    # cache").
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    if "jax" in sys.modules:  # a script that imported jax first: the cache starts with its compile
        jax = sys.modules["jax"]
        folder = os.environ["JAX_COMPILATION_CACHE_DIR"] or None
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs",
                          float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    show_warning = warnings.showwarning
    if getattr(show_warning, "drops_damaged_cache_entries", False):  # run_cli called before
        return

    def drop_damaged_entries(message, category, *args, **kwargs):
        damaged = re.match(r"Error reading persistent compilation cache entry for '([^']+)'",
                           str(message))
        if damaged is None:
            return show_warning(message, category, *args, **kwargs)
        remove_damaged_cache_entries(Path(os.environ["JAX_COMPILATION_CACHE_DIR"]), damaged[1])

    drop_damaged_entries.drops_damaged_cache_entries = True
    warnings.showwarning = drop_damaged_entries


def remove_damaged_cache_entries(cache_dir: Path, program: str) -> None:
    """Removes the cache entries of program that JAX could not read (a process killed while JAX
    wrote one leaves it cut short; JAX then recompiles the program but keeps the bad entry): this
    run's compile writes a good one in its place, so the cost is one recompile. Where every entry
    decompresses, JAX failed on one we cannot tell apart: all of the program's entries go."""
    from jax._src.compilation_cache import decompress_executable  # how JAX itself reads an entry

    entries = sorted(cache_dir.glob(f"{program}-*-cache"))
    damaged = []
    for entry in entries:
        try:
            decompress_executable(entry.read_bytes())
        except Exception:  # noqa: BLE001 -- whatever JAX failed on: the entry is unreadable
            damaged.append(entry)
    for entry in damaged or entries:
        entry.unlink(missing_ok=True)
    if damaged or entries:
        print(f"note: JAX could not read its compilation cache for {program}: removed "
              f"{len(damaged or entries)} file(s) from {cache_dir} (recompiled)",
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Config files and overrides


def load_config(name: str, config_class: type):
    """The `config = TrainConfig(...)` of configs/<name>.py, or of the .py file at name;
    config_class is TrainConfig (config.py), which the caller imports."""
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
    if not isinstance(config, config_class):
        raise UserError(f"{path} must define `config = {config_class.__name__}(...)`")
    return config


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
    (min_lr <= learning_rate, ...) see the final values whatever the order on the line."""
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


def bar_width() -> dict:
    """tqdm's width: the terminal's, or 80 columns where it reports none (a pty of width 0),
    on which a bar that follows the terminal would shrink to nothing."""
    try:
        columns = os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError, AttributeError):  # not a terminal, or no file descriptor
        columns = 0
    return {"dynamic_ncols": True} if columns > 0 else {"ncols": 80}
