#!/usr/bin/env bash
# Set up what layerwise needs on this machine, once, and say what was done:
#   - PyTorch 2.11.0 (the libtorch that tch 0.24 is built for) in a venv kept in a
#     per-machine cache outside the clone, so fresh clones (CI) reuse it;
#   - Debian's Fashion-MNIST package (the demo's and the end-to-end tests' data);
#   - Debian's DejaVu fonts (the labels of `layerwise plot`);
#   - numpy and scipy beside torch (the readers' test fixtures); tensorboard,
#     prometheus_client and playwright beside them, with Debian's chromium (the checks of
#     the event files, /metrics and the dashboard).
# Source it (`. scripts/setup.sh`) to get the build environment exported; running it
# as a program just installs. The installing runs in a subshell with strict options, so
# that sourcing it leaves the caller's shell options alone.

LAYERWISE_CACHE="${LAYERWISE_CACHE:-$HOME/.cache/layerwise}"
LAYERWISE_TORCH_VERSION=2.11.0
LAYERWISE_TORCH_VENV="${LAYERWISE_TORCH_VENV:-$LAYERWISE_CACHE/torch-$LAYERWISE_TORCH_VERSION}"

(
    set -euo pipefail
    TORCH_VENV="$LAYERWISE_TORCH_VENV"
    TORCH_VERSION="$LAYERWISE_TORCH_VERSION"
    FASHION_DIR=/usr/share/datasets/fashion-mnist
    FONT=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf

    say() { echo "setup: $*" >&2; }

    apt_install() {
        local sudo=""
        [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
    }

    torch_ok() {
        [ -x "$TORCH_VENV/bin/python3" ] &&
            "$TORCH_VENV/bin/python3" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null
    }

    if torch_ok; then
        say "torch $TORCH_VERSION already in $TORCH_VENV"
    else
        say "installing torch $TORCH_VERSION into $TORCH_VENV (about 4.7 GB, once per machine)"
        mkdir -p "$(dirname "$TORCH_VENV")"
        rm -rf "$TORCH_VENV"
        python3 -m venv "$TORCH_VENV"
        "$TORCH_VENV/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
        torch_ok || { say "torch $TORCH_VERSION did not import from $TORCH_VENV"; exit 1; }
        say "installed torch $TORCH_VERSION"
    fi

    # Python packages beside torch, each checked by importing it: pip_package MODULES WHY
    # SIZE PINS... installs the pinned PINS where `import MODULES` fails.
    pip_package() {
        local modules=$1 why=$2 size=$3; shift 3
        if "$TORCH_VENV/bin/python3" -c "import $modules" 2>/dev/null; then
            say "$modules ($why) already in $TORCH_VENV"
        else
            say "installing $* ($size, $why) into $TORCH_VENV"
            "$TORCH_VENV/bin/pip" install --quiet --disable-pip-version-check "$@"
            say "installed $modules"
        fi
    }

    # numpy and scipy write the readers' test fixtures independently of layerwise's own
    # writers (scripts/reader_fixtures.py, tests/readers.rs); nothing else uses them.
    pip_package "numpy, scipy" "the readers' test fixtures" "about 60 MB" numpy==2.3.5 scipy==1.16.3

    # Pillow (torchvision's image library) decodes and resizes the images that the decoder's
    # test compares with (scripts/image_fixtures.py, tests/readers.rs).
    pip_package PIL "the image decoder's test fixtures" "about 5 MB" pillow==13.0.0

    # TensorBoard's own reader checks the event files layerwise writes
    # (scripts/tensorboard_check.py, tests/binary.rs); it is also what users open them with.
    pip_package tensorboard "the event files' check" "about 15 MB with its dependencies" tensorboard==2.20.0

    # The official Prometheus client's parser checks /metrics (scripts/metrics_check.py).
    pip_package prometheus_client "the /metrics check" "under 1 MB" prometheus_client==0.23.1

    # A real browser for the dashboard's test (scripts/dashboard_check.py): Debian's
    # chromium, driven by Playwright from PyPI (it downloads no browser of its own here).
    if command -v chromium >/dev/null 2>&1; then
        say "chromium (the dashboard's test) already installed"
    else
        say "installing Debian package chromium (the dashboard's browser test)"
        apt_install chromium
        say "installed chromium"
    fi
    pip_package playwright "drives chromium in the dashboard's test" "about 40 MB" playwright==1.49.1

    # CUDA headers that the torch wheel leaves out and c10d's headers need, for the NCCL
    # shim (crates/nccl): the versions of the wheel's CUDA runtime.
    CUDA_INCLUDE="$("$TORCH_VENV/bin/python3" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "include"))' 2>/dev/null || true)"
    if [ -z "$CUDA_INCLUDE" ] || [ ! -d "$CUDA_INCLUDE" ]; then
        say "no CUDA headers beside torch: NCCL links are built without"
    elif [ -f "$CUDA_INCLUDE/crt/host_config.h" ] && [ -d "$CUDA_INCLUDE/nv" ]; then
        say "CUDA headers for the NCCL shim already in $CUDA_INCLUDE"
    else
        say "installing nvidia-cuda-crt and nvidia-cuda-cccl headers (about 20 MB) into $TORCH_VENV"
        "$TORCH_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps \
            nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
        say "installed CUDA headers"
    fi

    if [ -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ] && [ -f "$FASHION_DIR/t10k-labels-idx1-ubyte.gz" ]; then
        say "Fashion-MNIST already in $FASHION_DIR"
    else
        say "installing Debian package dataset-fashion-mnist into $FASHION_DIR"
        apt_install dataset-fashion-mnist
        say "installed Fashion-MNIST"
    fi

    if [ -f "$FONT" ]; then
        say "plot font already in $FONT"
    else
        say "installing Debian package fonts-dejavu-core (labels of layerwise plot)"
        apt_install fonts-dejavu-core
        say "installed fonts-dejavu-core"
    fi
) || { echo "setup: failed" >&2; return 1 2>/dev/null || exit 1; }

# Build environment: torch-sys finds libtorch through this venv's python.
export LIBTORCH_USE_PYTORCH=1
export LAYERWISE_TORCH_VENV
export PATH="$LAYERWISE_TORCH_VENV/bin:$PATH"
# Test binaries of the library crates find libtorch through this; the `layerwise` binary
# itself carries an rpath and needs nothing (a test checks that with ldd).
LAYERWISE_TORCH_LIB="$("$LAYERWISE_TORCH_VENV/bin/python3" -W ignore -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$LAYERWISE_TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "setup: build environment: LIBTORCH_USE_PYTORCH=1, python3 = $LAYERWISE_TORCH_VENV/bin/python3" >&2
