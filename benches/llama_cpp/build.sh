#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-completion, llama-simple and llama-tokenize
# (CPU only, static, -march=native) from the llama.cpp source that is vendored in
# the llama-cpp-python sdist on PyPI, the only place this machine can get it from.
#
# Everything goes under ${STLM_HOME:-$HOME/.cache/stlm}/llama.cpp:
#   venv/   a Python venv with the pinned cmake and ninja
#   src/    the sdist and its extracted tree (vendor/llama.cpp inside it)
#   build/  the cmake/ninja build; the binaries are in build/bin/
#
# Rerunning when the binaries exist (and were built from the same pins and flags)
# does nothing but print their paths. See README.md beside this file.
#
# Environment: STLM_HOME (root, above), PYTHON (interpreter for the venv,
# default python3), JOBS (ninja -j, default 2).
set -euo pipefail

# --- pins -------------------------------------------------------------------
LLAMA_CPP_PYTHON_VERSION=0.3.36
LLAMA_CPP_PYTHON_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
# The llama.cpp commit vendored in that sdist (informational; checked below when
# the sdist's git metadata is readable).
LLAMA_CPP_COMMIT=0c1e57098bba43ac29e6e3b677cdceebdd22334f
CMAKE_VERSION=4.4.5
NINJA_VERSION=1.13.2

# llama-cli is a target in this llama.cpp version, but it is now a chat-only
# front end built on the server (it needs LLAMA_BUILD_SERVER, whose web UI step
# downloads assets); llama-completion is the old `main` program (-no-cnv, -n,
# --temp 0, --seed) and llama-simple the minimal greedy example.
TARGETS=(llama-bench llama-completion llama-simple llama-tokenize)

ROOT="${STLM_HOME:-$HOME/.cache/stlm}/llama.cpp"
VENV="$ROOT/venv"
SRC="$ROOT/src"
BUILD="$ROOT/build"
BIN="$BUILD/bin"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
SDIST_DIR="$SRC/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
LLAMA_SRC="$SDIST_DIR/vendor/llama.cpp"

log() { printf '[llama.cpp build] %s\n' "$*" >&2; }

# OpenMP on if the C compiler can build and link an OpenMP program.
have_openmp() {
    local tmp rc=0
    tmp="$(mktemp -d)"
    printf '#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n' >"$tmp/t.c"
    "${CC:-cc}" -fopenmp "$tmp/t.c" -o "$tmp/t" >/dev/null 2>&1 || rc=1
    rm -rf "$tmp"
    return "$rc"
}
if have_openmp; then OPENMP=ON; else OPENMP=OFF; fi

CMAKE_FLAGS=(
    -G Ninja
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DGGML_NATIVE=ON
    -DGGML_CCACHE=OFF
    -DGGML_OPENMP="$OPENMP"
    -DGGML_CPU=ON
    -DGGML_BACKEND_DL=OFF
    -DGGML_BLAS=OFF
    -DGGML_CUDA=OFF
    -DGGML_HIP=OFF
    -DGGML_MUSA=OFF
    -DGGML_VULKAN=OFF
    -DGGML_METAL=OFF
    -DGGML_SYCL=OFF
    -DGGML_OPENCL=OFF
    -DGGML_WEBGPU=OFF
    -DGGML_RPC=OFF
    -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_COMMON=ON
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_EXAMPLES=ON
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_SERVER=OFF
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_LLGUIDANCE=OFF
)
# LLAMA_BUILD_EXAMPLES=ON only adds the example targets to the build graph (for
# llama-simple); ninja builds nothing but TARGETS.

STAMP_FILE="$BUILD/.stlm-build-stamp"
STAMP="llama-cpp-python=$LLAMA_CPP_PYTHON_VERSION cmake=$CMAKE_VERSION ninja=$NINJA_VERSION targets=${TARGETS[*]} flags=${CMAKE_FLAGS[*]}"

print_bins() {
    local t
    for t in "${TARGETS[@]}"; do
        printf '%s\n' "$BIN/$t"
    done
}

all_built() {
    local t
    for t in "${TARGETS[@]}"; do
        [[ -x "$BIN/$t" ]] || return 1
    done
    [[ -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$STAMP" ]]
}

if all_built; then
    print_bins
    exit 0
fi

mkdir -p "$ROOT" "$SRC"

# --- 1. venv with cmake and ninja --------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
have_tools() {
    [[ -x "$VENV/bin/cmake" && -x "$VENV/bin/ninja" ]] || return 1
    "$VENV/bin/python" - "$CMAKE_VERSION" "$NINJA_VERSION" <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    ok = version("cmake") == sys.argv[1] and version("ninja") == sys.argv[2]
except PackageNotFoundError:
    ok = False
sys.exit(0 if ok else 1)
EOF
}
if ! have_tools; then
    log "installing cmake==$CMAKE_VERSION ninja==$NINJA_VERSION into the venv"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
        "cmake==$CMAKE_VERSION" "ninja==$NINJA_VERSION"
fi
export PATH="$VENV/bin:$PATH"

# --- 2. the llama-cpp-python sdist and its vendored llama.cpp ----------------
find_sdist() {
    local f
    for f in "$SRC/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" \
             "$SRC/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"; do
        [[ -f "$f" ]] && { printf '%s\n' "$f"; return 0; }
    done
    return 1
}
if [[ ! -f "$LLAMA_SRC/CMakeLists.txt" ]]; then
    if ! SDIST="$(find_sdist)"; then
        log "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
        # --no-binary for this package only: with ':all:' pip would also build its
        # build requirements (cmake, ninja, scikit-build-core) from source just to
        # read the sdist's metadata, which takes longer than llama.cpp itself.
        # llama-cpp-python has no wheels on PyPI, so this is the sdist either way.
        "$VENV/bin/python" -m pip download --disable-pip-version-check -q \
            --no-deps --no-binary llama-cpp-python \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$SRC"
        SDIST="$(find_sdist)"
    fi
    log "checking $SDIST"
    echo "$LLAMA_CPP_PYTHON_SHA256  $SDIST" | sha256sum -c --quiet -
    log "extracting $SDIST"
    tmp="$(mktemp -d "$SRC/extract.XXXXXX")"
    tar -xzf "$SDIST" -C "$tmp"
    rm -rf "$SDIST_DIR"
    mv "$tmp/$(basename "$SDIST_DIR")" "$SDIST_DIR"
    rmdir "$tmp"
fi
if [[ ! -f "$LLAMA_SRC/CMakeLists.txt" ]]; then
    # Fall back to looking for it, should the sdist's layout change.
    LLAMA_SRC="$(find "$SDIST_DIR" -maxdepth 3 -type d -path '*/vendor/llama.cpp' | head -n1)"
    [[ -n "$LLAMA_SRC" && -f "$LLAMA_SRC/CMakeLists.txt" ]] \
        || { log "no vendor/llama.cpp in $SDIST_DIR"; exit 1; }
fi
if head="$(git -C "$LLAMA_SRC" rev-parse HEAD 2>/dev/null)"; then
    [[ "$head" == "$LLAMA_CPP_COMMIT" ]] \
        || log "note: vendored llama.cpp is at $head, not $LLAMA_CPP_COMMIT"
fi
log "llama.cpp source: $LLAMA_SRC"

# --- 3. configure and build ------------------------------------------------
# A build tree configured from another source directory (another pinned
# version) cannot be reused by cmake.
if [[ -f "$BUILD/CMakeCache.txt" ]] \
    && ! grep -qxF "CMAKE_HOME_DIRECTORY:INTERNAL=$LLAMA_SRC" "$BUILD/CMakeCache.txt"; then
    log "removing the build tree of another source ($BUILD)"
    rm -rf "$BUILD"
fi
log "configuring (OpenMP $OPENMP) in $BUILD"
nice -n 19 cmake -S "$LLAMA_SRC" -B "$BUILD" \
    -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" "${CMAKE_FLAGS[@]}"

log "building ${TARGETS[*]} with ninja -j $JOBS"
(cd "$BUILD" && nice -n 19 ninja -j "$JOBS" "${TARGETS[@]}")

for t in "${TARGETS[@]}"; do
    [[ -x "$BIN/$t" ]] || { log "missing $BIN/$t after the build"; exit 1; }
done
printf '%s\n' "$STAMP" >"$STAMP_FILE"

# --- 4. keep the disk from filling ---------------------------------------------
# The binaries are statically linked, so the object files and the extracted
# tree are only needed for a rebuild; drop them when less than 10 GB is free.
avail_kb="$(df -Pk "$ROOT" | awk 'NR==2 {print $4}')"
if (( avail_kb < 10 * 1024 * 1024 )); then
    log "less than 10 GB free: removing object files and the extracted source"
    find "$BUILD" \( -name '*.o' -o -name '*.a' \) -type f -delete
    rm -rf "$SDIST_DIR"
fi

print_bins
