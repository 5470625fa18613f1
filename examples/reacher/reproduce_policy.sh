#!/usr/bin/env bash
# Reproduce the shipped Reacher policy (streamtx/tasks/reacher/policy.pt) from scratch, then run the demo with it.
# Training takes about 7 minutes on one core of the 2-core dev machine; everything is seeded (data, initialization,
# batches, noise), so a rerun on the same machine and torch build retraces the same run.
set -euo pipefail
out=${1:-runs/reacher}
mkdir -p "$out"
streamtx collect --episodes 1000 --seed 0 --action-noise 0.1 --out "$out/demos.npz"
streamtx train "$out/demos.npz" --out "$out/policy.pt" --steps 6000 --batch-size 256 --dim 32 --layers 2 \
    --cond-layers 0 --heads 2 --action-horizon 8 --obs-horizon 2 --sampling-steps 5 --seed 0 --threads 1
streamtx demo --checkpoint "$out/policy.pt" --png "$out/demo.png"
