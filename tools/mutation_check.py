"""Do the tests notice when the code breaks? A mutation check, on demand.

    python tools/mutation_check.py                  # every mutation
    python tools/mutation_check.py --list           # names, places, tests
    python tools/mutation_check.py --only export_embedding_max resume_restores_nothing
    python tools/mutation_check.py --markdown       # the table for docs/testing.md

Each mutation is one line of keras_aim or recipes changed the way a real
bug would change it (a transposition dropped, a mean turned into a max, a
label shifted, a check skipped). It is applied to a scratch copy of the
working tree (committed or not; this tree is never touched), the tests
aimed at that line run on one backend, and the mutation counts as killed
when they fail. A survivor is a line that can break without any test
noticing: strengthen the tests. The unmutated tests run first, so a
failure is the mutation's doing. Exit code 0 when every mutation is killed.

Why this and not a mutation-testing package (mutmut, cosmic-ray): those
generate thousands of mechanical mutants and run the whole suite for each;
with a 15-minute suite on 2 cores that takes days. Here each mutation
names the bug it stands for and the few tests that must catch it, so the
whole check runs in well under an hour and a survivor says what is missing.
Not part of CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_SECONDS = 1200


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    area: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in `path`
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    backend: str = "torch"  # the quickest backend on which the tests cover it


def _k(path: str, expression: str) -> tuple[str, ...]:
    return (path, "-k", expression)


MUTATIONS = (
    # --- layers ---------------------------------------------------------------
    Mutation("causal_mask_reversed", "layers", "keras_aim/layers/attention.py",
             "causal = ops.less_equal(positions[None, :], positions[:, None])",
             "causal = ops.less_equal(positions[:, None], positions[None, :])",
             _k("tests/test_layers.py", "prefix_causal_mask_rule or prefix_attention")),
    Mutation("prefix_includes_its_end", "layers", "keras_aim/layers/attention.py",
             "in_prefix = ops.less(positions[None, None, :], prefix)",
             "in_prefix = ops.less_equal(positions[None, None, :], prefix)",
             _k("tests/test_layers.py", "prefix_causal_mask_rule or prefix_attention")),
    Mutation("q_and_k_swapped", "layers", "keras_aim/layers/attention.py",
             "q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]",
             "k, q, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]",
             _k("tests/test_layers.py", "manual_multihead")),
    Mutation("gelu_tanh_approximation", "layers", "keras_aim/layers/mlp.py",
             "return keras.activations.gelu(x, approximate=False)",
             "return keras.activations.gelu(x, approximate=True)",
             _k("tests/test_layers.py", "exact_gelu")),
    Mutation("sincos_halves_swapped", "layers", "keras_aim/layers/position_embedding.py",
             "ops.concatenate([ops.sin(angles), ops.cos(angles)], axis=-1)",
             "ops.concatenate([ops.cos(angles), ops.sin(angles)], axis=-1)",
             _k("tests/test_layers.py", "sincos_matches_spec")),
    Mutation("grid_rows_and_columns_swapped", "layers", "keras_aim/layers/position_embedding.py",
             "ops.concatenate([col, row], axis=-1)", "ops.concatenate([row, col], axis=-1)",
             _k("tests/test_layers.py", "sincos_matches_spec")),
    Mutation("probe_batchnorm_always_inference", "layers", "keras_aim/layers/attention_probe.py",
             "x = self.bn(x, training=training)", "x = self.bn(x, training=False)",
             _k("tests/test_layers.py", "batchnorm_modes")),
    Mutation("lora_default_scale_doubled", "layers", "keras_aim/layers/attention.py",
             "self.lora_alpha = lora_alpha if lora_alpha is not None else rank",
             "self.lora_alpha = lora_alpha if lora_alpha is not None else 2 * rank",
             ("tests/test_lora.py",)),
    Mutation("lora_q_and_v_adapters_swapped", "layers", "keras_aim/layers/attention.py",
             "b_q, b_v = variable[:rank], variable[rank:]",
             "b_v, b_q = variable[:rank], variable[rank:]",
             ("tests/test_lora.py",)),
    # --- losses and optimizers ------------------------------------------------
    Mutation("prefix_targets_counted", "losses", "keras_aim/training/losses.py",
             "ops.greater_equal(positions, prefix)", "ops.greater(positions, prefix)",
             _k("tests/test_pretraining.py", "target_mask or loss_matches")),
    Mutation("biased_patch_variance", "losses", "keras_aim/training/losses.py",
             "/ (count - 1)", "/ count",
             _k("tests/test_pretraining.py", "normalized_targets")),
    Mutation("adamw_beta2_default", "losses", "keras_aim/training/optimizers.py",
             "beta_2=0.95,", "beta_2=0.999,",
             _k("tests/test_pretraining.py", "optimizer_defaults")),
    # --- conversion of released weights ----------------------------------------
    Mutation("proj_kernel_not_transposed", "conversion", "keras_aim/models/aim/convert_aim.py",
             '"attn.proj.weight": (block.attn.proj.kernel, linear)',
             '"attn.proj.weight": (block.attn.proj.kernel, identity)',
             _k("tests/test_backbone.py", "final_tokens_match_reference")),
    Mutation("patch_kernel_height_width_swapped", "conversion", "keras_aim/loading/state_dict.py",
             "return x.transpose(2, 3, 1, 0)", "return x.transpose(3, 2, 1, 0)",
             _k("tests/test_backbone.py", "patch_tokens_with_position")),
    Mutation("data_not_verified_before_assigning", "conversion", "keras_aim/loading/state_dict.py",
             "source.verify([key for key in expected if found[key] is source])", "pass",
             _k("tests/test_conversion.py", "damaged_zip")),
    Mutation("storage_bound_off_by_one", "conversion", "keras_aim/loading/state_dict.py",
             "if (last + 1) * itemsize > storage_bytes:", "if last * itemsize > storage_bytes:",
             _k("tests/test_conversion.py", "declared_sizes")),
    Mutation("checksum_prefix_only", "conversion", "keras_aim/loading/download.py",
             "if actual.startswith(expected):", "if actual[:8] == expected[:8]:",
             _k("tests/test_released_weights.py", "checksum")),
    Mutation("downloads_folder_trusted", "conversion", "keras_aim/loading/preset_cache.py",
             "verify_sha256(cached, sha256, cached, fix=(",
             "(lambda *args, **kwargs: None)(cached, sha256, cached, fix=(",
             _k("tests/test_released_weights.py", "by_hand")),
    # --- checkpoints and resuming ----------------------------------------------
    Mutation("resume_restores_nothing", "checkpointing", "keras_aim/training/checkpointing.py",
             "variable.assign(restored[group][key])", "pass",
             _k("tests/test_recipes.py", "interrupted_run")),
    Mutation("resumed_data_restarts", "checkpointing", "recipes/pretrain.py",
             'next_batch = int(checkpoints.data_state(step).get("next_batch", next_batch))',
             "next_batch = 0",
             _k("tests/test_recipes.py", "interrupted_run")),
    Mutation("data_skips_batches_not_images", "checkpointing", "keras_aim/data/pipelines.py",
             "return tf.data.Dataset.counter(start_step * part).map(position)",
             "return tf.data.Dataset.counter(start_step).map(position)",
             _k("tests/test_data.py", "exact_resume")),
    Mutation("file_stream_restarts", "checkpointing", "keras_aim/data/pipelines.py",
             "return tf.data.Dataset.counter(start_step).interleave(",
             "return tf.data.Dataset.counter(0).interleave(",
             _k("tests/test_data.py", "resumes_exactly")),
    Mutation("every_process_reads_part_zero", "checkpointing", "keras_aim/data/pipelines.py",
             "positions = step * batch_size + index * part + tf.range(part, dtype=tf.int64)",
             "positions = step * batch_size + tf.range(part, dtype=tf.int64)",
             _k("tests/test_data.py", "resumes_exactly")),
    # --- preprocessing and decoding --------------------------------------------
    Mutation("bilinear_resize", "preprocessing", "keras_aim/models/aim/aim_image_converter.py",
             "interpolation=self.interpolation,", 'interpolation="bilinear",',
             ("tests/test_preprocessing.py",)),
    Mutation("center_crop_floor", "preprocessing", "keras_aim/models/aim/aim_image_converter.py",
             "top = int(round((new_h - crop_h) / 2.0))", "top = (new_h - crop_h) // 2",
             ("tests/test_preprocessing.py",)),
    Mutation("shorter_side_rounded", "preprocessing", "keras_aim/models/aim/aim_image_converter.py",
             "return target, int(target * width / height)",
             "return target, round(target * width / height)",
             ("tests/test_preprocessing.py",)),
    Mutation("imagenet_std_typo", "preprocessing", "keras_aim/models/aim/aim_image_converter.py",
             "IMAGENET_STD = (0.229, 0.224, 0.225)", "IMAGENET_STD = (0.229, 0.224, 0.224)",
             ("tests/test_preprocessing.py",)),
    Mutation("jpeg_fast_idct", "preprocessing", "keras_aim/data/images.py",
             'dct_method="INTEGER_ACCURATE"', 'dct_method="INTEGER_FAST"',
             _k("tests/test_data.py", "decod")),
    # --- export ------------------------------------------------------------
    Mutation("export_embedding_max", "export", "keras_aim/export/saved_model.py",
             '"embedding": ops.mean(tokens, axis=1)', '"embedding": ops.max(tokens, axis=1)',
             _k("tests/test_export.py", "independent"), "tensorflow"),
    Mutation("export_top_k_ascending", "export", "keras_aim/export/saved_model.py",
             "indices = ops.argsort(-probabilities, axis=-1)[:, :k]",
             "indices = ops.argsort(probabilities, axis=-1)[:, :k]",
             _k("tests/test_export.py", "independent"), "tensorflow"),
    Mutation("export_private_permissions", "export", "keras_aim/utils/atomic_files.py",
             "_ordinary_permissions(staging, directory=True)", "pass",
             _k("tests/test_export.py", "permissions"), "tensorflow"),
    # --- recipes, command line, inputs ------------------------------------------
    Mutation("probe_labels_shifted", "recipes", "keras_aim/training/probing.py",
             "model.fit(features, labels, batch_size=batch_size",
             "model.fit(features, (labels + 1) % num_classes, batch_size=batch_size",
             _k("tests/test_downstream.py", "easy_task")),
    Mutation("holdout_splits_swapped", "recipes", "keras_aim/data/sources.py",
             'chosen = train if split == "train" else val',
             'chosen = val if split == "train" else train',
             _k("tests/test_recipes.py", "holds_out")),
    Mutation("class_names_unchecked", "recipes", "recipes/common.py",
             "if train_set.class_names != val_set.class_names:",
             "if len(train_set.class_names) != len(val_set.class_names):",
             _k("tests/test_recipes.py", "holds_out")),
    Mutation("single_class_accepted", "recipes", "recipes/common.py",
             "if train_set.num_classes < 2:", "if train_set.num_classes < 1:",
             _k("tests/test_recipes.py", "holds_out")),
    Mutation("run_folder_owner_ignored", "recipes", "recipes/common.py",
             "        if owner != recipe:", "        if False:",
             _k("tests/test_recipes.py", "belongs")),
    Mutation("cli_error_traceback", "recipes", "keras_aim/cli.py",
             "return report_error(error, with_traceback=args.verbose)", "raise",
             _k("tests/test_cli.py", "one_line")),
    Mutation("empty_batch_passed_on", "recipes", "keras_aim/utils/image_inputs.py",
             "if batch_length(x) == 0:", "if batch_length(x) == -1:",
             _k("tests/test_classifier.py", "no_images")),
    # --- runs that refuse to report garbage (signals, locks, NaN) ----------------
    Mutation("signal_never_stops_the_fit", "run safety", "keras_aim/training/interrupts.py",
             """        if self.at == "batch" and self._received():
            self.model.stop_training = True""",
             """        if self.at == "batch" and self._received():
            pass""",
             _k("tests/test_recipes.py", "interrupted_run_resumes")),
    Mutation("interrupted_run_exits_0", "run safety", "recipes/pretrain.py",
             "            return interrupts.exit_code", "            return 0",
             _k("tests/test_recipes.py", "interrupted_run_resumes")),
    Mutation("run_lock_not_exclusive", "run safety", "keras_aim/utils/run_lock.py",
             "os.O_CREAT | os.O_EXCL | os.O_WRONLY", "os.O_CREAT | os.O_TRUNC | os.O_WRONLY",
             _k("tests/test_run_safety.py", "second_run")),
    Mutation("nan_loss_unchecked", "run safety", "keras_aim/training/interrupts.py",
             "        if not math.isfinite(value):\n            step",
             "        if False:\n            step",
             _k("tests/test_run_safety.py", "diverging")),
    Mutation("nan_weights_checkpointed", "run safety", "keras_aim/training/checkpointing.py",
             'check_finite_weights(self.model, f"the checkpoint of step {step}")', "pass",
             _k("tests/test_run_safety.py", "diverging_run")),
    Mutation("nan_flag_accepted", "run safety", "keras_aim/utils/arguments.py",
             "    if not math.isfinite(value):\n        raise argparse",
             "    if False:\n        raise argparse",
             _k("tests/test_run_safety.py", "non_finite")),
    # --- strict loading both ways ----------------------------------------------------
    Mutation("extra_weights_accepted", "loading", "keras_aim/loading/strict_weights.py",
             "if not missing and not mismatched and (allow_partial or not extra):",
             "if not missing and not mismatched:",
             _k("tests/test_backbone.py", "fewer_blocks or holding_more")),
    Mutation("deeper_adapters_accepted", "loading", "keras_aim/training/lora.py",
             "    extra = sorted(set(found) - set(expected))\n", "    extra = []\n",
             _k("tests/test_lora.py", "deeper_trunk or without_a_record")),
    Mutation("keras_zip_without_config", "loading", "keras_aim/loading/keras_files.py",
             "lacking = [n for n in (CONFIG_FILE, WEIGHTS_FILE) if n not in names]",
             "lacking = [n for n in (WEIGHTS_FILE,) if n not in names]",
             _k("tests/test_export.py", "not_a_keras_file")),
    # --- exports that stay in their place ------------------------------------------
    Mutation("export_folder_any_numbered_folder", "export", "keras_aim/export/versions.py",
             "and any((path / name).is_file() for name in SAVED_MODEL_FILES)", "and True",
             _k("tests/test_export_formats.py", "folder_of_other_files")),
    Mutation("export_empty_batch_served", "export", "keras_aim/export/serving_inputs.py",
             "shape[0] > 0,", "shape[0] >= 0,",
             _k("tests/test_export.py", "clear_error"), "tensorflow"),
)


def _tree_files(root: str) -> list[str]:
    """Tracked files and untracked ones git does not ignore."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root, capture_output=True, check=True,
    ).stdout.decode()
    return [p for p in listing.split("\0") if p and os.path.isfile(os.path.join(root, p))]


def make_scratch_copy(root: str) -> str:
    scratch = tempfile.mkdtemp(prefix="keras_aim_mutation_")
    for relative in _tree_files(root):
        target = os.path.join(scratch, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, relative), target)
    return scratch


def check_mutations(root: str, mutations) -> dict[str, int]:
    """The line number of each mutation; exits, naming every mutation that
    no longer applies, if any does not."""
    lines, stale = {}, []
    for mutation in mutations:
        with open(os.path.join(root, mutation.path)) as handle:
            text = handle.read()
        count = text.count(mutation.old)
        if count != 1:
            stale.append(f"  {mutation.name}: {mutation.old!r} occurs {count} times in "
                         f"{mutation.path}, not once")
        else:
            lines[mutation.name] = text[: text.index(mutation.old)].count("\n") + 1
    if stale:
        sys.exit("Mutations that no longer apply (update tools/mutation_check.py):\n"
                 + "\n".join(stale))
    return lines


def run_tests(scratch: str, tests, backend: str) -> tuple[int, float, str]:
    """`(exit code, seconds, output tail)` of the tests in the scratch copy."""
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": scratch,
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=scratch, env=env, capture_output=True,
                                text=True, timeout=TIMEOUT_SECONDS)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired:
        code, output = -1, "timeout"
    return code, time.perf_counter() - start, output[-2000:]


def _ran_tests(output: str) -> bool:
    """Whether pytest's summary line counts at least one passed test."""
    return re.search(r"\b[1-9][0-9]* passed", output) is not None


def outcome(code: int, output: str) -> str:
    """The verdict on a mutation from the exit code of its tests."""
    if code == 0:
        return "SURVIVED" if _ran_tests(output) else "NO TESTS"
    return {
        1: "killed",  # a test failed
        -1: "killed (timeout)",
        2: "killed (collection error)",
        5: "NO TESTS",  # every test deselected
    }.get(code, f"ERROR (pytest exit {code})")


def run_baseline(scratch: str, mutations) -> None:
    """Every targeted test, unmutated, once per backend: they must pass."""
    by_backend: dict[str, list[Mutation]] = {}
    for mutation in mutations:
        by_backend.setdefault(mutation.backend, []).append(mutation)
    for backend, group in by_backend.items():
        expressions: dict[str, list[str] | None] = {}  # None: the whole file
        for mutation in group:
            path, *selection = mutation.tests
            if not selection:
                expressions[path] = None
            elif expressions.get(path, []) is not None:
                expressions.setdefault(path, []).append(f"({selection[1]})")
        for path, selected in expressions.items():
            arguments = [path] + (["-k", " or ".join(selected)] if selected else [])
            code, seconds, output = run_tests(scratch, arguments, backend)
            print(f"baseline {backend} {' '.join(arguments)}: exit {code} ({seconds:.0f} s)",
                  flush=True)
            if code != 0:
                sys.exit(f"The unmutated tests fail; fix them first:\n{output}")
            if not _ran_tests(output):
                sys.exit(f"The unmutated tests were all skipped or deselected on {backend}; "
                         f"aim the mutations at tests that run there:\n{output}")


def apply(scratch: str, mutation: Mutation) -> str:
    """Mutates the scratch copy; returns the original text."""
    path = os.path.join(scratch, mutation.path)
    with open(path) as handle:
        original = handle.read()
    with open(path, "w") as handle:
        handle.write(original.replace(mutation.old, mutation.new, 1))
    return original


def markdown_table(rows, command: str) -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as handle:
            line = next(l for l in handle if l.startswith("flags"))
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile")
                         if f" {f}" in line)
    except (OSError, StopIteration):
        pass
    head = [
        f"Mutation check, {datetime.date.today().isoformat()}: {platform.machine()}, "
        f"{os.cpu_count()} cores ({flags or 'flags unknown'}), Python "
        f"{platform.python_version()}; `{command}`.",
        "",
        "| mutation | area | line | tests | backend | result | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    return "\n".join(head + [
        f"| {r['name']} | {r['area']} | {r['where']} | `{' '.join(r['tests'])}` | "
        f"{r['backend']} | {r['result']} | {r['seconds']:.0f} |" for r in rows
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run of the unmutated tests")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    mutations = MUTATIONS
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTATIONS}
        if unknown:
            parser.error(f"unknown mutations: {', '.join(sorted(unknown))}")
        mutations = [m for m in MUTATIONS if m.name in args.only]
    lines = check_mutations(ROOT, mutations)
    if args.list:
        for m in mutations:
            print(f"{m.name:36} {m.area:14} {m.path}:{lines[m.name]}  [{m.backend}] "
                  f"{' '.join(m.tests)}")
        return 0

    scratch = make_scratch_copy(ROOT)
    rows = []
    try:
        if not args.no_baseline:
            run_baseline(scratch, mutations)
        for mutation in mutations:
            original = apply(scratch, mutation)
            try:
                code, seconds, output = run_tests(scratch, mutation.tests, mutation.backend)
            finally:
                with open(os.path.join(scratch, mutation.path), "w") as handle:
                    handle.write(original)
            result = outcome(code, output)
            rows.append({"name": mutation.name, "area": mutation.area,
                         "where": f"{mutation.path}:{lines[mutation.name]}",
                         "tests": mutation.tests, "backend": mutation.backend,
                         "result": result, "seconds": seconds})
            print(f"{mutation.name:36} {result:18} {seconds:5.0f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    survivors = [r["name"] for r in rows if not r["result"].startswith("killed")]
    if args.markdown:
        command = "python tools/mutation_check.py" + (
            f" --only {' '.join(args.only)}" if args.only else "") + (
            " --no-baseline" if args.no_baseline else "")
        print("\n" + markdown_table(rows, command))
    print(f"\n{len(rows)} mutations: {len(rows) - len(survivors)} killed, "
          f"{len(survivors)} survived" + (f" ({', '.join(survivors)})" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
