#!/usr/bin/env bash
# The preference-stage set-ups measured for docs/learning.md, in the order they were run, one at a
# time (2 shared CPU cores). Every setting is spelled out, so the lines do not depend on the demo's
# current defaults. Results: experiments/pref_sweep.jsonl (its "settings" field lists the settings
# that differed from the defaults of that time: warm-up 150 steps, 4 samples per image,
# 60 preference steps at lr 1e-3, LoRA rank 16 on the language model only).
set -e
cd "$(dirname "$0")/.."
P=".venv/bin/python experiments/pref_sweep.py"
OLD="--set samples_per_image=4 --set pref_steps=60 --set pref_lr=1e-3 --set lora_vision=frozen"
C='{"name":"sft-on-chosen","algo":"sft"}'
D='{"name":"dpop","algo":"dpo","loss":{"name":"dpop","beta":0.1,"dpop_lambda":50.0}}'
R='{"name":"rpo","algo":"dpo","loss":{"name":"dpo","beta":0.1,"sft_weight":1.0}}'
G='{"name":"grpo","algo":"grpo","steps":40,"batch_size":8,"grpo":{"group_size":8,"temperature":1.0,"max_new_tokens":32,"beta":0.04,"rewards":[{"name":"count_exact"},{"name":"count_partial"},{"name":"count_format","weight":0.1}]}}'

# warm-up length (the 150-step warm-up is the one of demo_default_w150.log)
$P --name control $OLD --set warmup_steps=300 --method "$C"
$P --name control $OLD --set warmup_steps=600 --method "$C"
$P --name dpop $OLD --set warmup_steps=600 --method "$D"
# LoRA in the vision tower, lr 3e-3
V="$OLD --set warmup_steps=600 --set lora_vision=lora --set pref_lr=3e-3"
$P --name dpop-vis-lr3e-3 $V --method "$D"
$P --name control-vis-lr3e-3 $V --method "$C"
$P --name dpop-vis-lr3e-3-k8 $V --set samples_per_image=8 --method "$D"
$P --name rpo-vis-lr3e-3 $V --method "$R"
# longer preference stage
$P --name dpop-vis-lr3e-3-s200 $V --set pref_steps=200 --method "$D"
$P --name control-vis-lr3e-3-s200 $V --set pref_steps=200 --method "$C"
$P --name dpop-vis-lr3e-3-s400 $V --set pref_steps=400 --method "$D"
# two answers per image (a pairwise rater)
$P --name dpop-vis-lr3e-3-s200-k2 $V --set pref_steps=200 --set samples_per_image=2 --method "$D"
$P --name control-vis-lr3e-3-s200-k2 $V --set pref_steps=200 --set samples_per_image=2 --method "$C"
# GRPO on every preference image, reward = exact + partial + 0.1 format, KL beta 0.04
$P --name grpo-vis-lr3e-3-s40-b0.04 $V --method "$G"
# after the thread fix (OMP_NUM_THREADS=1 on the shared cores), on the same warm-up
export OMP_NUM_THREADS=1
K="--set warmup_steps=600 --set lora_vision=lora --set pref_steps=200 --set samples_per_image=2"
$P --name dpop-k2-merger $K --set pref_lr=3e-3 --set lora_merger=true --method "$D"
$P --name control-k2-merger $K --set pref_lr=3e-3 --set lora_merger=true --method "$C"
$P --name dpop-k2-lr1e-2 $K --set pref_lr=1e-2 --method "$D"
$P --name control-k2-lr1e-2 $K --set pref_lr=1e-2 --method "$C"
$P --name grpo-s200-b0.04 $K --set pref_lr=3e-3 --method "${G/\"steps\":40/\"steps\":200}"
# the shipped set-up on a second seed (other scenes, other warm-up)
$P --name dpop-k2-seed1 --set seed=1 $K --set pref_lr=3e-3 --method "$D"
$P --name control-k2-seed1 --set seed=1 $K --set pref_lr=3e-3 --method "$C"
# the warm-up also trains the vision tower and merger (full fine-tuning), fewer warm-up steps
$P --name dpop-k2-wvis400 $K --set warmup_vision=true --set warmup_steps=400 --set pref_lr=3e-3 --method "$D"
$P --name control-k2-wvis400 $K --set warmup_vision=true --set warmup_steps=400 --set pref_lr=3e-3 --method "$C"
# GRPO: larger groups and hotter sampling; Dr. GRPO (no std scaling, no KL) with the partial reward only
$P --name grpo-s200-g16-t1.2 $K --set pref_lr=3e-3 --method '{"name":"grpo","algo":"grpo","steps":200,"batch_size":8,"grpo":{"group_size":16,"temperature":1.2,"max_new_tokens":32,"beta":0.04,"rewards":[{"name":"count_exact"},{"name":"count_partial"},{"name":"count_format","weight":0.1}]}}'
$P --name grpo-s200-drgrpo-partial $K --set pref_lr=3e-3 --method '{"name":"grpo","algo":"grpo","steps":200,"batch_size":8,"grpo":{"group_size":8,"temperature":1.0,"max_new_tokens":32,"beta":0.0,"scale_rewards":"none","rewards":[{"name":"count_partial"}]}}'
$P --name grpo-s400-g16-t1.2 $K --set pref_lr=3e-3 --method '{"name":"grpo","algo":"grpo","steps":400,"batch_size":8,"grpo":{"group_size":16,"temperature":1.2,"max_new_tokens":32,"beta":0.04,"rewards":[{"name":"count_exact"},{"name":"count_partial"},{"name":"count_format","weight":0.1}]}}'
$P --name grpo-s800-g16-t1.2 $K --set pref_lr=3e-3 --method '{"name":"grpo","algo":"grpo","steps":800,"batch_size":8,"grpo":{"group_size":16,"temperature":1.2,"max_new_tokens":32,"beta":0.04,"rewards":[{"name":"count_exact"},{"name":"count_partial"},{"name":"count_format","weight":0.1}]}}'
