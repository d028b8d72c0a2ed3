#!/usr/bin/env bash
# Set up (torch, Fashion-MNIST) where missing, build, and train the demo: a predsim mlp,
# one pipeline stage per layer, one epoch on Fashion-MNIST; prints the test error.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release -p layerwise
./target/release/layerwise train configs/demo.json --run-dir "${RUN_DIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}" "$@"
