#!/usr/bin/env bash
# Set up (torch, Fashion-MNIST) where missing, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo test --workspace --all-targets "$@"
