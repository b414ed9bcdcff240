"""A mutation pass over the core: plausible one-line bugs, each planted in a copy of the repo, with
the fast suite (`pytest -m "not slow"`) as the oracle. A mutant the suite lets through names a
test that is missing, unless it computes the same as the code (an equivalent mutant).

    python tests/mutants.py                  # every mutant; writes its table to tests/mutants.md
    python tests/mutants.py --only sharding  # the mutants whose name starts with "sharding"
    python tests/mutants.py --list
    python tests/mutants.py --only optim.beta --tests tests/test_settings.py  # these files only

Each mutant replaces one exact snippet of one file (it must occur once). It first runs the test
files that cover that file, stopping at the first failure; a mutant they let through then runs
the whole fast suite. --tests names the test files (or test ids) to run instead, with no
fallback to the whole suite (2 shared cores: a mutant checked against the tests aimed at it).
A run of some mutants (--only, --tests) prints its results and writes a table only to --out:
tests/mutants.md keeps the last full pass.
Not part of the suite itself: it takes a long time.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (name, file, snippet, mutated snippet, the test files that cover the file)
MODEL = ["tests/test_model.py", "tests/test_sample.py", "tests/test_gpt2.py", "tests/test_settings.py"]
OPTIM = ["tests/test_optimizer.py", "tests/test_train.py", "tests/test_settings.py"]
TRAIN = ["tests/test_train.py", "tests/test_faults.py", "tests/test_optimizer.py",
         "tests/test_settings.py"]
DATA = ["tests/test_data.py", "tests/test_beyond_text.py", "tests/test_prepare.py"]
DECODE = ["tests/test_sample.py", "tests/test_gpt2.py", "tests/test_beyond_text.py"]
CHECKPOINTS = ["tests/test_train.py", "tests/test_faults.py", "tests/test_sample.py",
               "tests/test_bad_input.py"]
EVALUATION = ["tests/test_eval.py", "tests/test_beyond_text.py"]
MUTANTS = [
    # model.py
    ("model.rmsnorm_axis", "model.py", "jnp.mean(x32 * x32, axis=-1, keepdims=True)",
     "jnp.mean(x32 * x32, axis=0, keepdims=True)", MODEL),
    ("model.rope_frequencies", "model.py", "inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)",
     "inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / (head_dim // 2))", MODEL),
    ("model.rope_rotation_sign", "model.py", "rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)",
     "rotated = jnp.concatenate([x[..., half:], -x[..., :half]], axis=-1)", MODEL),
    ("model.causal_mask_strict", "model.py", "return queries[:, None] >= keys[None, :]",
     "return queries[:, None] > keys[None, :]", MODEL),
    ("model.attention_scale", "model.py", "scores = jnp.where(mask, scores / math.sqrt(head_dim), -jnp.inf)",
     "scores = jnp.where(mask, scores * math.sqrt(head_dim), -jnp.inf)", MODEL),
    ("model.residual_init_scale", "model.py", "self.proj = Linear(d, d, 0.02 / math.sqrt(2 * config.n_layer), config.bias, key=k_proj)",
     "self.proj = Linear(d, d, 0.02, config.bias, key=k_proj)", MODEL),
    ("model.residual_dropped", "model.py", "x = x + dropout(y, self.dropout, k_attn)",
     "x = dropout(y, self.dropout, k_attn)", MODEL),
    ("model.dropout_rescale", "model.py", "jnp.where(keep, x / (1.0 - rate), 0)",
     "jnp.where(keep, x * (1.0 - rate), 0)", MODEL),
    ("model.embed_grad_bounds", "model.py", "return running[bounds[1:]] - running[bounds[:-1]]",
     "return running[bounds[:-1]] - running[bounds[1:]]", MODEL),
    ("model.cross_entropy_grad_sign", "model.py", "per_target = (probs[..., None, :] - one_hots) * grad",
     "per_target = (one_hots - probs[..., None, :]) * grad", MODEL),
    ("model.multi_token_no_shift", "model.py", "[later[:, i:i + seq] for i", "[later[:, :seq] for i", MODEL),
    ("model.loss_counts_ignored", "model.py", "return jnp.sum(losses) / jnp.maximum(jnp.sum(counted), 1)",
     "return jnp.sum(losses) / tokens.size", MODEL),
    ("model.target_zero_ignored", "model.py", "    counted = targets >= 0\n    losses = cross_entropy(logits,",
     "    counted = targets > 0\n    losses = cross_entropy(logits,", MODEL),
    ("model.cache_length_kept", "model.py", "cache = KVCache(*layer_kv, cache.length + x.shape[0], cache.last_token)",
     "cache = KVCache(*layer_kv, cache.length, cache.last_token)", MODEL),
    ("model.cache_positions_restart", "model.py", "cos, sin = rope_table(start + jnp.arange(x.shape[0]), config.head_dim, config.rope_base)",
     "cos, sin = rope_table(jnp.arange(x.shape[0]), config.head_dim, config.rope_base)", MODEL),
    ("model.lookup_counted", "model.py", "if f.metadata.get(\"lookup\"))", "if not f.metadata.get(\"lookup\"))", MODEL),
    ("model.scan_length_ignored", "model.py", "repeats = eqn.params.get(\"length\", 1) if eqn.primitive.name == \"scan\" else 1",
     "repeats = 1", MODEL),
    ("model.final_norm_dropped", "model.py", "return model.final_norm(x), cache", "return x, cache", MODEL),
    ("model.bigram_pair_offset", "model.py", "(before + 1) * model.config.vocab_size + tokens",
     "before * model.config.vocab_size + tokens", MODEL),
    ("model.bigram_cache_context", "model.py", "cache = KVCache(cache.k, cache.v, cache.length, tokens[:, -1])",
     "cache = KVCache(cache.k, cache.v, cache.length, tokens[:, 0])", MODEL),
    ("model.value_tables_one", "model.py", "table_of_block = jnp.arange(model.config.n_layer) % tables",
     "table_of_block = jnp.zeros(model.config.n_layer, jnp.int32)", MODEL),
    ("model.value_mix_dropped", "model.py", "v = self.value_lambdas[0] * v + self.value_lambdas[1] * value_embed.reshape(v.shape)",
     "v = v + self.value_lambdas[1] * value_embed.reshape(v.shape)", MODEL),
    # model.py: a setting read then not used, or two arrays equal at init mixed up
    ("model.attn_dropout_is_dropout", "model.py", "rate = self.config.attn_dropout if key is not None else 0.0",
     "rate = self.config.dropout if key is not None else 0.0", MODEL),
    ("model.rope_base_unused", "model.py", "cos, sin = rope_table(start + jnp.arange(x.shape[0]), config.head_dim, config.rope_base)",
     "cos, sin = rope_table(start + jnp.arange(x.shape[0]), config.head_dim, 10000.0)", MODEL),
    ("model.norm_eps_unused", "model.py", "return RMSNorm(dim, config.norm_eps)", "return RMSNorm(dim)", MODEL),
    ("model.mlp_reads_attn_norm", "model.py", "x = x + dropout(self.mlp(self.mlp_norm(x)), self.dropout, k_mlp)",
     "x = x + dropout(self.mlp(self.attn_norm(x)), self.dropout, k_mlp)", MODEL),
    ("model.k_normed_by_q_gain", "model.py", "q, k = self.q_norm(q), self.k_norm(k)",
     "q, k = self.q_norm(q), self.q_norm(k)", MODEL),
    ("model.value_lambdas_swapped", "model.py", "v = self.value_lambdas[0] * v + self.value_lambdas[1] * value_embed.reshape(v.shape)",
     "v = self.value_lambdas[1] * v + self.value_lambdas[0] * value_embed.reshape(v.shape)", MODEL),
    # optim.py
    ("optim.stacked_gains_decayed", "optim.py", "if leaf.ndim - in_block_stack(path) < 2:", "if leaf.ndim < 2:", OPTIM),
    ("optim.schedule_floor", "optim.py", "end_value=config.min_lr,", "end_value=0.0,", OPTIM),
    ("optim.muon_aspect_inverted", "optim.py", "u * math.sqrt(max(1.0, u.shape[-1] / u.shape[-2]))",
     "u * math.sqrt(max(1.0, u.shape[-2] / u.shape[-1]))", OPTIM),
    ("optim.qkv_view_unswapped", "optim.py", "return a.reshape(layers, d_in, 3, d_out // 3).swapaxes(1, 2).reshape(-1, d_in, d_out // 3)",
     "return a.reshape(-1, d_in, d_out // 3)", OPTIM),
    ("optim.independent_decay_ignored", "optim.py", "adam_decay = config.weight_decay / config.learning_rate",
     "adam_decay = config.weight_decay", OPTIM),
    ("optim.muon_lr_ratio_dropped", "optim.py", "optax.scale(config.muon_learning_rate / config.learning_rate)",
     "optax.scale(1.0)", OPTIM),
    ("optim.normuon_axis_swapped", "optim.py", "return -1 if a.shape[-2] > a.shape[-1] else -2",
     "return -2 if a.shape[-2] > a.shape[-1] else -1", OPTIM),
    ("optim.normuon_norm_not_restored", "optim.py", "return normed * (norm(u) / jnp.maximum(norm(normed), eps)), nu",
     "return normed, nu", OPTIM),
    ("optim.normuon_beta_swapped", "optim.py", "nu = beta2 * nu + (1 - beta2) * mean_square",
     "nu = (1 - beta2) * nu + beta2 * mean_square", OPTIM),
    # optim.py: a setting read then not used (optax's own default, often the config's, in its place)
    ("optim.grad_clip_unused", "optim.py", "clip = optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity()",
     "clip = optax.identity()", OPTIM),
    ("optim.beta1_unused", "optim.py", "adam = optax.scale_by_adam(b1=config.beta1, b2=config.beta2)",
     "adam = optax.scale_by_adam(b2=config.beta2)", OPTIM),
    ("optim.beta2_unused", "optim.py", "adam = optax.scale_by_adam(b1=config.beta1, b2=config.beta2)",
     "adam = optax.scale_by_adam(b1=config.beta1)", OPTIM),
    ("optim.beta2_is_normuon_beta2", "optim.py", "adam = optax.scale_by_adam(b1=config.beta1, b2=config.beta2)",
     "adam = optax.scale_by_adam(b1=config.beta1, b2=config.normuon_beta2)", OPTIM),
    ("optim.weight_decay_unused", "optim.py", "adam_decay = muon_decay = config.weight_decay",
     "adam_decay = muon_decay = 0.1", OPTIM),
    ("optim.min_lr_a_tenth_of_peak", "optim.py", "end_value=config.min_lr,", "end_value=config.learning_rate / 10,", OPTIM),
    ("optim.warmup_unused", "optim.py", "warmup_steps=config.warmup_steps,", "warmup_steps=0,", OPTIM),
    ("optim.muon_momentum_unused", "optim.py", "beta=config.muon_momentum, ns_steps=config.muon_ns_steps, nesterov=True,",
     "ns_steps=config.muon_ns_steps, nesterov=True,", OPTIM),
    ("optim.muon_ns_steps_unused", "optim.py", "beta=config.muon_momentum, ns_steps=config.muon_ns_steps, nesterov=True,",
     "beta=config.muon_momentum, nesterov=True,", OPTIM),
    ("optim.muon_preconditioning_unused", "optim.py", "preconditioning=config.muon_preconditioning)",
     "preconditioning=\"frobenius\")", OPTIM),
    ("optim.normuon_beta2_unused", "optim.py", "normed = [normuon(config.normuon_beta2)] if config.normuon else []",
     "normed = [normuon(0.95)] if config.normuon else []", OPTIM),
    ("optim.normuon_beta2_is_muon_momentum", "optim.py", "normed = [normuon(config.normuon_beta2)] if config.normuon else []",
     "normed = [normuon(config.muon_momentum)] if config.normuon else []", OPTIM),
    ("optim.loss_scale_init_unused", "optim.py", "return dynamic_loss_scale(chained, config.loss_scale_init, config.loss_scale_growth_interval)",
     "return dynamic_loss_scale(chained, 2.0**16, config.loss_scale_growth_interval)", OPTIM),
    ("optim.loss_scale_growth_unused", "optim.py", "return dynamic_loss_scale(chained, config.loss_scale_init, config.loss_scale_growth_interval)",
     "return dynamic_loss_scale(chained, config.loss_scale_init, 2000)", OPTIM),
    # sharding.py
    ("sharding.layer_axis_sharded", "sharding.py", "first = 1 if in_block_stack(path) else 0", "first = 0",
     ["tests/test_sharding.py", "tests/test_train.py", "tests/test_optimizer.py"]),
    ("sharding.smallest_axis", "sharding.py", "axis = max(axes, key=lambda a: shape[a])", "axis = min(axes, key=lambda a: shape[a])",
     ["tests/test_sharding.py", "tests/test_train.py", "tests/test_optimizer.py"]),
    ("sharding.min_size_ignored", "sharding.py", "if n_shards == 1 or math.prod(shape) < min_size or not axes:",
     "if n_shards == 1 or not axes:", ["tests/test_sharding.py", "tests/test_train.py", "tests/test_optimizer.py"]),
    # train.py
    ("train.dropout_key_fixed", "train.py", "key = jr.fold_in(jr.wrap_key_data(key_data), step)",
     "key = jr.wrap_key_data(key_data)", TRAIN),
    ("train.accumulated_not_averaged", "train.py", "grads = jax.tree.map(lambda g: g / config.grad_accum, grad_sum)",
     "grads = grad_sum", TRAIN),
    ("train.eval_same_batch", "train.py", "batches = [sampler.batch(i) for i in range(config.eval_iters)]",
     "batches = [sampler.batch(0) for i in range(config.eval_iters)]", TRAIN),
    ("train.no_final_eval", "train.py", "if step % config.eval_interval == 0 or step == config.max_steps:\n                flush()",
     "if step % config.eval_interval == 0:\n                flush()", TRAIN),
    ("train.collapse_unchecked", "train.py", "if last_grad_norm is not None and last_grad_norm < 1e-8:",
     "if last_grad_norm is not None and last_grad_norm < 0:", TRAIN),
    ("train.grad_norm_of_updates", "train.py", "grad_norm = optax.tree_utils.tree_norm(grads)",
     "grad_norm = optax.tree_utils.tree_norm(updates)", TRAIN),
    ("train.eval_iters_unused", "train.py", "for i in range(config.eval_iters)]", "for i in range(200)]", TRAIN),
    ("train.keep_checkpoints_unused", "train.py", "manager, set_aside = checkpoints.open_checkpoints(rundir, config.keep_checkpoints)",
     "manager, set_aside = checkpoints.open_checkpoints(rundir, 3)", TRAIN),
    ("train.batch_seed_unused", "train.py", "train_batches = sampler(\"train\", config.seed, config.grad_accum)",
     "train_batches = sampler(\"train\", 1337, config.grad_accum)", TRAIN),
    ("train.init_seed_unused", "train.py", "params = run_once(make_params, shardings_of(abstract_params), jr.key(config.seed))",
     "params = run_once(make_params, shardings_of(abstract_params), jr.key(1337))", TRAIN),
    ("train.compiled_ahead_for_other_arguments", "train.py", "step = jax.ShapeDtypeStruct((), jnp.int32)",
     "step = jax.ShapeDtypeStruct((), jnp.float32)", TRAIN),
    ("train.finished_run_compiled_ahead", "train.py", "if finished:", "if False:", TRAIN),
    ("train.log_interval_unused", "train.py", "if step % config.log_interval == 0 or step == config.max_steps:",
     "if step % 10 == 0 or step == config.max_steps:", TRAIN),
    # data.py
    ("data.last_example_never_drawn", "data.py", "starts = rng.integers(0, len(self.tokens) // self.example_length, size=shape)",
     "starts = rng.integers(0, len(self.tokens) // self.example_length - 1, size=shape)", DATA),
    ("data.last_window_never_drawn", "data.py", "starts = rng.integers(0, len(self.tokens) - self.block_size, size=shape)",
     "starts = rng.integers(0, len(self.tokens) - self.block_size - 1, size=shape)", DATA),
    ("data.process_rows", "data.py", "self.rows = slice(process_index * rows, (process_index + 1) * rows)",
     "self.rows = slice(process_index, process_index + rows)", DATA),
    ("data.loss_mask_inverted", "data.py", "y = np.where(self.loss_mask, y, IGNORE).astype(np.int32)",
     "y = np.where(self.loss_mask, IGNORE, y).astype(np.int32)", DATA),
    ("data.targets_not_shifted", "data.py", "x, y = window[..., :-1], window[..., 1:]", "x, y = window[..., :-1], window[..., :-1]", DATA),
    ("data.short_read_unchecked", "data.py", "if len(raw) != count * size:", "if False:", DATA + ["tests/test_faults.py"]),
    # decode.py
    ("decode.top_k_drops_kth", "decode.py", "return jnp.where(logits < kth, -jnp.inf, logits)",
     "return jnp.where(logits <= kth, -jnp.inf, logits)", DECODE),
    ("decode.top_p_boundary", "decode.py", "keep_sorted = (mass_before < p).at[0].set(True)",
     "keep_sorted = (mass_before <= p).at[0].set(True)", DECODE),
    ("decode.temperature_multiplies", "decode.py", "logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)",
     "logits = top_p_filter(top_k_filter(logits * temperature, top_k), top_p)", DECODE),
    ("decode.cache_never_rebuilt", "decode.py", "carry = jax.lax.cond(cache.length < block, append, rebuild, cache, window)",
     "carry = jax.lax.cond(cache.length <= block, append, rebuild, cache, window)", DECODE),
    ("decode.prompt_not_cut", "decode.py", "    prompt = prompt[-block:].astype(jnp.int32)\n    vocab",
     "    prompt = prompt.astype(jnp.int32)\n    vocab", DECODE),
    # checkpoints.py
    ("checkpoints.best_is_worst", "checkpoints.py", "scored = sorted((m[\"val_loss\"], s) for s in steps if (m := manager.metrics(s)))",
     "scored = sorted(((m[\"val_loss\"], s) for s in steps if (m := manager.metrics(s))), reverse=True)", CHECKPOINTS),
    ("checkpoints.complete_set_aside", "checkpoints.py", "(p.name.isdigit() and not (p / COMMIT_MARKER).exists())",
     "(p.name.isdigit() and (p / COMMIT_MARKER).exists())", CHECKPOINTS),
    ("checkpoints.checksums_unread", "checkpoints.py", "    path = step_dir / CHECKSUMS\n    if not path.exists():",
     "    path = step_dir / CHECKSUMS\n    if True:", CHECKPOINTS),
    ("checkpoints.seed_may_change", "checkpoints.py", "    \"seed\": \"batches and dropout keep the checkpoint's seed\",\n", "", CHECKPOINTS),
    ("checkpoints.other_data_accepted", "checkpoints.py", "if was and now and was != now:", "if was and now and was == now:", CHECKPOINTS),
    ("checkpoints.no_val_loss_metric", "checkpoints.py", "metrics=None if val_loss is None else {\"val_loss\": val_loss})",
     "metrics=None)", CHECKPOINTS),
    ("checkpoints.non_finite_restored", "checkpoints.py", "                if all_finite(params):\n                    return step, params",
     "                if True:\n                    return step, params", CHECKPOINTS),
    # evaluation.py
    ("evaluation.partial_window_dropped", "evaluation.py", "n_rows = block_size, block_size, math.ceil((len(tokens) - 1) / block_size)",
     "n_rows = block_size, block_size, (len(tokens) - 1) // block_size", EVALUATION),
    ("evaluation.ending_off_by_one", "evaluation.py", "targets[row, len(ctx) - 1 : len(sequence) - 1] = tokens",
     "targets[row, len(ctx) : len(sequence)] = tokens", EVALUATION),
    ("evaluation.acc_norm_unnormalised", "evaluation.py", "mean_loss = sum_loss / counts", "mean_loss = sum_loss", EVALUATION),
    ("evaluation.any_token_matches", "evaluation.py", "correct += int(np.all(out[: len(chunk)] == chunk[:, prompt_length:], axis=1).sum())",
     "correct += int(np.any(out[: len(chunk)] == chunk[:, prompt_length:], axis=1).sum())", EVALUATION),
    ("evaluation.byte_count_of_inputs", "evaluation.py", "n_bytes += int(byte_lengths[targets[targets >= 0]].sum())",
     "n_bytes += int(byte_lengths[inputs[targets >= 0]].sum())", EVALUATION),
    # cli.py
    ("cli.freed_heap_trimmed", "cli.py", "libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)",
     "libc.mallopt(M_TRIM_THRESHOLD, 128 << 10)", ["tests/test_cli.py"]),
]


def pytest(copy: Path, files: list[str]) -> tuple[bool, str, str]:
    """(the suite failed, its last line, the first test that failed) for the fast tests of files
    in copy."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               "-m", "not slow", *files]
    shared = os.environ.get("EQXGPT_SHARED", str(REPO.parent / "shared"))
    done = subprocess.run(command, cwd=copy, capture_output=True, text=True,
                          env={**os.environ, "EQXGPT_SHARED": shared})
    lines = done.stdout.strip().splitlines()
    if done.returncode in (4, 5):  # pytest's usage error, no test collected: no verdict at all
        raise SystemExit(f"pytest ran no test of {' '.join(files)} (exit {done.returncode}): "
                         f"{(lines or [done.stderr.strip()])[-1]}; check the test ids")
    failed = next((line.split()[1] for line in lines if line.startswith(("FAILED ", "ERROR "))), "")
    return done.returncode != 0, (lines or [""])[-1], failed


def run_mutant(name, file, snippet, mutated, files, tests=None) -> dict:
    """tests: the files (or test ids) to run instead of the covering files, with no fallback."""
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "repo"
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "data", "runs",
                                                                  "__pycache__", "*.pyc"))
        source = (copy / file).read_text()
        if source.count(snippet) != 1:
            return {"name": name, "result": f"not planted: the snippet occurs {source.count(snippet)} times"}
        (copy / file).write_text(source.replace(snippet, mutated))
        start = time.time()
        killed, last, failed = pytest(copy, tests or files)
        oracle = " ".join(tests) if tests else "covering files"
        if not killed and not tests:
            killed, last, failed = pytest(copy, ["tests"])
            oracle = "whole fast suite"
        return {"name": name, "result": "killed" if killed else "SURVIVED", "by": oracle,
                "test": failed, "last": last, "seconds": round(time.time() - start)}


RESULTS = REPO / "tests" / "mutants.md"  # the last full pass's table


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the mutants whose name starts with this")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--tests", nargs="+", help="run these test files or ids, not the covering "
                        "files then the whole fast suite")
    parser.add_argument("--out", help="where the table goes (default: tests/mutants.md for a "
                        "run of every mutant; a run of some writes none)")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if m[0].startswith(args.only)]
    if args.list:
        for name, file, snippet, mutated, _ in chosen:
            print(f"{name}: {file}: {snippet!r} -> {mutated!r}")
        return
    rows = []
    for mutant in chosen:
        result = run_mutant(*mutant, tests=args.tests)
        rows.append(result)
        print(f"{result['name']}: {result['result']} ({result.get('by', '')}, "
              f"{result.get('seconds', 0)} s) {result.get('test', '')} {result.get('last', '')}",
              flush=True)
    lines = ["| mutant | result | oracle | first failing test | pytest's last line |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['result']} | {r.get('by', '')} | {r.get('test', '')} | "
              f"{r.get('last', '')} |" for r in rows]
    out = args.out or (None if args.only or args.tests else RESULTS)
    if out:
        Path(out).write_text("\n".join(lines) + "\n")
    survived = [r["name"] for r in rows if r["result"] == "SURVIVED"]
    print(f"{len(rows)} planted, {len(rows) - len(survived)} killed, {len(survived)} survived: "
          f"{', '.join(survived) or 'none'}")


if __name__ == "__main__":
    main(sys.argv[1:])
