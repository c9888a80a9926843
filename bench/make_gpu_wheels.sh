#!/usr/bin/env bash
# Downloads into .whl/ (or the folder given as $1) the wheels bench/gpu_check.sh installs,
# offline, on a GPU machine whose python (3.12 by default: PY_VERSION=3.11 etc.) may lack them:
#   pybind11 and setuptools (the C++ build; a python 3.12 venv has no setuptools), pytest and
#   its dependencies (the GPU tests), spikingjelly 2.0.0 and what its activation_based.neuron
#   path imports beyond torch (loguru, tqdm, numpy).
# Versions are those installed here (known to work together); spikingjelly is pinned to 2.0.0.
# gpu_check.sh installs only the ones the GPU machine lacks, so extra wheels cost nothing there.
# Run on a machine with package-index access:  bash bench/make_gpu_wheels.sh [DEST]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$REPO/.whl}
PY=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
# Pure-python packages (py3-none-any wheels) and numpy (binary, hence the platform tags below).
PACKAGES=(pybind11 setuptools pytest pluggy iniconfig packaging pygments loguru tqdm numpy)

pins=("spikingjelly==2.0.0")
for name in "${PACKAGES[@]}"; do
    if ! version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null); then
        echo "ERROR: $name is not installed for $PY, so its version cannot be pinned; install it or set PYTHON=" >&2
        exit 1
    fi
    pins+=("$name==$version")
done

mkdir -p "$DEST"
echo "downloading into $DEST for CPython $PY_VERSION: ${pins[*]}"
"$PY" -m pip download --no-deps --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${pins[@]}"
ls -l "$DEST"
du -sh "$DEST"
echo "carry it to the GPU machine with the repository (it is gitignored): e.g. the run tool's carry: [\".whl\"]"
