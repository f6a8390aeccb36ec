"""``scripts/gpu_real_shapes.py``: the GPU real-shape benchmark, run here with ``--tiny`` on the CPU.

The real shapes need a GPU; the tiny path runs the same code (model build in the target dtype, the
three systems, the budget guard, the stats JSON) with every shape shrunk. Subprocesses, as on the
GPU machine (the LLaVA part runs ``scripts/bench_llava.py`` in a subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "gpu_real_shapes.py"


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_tiny_run_all_systems_writes_stats(tmp_path):
    stats = tmp_path / "stats.json"
    proc = run_script("--tiny", "--device", "cpu", "--repeats", "1", "--budgets", "0.35,0.25", "--stats-json", str(stats))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(stats.read_text())
    assert {"command", "env", "estimate", "systems", "total_s"} <= set(data)
    assert {"torch", "transformers", "diffusers", "gpu", "flash_attn_installed"} <= set(data["env"])
    assert set(data["systems"]) == {"edit", "video", "llava"}
    for name, system in data["systems"].items():
        assert system["status"] == "ok", (name, system.get("error"), system.get("notes"))
        assert {"seconds", "notes"} <= set(system), name
        if name != "llava":
            assert {"config", "init_s", "rows"} <= set(system), name

    edit = data["systems"]["edit"]["rows"]
    assert [(r["mode"], r["schedule"]) for r in edit] == [
        ("none", "-"), ("mlp", "alternate"), ("full", "alternate"), ("kv", "alternate"),
        ("mlp", "once"), ("full", "once"), ("kv", "once")]
    for r in edit:
        assert len(r["step_median_s"]) == 4 and r["median_s"] > 0 and r["flops_bound_speedup"] >= 1.0
    assert all(r["cache_bytes"] > 0 for r in edit[1:])

    video = data["systems"]["video"]["rows"]
    assert {(r["frames"], r["preset"]) for r in video} == {
        (f, p) for f in (8, 16) for p in ("baseline", "stage2_only", "default", "aggressive")}
    for r in video:
        for key in ("ttft_s", "vision_s", "stage1_s", "llm_prefill_s", "decode_tokens_per_s", "kv_cache_bytes"):
            assert r[key] is not None and r[key] >= 0, (r["preset"], key)
        assert r["new_tokens"] == 16
        v0, v1, v2 = r["visual_tokens"]
        assert v0 == r["frames"] // 2 * 16 and v0 >= v1 >= v2
    base16 = next(r for r in video if r["frames"] == 16 and r["preset"] == "baseline")
    assert base16["visual_tokens"] == [128, 128, 128] and base16["stage1_s"] == 0.0
    default16 = next(r for r in video if r["frames"] == 16 and r["preset"] == "default")
    assert default16["stage1_s"] > 0 and default16["kv_cache_bytes"] < base16["kv_cache_bytes"]

    llava = data["systems"]["llava"]["bench_llava"]
    assert llava["scale"] == 4 and llava["dtype"] == "float32"
    methods = {(r["method"], r["budget"]) for r in llava["results"]}
    assert {("unpruned", 1.0), ("learned", 0.35), ("learned", 0.25), ("divprune", 0.35), ("divprune", 0.25)} <= methods
    assert all(r["prefill_seconds_median"] > 0 for r in llava["results"])
    assert "===== edit" in proc.stdout and "LLaVA-1.5-7B proportions / 4" in proc.stdout


def test_budget_guard_skips_with_a_note(tmp_path):
    stats = tmp_path / "stats.json"
    proc = run_script("--tiny", "--device", "cpu", "--systems", "edit", "--budget-s", "0.01",
                      "--stats-json", str(stats))
    assert proc.returncode == 0, proc.stderr[-3000:]
    edit = json.loads(stats.read_text())["systems"]["edit"]
    assert edit["status"] == "partial" and edit["notes"] and all(r.get("skipped") for r in edit["rows"])


def test_plan_and_bad_input(tmp_path):
    proc = run_script("--plan", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FLOP-based estimate" in proc.stdout and "edit :" in proc.stdout and "llava:" in proc.stdout
    proc = run_script("--systems", "edit,nope", "--tiny", "--device", "cpu")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --systems")
    proc = run_script("--device", "cpu", "--systems", "edit")  # real shapes on a CPU: refused, one line
    assert proc.returncode == 2 and "need a GPU" in proc.stderr


def test_tiny_edit_with_one_and_two_references_times_every_mode_against_its_own_baseline(tmp_path):
    stats = tmp_path / "stats.json"
    proc = run_script("--tiny", "--device", "cpu", "--systems", "edit", "--references", "1", "2",
                      "--modes", "full,kv", "--schedules", "once", "--stats-json", str(stats))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    edit = json.loads(stats.read_text())["systems"]["edit"]
    assert edit["config"]["references"] == [1, 2]
    rows = edit["rows"]
    assert [(r["references"], r["mode"]) for r in rows] == [
        (1, "none"), (1, "full"), (1, "kv"), (2, "none"), (2, "full"), (2, "kv")]
    bounds = {(r["references"], r["mode"]): r["flops_bound_speedup"] for r in rows}
    assert bounds[(1, "none")] == bounds[(2, "none")] == 1.0
    assert bounds[(2, "kv")] > bounds[(1, "kv")] > 1.0  # more reference tokens: more work skipped
    caches = {(r["references"], r["mode"]): r["cache_bytes"] for r in rows}
    assert caches[(2, "kv")] == 2 * caches[(1, "kv")]  # one cache row per reference token
    proc = run_script("--tiny", "--device", "cpu", "--systems", "edit", "--references", "0")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --references")
