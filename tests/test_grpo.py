"""GRPO on tiny real-architecture models: the group forward against a plain one, no-signal groups,
suppressed vision tokens, rewards by name or path, task-generic rewards, the clipped ratio over
several updates of one generation, and a short run in which the reward rises."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from vlmtune.data.formats import read_records
from vlmtune.data.records import PreferenceRecord, user_prompt
from vlmtune.errors import VlmtuneError
from vlmtune.forward.group import build_group_batch, group_logps
from vlmtune.forward.plain import sequence_logps
from vlmtune.generate import encode_prompts, stop_token_ids, vision_token_ids
from vlmtune.models.load import add_lora, load_model
from vlmtune.tasks.counting import CountingTask
from vlmtune.train.grpo import GrpoConfig, GrpoStep, resolve_reward, score


def length_reward(completions, **kwargs) -> list[float]:
    """Varies in an untrained model's samples, so every group has a gradient."""
    return [float(len(c)) for c in completions]


def live_lora(model, seed=0):
    """A LoRA adapter whose B is not zero, so its gradients reach A too."""
    model = add_lora(random_weights(model, seed), rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def random_weights(model, seed=0):
    """Larger random weights than the init, so log-probs depend on image and prompt."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1 if "visual" in name else 0.3)
    return model


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tmp_path_factory):
    """Qwen3-VL feeds the image features to several layers (deepstack): the group forward must too."""
    from vlmtune.models.tiny import build_tiny

    return build_tiny("qwen3-vl", tmp_path_factory.mktemp("tiny-qwen3-vl"), size="tiny", seed=0)


@pytest.fixture(scope="module")
def image_records(tmp_path_factory):
    """Images of different sizes (different numbers of image tokens) and one two-image prompt."""
    folder = tmp_path_factory.mktemp("grpo-images")
    torch.manual_seed(0)
    paths = []
    for i, size in enumerate([(112, 112), (168, 84), (84, 140)]):
        path = folder / f"im{i}.png"
        Image.fromarray((torch.rand(size[1], size[0], 3) * 255).to(torch.uint8).numpy()).save(path)
        paths.append(str(path))
    counts = {"car": 2, "bus": 0}
    return [
        PreferenceRecord("a", [paths[0]], user_prompt("Count the cars."), "", "", {"counts": counts}),
        PreferenceRecord(
            "b", paths[1:], user_prompt("Count the cars and buses in both.", 2), "", "", {"counts": counts}
        ),
        PreferenceRecord("c", [paths[2]], user_prompt("How many?"), "", "", {"counts": counts}),
    ]


def plain_token_logps(model, prompts, completions, group_size):
    """One completion at a time, unpadded, images from pixel_values: per-token log-probs and their sum."""
    patches = [int(g.prod()) for g in prompts["image_grid_thw"]]
    pixel_chunks = torch.split(prompts["pixel_values"], patches)
    per_prompt = []  # image indices of each prompt, in order
    start = 0
    for row in range(prompts["input_ids"].shape[0]):
        n = int((prompts["input_ids"][row] == model.config.vision_start_token_id).sum())
        per_prompt.append(list(range(start, start + n)))
        start += n
    out = []
    for r, completion in enumerate(completions):
        i = r // group_size
        keep = prompts["attention_mask"][i].bool()
        ids = torch.cat([prompts["input_ids"][i][keep], torch.tensor(completion)]).unsqueeze(0)
        p = int(keep.sum())
        labels = ids.clone()
        labels[0, :p] = -100
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": torch.cat(
                [prompts["mm_token_type_ids"][i][keep], torch.zeros(len(completion), dtype=torch.long)]
            ).unsqueeze(0),
            "pixel_values": torch.cat([pixel_chunks[j] for j in per_prompt[i]]),
            "image_grid_thw": prompts["image_grid_thw"][per_prompt[i]],
            "labels": labels,
        }
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits[0, p - 1 : -1]
        per_token = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
        total, _ = sequence_logps(model, inputs)
        out.append((per_token, total[0]))
    return out


def left_padded_prompts(records, processor):
    return encode_prompts([(r.images, r.prompt) for r in records], processor)


@pytest.mark.parametrize(
    "family_dir,attention", [("tiny_model_dir", "sdpa"), ("tiny_qwen25_dir", "eager"), ("tiny_qwen3_dir", "sdpa")]
)
@pytest.mark.parametrize("shared_prompt", [True, False])
def test_group_forward_equals_plain_per_sequence(request, image_records, family_dir, attention, shared_prompt):
    model, processor = load_model(request.getfixturevalue(family_dir), attn_implementation=attention)
    model = random_weights(model).eval()
    prompts = left_padded_prompts(image_records, processor)
    assert prompts["attention_mask"].min() == 0  # the prompts really are padded
    g = 3
    gen = torch.Generator().manual_seed(1)
    stop = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    completions = []
    for r in range(len(image_records) * g):
        n = int(torch.randint(1, 8, (1,), generator=gen))
        ids = torch.randint(20, 300, (n,), generator=gen).tolist()
        completions.append(ids + [stop] if r % 2 else ids)
    batch = build_group_batch(prompts, completions, g, [r.image_slots() for r in image_records],
                              processor.tokenizer.pad_token_id, vision_token_ids(model, processor))
    with torch.no_grad():
        logps, entropy = group_logps(model, batch, shared_prompt=shared_prompt)
        expected = plain_token_logps(model, prompts, completions, g)
    for r, (per_token, total) in enumerate(expected):
        n = len(completions[r])
        torch.testing.assert_close(logps[r, :n], per_token, atol=1e-5, rtol=0)
        torch.testing.assert_close(logps[r, :n].sum(), total, atol=1e-4, rtol=0)
        assert batch.completion_mask[r].sum() == n
    assert (entropy[batch.completion_mask.bool()] > 0).all()


def test_image_encoded_once_per_group(tiny_model_dir, image_records):
    model, processor = load_model(tiny_model_dir)
    prompts = left_padded_prompts(image_records, processor)
    batch = build_group_batch(prompts, [[30, 31]] * 12, 4, [1, 2, 1], processor.tokenizer.pad_token_id, [])
    seen = []
    hook = model.model.visual.register_forward_hook(lambda module, args, kwargs_out: seen.append(args[0].shape[0]))
    try:
        for shared in (True, False):
            with torch.no_grad():
                group_logps(model, batch, shared_prompt=shared)
    finally:
        hook.remove()
    # One vision pass per forward, over each image's patches once (not once per completion).
    assert seen == [prompts["pixel_values"].shape[0]] * 2


def test_vision_tokens_in_a_completion_are_masked(tiny_model_dir, image_records):
    model, processor = load_model(tiny_model_dir)
    vision = vision_token_ids(model, processor)
    prompts = left_padded_prompts(image_records[:1], processor)
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    pad = processor.tokenizer.pad_token_id
    batch = build_group_batch(prompts, [[30, image_pad, 31], [30, 31]], 2, [1], pad, vision)
    assert batch.completion_mask.tolist() == [[1, 0, 1], [1, 1, 0]]
    assert batch.completion_attention.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert image_pad not in batch.completion_ids.tolist()[0]
    with torch.no_grad():  # the image-token count still matches the image
        logps, _ = group_logps(model, batch)
    assert torch.isfinite(logps).all()


def test_sampling_never_emits_vision_tokens(vision_biased_model, image_records):
    model, processor, banned, _ = vision_biased_model
    step = GrpoStep(model, processor, GrpoConfig(group_size=3, max_new_tokens=5, temperature=2.0))
    torch.manual_seed(0)
    batch = step.encode(image_records[:2])
    attended = batch.group.completion_ids[batch.group.completion_attention.bool()]
    assert not set(attended.tolist()) & set(banned)
    assert batch.metrics["vision_tokens_masked"] == 0
    loss, metrics = step.loss_and_metrics(batch)  # the update pass sees the right image-token count
    assert torch.isfinite(loss)


def test_completions_end_at_their_stop_token(tiny_model_dir, image_records):
    model, processor = load_model(tiny_model_dir)
    random_weights(model, seed=3)
    stop = stop_token_ids(model, processor)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # make stopping likely but not certain
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
        model.lm_head.bias[im_end] = 4.0
    config = GrpoConfig(group_size=4, max_new_tokens=6)
    step = GrpoStep(model, processor, config)
    torch.manual_seed(0)
    batch = step.encode(image_records[:2])
    lengths = batch.group.completion_attention.sum(1).tolist()
    rows = batch.group.completion_ids.tolist()
    stopped = 0
    for row, n in zip(rows, lengths):
        body = row[:n]
        assert not set(body[:-1]) & stop  # nothing after a stop token is kept
        if body[-1] in stop:
            stopped += 1
        else:
            assert n == config.max_new_tokens  # ran out of budget: kept as it is
    assert 0 < stopped < len(rows)
    assert batch.metrics["completions/clipped_ratio"] == pytest.approx(1 - stopped / len(rows))
    assert batch.metrics["completion_length"] == pytest.approx(sum(lengths) / len(lengths))


def test_a_sampler_replaces_generation(tiny_model_dir, image_records):
    """The ``sampler`` hook gets the records and their left-padded prompts; its token ids are scored as given."""
    model, processor = load_model(tiny_model_dir)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    seen = []

    def sampler(records, prompts):
        seen.append(([r.id for r in records], prompts["attention_mask"][:, 0].tolist()))
        return [[30, 31, im_end], [32]] * len(records)

    step = GrpoStep(model, processor, GrpoConfig(group_size=2, max_new_tokens=3), sampler=sampler)
    batch = step.encode(image_records[:2])
    assert seen == [(["a", "b"], [0, 1])]  # the shorter prompt is padded on the left
    assert processor.tokenizer.padding_side == "right"  # and the shared tokenizer was not flipped for it
    pad = processor.tokenizer.pad_token_id
    assert batch.group.completion_ids.tolist() == [[30, 31, im_end], [32, pad, pad]] * 2
    assert batch.texts == [processor.tokenizer.decode([30, 31], skip_special_tokens=True).strip(),
                           processor.tokenizer.decode([32], skip_special_tokens=True).strip()] * 2
    assert batch.metrics["completions/clipped_ratio"] == 0.5  # [32] never stopped


def test_groups_with_equal_rewards_change_nothing(tiny_model_dir, image_records):
    model, processor = load_model(tiny_model_dir)
    model = add_lora(random_weights(model), rank=4, alpha=8)
    with torch.no_grad():  # LoRA's B starts at zero; make the adapter live so gradients reach A too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    # Two new tokens of a random model never say "2 cars, 0 buses": every reward is 0.
    step = GrpoStep(model, processor, GrpoConfig(group_size=4, max_new_tokens=2, rewards=["count_exact"]))
    torch.manual_seed(0)
    batch = step.encode(image_records)
    assert batch.metrics["frac_zero_std_groups"] == 1.0
    assert batch.advantages.abs().max() == 0
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss, _ = step.loss_and_metrics(batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.abs().max() == 0 for g in grads)
    optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[name]), name


def test_update_moves_logps_with_the_advantage_sign(tiny_model_dir, image_records):
    model, processor = load_model(tiny_model_dir)
    model = add_lora(random_weights(model), rank=4, alpha=8)
    step = GrpoStep(model, processor, GrpoConfig(group_size=4, max_new_tokens=4, beta=0.1))
    torch.manual_seed(0)
    batch = step.encode(image_records[:1])
    batch.advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    with torch.no_grad():
        before, _ = group_logps(model, batch.group)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(2):
        loss, metrics = step.loss_and_metrics(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after, _ = group_logps(model, batch.group)
    change = ((after - before) * batch.group.completion_mask).sum(1)
    assert (change * batch.advantages > 0).all(), change
    assert metrics["kl"] > 0  # the adapter moved away from the reference (adapter off)
    assert metrics["clip_fraction"] == 0  # one update per batch: the ratio is 1


def test_rewards_by_name_and_path_and_their_weighted_sum():
    label, function = resolve_reward("vlmtune.rewards:count_partial_reward")
    assert label == "count_partial_reward"
    rewards = [("count_exact", 1.0, resolve_reward("count_exact")[1]), (label, 0.5, function)]
    texts = ["There are 2 cars, 0 buses.", "There are 2 cars, 1 bus.", "no idea"]
    counts = [{"car": 2, "bus": 0}] * 3
    total, per_function = score(rewards, texts, {"counts": counts})
    assert per_function["count_exact"].tolist() == [1.0, 0.0, 0.0]
    assert per_function["count_partial_reward"].tolist() == [1.0, 0.5, 0.0]
    assert total.tolist() == [1.5, 0.25, 0.0]
    for bad in ("count_everything", "vlmtune.nowhere:f", "vlmtune.rewards:nothing"):
        with pytest.raises(VlmtuneError, match="reward"):
            resolve_reward(bad)
    with pytest.raises(VlmtuneError, match="one finite number per completion"):
        score([("short", 1.0, lambda completions, **kw: [1.0])], texts, {"counts": counts})


def test_config_section():
    config = GrpoConfig.model_validate(
        {"rewards": ["count_exact", {"name": "count_format", "weight": 0.1}], "scale_rewards": "none"}
    )
    assert [(r.name, r.weight) for r in config.rewards] == [("count_exact", 1.0), ("count_format", 0.1)]
    for bad in ({"group_size": 1}, {"num_iterations": 0}, {"normalize": "tokens"}, {"temprature": 1.0},
                {"rewards": []}, {"backend": "vllm"}):
        with pytest.raises(ValueError):
            GrpoConfig.model_validate(bad)


def test_records_without_a_task_are_refused(tiny_model_dir, image_records):
    model, processor = load_model(tiny_model_dir)
    step = GrpoStep(model, processor, GrpoConfig(group_size=2, max_new_tokens=2))
    with pytest.raises(VlmtuneError, match="record a: .*metadata.counts"):
        step.encode([replace(image_records[0], metadata={})])


def test_reward_rises_in_a_short_run(tiny_model_dir, synth_pairs_file):
    """SFT the tiny model briefly (full weights), then GRPO with a LoRA adapter on the format reward."""
    from vlmtune.train.steps import SftStep

    task = CountingTask(("car",))
    records = []
    for r in read_records(synth_pairs_file)[:2]:
        counts = {"car": r.metadata["counts"]["car"]}
        records.append(replace(r, chosen=task.render(counts), metadata={**r.metadata, "counts": counts}))
    torch.manual_seed(0)
    model, processor = load_model(tiny_model_dir)
    sft = SftStep(model, processor, max_length=256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(25):
        loss, _ = sft.loss_and_metrics(sft.encode(records))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    model = add_lora(model, rank=16, alpha=32)
    torch.manual_seed(1)
    config = GrpoConfig(group_size=16, max_new_tokens=10, rewards=["count_format"])
    step = GrpoStep(model, processor, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    rewards = []
    for i in range(12):
        batch = step.encode(records, seed=i)
        loss, metrics = step.loss_and_metrics(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rewards.append(metrics["reward"])
        # em_rate is the count task's accuracy: today's exact match, computed here the old way
        gold = [r.metadata["counts"] for r in records for _ in range(config.group_size)]
        old_way = [task.score(task.parse(text), counts).exact for text, counts in zip(batch.texts, gold)]
        assert metrics["em_rate"] == pytest.approx(sum(old_way) / len(old_way))
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.05, rewards


def test_first_update_has_ratio_1_and_later_updates_clip(tiny_model_dir, image_records):
    """num_iterations 3: update 1 uses the current log-probs detached (ratio exactly 1); update 2 uses
    the sampler's, and its loss and clip shares equal PPO's formula computed plainly here."""
    model, processor = load_model(tiny_model_dir)
    model = live_lora(model)
    config = GrpoConfig(group_size=4, max_new_tokens=5, num_iterations=3, clip_eps=0.2, clip_eps_high=0.3,
                        rewards=["test_grpo:length_reward"])
    step = GrpoStep(model, processor, config)
    generation = step.generate(image_records[:2], seed=0)
    assert generation.advantages.abs().max() > 0
    (first,) = step.micro_batches(generation, 1)
    assert first.old_logps is None
    with torch.no_grad():  # the sampler's log-probs are the update pass's at the sampling weights
        now, _ = group_logps(model, first.group)
    mask = first.group.completion_mask.bool()
    assert torch.allclose(generation.old_logps[:, : now.shape[1]][mask], now[mask], atol=1e-5)

    loss, metrics = step.loss_and_metrics(first)
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_fraction"] == 0.0
    loss.backward()
    with torch.no_grad():  # one large plain step: the ratio leaves [0.8, 1.3] on some tokens
        for p in model.parameters():
            if p.grad is not None:
                p -= 20.0 * p.grad
                p.grad = None

    generation.updates = 1
    (second,) = step.micro_batches(generation, 1)
    assert torch.equal(second.old_logps, generation.old_logps[:, : second.group.completion_ids.shape[1]])
    loss, metrics = step.loss_and_metrics(second)
    with torch.no_grad():
        logps, _ = group_logps(model, second.group)
    ratio = torch.exp(logps - second.old_logps)[mask]
    adv = second.advantages[:, None].expand_as(logps)[mask]
    low = (ratio < 0.8) & (adv < 0)
    high = (ratio > 1.3) & (adv > 0)
    expected = -torch.min(ratio * adv, ratio.clamp(0.8, 1.3) * adv).sum() / mask.sum()
    assert low.any() or high.any()
    assert metrics["clip_ratio/low_mean"] == pytest.approx(low.float().mean().item())
    assert metrics["clip_ratio/high_mean"] == pytest.approx(high.float().mean().item())
    assert metrics["clip_fraction"] == metrics["clip_ratio/region_mean"] == pytest.approx((low | high).float().mean().item())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_sampler_hook_without_logps_gets_them_from_one_pass(tiny_model_dir, image_records):
    model, processor = load_model(tiny_model_dir)
    model = random_weights(model)
    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = GrpoConfig(group_size=2, max_new_tokens=3, num_iterations=2, rewards=["test_grpo:length_reward"])
    step = GrpoStep(model, processor, config, sampler=lambda records, prompts: [[30, 31, im_end], [32]] * len(records))
    generation = step.generate(image_records[:2])
    (batch,) = step.micro_batches(generation, 1)
    with torch.no_grad():
        logps, _ = group_logps(model, batch.group)
    assert torch.allclose(generation.old_logps, logps, atol=1e-6)


def test_rewards_ask_the_records_task_and_get_images(tiny_model_dir, image_records):
    """A compare record (no counts): task_accuracy pays the right verdict, em_rate is its mean, and
    reward functions get the images column (what a judge needs)."""
    model, processor = load_model(tiny_model_dir)
    tokenizer = processor.tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    meta = {"task": {"family": "compare", "kind": "verdict", "answer": "more", "think": False}}
    record = replace(image_records[0], metadata=meta)
    answers = [tokenizer.encode("more") + [im_end], tokenizer.encode("fewer") + [im_end]]
    seen = {}

    def spy(completions, **columns):
        seen.update(columns)
        return [0.0] * len(completions)

    step = GrpoStep(model, processor, GrpoConfig(group_size=2, max_new_tokens=4, rewards=["task_accuracy"]),
                    sampler=lambda records, prompts: answers)
    step.rewards.append(("spy", 1.0, spy))
    batch = step.encode([record])
    assert batch.rewards.tolist() == [1.0, 0.0]
    assert batch.metrics["em_rate"] == 0.5 and batch.metrics["rewards/task_accuracy/mean"] == 0.5
    assert seen["images"] == [record.images] * 2 and seen["metadata"] == [meta] * 2
    assert seen["counts"] == [None, None]
