"""The GPU session kit (dev/gpu) is run only on a lent device, so its plumbing is checked here:
the dry run names every part's command, bad parts are refused, and the CPU-targets helper
plans its pinned jobs."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KIT = os.path.join(ROOT, "dev", "gpu")

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")


def _load_cpu_targets():
    spec = importlib.util.spec_from_file_location("cpu_targets", os.path.join(KIT, "cpu_targets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _session(tmp_path, *args, **knobs):
    """gpu_session.sh with this interpreter and only the given knobs (none of the caller's)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GPU_", "TESTS_", "BENCH_", "CPU_", "PROFILE_", "EVAL_",
                                "ENGINES_"))}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable, **knobs)
    done = subprocess.run(["bash", os.path.join(KIT, "gpu_session.sh"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    return done


@needs_bash
def test_dry_run_names_each_part(tmp_path):
    done = _session(tmp_path, "--dry-run", "--no-site", "probe", "cpu-targets", "profile",
                    CPU_JOBS="3", CPU_FILTER="float32")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dev/gpu/probe_half_inf.py" in done.stdout
    assert "dev/gpu/cpu_targets.py --filter float32" in done.stdout
    assert "--jobs 3" in done.stdout
    assert "--threshold 0.35" in done.stdout
    assert (tmp_path / "session.log").exists()


@needs_bash
def test_profile_knobs(tmp_path):
    done = _session(tmp_path, "--dry-run", "--no-site", "profile", PROFILE_THRESHOLD="0.95",
                    PROFILE_DTYPE="float16 float32")
    assert done.returncode == 0, done.stdout + done.stderr
    runs = [line for line in done.stdout.splitlines() if "] profile[" in line]
    assert len(runs) == 2
    for dtype, line in zip(("float16", "float32"), runs):
        assert f"profile[{dtype}]" in line and f"--dtype {dtype}" in line
        assert "--threshold 0.95" in line and f"_b1_{dtype}_edge0.95.json" in line


@needs_bash
def test_products_part_runs_one_table_per_dtype(tmp_path):
    done = _session(tmp_path, "--dry-run", "--no-site", "products", PRODUCTS_DTYPE="bfloat16")
    assert done.returncode == 0, done.stdout + done.stderr
    runs = [line for line in done.stdout.splitlines() if "] products[" in line]
    assert len(runs) == 1
    assert "experiments.products_first layers" in runs[0] and "--dtype bfloat16" in runs[0]
    # against what "auto" picks: the lattice split on CPU, "torch" on CUDA
    assert re.search(r"--engines (lattice|torch),products ", runs[0])


@needs_bash
def test_unknown_part_is_refused(tmp_path):
    done = _session(tmp_path, "--dry-run", "benchmark")
    assert done.returncode == 2
    assert "unknown part 'benchmark'" in done.stderr
    assert "cpu-targets" in done.stderr


def test_cpu_targets_slots_are_disjoint_and_whole():
    ct = _load_cpu_targets()
    assert ct.slots_of([0, 2, 4, 6, 8], jobs=4, threads=2) == [[0, 2], [4, 6]]
    assert ct.slots_of(list(range(16)), jobs=4, threads=2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert ct.slots_of([0], jobs=4, threads=2) == []


def test_cpu_targets_run_the_longest_first():
    ct = _load_cpu_targets()
    names = ["cpu_bfloat16_b1_edge0.15", "cpu_bfloat16_b4_edge0.35", "cpu_bfloat16_b1_keep_all",
             "cpu_bfloat16_b1_model_edge0.35"]
    order = [n for n, _ in ct.longest_first([(n, []) for n in names])]
    assert order == ["cpu_bfloat16_b4_edge0.35", "cpu_bfloat16_b1_model_edge0.35",
                     "cpu_bfloat16_b1_edge0.15", "cpu_bfloat16_b1_keep_all"]


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="lscpu not found")
def test_cpu_targets_physical_cores_are_usable_ones():
    ct = _load_cpu_targets()
    cores = ct.physical_cores()
    assert cores and len(set(cores)) == len(cores)
    assert set(cores) <= os.sched_getaffinity(0)


def test_cpu_targets_main_pins_each_job_and_reports_a_failed_one(tmp_path, monkeypatch):
    """main() without running a benchmark: each job pinned to its own cores, --threads set once,
    the float32 baseline left out, and one job killed by a signal makes the exit status
    non-zero."""
    ct = _load_cpu_targets()
    (tmp_path / "frame.png").write_bytes(b"")
    ran = []
    together = threading.Barrier(2, timeout=30)  # both jobs hold their slots at once

    def fake_run(cmd, **kwargs):
        ran.append(cmd)
        together.wait()
        name = cmd[cmd.index("--label") + 1]
        code = -9 if name.endswith("keep_all") else 0
        return subprocess.CompletedProcess(cmd, code, stdout="all  auto  0.5\n", stderr="killed")

    monkeypatch.setattr(ct.subprocess, "run", fake_run)
    monkeypatch.setattr(ct, "physical_cores", lambda: [0, 1, 2, 3, 4])
    monkeypatch.setattr(ct, "PIN", True)
    monkeypatch.chdir(ROOT)  # main() changes directory; restored after the test
    code = ct.main(["--filter", "float32_b1_keep_(none|all)$", "--frames", str(tmp_path), "--jobs", "4",
                    "--results", str(tmp_path)])
    assert code == 9
    assert len(ran) == 2  # keep_none and keep_all
    pins = sorted(cmd[2] for cmd in ran)
    assert pins == ["0,1", "2,3"]
    for cmd in ran:
        assert cmd[:2] == ["taskset", "-c"]
        assert cmd.count("--threads") == 1 and cmd[cmd.index("--threads") + 1] == "2"
        assert "--no-float32-baseline" in cmd


def test_cpu_targets_refuses_a_filter_that_matches_nothing(tmp_path, monkeypatch):
    ct = _load_cpu_targets()
    (tmp_path / "frame.png").write_bytes(b"")
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit, match="matches none of"):
        ct.main(["--filter", "no_such_result", "--frames", str(tmp_path)])
