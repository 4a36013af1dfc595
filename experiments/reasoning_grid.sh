#!/usr/bin/env bash
# The reasoning protocol from the one set-up whose warm-up (SFT on gold) learned something visual
# (docs/learning.md, "Why the ceiling did not learn"): grid layout, each class its own colour (no
# attribute questions), 3,000 scenes, a 1,500-step warm-up that also trains the vision tower and
# merger. Longer than the demo's 10 minutes with its evaluations, so it is a script, not the demo.
# First validation (reasoning_grid_val.log), then, once, the test split: the second command reuses
# the trained stages in OUT and only evaluates (reasoning_grid_test.log).
set -euo pipefail
OUT=${1:-/tmp/reasoning-grid}
SET=('families=["count","compare","arithmetic","spatial","multihop"]' 'warmup_families=["count","spatial","compare"]'
     warmup_vision=true n_scenes=3000 warmup_steps=1500 layout=grid attributes=false think=false)
python experiments/reasoning_sweep.py "$OUT" "${SET[@]}"
python experiments/reasoning_sweep.py "$OUT" "${SET[@]}" eval_split=test
