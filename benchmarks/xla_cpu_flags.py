"""Keras-JAX throughput under XLA:CPU's optional code paths (`XLA_FLAGS`).

Runs `throughput.py`'s keras-jax target (inference and pre-training step,
each in a fresh process) once per flag set below and prints a table of the
fraction of the measured float32 matmul rate; the first row is XLA's
default. It answers whether a compiler setting closes the gap of the JAX
pre-training step (see the README's Performance section).

    python benchmarks/xla_cpu_flags.py [--repeats N] [--markdown-out F] [size flags of throughput.py]
    python benchmarks/xla_cpu_flags.py --config aim_600m --batch-size 4 --modes inference \\
        --dtype bfloat16             # one dtype policy per sweep

A measurement, not a test. Flags this jaxlib does not know fail their row.
The fraction is of the machine's float32 matmul rate as `throughput.py` measures it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import throughput  # noqa: E402

# (flags, what they switch on). The defaults of jax 0.10 already send most
# matrix products to YNNPACK ("ynn_fusion" thunks).
FLAG_SETS = (
    ("", "XLA's default"),
    ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT",
     "YNNPACK for dots with fused operands"),
    ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
     "YNNPACK for every single dot"),
    ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE",
     "YNNPACK dots and element-wise"),
    ("--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE",
     "XNNPACK dots and element-wise"),
    ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
     "XNNPACK greedy subgraphs"),
    ("--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE",
     "oneDNN dots and element-wise"),
    ("--xla_cpu_use_onednn=true", "oneDNN rewrites"),
    ("--xla_cpu_enable_fast_math=true", "fast math"),
    ("--xla_cpu_experimental_enable_tiling_propagation=true", "tiling propagation"),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=true", "concurrency-optimized scheduler"),
    ("--xla_cpu_use_fusion_emitters=false", "legacy loop emitters"),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=throughput._at_least(1), default=1)
    parser.add_argument("--markdown-out", default=None)
    known, rest = parser.parse_known_args(argv)
    args = throughput.parse_args(["--targets", "keras-jax", *rest])
    case = throughput.parse_case(args.config, args)
    plan = throughput.matmul_plan([case])
    readings = {framework: [] for framework in throughput.MACHINE_RATE_FRAMEWORKS}

    def read_rates():
        for framework in readings:
            reading = throughput.measure_matmuls(framework, plan, args.target_timeout)
            if "error" not in reading:
                reading.pop("wall")
                readings[framework].append(reading)

    read_rates()
    measured = []  # (flags, meaning, worker results, first error)
    base = os.environ.get("XLA_FLAGS", "")
    try:
        for flags, meaning in FLAG_SETS:
            os.environ["XLA_FLAGS"] = f"{base} {flags}".strip()
            processes = [throughput.measure_target("keras-jax", args, case)
                         for _ in range(known.repeats)]
            error = next((p["error"][0] for p in processes if "error" in p), "")
            measured.append((flags, meaning, [p for p in processes if "error" not in p], error))
            print(f"{flags or '(none)'}: {error or 'ok'}", flush=True)
    finally:
        os.environ["XLA_FLAGS"] = base
    read_rates()
    rates = throughput.best_rates(readings)

    header = ["XLA_FLAGS", "what", *(f"{mode} of matmul" for mode in args.modes)]
    lines = []
    for flags, meaning, processes, error in measured:
        # The fastest process per mode, as in throughput.py's table.
        rows = throughput.table_rows({("keras-jax", case["dtypes"][0]): processes}, case, rates)
        fraction = {row["mode"]: row["of_matmul"] for row in rows}
        cells = [f"`{flags}`" if flags else "(none)", meaning]
        cells += [f"{100 * fraction[mode]:.0f}%" if mode in fraction else
                  f"failed: {error[:60]}" for mode in args.modes]
        lines.append(cells)
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(cells) + " |" for cells in lines]
    machine = throughput.machine_rate(rates)
    note = (f"keras-jax, {case['label']}, {case['dtypes'][0]}, fastest of {known.repeats} "
            f"process(es) per row; machine float32 "
            f"matmul rate (fastest of JAX and PyTorch, 2048^3) {machine / 1e9:.1f} GFLOP/s; "
            f"{throughput.describe_cpu()}; {throughput._versions()}")
    print("\n" + note + "\n" + "\n".join(table))
    if known.markdown_out:
        throughput._write_text(known.markdown_out, note + "\n\n" + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
