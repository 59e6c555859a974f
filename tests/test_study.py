"""The scaling study: the quick variant end to end (files, figures,
correlations), resuming after an interruption, the analysis on known
numbers, and bad configurations."""

import dataclasses
import json
import os

import numpy as np
import pytest

from keras_aim.studies import scaling
from tests.conftest import once_in_torch_pass


@pytest.mark.slow
@once_in_torch_pass
def test_quick_study_runs_resumes_and_reports(tmp_path, capsys):
    from recipes import scaling_study

    out = tmp_path / "study"
    config = scaling.QUICK
    runs = [run.key for run in config.runs()]
    assert len(runs) == 5 and len(set(runs)) == 5

    # Interrupted after two runs, done at once in two processes...
    assert scaling_study.main(
        ["--out", str(out), "--quick", "--max-runs", "2", "--workers", "2"]) == 0
    assert "2 of 5 runs done; rerun to continue" in capsys.readouterr().out
    first = scaling.read_results(str(out))
    assert [r["run"] for r in first] == [runs[0]] * 2 + [runs[1]] * 2
    # ... and killed in the middle of the third: its rows are dropped and it is redone.
    partial = dict(first[0], run=runs[2], final=False, probe_top1=-1.0)
    with open(out / scaling.RESULTS_FILE, "a") as handle:
        handle.write(json.dumps(partial) + "\n")

    # ... and continued in this process.
    assert scaling_study.main(["--out", str(out), "--quick", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    rows = scaling.read_results(str(out))
    assert rows[:4] == first  # finished runs were not redone
    assert [r["run"] for r in rows] == [key for key in runs for _ in config.checkpoints]
    assert all(0.0 <= r["probe_top1"] <= 1.0 and np.isfinite(r["val_loss"]) for r in rows)
    assert {r["step"] for r in rows} == set(config.checkpoints)
    causal = [r for r in rows if r["variant"] == "causal"]
    assert causal and causal[-1]["final"]

    summary = json.loads((out / scaling.SUMMARY_FILE).read_text())
    assert summary["runs"] == 5
    assert summary["correlation_all"]["points"] == 8
    assert summary["correlation_all"]["pearson"] is not None
    assert set(summary["correlation_by_size"]) == {"XS", "S"}
    assert summary["ablations"]["causal"] is not None and summary["ablations"]["base"] is not None
    for figure in ("loss_vs_probe.png", "probe_vs_parameters.png", "probe_vs_data.png"):
        assert (out / figure).stat().st_size > 5000
    assert "All base checkpoints: Pearson" in printed and "| causal |" in printed

    # A run's numbers do not depend on the process that ran it.
    again = []
    scaling.execute_run(config, scaling.load_data(config), config.runs()[0], again.append)
    for mine, theirs in zip(again, first[:2]):
        assert {k: v for k, v in mine.items() if k != "seconds"} == \
            {k: v for k, v in theirs.items() if k != "seconds"}

    # Everything done: a rerun only reports; another configuration is refused.
    assert scaling_study.main(["--out", str(out), "--quick"]) == 0
    assert scaling.read_results(str(out)) == rows
    assert scaling_study.main(["--out", str(out), "--quick", "--steps", "8"]) == 1
    assert "another configuration (differs in: checkpoints, steps)" in capsys.readouterr().err


@pytest.mark.slow
@once_in_torch_pass
def test_an_error_in_a_worker_process_reaches_the_caller_as_itself(tmp_path):
    config = dataclasses.replace(scaling.QUICK, data=f"folder:{tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match="missing"):
        scaling.run_study(config, str(tmp_path / "study"), log=lambda text: None, workers=2)
    assert scaling.read_results(str(tmp_path / "study")) == []
    with pytest.raises(ValueError, match="workers must be at least 1"):
        scaling.run_study(scaling.QUICK, str(tmp_path / "other"), workers=0)


def test_the_recipe_refuses_zero_workers(tmp_path, capsys):
    from recipes import scaling_study

    out = tmp_path / "study"
    with pytest.raises(SystemExit) as stop:  # refused when parsed
        scaling_study.main(["--out", str(out), "--quick", "--workers", "0"])
    assert stop.value.code == 2
    assert "argument --workers: must be >= 1, got 0" in capsys.readouterr().err
    assert not out.exists()


def synthetic_rows(config):
    """Rows whose probe top-1 is a known function of the loss."""
    rows = []
    rng = np.random.RandomState(0)
    for run in config.runs():
        size = config.size(run.size)
        for step in config.checkpoints:
            loss = 1.0 / (1 + step) + 0.1 / size.hidden_dim + rng.uniform(0, 1e-4)
            rows.append({
                "run": run.key, "size": run.size, "variant": run.variant, "seed": run.seed,
                "data_fraction": run.data_fraction,
                "pretraining_images": int(1000 * run.data_fraction),
                "trunk_parameters": size.parameters(config.patch_size), "step": step,
                "final": step == config.checkpoints[-1], "train_loss": loss,
                "val_loss": loss, "probe_top1": 1.0 - loss, "seconds": 1.0,
            })
    return rows


def test_summary_correlations_tables_and_figures(tmp_path):
    config = scaling.StudyConfig()
    rows = synthetic_rows(config)
    summary = scaling.summarize(config, rows)
    # Accuracy = 1 - loss exactly: a perfect negative correlation.
    assert summary["correlation_all"]["pearson"] == pytest.approx(-1.0)
    assert summary["correlation_all"]["spearman"] == pytest.approx(-1.0)
    assert summary["correlation_all"]["points"] == (
        len(config.sizes) * (len(config.data_fractions) + len(config.seeds) - 1)
        * len(config.checkpoints))
    assert summary["by_size"]["XL"]["probe_top1"]["n"] == 3
    assert summary["by_size"]["S"]["trunk_parameters"] == 102_208
    assert summary["by_size"]["XL"]["trunk_parameters"] == 2_668_992
    assert set(summary["ablations"]) == {"base", *config.ablations}
    assert summary["runs"] == len(config.runs()) == 24
    table = scaling.format_summary(config, summary)
    assert "| XL (192x6) | 2.67M |" in table and "| head_depth_4 |" in table
    paths = scaling.plot(config, rows, str(tmp_path))
    assert len(paths) == 3 and all((tmp_path / p).stat().st_size > 5000 for p in paths)


def test_correlations_need_three_points_with_spread():
    assert scaling.correlations([1.0, 2.0], [0.5, 0.4])["pearson"] is None
    assert scaling.correlations([1.0, 1.0, 1.0], [0.5, 0.4, 0.3])["pearson"] is None
    result = scaling.correlations([1.0, 2.0, 3.0], [0.9, 0.5, 0.6])
    assert result["spearman"] == pytest.approx(-0.5)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(checkpoints=(50, 100)), "end at steps=400"),
        (dict(checkpoints=(100, 50, 400)), "increase strictly"),
        (dict(data_fractions=(0.0, 1.0)), r"data_fractions must lie in \(0, 1\]"),
        (dict(ablations=("sideways",)), "unknown ablations"),
        (dict(ablation_size="XXL"), "ablation_size 'XXL' is not one of"),
        (dict(image_size=18), "must be a multiple of patch_size"),
        (dict(seeds=()), "seeds is empty"),
    ],
)
def test_bad_configs_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(scaling.StudyConfig(), **changes)


def test_a_folder_of_something_else_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no study"):
        scaling.run_study(scaling.QUICK, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_the_recipe_keeps_compiled_programs_in_the_study_folder(monkeypatch, tmp_path):
    from recipes import scaling_study

    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        monkeypatch.delenv(name, raising=False)
    scaling_study.use_compilation_cache(str(tmp_path / "study"))
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "study" / "compilation_cache")
    assert os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"
    # A cache the user chose is kept.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    scaling_study.use_compilation_cache(str(tmp_path / "other"))
    assert os.environ["JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"


def test_config_survives_json():
    config = scaling.StudyConfig()
    assert scaling.StudyConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_estimated_cost_counts_every_run():
    from keras_aim.training import memory_plan

    config = scaling.StudyConfig()
    cost = scaling.estimated_cost(config, train_images=1000, val_images=100)
    assert [r["run"] for r in cost["runs"]] == [run.key for run in config.runs()]
    first = config.runs()[0]
    shape = scaling.run_shape(config, first)
    assert (shape.hidden_dim, shape.num_layers, shape.pixel_head_depth) == (64, 2, 2)
    step = memory_plan.step_flops(shape)
    head = memory_plan.forward_flops(shape)["pixel_head"]
    assert cost["runs"][0]["pretraining_flops"] == 400 * 64 * step["train"]
    assert cost["runs"][0]["measuring_flops"] == 4 * (
        100 * (step["inference"] + head) + 1100 * step["inference"])
    assert cost["total_flops"] == sum(
        r["pretraining_flops"] + r["measuring_flops"] for r in cost["runs"])
    # The pixel-head ablations change the head's depth, and so the cost.
    by_run = {r["run"]: r["pretraining_flops"] for r in cost["runs"]}
    assert by_run["M-data1-seed0-head_depth_4"] > by_run["M-data1-seed0-base"] \
        > by_run["M-data1-seed0-head_depth_1"]
    assert cost["pretraining_flops"] == sum(r["pretraining_flops"] for r in cost["runs"])
    # The largest step is XL's (widest trunk) in float32 on one device.
    assert cost["largest_step"].micro_batch_per_device == 64
    assert cost["largest_step"] == memory_plan.plan_memory(
        scaling.run_shape(config, scaling.Run("XL", 1.0, 0)), 1, 1, 64, precision="fp32")


def test_the_recipe_estimates_without_running(tmp_path, capsys):
    from recipes import scaling_study

    out = tmp_path / "study"
    assert scaling_study.main([
        "--out", str(out), "--estimate", "--images", "1281167,50000", "--image-size", "224",
        "--patch-size", "14", "--steps", "20000", "--batch-size", "256", "--tflops", "50"]) == 0
    printed = capsys.readouterr().out
    assert "24 runs on 1281167 training and 50000 held-out images" in printed
    assert " h at 50 TFLOP/s sustained" in printed and "largest step (batch 256" in printed
    assert not out.exists()  # nothing was run or written
    with pytest.raises(SystemExit):
        scaling_study.main(["--out", str(out), "--estimate", "--images", "1000"])
    assert "expected TRAIN,VAL image counts" in capsys.readouterr().err
