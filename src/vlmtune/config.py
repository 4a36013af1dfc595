"""The typed training configuration: a YAML file plus dotted overrides from the command line.

    vlmtune train --algo dpo --config configs/demo-cpu.yaml train.lr=1e-4 loss.name=dpop

Every section is a pydantic model that forbids unknown keys, so a typo is an error that names
the closest valid key instead of a setting silently ignored. ``load_config`` turns every
problem (missing file, bad YAML, unknown key, wrong type) into a ``VlmtuneError``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vlmtune.errors import VlmtuneError

LossName = Literal["dpo", "dpop", "ipo", "hinge", "robust", "simpo", "bco", "mpo"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The model to train and how it is loaded (``vlmtune.models.load.load_model``)."""

    name_or_path: str = Field(description="a model folder (config.json + model.safetensors) or a hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="weight dtype")
    attn_implementation: str | None = Field(
        default=None, description="transformers' attention implementation (sdpa, eager, flash_attention_2, ...); "
        "None: transformers' default. The fast pair and group forwards need sdpa or eager")
    min_pixels: int | None = Field(default=None, gt=0, description="smallest image area after resizing")
    max_pixels: int | None = Field(
        default=None, gt=0, description="largest image area after resizing: fewer image tokens, less memory")
    quantization: Literal["none", "4bit"] = Field(
        default="none", description="4bit: NF4 language model under LoRA adapters (QLoRA; bitsandbytes + CUDA)")
    loader: Literal["transformers", "unsloth"] = Field(
        default="transformers", description="how the weights are loaded: transformers, or unsloth "
        "(Unsloth's kernels; needs a CUDA device and the unsloth package; LoRA only)")

    @model_validator(mode="before")
    @classmethod
    def _no_remote_code_key(cls, data: Any) -> Any:
        """Remote code runs only on a command-line flag, never because a config file says so.

        ``trust_remote_code: false``, which configs saved by earlier versions hold, is dropped."""
        if isinstance(data, dict) and data.get("trust_remote_code") is False:
            data = {k: v for k, v in data.items() if k != "trust_remote_code"}
        if isinstance(data, dict) and "trust_remote_code" in data:
            raise ValueError(
                "model.trust_remote_code cannot be set in a config file (a config handed to you must not run "
                "code on your machine): remove it, and pass --trust-remote-code on the command line instead"
            )
        return data


class LoraConfig(_Section):
    """LoRA on the language model; ``enabled: false`` trains the weights themselves (full fine-tuning)."""

    enabled: bool = True
    rank: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] | None = None  # None: the language model's linear layers
    vision: Literal["frozen", "lora", "full"] = "frozen"
    merger: bool = False  # also train the vision-to-language projector


class DataConfig(_Section):
    train: Path
    eval: Path | None = None
    format: str | None = None  # None: detected from the file
    max_length: int = Field(default=1024, gt=0)
    skip_bad: bool = False
    # Vision outputs cached on disk per image across epochs (frozen vision tower and merger only).
    cache_vision: bool = False


class MpoWeights(_Section):
    """MPO's three weights (``loss.name=mpo``); the defaults are InternVL's."""

    preference: float = Field(default=0.8, ge=0.0, description="weight of the sigmoid DPO loss (which answer wins)")
    quality: float = Field(
        default=0.2, ge=0.0, description="weight of the BCO loss (is each answer good on its own)")
    generation: float = Field(
        default=1.0, ge=0.0, description="weight of the chosen answer's mean token NLL (the SFT term)")


class LossConfig(_Section):
    """The preference loss of ``--algo dpo`` (see ``vlmtune.losses.preference``); ``--algo kto`` reads
    ``beta`` and the ``kto_*`` weights (see ``vlmtune.losses.unpaired``)."""

    name: LossName = Field(
        default="dpo", description="the loss of --algo dpo: " + ", ".join(LossName.__args__)
        + " (--algo kto always trains with KTO)")
    beta: float = Field(
        default=0.1, gt=0,
        description="scale of the implicit reward β·(log π − log π_ref) (SimPO: of the mean log-prob)")
    kto_desirable_weight: float = Field(
        default=1.0, gt=0, description="--algo kto: weight λ_D of the desirable answers' losses; with unequal "
        "counts the KTO paper suggests λ_D·n_D / (λ_U·n_U) between 1 and 4/3")
    kto_undesirable_weight: float = Field(
        default=1.0, gt=0, description="--algo kto: weight λ_U of the undesirable answers' losses")
    label_smoothing: float = Field(
        default=0.0, ge=0.0, lt=0.5, description="dpo (cDPO), robust, simpo: probability that a label is flipped")
    dpop_lambda: float = Field(
        default=50.0, ge=0.0, description="dpop: weight of the penalty on a falling chosen answer")
    simpo_gamma: float = Field(default=0.5, ge=0.0, description="simpo: target reward margin γ")
    sft_weight: float = Field(
        default=0.0, ge=0.0, description="RPO: adds sft_weight × the chosen answer's mean token NLL to the loss "
        "(not with mpo, which has loss.mpo_weights.generation)")
    reference_free: bool = Field(
        default=False, description="reference log-probs set to 0 (no reference model; not for dpop, bco, mpo)")
    mpo_weights: MpoWeights = Field(
        default_factory=MpoWeights, description="mpo: weights of its preference, quality and generation losses")
    bco_reward_shift: Literal["none", "running"] = Field(
        default="none", description="bco, mpo: BCO's reward shift δ. none: δ = 0, as TRL 1.16's bco_pair; "
        "running: the mean over training of each batch's mean reward, as in the BCO paper and InternVL's MPO "
        "(kept per process and in memory: a resumed run starts it again from 0)")

    def keys_read(self, algo: str = "dpo") -> tuple[str, ...]:
        """The ``loss.*`` keys that ``algo``'s loss reads (this section holds every loss's keys)."""
        if algo == "kto":
            return ("beta", "kto_desirable_weight", "kto_undesirable_weight")
        common = ("name", "beta") + (() if self.name == "mpo" else ("sft_weight",))
        common += () if self.name in ("dpop", "bco", "mpo") else ("reference_free",)
        own = {"dpo": ("label_smoothing",), "robust": ("label_smoothing",),
               "simpo": ("label_smoothing", "simpo_gamma"), "dpop": ("dpop_lambda",),
               "bco": ("bco_reward_shift",), "mpo": ("mpo_weights", "bco_reward_shift")}
        return common + own.get(self.name, ())

    @field_validator("name", mode="before")
    @classmethod
    def _kto_is_an_algo(cls, value: Any) -> Any:
        """KTO trains on records with one answer, so it is ``--algo kto``, not a pair loss."""
        if value == "kto":
            raise ValueError("kto trains on records with a single answer marked desirable or not: use "
                             "`train --algo kto` (it reads loss.beta, loss.kto_desirable_weight and "
                             "loss.kto_undesirable_weight) instead of loss.name=kto")
        return value

    def loss_params(self) -> dict[str, Any]:
        """The keyword parameters ``preference_loss`` takes for this loss name (bco's δ comes from the step)."""
        if self.name in ("dpo", "robust"):
            return {"label_smoothing": self.label_smoothing}
        if self.name == "dpop":
            return {"dpop_lambda": self.dpop_lambda}
        if self.name == "simpo":
            return {"gamma": self.simpo_gamma, "label_smoothing": self.label_smoothing}
        if self.name == "mpo":
            w = self.mpo_weights
            return {"weights": (w.preference, w.quality, w.generation)}
        return {}


class TrainConfig(_Section):
    algo: Literal["sft", "dpo", "grpo", "kto", "online_dpo", "rft", "iterative_dpo"] = Field(
        default="dpo", description="sft; dpo (offline pairs, the loss: section); kto (unpaired records, loss.beta and loss.kto_*); grpo; online_dpo (pairs from the "
        "policy's own samples, the online: and loss: sections); rft (SFT on the best of the policy's samples); "
        "iterative_dpo (online.rounds rounds of: label the policy's samples, train online.steps_per_round steps)")
    # dpo: the fast pair forward (image once, shared prompt; exact, falls back where unsupported)
    fast_path: bool = True
    # dpo: reference log-probs computed once before training and cached (keyed by model + data)
    precompute_ref: bool = False
    output_dir: Path = Path("runs/train")
    lr: float = Field(default=5e-6, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0)  # optimizer steps; overrides epochs
    batch_size: int = Field(default=1, gt=0)  # pairs (or sequences) per process per micro-batch
    grad_accum: int = Field(default=1, gt=0)
    warmup_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    log_every: int = Field(default=1, gt=0)
    eval_every: int | None = Field(default=None, gt=0)  # None: evaluate only at the end
    save_every: int | None = Field(default=None, gt=0)  # None: checkpoint only at the end
    keep_last: int = Field(default=2, gt=0)
    early_stopping_patience: int | None = Field(default=None, gt=0)  # evaluations without improvement
    resume: Literal["no", "auto"] = "no"
    progress: bool = True
    sample_every: int | None = Field(
        default=None, ge=0, description="every this many steps (and once at the end), write the model's greedy "
        "answers to train.sample_count held-out items to OUTPUT/samples.html and TensorBoard; 0 or null: off")
    sample_count: int = Field(
        default=8, gt=0, description="how many items train.sample_every shows: the first of data.eval, else of "
        "data.train, the same ones for the whole run")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default=["tensorboard"], description="where metrics go besides OUTPUT/metrics.jsonl: tensorboard "
        "(OUTPUT/tensorboard), wandb, mlflow (through accelerate's trackers; pip install 'vlmtune[trackers]'); "
        "[] for none")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # train.report_to=wandb on the command line


class RewardSpec(BaseModel):
    """One reward function and its weight in the sum: a built-in name or ``package.module:function``."""

    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = 1.0


class GrpoConfig(BaseModel):
    """The ``grpo:`` section (``--algo grpo``; see ``vlmtune.train.grpo``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    group_size: int = Field(default=8, ge=2)  # completions per prompt (G)
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=48, gt=0)
    beta: float = Field(default=0.0, ge=0)  # KL coefficient; 0: no reference pass
    clip_eps: float = Field(default=0.2, gt=0)
    clip_eps_high: float | None = Field(default=None, gt=0)  # DAPO's clip-higher; None: clip_eps
    scale_rewards: Literal["std", "none"] = "std"  # none: Dr. GRPO
    normalize: Literal["token", "sequence", "constant"] = "token"
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="task_accuracy"), RewardSpec(name="task_format")],
        min_length=1,
    )
    # Updates (optimizer steps) per batch of samples (GRPO's mu, TRL's num_iterations): > 1 makes the clip act.
    num_iterations: int = Field(default=1, ge=1)
    shared_prompt: bool = True  # one prompt | c1 | ... | cG row per group (eager/sdpa attention)

    @field_validator("rewards", mode="before")
    @classmethod
    def _names_as_specs(cls, value: Any) -> Any:
        """``rewards: [task_accuracy, {name: task_format, weight: 0.5}]``: a bare name has weight 1."""
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value


class OnlineConfig(_Section):
    """The ``online:`` section: ``--algo online_dpo`` and ``rft`` (``vlmtune.train.online``), ``iterative_dpo``
    (``vlmtune.train.iterative``)."""

    group_size: int = Field(default=4, ge=2, description="answers sampled per prompt (k)")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature")
    top_p: float = Field(default=1.0, gt=0, le=1, description="sampling nucleus (1: no truncation)")
    max_new_tokens: int = Field(default=48, gt=0, description="longest sampled answer, in tokens")
    pairs: Literal["best_worst", "all"] = Field(
        default="best_worst", description="online_dpo, iterative_dpo: best_worst, one pair per prompt (its best against its worst "
        "answer); all, every two answers whose rewards differ by more than online.margin, the better one chosen")
    margin: float = Field(
        default=0.0, ge=0.0, description="online_dpo, iterative_dpo: two answers whose rewards differ by at most this are a tie, "
        "dropped and counted in pairs/dropped_ties")
    rft_threshold: float | None = Field(
        default=None, description="rft: keep a prompt's best answer only if its reward is at least this; "
        "None: always keep it (top-1)")
    judge: Literal["reward", "http", "local"] = Field(
        default="reward", description="who scores the answers: reward (online.rewards, the record's task reward by "
        "default); http (an OpenAI-compatible VLM at online.judge_url); local (the model at online.judge_model)")
    judge_mode: Literal["score", "pairwise"] = Field(
        default="score", description="http and local judges: score (a rating per answer) or pairwise (every two "
        "answers of a prompt compared in both orders; an answer's reward is its wins minus its losses)")
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="vlmtune.tasks.rewards:task_accuracy_reward"),
                                 RewardSpec(name="vlmtune.tasks.rewards:task_format_reward")],
        min_length=1, description="judge=reward: the reward functions summed (names as in grpo.rewards)")
    judge_url: str | None = Field(default=None, description="judge=http: the endpoint's base URL (…/v1)")
    judge_model: str | None = Field(
        default=None, description="judge=http: the model name the endpoint serves; judge=local: the model folder")
    judge_key_env: str | None = Field(
        default=None, description="judge=http: the environment variable holding the API key (none: no key sent)")
    judge_cache: Path | None = Field(
        default=None, description="http and local judges: a folder where replies are kept by content hash")
    shared_prompt: bool = Field(
        default=True, description="score a prompt's k answers in one prompt | a1 | ... | ak row (eager or sdpa "
        "attention); false: one row per answer, the image still encoded once")
    rounds: int = Field(default=2, ge=1, description="iterative_dpo: how many rounds of label-then-train")
    steps_per_round: int = Field(default=10, gt=0, description="iterative_dpo: optimizer steps in each round")
    reference: Literal["initial", "previous"] = Field(
        default="initial", description="iterative_dpo: the reference of every round is the initial model (the "
        "previous round's adapter continues on it), or the previous round's policy (merged; a new adapter on it)")
    round_labels: dict[int, Path] = Field(
        default_factory=dict, description="iterative_dpo: {round: pair file} (e.g. what `vlmtune study export` "
        "writes): that round trains on the file's pairs instead of judging its own samples")

    @field_validator("rewards", mode="before")
    @classmethod
    def _names_as_specs(cls, value: Any) -> Any:
        return GrpoConfig._names_as_specs(value)

    @model_validator(mode="after")
    def _judge_settings(self) -> OnlineConfig:
        if self.judge == "http" and not (self.judge_url and self.judge_model):
            raise ValueError("online.judge=http needs online.judge_url and online.judge_model")
        if self.judge == "local" and not self.judge_model:
            raise ValueError("online.judge=local needs online.judge_model (the judge model's folder)")
        if self.judge == "reward" and self.judge_mode == "pairwise":
            raise ValueError("online.judge_mode=pairwise needs an http or local judge; a reward scores each answer")
        return self


class Config(_Section):
    model: ModelConfig
    lora: LoraConfig = LoraConfig()
    data: DataConfig
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    grpo: GrpoConfig = GrpoConfig()
    online: OnlineConfig = OnlineConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.train.algo in ("online_dpo", "iterative_dpo") and "name" not in self.loss.model_fields_set:
            self.loss.name = "dpop"  # the online methods' default loss, as issue 13 asks; an explicit loss.name wins
        iterative = self.train.algo == "iterative_dpo"
        if iterative and self.online.reference == "initial" and not self.lora.enabled and self.online.rounds > 1:
            raise ValueError("online.reference=initial continues the LoRA adapter from round to round on the initial "
                             "model: set lora.enabled=true, or online.reference=previous for full fine-tuning")
        late = [r for r in self.online.round_labels if not 0 <= r < self.online.rounds]
        if late:
            raise ValueError(f"online.round_labels names round(s) {late}, outside 0..{self.online.rounds - 1} "
                             "(rounds count from 0)")
        if self.train.early_stopping_patience and self.data.eval is None:
            raise ValueError("train.early_stopping_patience needs held-out data: set data.eval")
        if self.loss.reference_free and self.loss.name in ("dpop", "bco", "mpo"):
            raise ValueError(
                f"loss.reference_free cannot be used with {self.loss.name}: its "
                + ("penalty" if self.loss.name == "dpop" else "BCO term") + " is measured against the reference"
            )
        if self.train.algo == "kto":
            self._kto_consistent()
        if self.loss.name == "mpo" and self.loss.sft_weight > 0:
            raise ValueError("loss.sft_weight cannot be used with mpo: set its NLL weight with "
                             "loss.mpo_weights.generation instead")
        if self.data.cache_vision and (self.lora.vision != "frozen" or self.lora.merger):
            raise ValueError("data.cache_vision stores the vision tower's output, so it needs a frozen tower: "
                             "set lora.vision=frozen and lora.merger=false, or data.cache_vision=false")
        if self.model.quantization == "4bit" and not self.lora.enabled:
            raise ValueError("model.quantization=4bit (QLoRA) trains LoRA adapters only: set lora.enabled=true")
        return self

    def _kto_consistent(self) -> None:
        if self.train.batch_size < 2:
            raise ValueError("--algo kto estimates its reference point from each record's prompt paired with "
                             "another record's answer of the same micro-batch, so it needs train.batch_size "
                             "of 2 or more (the KTO paper and TRL advise an effective batch of 16 or more)")
        if self.loss.reference_free or self.loss.sft_weight > 0:
            raise ValueError("--algo kto measures every answer against the reference and has no SFT term: "
                             "set loss.reference_free=false and loss.sft_weight=0")


def load_config(path: str | Path, overrides: list[str] | None = None, algo: str | None = None) -> Config:
    """Read ``path`` (YAML), apply ``key.sub=value`` overrides and ``--algo``, and validate."""
    from vlmtune.data.text_files import read_yaml

    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise VlmtuneError(f"config file {path} does not exist")
    # Names the file and what is wrong: a looping link, a folder, the byte offset of bad UTF-8, bad YAML.
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict):
        raise VlmtuneError(f"{path}: the config must be a mapping of sections (model:, data:, train:, ...)")
    for item in overrides or []:
        apply_override(raw, item)
    if algo is not None:
        raw.setdefault("train", {})["algo"] = algo
    return validate_config(raw, source=str(path))


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in the nested dict ``raw``; the value is read as YAML (numbers, bools, lists)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise VlmtuneError(f"override {item!r} is not of the form section.key=value (e.g. train.lr=1e-5)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise VlmtuneError(f"override {item!r}: the value is not valid YAML: {e}") from e
    node = raw
    *parents, last = key.strip().split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise VlmtuneError(f"override {item!r}: {part} is a value, not a section")
        node = child
    node[last] = value


def validate_config(raw: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise VlmtuneError(f"{source}: invalid config:\n{_explain(e)}") from None


def config_yaml(config: Config) -> str:
    """The resolved config as YAML (what a run writes to OUTPUT/config.yaml)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _explain(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key{_suggestion(problem['loc'])}")
        elif problem["type"] == "missing":
            lines.append(f"  {where}: required but missing")
        else:
            got = problem.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"  {where}: {problem['msg']}{shown}")
    return "\n".join(lines)


def _suggestion(loc: tuple) -> str:
    """'; did you mean train.lr?' for the valid key closest to the unknown one."""
    section: type[BaseModel] = Config
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        section = annotation
    valid = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
    prefix = ".".join(str(p) for p in loc[:-1])
    if close:
        return f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    return f"; valid keys here: {', '.join(valid)}"

