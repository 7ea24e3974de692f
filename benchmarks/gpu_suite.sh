#!/usr/bin/env bash
# GPU suite for a machine with an NVIDIA GPU and torch installed but no network:
# builds for sm_90 with the system python3 (no venv, no downloads), runs the full
# pytest suite, compute-sanitizer memcheck + racecheck on the CUDA tests, the
# benchmarks, and writes benchmarks/results/gpu_<device>.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export TBD_OPS_CUDA=1
export TBD_OPS_CUDA_ARCHS="${TBD_OPS_CUDA_ARCHS:-90}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
LOG=build/gpu-suite
mkdir -p "$LOG" benchmarks/results
status=0

step() {  # step NAME CMD... : runs CMD, keeps its log, records PASS/FAIL
  local name=$1; shift
  echo "==== $name ===="
  "$@" 2>&1 | tee "$LOG/$name.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then echo PASS > "$LOG/$name.status"; else echo "FAIL (exit $rc)" > "$LOG/$name.status"; status=1; fi
}

step build "$PY" setup.py --quiet build_ext --inplace
step build-emu "$PY" tests/emu/setup.py
step pytest "$PY" -m pytest tests -q -ra
SAN="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
# Sanitizers only on the real-GPU tests (not the emulated ones); torch.compile tests are skipped there for time.
GPU_TESTS="cuda and not emu and not compile"
step memcheck "$SAN" --tool memcheck --error-exitcode 99 "$PY" -m pytest tests -q -x -k "$GPU_TESTS"
step racecheck "$SAN" --tool racecheck --error-exitcode 99 "$PY" -m pytest tests -q -x -k "$GPU_TESTS and not memory"
step bench "$PY" benchmarks/run_all.py --device cuda

"$PY" - "$LOG" <<'PYEOF'
import datetime, pathlib, re, subprocess, sys
import torch
log = pathlib.Path(sys.argv[1])
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
try:
    commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    changed = subprocess.check_output(["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"],
                                      text=True).strip()
    commit += "-dirty" if changed else ""
except Exception:
    commit = "unknown"
def tail(step, n=3):
    p = log / f"{step}.log"
    lines = [l for l in p.read_text(errors="replace").splitlines() if l.strip()] if p.exists() else []
    return "\n".join(lines[-n:])
def status(step):
    p = log / f"{step}.status"
    return p.read_text().strip() if p.exists() else "NOT RUN"
out = [f"# tbd_ops GPU suite — {name}", "",
       f"- date: {datetime.date.today()}", f"- device: {name}",
       f"- torch: {torch.__version__} (CUDA {torch.version.cuda})", f"- commit: {commit}", "",
       "| step | result | summary |", "|---|---|---|"]
for step in ["build", "build-emu", "pytest", "memcheck", "racecheck", "bench"]:
    summary = tail(step, 1).replace("|", "/")
    out.append(f"| {step} | {status(step)} | {summary} |")
out += ["", "## Benchmarks", "", "```", tail("bench", 100000), "```", ""]
dest = pathlib.Path("benchmarks/results") / f"gpu_{slug}.md"
dest.write_text("\n".join(out))
print(f"wrote {dest}")
PYEOF
exit $status
