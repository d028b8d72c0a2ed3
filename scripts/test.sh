#!/usr/bin/env bash
# Set up (torch, Fashion-MNIST) where missing, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
# The goldens the tests hold layerwise to are what scripts/golden.py computes with this torch.
python3 scripts/golden.py --check
cargo test --workspace --all-targets "$@"
