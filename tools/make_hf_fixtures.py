"""Generate tiny Hugging Face checkpoints + reference outputs for jaxpd tests.

Why these fixtures exist
------------------------
jaxpd loads Hugging Face checkpoints (config.json + safetensors) into its own
JAX/Flax model. To test the loader and the model numerically *without* torch or
transformers in the main project's environment, and without network access,
we commit a few tiny randomly initialised checkpoints together with reference
outputs computed by the transformers (PyTorch) implementation:

* ``llama/``   LlamaForCausalLM, GQA (8 heads / 2 KV heads), Llama-3 rope
               scaling, untied embeddings, sharded into several
               ``model-0000x-of-0000y.safetensors`` files plus
               ``model.safetensors.index.json``. Its config.json is rewritten
               into the pre-transformers-5 style used by published checkpoints
               (top-level ``rope_theta`` + ``rope_scaling``, no
               ``rope_parameters``).
* ``qwen2/``   Qwen2ForCausalLM, q/k/v biases, tied embeddings (no
               ``lm_head.weight`` in the file), single ``model.safetensors``,
               transformers-5 native config (``rope_parameters``).
* ``mistral/`` MistralForCausalLM with an explicit ``head_dim`` (32) that
               differs from hidden_size / num_attention_heads (16), no sliding
               window, untied, single file, transformers-5 native config.
* ``mistral_window/`` MistralForCausalLM with an active 8-token sliding window
               (prompts of 11 and 23 tokens, 12 generated), MQA (1 KV head).

All parameters are overwritten with seeded random values (weights
N(0, 0.08), biases N(0, 0.1), norm weights 1 + N(0, 0.1)) so that bias and
norm code paths are actually exercised (HF's default init zeroes biases and
sets norms to 1).

Each folder gets an ``expected.json``::

    {"model_type": ..., "prompts": [[ids]...],
     "last_logits": [[float...] per prompt],   # fp32 logits at last prompt pos
     "greedy": [[new ids] per prompt],         # generate(), do_sample=False
     "max_new_tokens": 12}

Logits come from a plain eager fp32 forward pass of each unpadded prompt.
Greedy tokens come from ``model.generate`` per prompt (no padding) with
``eos_token_id=None`` so generation never stops early: jaxpd tests comparing
against ``greedy`` must likewise ignore EOS. The references are computed from
the model *reloaded from the written files* (and checked against the
in-memory model), so they also validate the rewritten llama config.

How to re-run
-------------
This needs torch + transformers, which are NOT dependencies of jaxpd; use a
separate tool venv (CPU torch is enough)::

    python3.11 -m venv .toolvenv
    .toolvenv/bin/pip install torch==2.13.0 transformers safetensors
    .toolvenv/bin/python tools/make_hf_fixtures.py            # -> tests/fixtures/hf

Fixtures were generated with torch 2.13.0 (CPU) and transformers 5.23.0 (mistral_window:
5.24.0). The
output is deterministic for a given torch/transformers version (run it twice
and diff).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

# Base seed (fixture i uses SEED + i). 1257 was picked (by trying bases
# 1234..1273) because every greedy step of every prompt then has a top-1 vs
# top-2 logit margin >= ~0.009, so greedy comparisons are not knife-edge for
# a JAX implementation with slightly different fp32 rounding.
SEED = 1257
MAX_NEW_TOKENS = 12
PROMPT_LENGTHS = (5, 11, 23)
VOCAB_SIZE = 320
LLAMA_SHARD_SIZE = "200KB"
SLIDING_WINDOW = 8
# Fixtures after the first three take their own seed: mistral_window's 1267 was picked from
# 1260..1274 for its top-1 vs top-2 margin (0.019; the base + i seed gave 0.0008).
FIXTURE_SEEDS = {"mistral_window": 1267}

WEIGHT_STD = 0.08
BIAS_STD = 0.1
NORM_STD = 0.1


def make_prompts(vocab_size: int) -> list[list[int]]:
    """Three fixed prompts (lengths 5, 11, 23), ids in [1, vocab_size)."""
    prompts = []
    for p, n in enumerate(PROMPT_LENGTHS):
        # Simple deterministic LCG-ish sequence; never produces 0.
        prompts.append([1 + (37 * i * i + 101 * i + 59 * (p + 1)) % (vocab_size - 1) for i in range(n)])
    return prompts


def build_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    llama = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,  # puts one frequency in the blended middle band
        },
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    qwen2 = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=2,
    )
    mistral_args = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        sliding_window=None,
        tie_word_embeddings=False,
    )
    mistral = MistralConfig(**mistral_args)
    # An active sliding window: 8 tokens, shorter than two of the prompts and than every prompt
    # plus its 12 generated tokens, so masking by the window changes the logits. MQA.
    mistral_window = MistralConfig(**{**mistral_args, "num_key_value_heads": 1, "head_dim": 16,
                                      "sliding_window": SLIDING_WINDOW})
    return {"llama": llama, "qwen2": qwen2, "mistral": mistral, "mistral_window": mistral_window}


def randomize_parameters(model, seed: int) -> None:
    """Overwrite every parameter (tied ones once) with seeded random values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # named_parameters() de-duplicates shared (tied) tensors.
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + NORM_STD * noise)
            elif name.endswith(".bias"):
                param.copy_(BIAS_STD * noise)
            else:
                param.copy_(WEIGHT_STD * noise)


def rewrite_llama_config_legacy(config_path: Path) -> None:
    """Rewrite a transformers-5 config.json into pre-v5 published style.

    ``rope_parameters`` -> top-level ``rope_theta`` + ``rope_scaling``.
    """
    cfg = json.loads(config_path.read_text())
    rope = cfg.pop("rope_parameters")
    theta = rope.pop("rope_theta")
    cfg["rope_theta"] = theta
    cfg["rope_scaling"] = {
        "rope_type": rope["rope_type"],
        "factor": rope["factor"],
        "low_freq_factor": rope["low_freq_factor"],
        "high_freq_factor": rope["high_freq_factor"],
        "original_max_position_embeddings": rope["original_max_position_embeddings"],
    }
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def compute_expected(model, prompts: list[list[int]]) -> tuple[list, list]:
    import torch

    last_logits, greedy = [], []
    with torch.no_grad():
        for ids in prompts:
            input_ids = torch.tensor([ids], dtype=torch.long)
            out = model(input_ids=input_ids, use_cache=False)
            assert out.logits.dtype == torch.float32
            last_logits.append([float(x) for x in out.logits[0, -1].tolist()])
            gen = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=MAX_NEW_TOKENS,
                min_new_tokens=MAX_NEW_TOKENS,
                eos_token_id=None,
                pad_token_id=0,
            )
            new = gen[0, len(ids):].tolist()
            assert len(new) == MAX_NEW_TOKENS, new
            greedy.append([int(t) for t in new])
    return last_logits, greedy


def greedy_margin(model, prompts: list[list[int]], greedy: list[list[int]]) -> float:
    """Smallest top-1 minus top-2 logit gap over all greedy decoding steps."""
    import torch

    margin = float("inf")
    with torch.no_grad():
        for ids, new in zip(prompts, greedy):
            logits = model(input_ids=torch.tensor([ids + new]), use_cache=False).logits[0, len(ids) - 1 : -1]
            assert logits.argmax(-1).tolist() == new, "teacher-forced argmax != generate() output"
            top2 = logits.topk(2, dim=-1).values
            margin = min(margin, (top2[:, 0] - top2[:, 1]).min().item())
    return margin


def build_fixture(name: str, config, out_dir: Path, seed: int) -> None:
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    randomize_parameters(model, seed)
    # Generation must never stop early: no EOS, explicit pad.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    save_kwargs = {"safe_serialization": True}
    if name == "llama":
        save_kwargs["max_shard_size"] = LLAMA_SHARD_SIZE
    model.save_pretrained(out_dir, **save_kwargs)

    config_path = out_dir / "config.json"
    if name == "llama":
        rewrite_llama_config_legacy(config_path)

    # --- sanity checks on what was written -------------------------------
    st_files = sorted(out_dir.glob("*.safetensors"))
    keys: set[str] = set()
    for f in st_files:
        with safe_open(str(f), framework="pt") as sf:
            keys.update(sf.keys())
            for k in sf.keys():
                assert sf.get_slice(k).get_dtype() == "F32", (f, k)
    if name == "llama":
        assert len(st_files) > 1 and (out_dir / "model.safetensors.index.json").exists(), st_files
        assert "rope_parameters" not in json.loads(config_path.read_text())
    else:
        assert [f.name for f in st_files] == ["model.safetensors"], st_files
    if name == "qwen2":
        assert "lm_head.weight" not in keys, "tied model must not store lm_head.weight"
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert f"model.layers.0.self_attn.{proj}.bias" in keys, proj
    else:
        assert "lm_head.weight" in keys
    assert not any(k.endswith(".bias") for k in keys) or name == "qwen2", keys

    # --- reload from disk and compute references ---------------------------
    prompts = make_prompts(config.vocab_size)
    ref_logits, ref_greedy = compute_expected(model, prompts)

    reloaded = AutoModelForCausalLM.from_pretrained(
        out_dir, attn_implementation="eager", dtype=torch.float32, local_files_only=True
    )
    reloaded.eval()
    rc = reloaded.config
    if name == "llama":
        assert rc.rope_parameters["rope_type"] == "llama3", rc.rope_parameters
        assert rc.rope_parameters["rope_theta"] == 500000.0, rc.rope_parameters
    if name in ("qwen2", "mistral"):
        assert getattr(rc, "sliding_window", None) is None or not getattr(rc, "use_sliding_window", True)
    if name == "mistral_window":
        assert rc.sliding_window == SLIDING_WINDOW, rc.sliding_window
    if name == "mistral":
        assert rc.head_dim == 32
    last_logits, greedy = compute_expected(reloaded, prompts)
    assert greedy == ref_greedy, (greedy, ref_greedy)
    max_diff = max(abs(a - b) for la, lb in zip(last_logits, ref_logits) for a, b in zip(la, lb))
    assert max_diff == 0.0, f"{name}: reloaded model differs from in-memory model by {max_diff}"

    margin = greedy_margin(reloaded, prompts, greedy)
    print(f"{name}: min top1-top2 logit margin over greedy steps = {margin:.4f}", file=sys.stderr)

    expected = {
        "model_type": config.model_type,
        "prompts": prompts,
        "last_logits": last_logits,
        "greedy": greedy,
        "max_new_tokens": MAX_NEW_TOKENS,
    }
    (out_dir / "expected.json").write_text(json.dumps(expected) + "\n")


def summarize(out_root: Path, names: list[str]) -> None:
    interesting = (
        "model_type", "architectures", "rope_theta", "rope_scaling", "rope_parameters", "head_dim",
        "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
        "layer_types", "dtype", "torch_dtype", "rms_norm_eps", "bos_token_id", "eos_token_id",
    )
    for name in names:
        d = out_root / name
        total = 0
        print(f"== {d}")
        for f in sorted(d.iterdir()):
            size = f.stat().st_size
            total += size
            print(f"   {size:>9,d}  {f.name}")
        print(f"   {total:>9,d}  total")
        cfg = json.loads((d / "config.json").read_text())
        excerpt = {k: cfg[k] for k in interesting if k in cfg}
        print("   config.json excerpt: " + json.dumps(excerpt))


# -- chat templates ---------------------------------------------------------------------------
# Three templates in the styles checkpoints ship (written for these fixtures), each stored the
# way a checkpoint may store it: a string in tokenizer_config.json, a chat_template.jinja file,
# or a list of named templates. They exercise trim_blocks/lstrip_blocks, whitespace control,
# special tokens from the config, filters, loop controls, namespace() and raise_exception.
CHAT_TEMPLATES = {
    "chatml": ("config", (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
        "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}")),
    "headers": ("jinja", (
        "{{- bos_token }}\n"
        "{%- for message in messages %}\n"
        "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] | trim + '<|eot_id|>' }}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
        "{%- endif %}\n")),
    "inst": ("list", (
        "{{ bos_token }}\n"
        "{% set ns = namespace(turns=0) %}\n"
        "{% for message in messages %}\n"
        "    {% if loop.index > 12 %}{% break %}{% endif %}\n"
        "    {% if message['role'] == 'system' %}{% continue %}{% endif %}\n"
        "    {% if (message['role'] == 'user') != (ns.turns % 2 == 0) %}\n"
        "        {{ raise_exception('Conversation roles must alternate user/assistant/user/"
        "assistant/...') }}\n"
        "    {% endif %}\n"
        "    {% set ns.turns = ns.turns + 1 %}\n"
        "    {% if message['role'] == 'user' %}\n"
        "[INST] {{ message['content'] }} [/INST]\n"
        "    {% else %}\n"
        "{{ message['content'] }}{{ eos_token }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] | tojson }}{% endif %}\n")),
}
CHAT_CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "  4  "},
     {"role": "user", "content": "And 3+3? \u00dcn\u00efc\u00f6d\u00e9 \u2713"}],
    [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}],
]


def build_chat_fixtures(out_root: Path) -> None:
    """tests/fixtures/chat/<template>/: a tokenizer_config.json (and chat_template.jinja)
    holding the template, and expected.json with transformers' apply_chat_template text and
    token ids (or its error) for each conversation, with and without the generation prompt.
    The tokenizer is the embedded model's: copied in while transformers renders, then removed
    (the tests tokenize with jaxpd/assets/default_model/tokenizer.json)."""
    import transformers

    source = Path(__file__).resolve().parents[1] / "jaxpd" / "assets" / "default_model"
    for name, (where, template) in CHAT_TEMPLATES.items():
        folder = out_root / name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "tokenizer.json", folder / "tokenizer.json")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
                  "eos_token": {"__type": "AddedToken", "content": "<|eos|>", "lstrip": False,
                                "normalized": False, "rstrip": False, "single_word": False},
                  "pad_token": "<|pad|>", "model_max_length": 1024}
        if where == "config":
            config["chat_template"] = template
        elif where == "list":
            config["chat_template"] = [{"name": "default", "template": template},
                                       {"name": "tool_use", "template": "{{ raise_exception("
                                        "'not this one') }}"}]
        else:
            (folder / "chat_template.jinja").write_text(template)
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok = transformers.AutoTokenizer.from_pretrained(str(folder))
        cases = []
        for messages in CHAT_CONVERSATIONS:
            for generation in (True, False):
                case = {"messages": messages, "add_generation_prompt": generation}
                try:
                    text = tok.apply_chat_template(messages, add_generation_prompt=generation,
                                                   tokenize=False)
                    ids = tok.apply_chat_template(messages, add_generation_prompt=generation,
                                                  tokenize=True, return_dict=False)
                    case.update(text=text, ids=list(ids), error=None)
                except Exception as e:  # noqa: BLE001 - the template's own refusal, recorded
                    case.update(text=None, ids=None, error=str(e))
                cases.append(case)
        (folder / "expected.json").write_text(json.dumps(
            {"transformers": transformers.__version__,
             "tokenizer": "jaxpd/assets/default_model/tokenizer.json", "cases": cases},
            indent=1) + "\n")
        (folder / "tokenizer.json").unlink()
        print(f"wrote {folder} ({len(cases)} cases)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "Build tiny random Llama / Qwen2 / Mistral HF checkpoints (fp32, seeded) plus "
            "expected.json reference logits and greedy tokens, for jaxpd's loader/model tests. "
            "Needs torch + transformers (tool venv, not a jaxpd dependency); never downloads."
        )
    )
    parser.add_argument("--out", default="tests/fixtures/hf", help="output root directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="base random seed (default: %(default)s)")
    parser.add_argument(
        "--only", choices=["llama", "qwen2", "mistral", "mistral_window"], action="append",
        help="build only this fixture (repeatable; default: all)",
    )
    parser.add_argument("--chat", metavar="DIR",
                        help="instead, write the chat-template fixtures here "
                             "(tests/fixtures/chat): a tokenizer, a template, and "
                             "transformers' apply_chat_template output")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    import transformers

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    if args.chat:
        build_chat_fixtures(Path(args.chat))
        return 0
    out_root = Path(args.out)
    configs = build_configs()
    names = args.only or list(configs)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}", file=sys.stderr)
    for i, name in enumerate(configs):
        if name in names:
            build_fixture(name, configs[name], out_root / name,
                          FIXTURE_SEEDS.get(name, args.seed + i))
    summarize(out_root, names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
