"""The recipe: one YAML file that describes a run, validated with pydantic.

Key names follow axolotl (``base_model``, ``adapter``, ``lora_r``, ``sequence_len``,
``sample_packing``, ``micro_batch_size``, ``num_epochs`` ...) so recipes read like what users
already know. Unknown keys and wrong types raise :class:`RecipeError`, naming the key path and
the closest valid name.

Plugins add keys: the pydantic models of the training methods (:attr:`plugtune.spec.Method.keys`)
and of ``plugtune_recipe_keys`` answers are merged into :class:`Recipe` (like axolotl's
plugins' ``get_input_args``), see :func:`validate_recipe`. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

DATASET_TYPES = (
    "alpaca",
    "alpaca:chat",
    "dolly",
    "sharegpt",
    "messages",
    "chat_template",
    "completion",
    "prompt_completion",
    "seq2seq",
    "text",
    "preference",
    "chat_template.default",
    "chat_template.argilla",
    "chat_template.argilla_chat",
    "bradley_terry.chat_template",
    "kto",
    "llama3.ultra",
    "vision",
)
#: the roles a turn may be trained as (``roles_to_train``); plugtune trains assistant turns
TRAINABLE_ROLES = ("assistant", "gpt", "model")


class RecipeError(ValueError):
    """A recipe is invalid: the message names the file, the key path and what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DatasetConfig(_Strict):
    """One dataset of the recipe's ``datasets`` (or ``test_datasets``) list."""

    path: str = Field(description="local file (jsonl/json/csv/parquet), local folder or hub id")
    type: Literal[DATASET_TYPES] = Field(description="record format")  # type: ignore[valid-type]
    split: str = "train"
    name: str | None = Field(None, description="hub dataset config name")
    data_files: str | list[str] | None = None
    field: str | None = Field(None, description="JSON key holding the records, if nested")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="map canonical field -> column name, e.g. {instruction: question}",
    )
    system_prompt: str | None = None
    max_samples: int | None = Field(None, ge=1)
    on_bad_row: Literal["error", "skip"] = "error"
    max_record_bytes: int | None = Field(
        10_000_000, ge=1, description="largest record (one line of a jsonl/csv/txt file) in "
        "bytes; a longer one is an error naming file and line, found before parsing. "
        "null: no limit")
    image_dir: str | None = Field(
        None, description="folder that relative image paths of a vision dataset are resolved "
        "against (default: the dataset file's folder)")
    # axolotl's dataset keys, with axolotl's meaning (docs/dataset-formats, schemas/datasets.py)
    ds_type: str | None = Field(None, description="file format when path is a file "
                                "(json, parquet, csv, text, arrow); default: from the suffix")
    field_messages: str | None = Field(None, description="column of the message list "
                                       "(chat_template, chat_template.default)")
    field_chosen: str | None = None
    field_rejected: str | None = None
    field_tools: str | None = Field(None, description="column of the tool schemas")
    message_property_mappings: dict[str, str] | None = Field(
        None, description="message keys: {role: from, content: value}")
    message_field_role: str | None = Field(None, description="legacy: message_property_mappings.role")
    message_field_content: str | None = Field(
        None, description="legacy: message_property_mappings.content")
    roles: dict[str, list[str]] | None = Field(
        None, description="{target_role: [source roles]}, e.g. {assistant: [gpt, model]}")
    message_field_training: str | None = Field(
        None, description="message key whose true/false says whether an assistant turn is "
        "trained (others are context)")
    roles_to_train: list[str] | None = Field(
        None, description="roles whose turns are trained; plugtune trains assistant turns")
    train_on_eos: Literal["turn", "all", "last", "none"] | None = Field(
        None, description="which stop tokens are trained: turn (each trained turn's, "
        "default), all, last, none (one value per run; see data.pipeline.apply_train_on_eos)")
    chat_template: str | None = Field(
        None, description="per-dataset chat template (must agree with the recipe's)")
    tags: dict[str, str] = Field(
        default_factory=dict, description="LLaMA-Factory ShareGPT tags: role_tag, content_tag, "
        "user_tag, assistant_tag, observation_tag, function_tag, system_tag")

    @field_validator("roles_to_train")
    @classmethod
    def _roles_to_train(cls, v: list[str] | None) -> list[str] | None:
        bad = [r for r in v or [] if r not in TRAINABLE_ROLES]
        if bad:
            raise ValueError(f"roles_to_train {bad}: plugtune trains assistant turns only "
                             "(other roles are always prompt); use [assistant]")
        return v

    @model_validator(mode="after")
    def _type_keys(self) -> DatasetConfig:
        if self.type == "completion" and {"prompt", "completion"} & set(self.columns):
            raise ValueError("type: completion is raw text (axolotl's meaning, column set with "
                             "field:); for prompt/completion columns use type: prompt_completion "
                             "(plugtune's former 'completion')")
        return self


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(64, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)


class Recipe(_Strict):
    """A validated plugtune recipe. See ``examples/recipes`` and ``plugtune recipes``."""

    # model
    base_model: str
    tokenizer: str | None = Field(None, description="tokenizer path if not base_model's")
    model_type: str | None = Field(None, description="override config.model_type routing")
    trust_remote_code: bool = False
    revision: str | None = None
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tf32: bool | None = Field(
        None, description="TF32 matmuls on Ampere+ GPUs (ignored with a notice elsewhere)")
    special_tokens: dict[str, str | list[str]] = Field(
        default_factory=dict, description="tokenizer special tokens to set, e.g. "
        "{pad_token: '<|end_of_text|>'}; tokens new to the vocabulary are added and the "
        "embeddings resized")
    flash_attention: bool = False
    attn_implementation: str | None = None
    liger_kernel: bool = Field(
        False, description="Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear "
        "cross-entropy) on CUDA; pip install 'plugtune[liger]'. Without CUDA or liger-kernel: "
        "one notice, then plugtune's label-only LM head (plugtune.kernels)")
    liger_kernel_config: dict[
        Literal["rope", "rms_norm", "swiglu", "geglu", "layer_norm", "cross_entropy",
                "fused_linear_cross_entropy"], bool] | None = Field(
        None, description="switch single Liger kernels, e.g. {rope: false}; default: Liger's "
        "own per-model defaults")
    # adapter
    adapter: Literal["none", "lora", "qlora"] = "lora"
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: str | list[str] = "auto"
    lora_modules_to_save: list[str] | None = None
    peft_use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (peft use_dora)")
    peft_use_rslora: bool = Field(False, description="rank-stabilised LoRA scaling alpha/sqrt(r) "
                                  "(peft use_rslora)")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: learning rate of the B matrices = ratio x learning_rate "
        "(peft.optimizers.create_loraplus_optimizer)")
    loraplus_lr_embedding: float | None = Field(
        None, gt=0, description="LoRA+: learning rate of adapted embedding layers (default 1e-6)")
    lora_target_parameters: str | list[str] | None = Field(
        None, description="MoE routed experts (axolotl's key, peft's target_parameters): experts "
        "(every fused expert weight) or parameter names such as experts.gate_up_proj; needs "
        "lora_dropout: 0 (set when the recipe leaves lora_dropout out). Default: the experts "
        "stay frozen, LoRA wraps the attention projections (plugtune.moe)")
    moe_aux_loss_coef: float | None = Field(
        None, ge=0, description="MoE router auxiliary (load-balancing) loss coefficient "
        "(LLaMA-Factory's key); default: the model's own router_aux_loss_coef where the model "
        "computes the loss; 0 turns it off. Logged as aux_loss")
    moe_train_router: bool = Field(
        False, description="MoE: train the router (full fine-tuning: its weights; LoRA: in full, "
        "as modules_to_save); default: the router stays frozen")
    lora_target_cross_attention: bool = Field(
        False, description="vision families with cross-attention layers (Llama 3.2 Vision): "
        "adapt those layers too (default: self-attention/MLP of the language model only)")
    # data
    datasets: list[DatasetConfig] = Field(min_length=1)
    dataset: str | list[str] | None = Field(
        None, description="LLaMA-Factory dataset names (\"a,b\") from dataset_dir's "
        "dataset_info.json; they become datasets entries")
    dataset_dir: str | None = Field(None, description="folder of dataset_info.json (default ./data)")
    test_datasets: list[DatasetConfig] = Field(default_factory=list)
    val_set_size: float = Field(0.0, ge=0)
    chat_template: str | None = None
    added_tokens: list[str] = Field(
        default_factory=list, description="tokens to add to the vocabulary (as special tokens); "
        "their embedding and output rows are trained (see train_token_rows)")
    train_token_rows: bool = Field(
        True, description="with an adapter, train the embedding/output rows of added tokens and "
        "of stop tokens the base model never learned (plugtune.token_rows); false: never")
    token_rows_lr_scale: float = Field(
        10.0, gt=0, description="learning rate of those token rows, as a multiple of "
        "learning_rate (a row must move by O(1); Adam moves it ~lr per step)")
    train_on_inputs: bool = False
    sequence_len: int = Field(512, ge=8)
    truncation: Literal["prompt_then_drop", "drop"] = "prompt_then_drop"
    sample_packing: bool = False
    eval_sample_packing: bool | None = None
    multipack_real_batches: bool = Field(
        True, description="with sample_packing (axolotl's key): true packs samples into "
        "micro_batch_size rows of sequence_len tokens; false packs them into one row of "
        "micro_batch_size * sequence_len tokens per micro-batch (axolotl's default with "
        "flash-attn; bins 4x larger leave less room unfilled: stories260K on Dolly + "
        "alpaca_en_demo, rows 92.6 % -> 98.3 % full, no padding in a one-row micro-batch). "
        "Samples still never attend to each other; without a per-sample attention "
        "(flash-attn varlen, plugtune's packed sdpa on CPU) a long row costs "
        "O((micro_batch_size*sequence_len)^2) attention")
    group_by_length: bool = True
    dataset_num_proc: int | None = Field(None, ge=1)
    dataset_seed: int = 42
    # optimisation
    micro_batch_size: int = Field(4, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    #: transformers' own default (torch >= 2.8): one fused kernel per step, 4.8x faster than the
    #: per-tensor AdamW on this CPU for 19.5M parameters (25 vs 118 ms/step, bench/README)
    optimizer: str = "adamw_torch_fused"
    max_grad_norm: float = Field(1.0, ge=0)
    num_epochs: float = Field(1, gt=0)
    max_steps: int = -1
    gradient_checkpointing: bool = False
    seed: int = 42
    # alignment (method keys such as dpo_beta come from the methods: plugtune.methods.*)
    rl: str | None = Field(
        None, description="training method (axolotl's key): dpo, ipo, kto, orpo, simpo, ... or "
        "any installed method plugin; unset: sft (dpo for preference data)")
    reward_model: bool = Field(False, description="train a reward model (same as rl: reward)")
    # scale
    deepspeed: str | None = None
    fsdp: str | None = Field(
        None, description="FSDP2 through accelerate: a preset (full_shard, shard_grad_op, "
        "full_shard_offload) or the path of a JSON fsdp_config (plugtune.scale)")
    # bookkeeping
    output_dir: str = "./out"
    logging_steps: int = Field(5, ge=1)
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    evals_per_epoch: int | None = Field(
        None, ge=1, description="evaluate N times per epoch (instead of eval_steps)")
    saves_per_epoch: int | None = Field(
        None, ge=1, description="save N checkpoints per epoch (instead of save_steps)")
    report_to: str | list[str] = "none"
    report_env: dict[str, str] = Field(
        default_factory=dict, description="environment variables the report_to integrations of "
        "transformers read (WANDB_PROJECT, MLFLOW_TRACKING_URI, ...), set for the run")
    hub_model_id: str | None = Field(
        None, description="push the run's checkpoints to this hub repository (Trainer push_to_hub)")
    # evaluation
    eval_metrics: list[Literal["loss", "exact_match", "rouge", "perplexity"]] = Field(
        default_factory=lambda: ["loss"]
    )
    eval_before_training: bool = False
    eval_max_samples: int | None = Field(64, ge=1)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    @field_validator("lora_target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list wraps nothing: use auto, all-linear or module names")
        return v

    @model_validator(mode="before")
    @classmethod
    def _registry_and_templates(cls, data: Any) -> Any:
        """``dataset:`` + ``dataset_dir:`` (LLaMA-Factory) become ``datasets`` entries, and a
        per-dataset ``chat_template`` becomes the recipe's (one template per run)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if not data.get("dataset"):
            data.pop("dataset", None)
        else:
            from plugtune.data.registry import resolve_llamafactory

            resolved = resolve_llamafactory(data.pop("dataset"), data.pop("dataset_dir", None) or "data")
            data["datasets"] = [*(data.get("datasets") or []),
                                *resolved]
        names = {d.get("chat_template") for d in data.get("datasets") or []
                 if isinstance(d, dict) and d.get("chat_template")}
        if len(names) > 1 or (names and data.get("chat_template") not in (None, *names)):
            raise ValueError(f"datasets name different chat templates {sorted(names)} (recipe: "
                             f"{data.get('chat_template')!r}); a run renders with one template")
        if names and not data.get("chat_template"):
            data["chat_template"] = names.pop()
        return data

    @model_validator(mode="after")
    def _consistency(self) -> Recipe:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit and load_in_8bit are exclusive")
        if self.adapter == "qlora" and self.load_in_8bit:
            raise ValueError("adapter: qlora loads the base in 4-bit; drop load_in_8bit")
        if self.adapter == "none" and (self.load_in_4bit or self.load_in_8bit):
            raise ValueError(
                "a quantized base cannot be fully fine-tuned: set adapter: lora or qlora"
            )
        if self.fsdp and self.deepspeed:
            raise ValueError("fsdp and deepspeed are exclusive: choose one way to shard")
        if self.fsdp and self.quantization is not None:
            raise ValueError("fsdp with a 4/8-bit base (qlora, load_in_*) is not supported by "
                             "plugtune yet: use adapter: lora, or deepspeed: zero3 for QLoRA")
        if self.reward_model and self.rl not in (None, "reward"):
            raise ValueError(f"reward_model: true trains a reward model; drop rl: {self.rl}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _expert_lora_dropout(cls, data: Any) -> Any:
        """``lora_target_parameters`` without ``lora_dropout``: dropout 0 (peft's ParamWrapper
        takes no dropout; axolotl's default is 0 too)."""
        if isinstance(data, dict) and data.get("lora_target_parameters") and "lora_dropout" not in data:
            data = {**data, "lora_dropout": 0.0}
        return data

    @model_validator(mode="after")
    def _expert_lora(self) -> Recipe:
        if self.lora_target_parameters and self.lora_dropout:
            raise ValueError(
                f"lora_target_parameters needs lora_dropout: 0 (got {self.lora_dropout}): peft "
                "wraps expert weights with a ParamWrapper, which cannot apply dropout to their input")
        if isinstance(self.lora_target_parameters, list) and not self.lora_target_parameters:
            raise ValueError("lora_target_parameters: an empty list wraps nothing; leave it out "
                             "or write experts")
        return self

    @model_validator(mode="after")
    def _liger(self) -> Recipe:
        cfg = self.liger_kernel_config or {}
        if cfg.get("cross_entropy") and cfg.get("fused_linear_cross_entropy"):
            raise ValueError("liger_kernel_config: cross_entropy and fused_linear_cross_entropy "
                             "are exclusive (the fused one already includes the cross-entropy)")
        return self

    @property
    def method(self) -> str | None:
        """The training method asked for: ``rl``, ``"reward"`` for ``reward_model: true``,
        ``None`` when unset (``sft``, or ``dpo`` for preference data)."""
        return self.rl or ("reward" if self.reward_model else None)

    @property
    def quantization(self) -> str | None:
        """``"4bit"`` (qlora or load_in_4bit), ``"8bit"`` or ``None``."""
        if self.adapter == "qlora" or self.load_in_4bit:
            return "4bit"
        if self.load_in_8bit:
            return "8bit"
        return None


# ---------------------------------------------------------------------------------------------
# loading, overrides and error messages


def _all_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


@functools.lru_cache(maxsize=32)
def recipe_model(extras: tuple[type[BaseModel], ...] = ()) -> type[Recipe]:
    """:class:`Recipe` with the fields of ``extras`` (plugins' key models) merged in.

    Raises:
        RecipeError: an extra model redefines a core key or another plugin's key.
    """
    if not extras:
        return Recipe
    seen = {k: "core" for k in Recipe.model_fields}
    for model in extras:
        for key in model.model_fields:
            if key in seen:
                raise RecipeError(f"recipe key {key!r} of {model.__module__}.{model.__qualname__} "
                                  f"is already defined by {seen[key]}")
            seen[key] = f"{model.__module__}.{model.__qualname__}"
    merged = create_model("Recipe", __base__=(Recipe, *extras), __module__=Recipe.__module__)
    merged.__doc__ = Recipe.__doc__
    return merged


def _model_at(path: tuple[Any, ...], root: type[BaseModel] = Recipe) -> type[BaseModel]:
    """The pydantic model that owns the last key of ``path`` (for 'did you mean')."""
    model: type[BaseModel] = root
    for part in path[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        ann = field.annotation
        for cand in (DatasetConfig, GenerationConfig):
            if ann is cand or cand in getattr(ann, "__args__", ()) or (
                getattr(ann, "__origin__", None) is list and cand in ann.__args__
            ):
                model = cand
    return model


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel] = Recipe) -> str:
    """Render a pydantic ``ValidationError`` as one line per problem: ``source: key.path: why``."""
    lines = [f"invalid recipe {source}:"]
    for e in err.errors():
        loc = e["loc"]
        path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        if e["type"] == "extra_forbidden":
            key = str(loc[-1])
            hint = did_you_mean(key, _all_keys(_model_at(loc, root)))
            if len(loc) == 1 and not hint and key in DatasetConfig.model_fields:
                hint = f"; did you mean datasets[].{key}? (a per-dataset key)"
            lines.append(f"  {path}: unknown key{hint}")
        else:
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            lines.append(f"  {path or '<root>'}: {e['msg']}{got_s}")
    return "\n".join(lines)


def did_you_mean(key: str, valid: list[str]) -> str:
    """``"; did you mean 'x'?"`` for a plausible typo of ``key`` among ``valid``, else ``""``.

    Plausible: difflib similarity >= 0.8 (``learing_rate`` -> ``learning_rate``,
    ``sequence_length`` -> ``sequence_len``) or at most one edit per five letters (``tpye`` ->
    ``type``), so unrelated names sharing a few letters (``wandb_entity`` / ``load_in_8bit``,
    similarity 0.42) get no hint.
    """
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.8)
    if not close:  # short keys: one or two slips (tpye -> type, lora_rr -> lora_r)
        limit = max(1, len(key) // 5)
        best = min(valid, key=lambda v: _edit_distance(key, v), default=None)
        close = [best] if best is not None and _edit_distance(key, best) <= limit else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _edit_distance(a: str, b: str) -> int:
    """Edits (insert, delete, replace, swap of neighbours) that turn ``a`` into ``b``."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def _parse_scalar(text: str) -> Any:
    """Parse a ``--set`` value with YAML rules (``true``, ``3``, ``2e-4``, ``[q, v]``)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads 2e-4 as a string; accept it as a float.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            return value
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides with dotted paths (``datasets.0.path=x``) to a raw recipe.

    Raises:
        RecipeError: an override without ``=`` or a path through a non-container.
    """
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set max_steps=10")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(node, list):
                try:
                    node = node[int(part)]
                except (ValueError, IndexError) as exc:
                    raise RecipeError(f"--set {key}: no list item {part!r}") from exc
                continue
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping")
            node = node.setdefault(part, [] if nxt.isdigit() else {})
        last = parts[-1]
        value = _parse_scalar(raw)
        if isinstance(node, list):
            try:
                node[int(last)] = value
            except (ValueError, IndexError) as exc:
                raise RecipeError(f"--set {key}: no list item {last!r}") from exc
        else:
            node[last] = value
    return data


def bundled_recipes_dir() -> Path:
    return Path(__file__).parent.parent / "recipes"


def list_bundled_recipes() -> dict[str, Path]:
    """Bundled example recipes: name (file stem) -> path."""
    return {p.stem: p for p in sorted(bundled_recipes_dir().glob("*.yaml"))}


def resolve_recipe_path(name_or_path: str) -> Path:
    """A recipe path, or the name of a bundled recipe (``plugtune recipes`` lists them)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    bundled = list_bundled_recipes()
    if name_or_path in bundled:
        return bundled[name_or_path]
    close = difflib.get_close_matches(name_or_path, list(bundled), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise RecipeError(
        f"recipe {name_or_path!r} is neither a file nor a bundled recipe "
        f"(bundled: {', '.join(bundled)}).{hint}"
    )


def _validate(data: dict, source: str, pm) -> Recipe:
    from plugtune.plugins import PluginError, recipe_key_models, resolve_method

    try:
        model = recipe_model(recipe_key_models(pm))
    except PluginError as exc:
        raise RecipeError(f"invalid recipe {source}: {exc}") from None
    try:
        recipe = model.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source, model)) from None
    if recipe.method is not None:
        try:
            resolve_method(pm, recipe.method)
        except PluginError as exc:
            raise RecipeError(f"invalid recipe {source}:\n  rl: {exc}") from None
    return recipe


def validate_recipe(data: dict, source: str = "<recipe>", pm=None) -> Recipe:
    """Validate a raw mapping against the core keys plus the keys plugins add.

    ``pm``: the plugin manager whose methods and ``plugtune_recipe_keys`` extend the schema.
    Without one, core's built-in methods are tried first (fast: no torch, no entry points);
    only a recipe they reject is validated again with every installed plugin loaded, so a
    third-party method or key works and a plain recipe validates in milliseconds.

    Raises:
        RecipeError: unknown keys, wrong types, an unknown ``rl`` method (the message names the
            key path, the closest valid key, or the installed methods).
    """
    if pm is not None:
        return _validate(data, source, pm)
    from plugtune.plugins import get_plugin_manager, methods_plugin_manager

    try:
        return _validate(data, source, methods_plugin_manager())
    except RecipeError as exc:
        if not _plugin_could_fix(str(exc)):
            raise  # typos and wrong values: reported before any plugin (or torch) is imported
    # a key or method no core part knows: maybe an installed plugin's, retry with all of them
    return _validate(data, source, get_plugin_manager())


def _plugin_could_fix(message: str) -> bool:
    """Whether a fast-path validation error may be a plugin's key or method: an unknown key
    without a plausible-typo hint, or an unknown ``rl`` method."""
    for line in message.splitlines():
        if line.endswith(": unknown key") or "unknown training method" in line:
            return True
    return False


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (saved into the run directory)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
