"""The persistent compilation cache every script uses (cli.use_compilation_cache): a second launch
compiles nothing, a damaged entry costs one recompile and one line, and the cache can be moved or
turned off. Each test gives its launches their own cache folder (the suite's shared one is not
used here)."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import pytest
from jax._src.compilation_cache import compress_executable, decompress_executable

from cli import remove_damaged_cache_entries, use_compilation_cache
from test_train import LIGHT, REPO, TINY_OVERRIDES, data_dir  # noqa: F401 -- a fixture



def user_env(cache_home: Path) -> dict:
    """A user's environment: no cache folder set (the suite sets one), the cache under cache_home."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    return {**env, "XDG_CACHE_HOME": str(cache_home)}


def launch(data_dir, rundir, env) -> subprocess.CompletedProcess:
    """A tiny, light run: what is cached, not what it computes, is the point here."""
    args = [sys.executable, REPO / "launch.py", "--config=shakespeare_char_cpu",
            f"--data_dir={data_dir}", f"--rundir={rundir}", *TINY_OVERRIDES, *LIGHT,
            "--max_steps=2", "--eval_interval=2"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def entries(cache: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in cache.glob("*-cache")}


@pytest.mark.slow  # four launches
def test_a_second_launch_compiles_nothing_and_a_truncated_entry_costs_one_recompile_and_one_line(
        data_dir, tmp_path):
    env = user_env(tmp_path / "home_cache")
    cache = tmp_path / "home_cache" / "eqxgpt" / "jax"
    launch(data_dir, tmp_path / "first", env)
    written = entries(cache)
    [step_entry] = cache.glob("jit_train_step-*-cache")
    launch(data_dir, tmp_path / "second", env)
    assert entries(cache) == written, "the second launch compiled (and wrote) programs again"

    step_entry.write_bytes(step_entry.read_bytes()[: step_entry.stat().st_size // 3])  # cut short
    damaged = launch(data_dir, tmp_path / "third", env)
    noted = [line for line in damaged.stderr.splitlines() if line.strip()]
    assert len(noted) == 1 and "compilation cache" in noted[0] and "jit_train_step" in noted[0], \
        damaged.stderr
    decompress_executable(step_entry.read_bytes())  # the recompiled step was written back whole
    after = launch(data_dir, tmp_path / "fourth", env)
    assert after.stderr.strip() == "", after.stderr


@pytest.mark.parametrize("env, folder", [
    ({}, "HOME/.cache/eqxgpt/jax"),
    ({"XDG_CACHE_HOME": "XDG"}, "XDG/eqxgpt/jax"),
    ({"XDG_CACHE_HOME": "XDG", "JAX_COMPILATION_CACHE_DIR": "MOVED"}, "MOVED"),
    ({"JAX_COMPILATION_CACHE_DIR": ""}, None),
])
def test_the_cache_folder_is_the_users_cache_unless_moved_or_turned_off(env, folder, monkeypatch,
                                                                       tmp_path):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored afterwards
    for key in ("XDG_CACHE_HOME", "JAX_COMPILATION_CACHE_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for key, value in env.items():
        monkeypatch.setenv(key, value.replace("XDG", str(tmp_path / "xdg"))
                           .replace("MOVED", str(tmp_path / "moved")))
    previous = jax.config.jax_compilation_cache_dir
    try:
        use_compilation_cache()
        chosen = jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
    expected = folder and folder.replace("HOME", str(tmp_path / "home")) \
        .replace("XDG", str(tmp_path / "xdg")).replace("MOVED", str(tmp_path / "moved"))
    assert chosen == expected


def test_only_the_unreadable_entries_of_a_program_are_removed(tmp_path, capsys):
    good = tmp_path / "jit_step-aaa-cache"
    good.write_bytes(compress_executable(b"a serialized executable"))
    cut = tmp_path / "jit_step-bbb-cache"
    cut.write_bytes(compress_executable(b"another one")[:5])
    other = tmp_path / "jit_init-ccc-cache"
    other.write_bytes(b"not ours to judge")
    remove_damaged_cache_entries(tmp_path, "jit_step")
    assert good.exists() and not cut.exists() and other.exists()
    assert capsys.readouterr().err.count("\n") == 1


def test_a_second_script_in_one_process_does_not_wrap_the_warning_hook_again(monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored afterwards
    use_compilation_cache()
    hook = warnings.showwarning
    use_compilation_cache()  # run_cli again: tests, or a notebook calling main() twice
    assert warnings.showwarning is hook
