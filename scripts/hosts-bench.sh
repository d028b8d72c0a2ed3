#!/usr/bin/env bash
# Training speed against link bandwidth, over three hosts made of network namespaces on
# this machine (as tests/hosts.rs makes them): the coordinator in host 0, workers w1 and w2
# in hosts 1 and 2, each host's outgoing link shaped with tc's tbf to each RATE in turn.
# For mlp predsim and vgg8b predsim (Fashion-MNIST) it prints images/s of the second epoch
# (the first warms up) and the bytes each host received per image, read off its
# interface's counters (activations into its stages, credits and reports; with sealing).
# Needs root, and a release binary. Prints figures; asserts nothing.
#   sudo scripts/hosts-bench.sh                 # rates 10gbit 1gbit 100mbit 10mbit
#   sudo RATES="1gbit 10mbit" scripts/hosts-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-$PWD/target/release/layerwise}
RATES=${RATES:-10gbit 1gbit 100mbit 10mbit}
[ -x "$BIN" ] || { echo "hosts-bench: no $BIN (cargo build --release -p layerwise)" >&2; exit 1; }
P=lwbench$$
WORK=$(mktemp -d)
export LAYERWISE_SECRET=$(head -c 24 /dev/urandom | base64)

cleanup() {
    for n in 0 1 2 sw; do ip netns del "$P-$n" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$P-sw"
ip -n "$P-sw" link add br0 type bridge
ip -n "$P-sw" link set br0 up
for i in 0 1 2; do
    ip netns add "$P-$i"
    ip -n "$P-$i" link add eth0 type veth peer name "p$i" netns "$P-sw"
    ip -n "$P-$i" addr add "10.77.0.$((i + 1))/24" dev eth0
    ip -n "$P-$i" link set eth0 up
    ip -n "$P-$i" link set lo up
    ip -n "$P-sw" link set "p$i" master br0
    ip -n "$P-sw" link set "p$i" up
done

rx() { ip netns exec "$P-$1" cat /sys/class/net/eth0/statistics/rx_bytes; }

# One run: NAME CONFIG STEPS BATCH PLACEMENT; prints images/s and bytes per image per host.
run() {
    local name=$1 config=$2 steps=$3 batch=$4 placement=$5 dir="$WORK/$1-$RATE"
    local before=($(rx 0) $(rx 1) $(rx 2))
    ip netns exec "$P-0" "$BIN" train "$config" --run-dir "$dir" --listen 0.0.0.0:0 \
        --set train.epochs=2 --set "train.steps_per_epoch=$steps" --set "train.batch_size=$batch" \
        --set train.eval_batches=1 --set "train.eval_batch_size=$batch" --set checkpoint.every_epochs=0 \
        --set "pipeline.placement=$placement" >/dev/null 2>"$dir.log" &
    local coordinator=$!
    until [ -s "$dir/coordinator.addr" ]; do sleep 0.1; done
    local addr="10.77.0.1:$(sed 's/.*://' "$dir/coordinator.addr")"
    for i in 1 2; do
        ip netns exec "$P-$i" "$BIN" worker --coordinator "$addr" --name "w$i" --once 2>"$dir.w$i.log" &
    done
    wait
    local images=$((2 * (steps + 1) * batch))
    local after=($(rx 0) $(rx 1) $(rx 2))
    python3 - "$dir/metrics.jsonl" "$name" "$RATE" "$images" "${before[@]}" "${after[@]}" <<'EOF'
import json, sys
path, name, rate, images = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
before, after = list(map(int, sys.argv[5:8])), list(map(int, sys.argv[8:11]))
last = [json.loads(l) for l in open(path)][-1]
per = [(a - b) / images for a, b in zip(after, before)]
print(f"{rate:>8} {name:<14} {last['images_per_sec']:>8.0f} images/s   bytes/image received: "
      + "  ".join(f"host{i} {p:,.0f}" for i, p in enumerate(per)))
EOF
}

FMNIST=/usr/share/datasets/fashion-mnist
MLP='[{"layers":[0,1],"device":"cpu"},{"layers":[2],"device":"w1/cpu"},{"layers":[3],"device":"w2/cpu"}]'
VGG='[{"layers":[0,1,2],"device":"cpu"},{"layers":[3,4],"device":"w1/cpu"},{"layers":[5,6,7],"device":"w2/cpu"}]'
echo "hosts-bench $(date -u +%F), $(nproc) cores; three hosts, the coordinator's stage in host 0"
for RATE in $RATES; do
    burst=$(python3 -c "
import re, sys
r = sys.argv[1]; n, u = re.fullmatch(r'(\d+)(gbit|mbit|kbit)', r).groups()
bits = int(n) * {'gbit': 1e9, 'mbit': 1e6, 'kbit': 1e3}[u]
print(max(int(bits / 8 / 100), 65536))" "$RATE")
    for i in 0 1 2; do
        ip netns exec "$P-$i" tc qdisc replace dev eth0 root tbf rate "$RATE" burst "$burst" latency 100ms
    done
    run mlp-predsim configs/fashion-mnist-mlp-predsim.json 60 128 "$MLP"
    run vgg8b-predsim configs/fashion-mnist-vgg8b-predsim.json 4 32 "$VGG"
done
