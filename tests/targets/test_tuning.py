"""MetaSchedule tuning with a reusable database (targets/tvm_backend/tuning.py, fxopt/tuning.py).

One tiny model (two small convs: two tasks) is tuned once per module with a handful of random
trials; the tests share what those runs did. The first run is interrupted after its first batch
(a real SIGINT through the handler), the second one resumes, the third finds everything in the
database.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import fxopt
from fxopt import InputError, TargetError, TuneConfig
from fxopt.cli import make_parser, tune_config
from fxopt.targets import get_target, tvm_backend
from fxopt.targets.tvm_backend import tuning

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

TRIALS = 4  # two tasks, two trials each
BATCH = 2


def two_convs(second_channels: int = 8) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, second_channels, 3, padding=1)
    ).eval()


def fused_module(model: torch.nn.Module, x: torch.Tensor, target):
    """The Relax module at the point where schedules are applied: legalized and fused."""
    mod = tvm_backend.lower(model, (x,))
    with tvm.target.Target(target):
        return tvm.transform.Sequential([
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR(),
        ])(mod)


def run_module(mod, target, x: torch.Tensor) -> np.ndarray:
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    tvm_target = tvm.target.Target(target)

    @tvm.transform.module_pass(opt_level=0)
    def finish(mod, _ctx):
        with tvm_target:
            return tvm.transform.Sequential(cpu.dataflow_lower_passes(tvm_target) + cpu.finalize_passes(tvm_target))(mod)

    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm_target, relax_pipeline=finish), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    return out[0].numpy() if hasattr(out, "__len__") else out.numpy()


def scheduled_text(mod) -> dict[str, str]:
    return {gv.name_hint: f.script() for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.fixture(scope="module")
def host():
    return tvm_backend.resolve_target("host")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, host):
    """Three tune() calls on one database: interrupted after the first batch, resumed, reused."""
    database = tmp_path_factory.mktemp("tuning") / "db"
    x = torch.randn(1, 3, 12, 12)
    model = two_convs()
    mod = fused_module(model, x, host)
    config = TuneConfig(trials=TRIALS, database=database, trials_per_batch=BATCH, cost_model="random")
    results: dict = {"database": database, "config": config, "x": x, "model": model, "mod": mod}

    original = tuning._Session.on_batch

    def interrupt_once(self, builder_results, runner_results):
        if not results.get("sent"):
            results["sent"] = True
            signal.raise_signal(signal.SIGINT)  # as a Ctrl-C would: the handler asks for a stop
        return original(self, builder_results, runner_results)

    handler = signal.getsignal(signal.SIGINT)
    tuning._Session.on_batch = interrupt_once
    try:
        with pytest.raises(KeyboardInterrupt):
            tuning.tune(mod, host, config)
    finally:
        tuning._Session.on_batch = original
    results["handler_restored"] = signal.getsignal(signal.SIGINT) is handler
    directory = tuning.database_dir(database, host)
    results["after_interrupt"] = {
        "records": len((directory / "database_tuning_record.json").read_text().splitlines()),
        "incomplete": json.loads((directory / "incomplete.json").read_text()),
    }
    results["resumed"] = tuning.tune(mod, host, config)
    results["first_mod"], results["first_applied"] = tuning.apply_database(mod, host, database)
    results["again_mod"], results["again"] = tuning.tune_and_apply(mod, host, config)
    return results


def test_interrupt_keeps_committed_records_and_marks_the_task(tuned):
    after = tuned["after_interrupt"]
    assert after["records"] == BATCH  # the batch in flight finished and was committed
    assert len(after["incomplete"]) == 1
    assert tuned["handler_restored"]


def test_resume_tunes_the_interrupted_and_the_untouched_tasks(tuned):
    resumed = tuned["resumed"]
    assert resumed.tasks == 2 and resumed.tuned == 2 and resumed.reused == 0
    assert resumed.measured == TRIALS and not resumed.interrupted
    assert not (Path(resumed.database) / "incomplete.json").exists()


def test_second_tune_does_no_tuning_and_gives_the_same_schedules(tuned):
    again = tuned["again"]
    assert again.tuned == 0 and again.measured == 0 and again.reused == 2 and again.applied == 2
    assert tuned["first_applied"] == 2
    assert scheduled_text(tuned["again_mod"]) == scheduled_text(tuned["first_mod"])
    for func in tuned["again_mod"].functions.values():
        if isinstance(func, tvm.tirx.PrimFunc):
            assert func.attrs[tuning.SCHEDULED_ATTR]


def test_tuned_build_equals_the_eager_model(tuned, host):
    actual = run_module(tuned["again_mod"], host, tuned["x"])
    expected = tuned["model"](tuned["x"]).detach().numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))


def test_same_workload_in_another_model_is_reused_and_others_untouched(tuned, host):
    # The first conv (+ReLU) has the same shapes: its workload is in the database; the second not.
    x = tuned["x"]
    model = two_convs(second_channels=4)
    mod = fused_module(model, x, host)
    summary = tuning.tune(mod, host, TuneConfig(trials=0, database=tuned["database"]))
    assert summary.tasks == 2 and summary.reused == 1 and summary.measured == 0
    applied_mod, applied = tuning.apply_database(mod, host, tuned["database"])
    assert applied == 1
    flags = sorted(bool(f.attrs and tuning.SCHEDULED_ATTR in f.attrs)
                   for f in applied_mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    assert flags == [False, True]
    np.testing.assert_allclose(run_module(applied_mod, host, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_database_is_keyed_by_target(tuned, host):
    other = {**host, "num-cores": 1 if tuning._cpu_count() != 1 else 3}  # another tuning target
    assert tuning.target_key(other) != tuning.target_key(host)
    assert tuning.target_key(host) == tuning.target_key(tvm.target.Target(host))  # dict or Target: one key
    summary = tuning.tune(tuned["mod"], other, TuneConfig(trials=0, database=tuned["database"]))
    assert summary.reused == 0 and summary.tasks == 2
    assert tuning.apply_database(tuned["mod"], other, tuned["database"])[1] == 0
    arm = tvm_backend.resolve_target("arm64")
    assert tuning.apply_database(tuned["mod"], arm, tuned["database"])[1] == 0
    assert json.loads((Path(tuned["again"].database) / "target.json").read_text())["num-cores"] == host.get(
        "num-cores", tuning._cpu_count())


def test_missing_database_applies_nothing_and_creates_nothing(tmp_path, tuned, host):
    mod, applied = tuning.apply_database(tuned["mod"], host, tmp_path / "none")
    assert applied == 0 and not (tmp_path / "none").exists()


def test_a_target_that_does_not_run_here_needs_rpc(tuned, tmp_path):
    target = get_target("arm64")
    with pytest.raises(TargetError, match="does not run on this machine.*rpc"):
        tuning.tune(tuned["mod"], tvm_backend.resolve_target(target), TuneConfig(trials=4, database=tmp_path),
                    target=target)


@pytest.mark.parametrize("options, option", [
    ({"trials": -1}, "trials"),
    ({"trials": 1.5}, "trials"),
    ({"trials": True}, "trials"),
    ({"trials": 4, "max_trials_per_task": 0}, "max_trials_per_task"),
    ({"trials": 4, "trials_per_batch": 0}, "trials_per_batch"),
    ({"trials": 4, "workers": 0}, "workers"),
    ({"trials": 4, "seed": -2}, "seed"),
    ({"trials": 4, "cost_model": "gbm"}, "cost_model"),
    ({"trials": 4, "timeout_s": 0}, "timeout_s"),
    ({"trials": 4, "rpc": "tracker:9190"}, "rpc"),
    ({"trials": 4, "database": 3}, "database"),
    ({"trials": 4, "trails": 5}, "trails"),
])
def test_tune_config_errors_name_the_option(options, option):
    with pytest.raises(InputError, match=option):
        TuneConfig(**options)


def test_tune_config_defaults_and_json(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = TuneConfig(trials=8)
    assert config.database_path == tmp_path / "fxopt" / "tuning-db"
    assert TuneConfig.from_json(config.to_json()) == TuneConfig(trials=8, database=str(config.database_path))
    with pytest.raises(InputError, match="no option 'trails'"):
        TuneConfig.from_json({"trails": 3})
    with pytest.raises(InputError, match="tune must be a fxopt.TuneConfig"):
        fxopt.compile(two_convs(), (torch.randn(1, 3, 8, 8),), tune=64)


def test_cli_tune_flags(tmp_path):
    out = tmp_path / "builds" / "m"
    parse = make_parser().parse_args
    args = parse(["build", "x.py:f", "--input-shape", "1x3x8x8", "-o", str(out), "--tune", "16"])
    assert tune_config(args, out) == TuneConfig(trials=16, database=out.parent / "tuning-db")
    args = parse(["build", "x.py:f", "-o", str(out), "--tune", "8", "--tune-db", str(tmp_path / "db")])
    assert tune_config(args, out) == TuneConfig(trials=8, database=tmp_path / "db")
    args = parse(["build", "x.py:f", "-o", str(out), "--tune-db", str(tmp_path / "db")])
    assert tune_config(args, out).trials == 0  # apply the database only
    assert tune_config(parse(["build", "x.py:f", "-o", str(out)]), out) is None
    with pytest.raises(InputError, match="--tune -3"):
        tune_config(parse(["build", "x.py:f", "-o", str(out), "--tune", "-3"]), out)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="--tune-db .* is a file"):
        tune_config(parse(["build", "x.py:f", "-o", str(out), "--tune", "1", "--tune-db", str(tmp_path / "file")]), out)


def test_compile_records_tuning_in_report_and_manifest(tmp_path, monkeypatch):
    """fxopt.compile passes tune= to build() and records what build() says tuning did."""
    seen = {}
    real_build = tvm_backend.build

    def build(mod, target, tune=None):
        seen["tune"] = tune
        library = real_build(mod, target)
        library.tuning = {"tasks": 2, "reused": 2, "tuned": 0, "measured": 0, "failed": 0, "seconds": 0.5,
                          "interrupted": False, "applied": 2, "database": str(tmp_path / "db" / "key"),
                          "target_key": "key"}
        return library

    monkeypatch.setattr(tvm_backend, "build", build)
    config = TuneConfig(trials=16, database=tmp_path / "db")
    compiled = fxopt.compile(two_convs(), (torch.randn(1, 3, 8, 8),), tune=config)
    assert seen["tune"] is config
    tuning_info = compiled.report.build["tuning"]
    assert tuning_info["budget"] == 16 and tuning_info["applied"] == 2
    assert "tuning: 0 trials measured for 0 of 2 tasks (2 from the database)" in compiled.report.to_text()
    # The library alone: the runner (built from TVM's sources, cached) is not what this test is about.
    compiled._write_payload = lambda directory: [compiled.library.save(directory / compiled.target.library).name]
    manifest = json.loads((compiled.export(tmp_path / "build") / "manifest.json").read_text())
    assert manifest["tuning"]["budget"] == 16 and manifest["tuning"]["target_key"] == "key"
    assert manifest["tuning"]["database"] == str(tmp_path / "db")


def test_budget_split_over_tasks():
    tasks = ["heavy", "middle", "light"]
    shares = lambda **kw: [(t, n) for t, n in tuning._shares(TuneConfig(**kw), tasks)]  # noqa: E731
    assert shares(trials=8) == [("heavy", 3), ("middle", 3), ("light", 2)]
    assert shares(trials=30, max_trials_per_task=4) == [("heavy", 4), ("middle", 4), ("light", 4)]
    assert shares(trials=2) == [("heavy", 1), ("middle", 1)]  # the light task keeps the default schedule
    assert shares(trials=0) == []


def test_progress_bar_on_a_terminal_only():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    bar = tuning._Progress(10, stream=screen)
    bar.update(label="task 1/2: fused_conv2d")
    bar.update(done=4)
    bar.close()
    text = screen.getvalue()
    assert "estimating" in text and "4/10 trials" in text and "left" in text and "fused_conv2d" in text
    quiet = io.StringIO()
    tuning._Progress(10, stream=quiet).update(done=4)
    assert quiet.getvalue() == ""


def test_cli_build_with_tuning_then_reuse(tmp_path, capsys):
    (tmp_path / "model.py").write_text(
        "import torch\n"
        "def two_convs():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),\n"
        "                               torch.nn.Conv2d(8, 8, 3, padding=1))\n")
    from fxopt.cli import main

    build = ["build", f"{tmp_path / 'model.py'}:two_convs", "--input-shape", "1x3x8x8"]
    # 6 trials: at least one for each task of the build (4 with today's CPU pipeline)
    assert main([*build, "-o", str(tmp_path / "builds" / "a"), "--tune", "6"]) == 0
    out = capsys.readouterr().out
    assert "tuning: 6 trials measured" in out and str(tmp_path / "builds" / "tuning-db") in out
    assert main([*build, "-o", str(tmp_path / "builds" / "b"), "--tune", "6"]) == 0
    assert "tuning: 0 trials measured for 0 of" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "builds" / "b" / "manifest.json").read_text())
    assert manifest["tuning"]["measured"] == 0 and manifest["tuning"]["applied"] >= 1
    assert main(["check", str(tmp_path / "builds" / "b")]) == 0


def test_default_schedule_is_seeded_so_tuning_never_loses_to_it(tmp_path, host):
    """build(tune=...) measures fxopt's default schedule of each task first and commits it to the
    database: one record more per task than trials, and the build is never worse than untuned
    by construction (the database keeps the faster)."""
    x = torch.randn(1, 3, 12, 12)
    model = two_convs()
    config = TuneConfig(trials=8, database=tmp_path / "db", trials_per_batch=2, cost_model="random")
    library = tvm_backend.build(tvm_backend.lower(model, (x,)), "host", tune=config)
    directory = Path(library.tuning["database"])
    records = (directory / "database_tuning_record.json").read_text().splitlines()
    assert library.tuning["tuned"] == library.tuning["tasks"] == library.tuning["applied"] >= 2
    assert len(records) == library.tuning["measured"] + library.tuning["tuned"]  # + one seed per tuned task
    got = library.run(x)[0]
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
