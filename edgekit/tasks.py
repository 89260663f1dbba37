"""What differs per task, kept in one declarative table.

A task says which transformers Auto class loads the checkpoint, which ONNX output carries the result, and
how predictions are scored. Detection reads ``config.json`` only (no torch import).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.errors import EdgekitError


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # transformers class that loads the checkpoint for this task
    output: str  # the output the runtimes return and verify compares
    head_suffix: str | None  # architecture suffix that proves the checkpoint carries this head
    def has_head(self, arch: str) -> bool:
        return bool(self.head_suffix) and arch.endswith((self.head_suffix, *self.also_suffixes))
    labeled_metric: str | None  # the metric --max-drop applies to, when the data has labels
    also_suffixes: tuple[str, ...] = ()  # other names of that head (GPT-2's is GPT2LMHeadModel)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("text-classification", "AutoModelForSequenceClassification", "logits", "ForSequenceClassification", "accuracy"),
        Task("token-classification", "AutoModelForTokenClassification", "logits", "ForTokenClassification", "entity_f1"),
        Task("feature-extraction", "AutoModel", "last_hidden_state", None, None),
        Task("text-generation", "AutoModelForCausalLM", "logits", "ForCausalLM", "perplexity", ("LMHeadModel",)),
    )
}

DECODER_TASK = "text-generation"

# Encoder families whose export, ORT fusion and pruning edgekit knows. Keys are config.model_type;
# values are the onnxruntime.transformers optimizer model_type used for fusion (None: no fusion).
ENCODER_FAMILIES: dict[str, str | None] = {
    "bert": "bert",
    "roberta": "bert",
    "xlm-roberta": "bert",
    "camembert": "bert",
    "distilbert": "bert",
    "electra": "bert",
    "mpnet": None,
    "albert": None,
    "deberta-v2": None,
}


# Decoder language-model families (config.model_type) edgekit exports with a KV cache through optimum-onnx's
# text-generation-with-past configs, quantizes and verifies. Values: the name people know them by.
DECODER_FAMILIES: dict[str, str] = {
    "llama": "Llama (Llama 3.x, SmolLM2, TinyLlama)",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "mistral": "Mistral",
    "phi3": "Phi-3 / Phi-3.5",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "gpt2": "GPT-2",
}


def is_decoder(task) -> bool:
    return (task if isinstance(task, str) else task.name) == DECODER_TASK


# Families whose position ids start after the padding index (RoBERTa's create_position_ids_from_input_ids):
# of max_position_embeddings, pad_token_id + 1 positions are never used by a token (514 -> 512).
POSITIONS_AFTER_PADDING = {"roberta", "xlm-roberta", "camembert"}


def max_positions(config: dict) -> int | None:
    """The most tokens the model's position embeddings can take, from config.json (None: not bounded there)."""
    n = config.get("max_position_embeddings", config.get("n_positions"))  # GPT-2 names it n_positions
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    if config.get("model_type") in POSITIONS_AFTER_PADDING:
        n -= int(config.get("pad_token_id") or 0) + 1
    return max(n, 1)


def is_regression(config: dict) -> bool:
    """A sequence-classification head with one output scored as a regression, as transformers decides it:
    problem_type "regression", or num_labels == 1 without a classification problem_type."""
    problem = config.get("problem_type")
    if problem == "regression":
        return True
    labels = config.get("id2label") or {}
    n = config.get("num_labels", len(labels) or None)
    return n == 1 and problem not in ("single_label_classification", "multi_label_classification")


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise EdgekitError(
            f"unsupported task '{name}'", f"use one of: {', '.join(TASKS)}"
        ) from None


def detect_task(config: dict, override: str | None = None) -> Task:
    """The task of a checkpoint, from its architectures; ``override`` (--task) wins where it is possible."""
    archs = config.get("architectures") or []
    if override is not None:
        task = get_task(override)
        if task.head_suffix and not any(task.has_head(a) for a in archs):
            raise EdgekitError(
                f"--task {task.name} needs a checkpoint with a *{task.head_suffix} head, "
                f"but this one has {', '.join(archs) or 'no architectures listed'}",
                "fine-tune a head first, or use --task feature-extraction",
            )
        return task
    if not archs:
        raise EdgekitError(
            "config.json lists no architectures, so the task cannot be detected",
            f"pass --task ({', '.join(TASKS)})",
        )
    arch = archs[0]
    for task in TASKS.values():
        if task.has_head(arch):
            return task
    if arch.endswith("Model") and "For" not in arch and "LMHead" not in arch:
        return TASKS["feature-extraction"]
    raise EdgekitError(
        f"the checkpoint's architecture {arch} is not a supported task",
        f"edgekit handles {', '.join(TASKS)}; pass --task feature-extraction to use only its encoder",
    )


def check_family(config: dict, task: Task | None = None) -> str:
    """config.model_type, when edgekit handles that family for the task (decoders and encoders apart)."""
    model_type = config.get("model_type")
    if task is not None and is_decoder(task):
        if model_type not in DECODER_FAMILIES:
            raise EdgekitError(
                f"model type '{model_type}' is not a supported decoder language model",
                f"edgekit handles {', '.join(sorted(DECODER_FAMILIES))}",
            )
        return model_type
    if model_type not in ENCODER_FAMILIES:
        hint = (f"edgekit handles {', '.join(sorted(ENCODER_FAMILIES))}" if model_type not in DECODER_FAMILIES else
                f"{model_type} is a decoder family: edgekit takes its *ForCausalLM checkpoints (text-generation)")
        raise EdgekitError(f"model type '{model_type}' is not a supported encoder", hint)
    return model_type
