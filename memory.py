"""Will it fit: what the state and the compiled step need against what a device has free (on a
CPU, the host's memory), and an allocation failure during a run, each turned into one line that
says what to change instead of XLA's RESOURCE_EXHAUSTED traceback or the kernel's silent kill."""

import contextlib
import math
import resource

import jax

from cli import UserError
from config import TrainConfig

GiB = 2**30


def free_bytes(device) -> int | None:
    """Bytes that device can still allocate: its allocator's limit on a GPU, the host's available
    memory (and what an address-space limit leaves) on a CPU; None where neither is known."""
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    if device.platform != "cpu":
        return None
    limits = []
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/meminfo") as meminfo:
            limits.append(1024 * int(next(line for line in meminfo
                                          if line.startswith("MemAvailable:")).split()[1]))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        with contextlib.suppress(OSError, StopIteration, ValueError):
            with open("/proc/self/status") as status:
                in_use = 1024 * int(next(line for line in status
                                         if line.startswith("VmSize:")).split()[1])
            limits.append(soft - in_use)
    return min(limits) if limits else None


def what_to_change(config: TrainConfig, too_large_by: float = 2.0) -> str:
    """The changes that shrink a step's memory, the first one sized to too_large_by."""
    split = min(2 ** math.ceil(math.log2(max(too_large_by, 2.0))), config.batch_size)
    fewer = max(1, config.batch_size // split)
    return (f"lower --batch_size={fewer} with --grad_accum={config.grad_accum * split} (the same "
            f"{config.tokens_per_step:,} tokens per step)"
            + (", or --model.remat=true (recompute each block: less memory)"
               * (not config.model.remat))
            + ", a smaller model, or FSDP over more devices")


def check_state_fits(config: TrainConfig, abstract_params, abstract_opt) -> None:
    """Refuses, before anything is allocated, a model whose parameters and optimizer state
    alone are larger than a device's free memory."""
    device = jax.local_devices()[0]
    free = free_bytes(device)
    shards = [leaf for leaf in jax.tree.leaves((abstract_params, abstract_opt))
              if hasattr(leaf, "sharding")]
    needed = sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                 for leaf in shards)
    if free is not None and needed > free:
        raise UserError(f"out of memory: the parameters and optimizer state need "
                        f"{needed / GiB:.1f} GiB per device and {device.platform} device 0 has "
                        f"{free / GiB:.1f} GiB free: a smaller model, or FSDP over more devices")


def check_step_fits(config: TrainConfig, compiled_step) -> None:
    """Refuses the compiled step when its buffers beyond the arguments already in memory cannot
    fit in a device's free memory. None (a step compiled by its first call) is not analysed."""
    if compiled_step is None:
        return
    analysis = compiled_step.memory_analysis()
    free = free_bytes(jax.local_devices()[0])
    if analysis is None or free is None:
        return
    needed = (analysis.temp_size_in_bytes + analysis.output_size_in_bytes
              - analysis.alias_size_in_bytes + analysis.generated_code_size_in_bytes)
    if needed > free:
        raise UserError(f"out of memory: the training step needs {needed / GiB:.1f} GiB per "
                        f"device beyond the model and optimizer state, and "
                        f"{jax.local_devices()[0].platform} device 0 has {free / GiB:.1f} GiB "
                        f"free: {what_to_change(config, needed / max(free, 1))}")


@contextlib.contextmanager
def out_of_memory_is_user_error(what: str, advice: str):
    """XLA's allocation failure (RESOURCE_EXHAUSTED) in the block becomes one line: what did not
    fit, XLA's own words, and what to change."""
    try:
        yield
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        raise UserError(f"{what} ({str(error).splitlines()[0][:120]}): {advice}") from None


def out_of_memory_while_training(config: TrainConfig, rundir):
    """The same for a run: the checkpoints are left as they are (train() puts the last one on
    disk before the line is printed)."""
    return out_of_memory_is_user_error(
        "out of memory during the run", f"{what_to_change(config)}; then rerun with "
        f"--rundir={rundir} (its checkpoints are kept)")
