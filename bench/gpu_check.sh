#!/usr/bin/env bash
# The one-shot GPU check of rnl_fast: build, GPU tests, GPU benchmarks, one final table.
#
#   bash bench/gpu_check.sh                 # on a CUDA machine (from any folder)
#   bash bench/gpu_check.sh --cpu-dry-run   # the same steps on a CPU machine at tiny sizes
#
# Needs a python3 with torch and triton (PYTHON=... picks another interpreter). Pure-python
# pieces it may lack (pybind11 for the build, pytest, spikingjelly 2.0 and its loguru...) come
# from wheels in .whl/ (filled by bench/make_gpu_wheels.sh), installed offline into
# /tmp/rnl_fast_site, and only those the interpreter lacks. Logs go to $OUT when it is set, else
# to /tmp/rnl_fast_gpu_check. The whole run stays within RNL_GPU_CHECK_BUDGET_S (default 340 s):
# each step gets what is left, and the benchmarks print their table even when cut short.
# RNL_GPU_BENCH_ONLY=REGEX benchmarks only the groups whose name matches.
# Exit status: 0 when every step passed, 1 when one failed, 2 when the machine cannot run it.
set -euo pipefail

DRY_RUN=0
case "${1:-}" in
    --cpu-dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: $0 [--cpu-dry-run]" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
LOG_DIR=${OUT:-/tmp/rnl_fast_gpu_check}
SITE=/tmp/rnl_fast_site
BUDGET_S=${RNL_GPU_CHECK_BUDGET_S:-340}
START=$SECONDS
FAILED=()
mkdir -p "$LOG_DIR"

say() { printf '\n== [%3ds] %s\n' "$((SECONDS - START))" "$*"; }
seconds_left() { echo $((BUDGET_S - (SECONDS - START))); }
# Runs "$@" under timeout, output to the console (last $1 lines) and to $LOG_DIR/$2; returns its status.
run_logged() {
    local tail_lines=$1 log=$2 limit=$3
    shift 3
    set +e
    timeout -k 15 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$log" | tail -n "$tail_lines"
    local status=${PIPESTATUS[0]}
    set -e
    return "$status"
}

# ── 1. the machine ────────────────────────────────────────────────────────────────────────
say "environment ($PY), logs in $LOG_DIR"
if ! command -v "$PY" >/dev/null; then
    echo "ERROR: no $PY on PATH (set PYTHON=...)" >&2
    exit 2
fi
"$PY" - <<'EOF' 2>&1 | tee "$LOG_DIR/environment.log"
import sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "triton"):
    try:
        module = __import__(name)
        print(name, module.__version__)
    except ImportError as error:
        print(f"{name}: MISSING ({error})")
import torch
print("CUDA", torch.version.cuda, "available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
if [[ $DRY_RUN == 0 ]]; then
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "ERROR: torch sees no CUDA device; on a CPU machine run: $0 --cpu-dry-run" >&2
        exit 2
    fi
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
    fi
fi

# ── 2. missing pure-python packages, offline from .whl/ ───────────────────────────────────
if compgen -G ".whl/*.whl" >/dev/null; then
    say "wheels from .whl/ for the packages $PY lacks"
    # A wheel is needed when its package is missing, or (setuptools) too old to build an
    # editable install (>= 77: the SPDX license string of pyproject.toml; >= 70.1 builds without "wheel").
    mapfile -t missing < <("$PY" - .whl/*.whl <<'PYTHON'
import importlib.metadata as metadata, re, sys
MINIMUM = {"setuptools": (77, 0)}
PYTHON_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
for path in sys.argv[1:]:
    name, _, python_tag = path.rsplit("/", 1)[-1].split("-")[:3]
    try:
        have = metadata.version(name)
        if tuple(int(part) for part in re.findall(r"\d+", have)[:2]) >= MINIMUM.get(name.lower(), ()):
            print(f"  have {name} {have}", file=sys.stderr)
            continue
    except metadata.PackageNotFoundError:
        pass
    if python_tag.startswith("cp") and python_tag != PYTHON_TAG:
        print(f"  cannot use {path}: built for {python_tag}, this python is {PYTHON_TAG}", file=sys.stderr)
    else:
        print(path)
PYTHON
    )
    if ((${#missing[@]})); then
        printf '  installing %s\n' "${missing[@]##*/}"
        # Not fatal: the checks below name what the build needs; a missing baseline is skipped.
        if "$PY" -m pip --version >/dev/null 2>&1; then
            "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "${missing[@]}" ||
                echo "WARNING: pip could not install every wheel (above)"
        else  # no pip: a pure-python wheel is a zip of importable files
            "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
                "$SITE" "${missing[@]}" || echo "WARNING: could not unpack every wheel (above)"
        fi
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    fi
else
    say "no .whl/ folder: using what $PY has (bench/make_gpu_wheels.sh fills .whl/)"
fi
if ! "$PY" -c "import pybind11" 2>/dev/null; then
    echo "ERROR: the C++ build needs pybind11: not installed and no pybind11 wheel in .whl/" >&2
    exit 2
fi

# ── 3. build: the C++ extension, and rnl_fast importable with rnl_fast.kernels ─────────────
say "build: pip install --no-build-isolation --no-deps -e ."
if "$PY" -m pip install --no-build-isolation --no-deps -e . >"$LOG_DIR/build.log" 2>&1; then
    echo "  editable install done"
else
    # E.g. an externally managed system python: build in place instead, and reach the Triton
    # kernels (the folder kernels/, installed as rnl_fast.kernels) through a link for this run.
    tail -n 5 "$LOG_DIR/build.log"
    echo "  pip install -e . failed (above; full log in build.log): building in place instead"
    if ! "$PY" setup.py build_ext --inplace >>"$LOG_DIR/build.log" 2>&1; then
        tail -n 40 "$LOG_DIR/build.log"
        echo "ERROR: the C++ build failed (log: $LOG_DIR/build.log)" >&2
        exit 1
    fi
    if [[ ! -e rnl_fast/kernels ]]; then
        ln -s ../kernels rnl_fast/kernels
        trap 'rm -f "$REPO/rnl_fast/kernels"' EXIT
    fi
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
(cd /tmp && "$PY" -c "import rnl_fast, rnl_fast._C, rnl_fast.kernels; print('  rnl_fast imports from', rnl_fast.__file__)")

# ── 4. the GPU tests ──────────────────────────────────────────────────────────────────────
# Up to 120 s, leaving the benchmarks at least 150 s.
limit=$(($(seconds_left) - 150 < 120 ? $(seconds_left) - 150 : 120))
say "tests: pytest -m gpu tests/ (limit ${limit} s)"
if ((limit < 20)); then
    FAILED+=("tests (no time left)")
else
    status=0
    run_logged 40 tests.log "$limit" "$PY" -m pytest -m gpu tests/ -q -rs -p no:cacheprovider || status=$?
    case $status in
        0) ;;
        5) echo "  (no test carries the gpu mark)" ;;
        124 | 137) FAILED+=("tests: timed out after ${limit} s") ;;
        *) FAILED+=("tests: pytest exit status $status (log: $LOG_DIR/tests.log)") ;;
    esac
fi

# ── 5. the GPU benchmarks and their table ─────────────────────────────────────────────────
# The script starts no baseline after --budget-s and prints its table on SIGTERM, so the
# timeout below (what is left) cuts it short without losing the figures already measured.
limit=$(($(seconds_left) - 5))
if ((limit < 40)); then
    say "benchmarks: no time left (${limit} s)"
    FAILED+=("benchmarks (no time left)")
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
say "benchmarks: bench/gpu_bench.py (limit ${limit} s)"
bench_args=(--log-dir "$LOG_DIR" --budget-s "$((limit - 60 > 30 ? limit - 60 : 30))")
if [[ -n ${RNL_GPU_BENCH_ONLY:-} ]]; then  # a regex of group names (gpu_bench.py --only)
    bench_args+=(--only "$RNL_GPU_BENCH_ONLY")
fi
if [[ $DRY_RUN == 1 ]]; then
    bench_args+=(--cpu-dry-run)
fi
status=0
run_logged 200 bench.log "$limit" "$PY" bench/gpu_bench.py "${bench_args[@]}" || status=$?
case $status in
    0) ;;
    124 | 137) FAILED+=("benchmarks: cut at ${limit} s (the table shows what was measured)") ;;
    *) FAILED+=("benchmarks: exit status $status (log: $LOG_DIR/bench.log)") ;;
esac

# ── 6. verdict ────────────────────────────────────────────────────────────────────────────
say "done in $((SECONDS - START)) s; logs: $LOG_DIR"
if ((${#FAILED[@]})); then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all steps passed"
