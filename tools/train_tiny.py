#!/usr/bin/env python3
"""Train the embedded default model: a small Llama-shaped decoder on Jane Austen's novels.

Why: no weights can be downloaded on the machines jaxpd is developed and tested on, and a random
model prints noise that makes a newcomer think the stack is broken. This script makes a model that
continues a prompt with recognisable English, from a public-domain text that a Debian package
ships (r-cran-janeaustenr: the six novels, ~4 MB; R itself is not needed).

    python tools/train_tiny.py --out jaxpd/assets/default_model --minutes 20

It writes a Hugging Face style folder (config.json, model.safetensors in f32, ~15 MB, tokenizer.json,
tokenizer_config.json), so the embedded model loads through the same code as any HF checkpoint.
Re-runnable in under 30 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

BOOKS = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]
DEBIAN_PACKAGE = "r-cran-janeaustenr"
RDB_IN_PACKAGE = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>"]


def read_r_string_vectors(rdb: bytes) -> list[list[str]]:
    """Decode an R lazy-load database holding character vectors (one string per text line).

    Each object is a 4-byte length then a zlib stream of R's XDR serialization: header, then a
    STRSXP of CHARSXPs. Only that shape is handled, which is all the janeaustenr package holds.
    """
    vectors, offset = [], 0
    while offset < len(rdb):
        inflater = zlib.decompressobj()
        data = inflater.decompress(rdb[offset + 4:])
        offset = len(rdb) - len(inflater.unused_data)
        if data[:2] != b"X\n":
            raise ValueError("not an XDR-serialized R object")
        pos = 2 + 12  # format marker, then R version / min version / (v3) native encoding length
        enc_len = struct.unpack(">i", data[pos:pos + 4])[0]
        pos += 4 + enc_len
        sexptype, length = struct.unpack(">ii", data[pos:pos + 8])
        pos += 8
        if sexptype & 0xFF != 16:
            raise ValueError(f"expected a character vector, found SEXP type {sexptype & 0xFF}")
        lines = []
        for _ in range(length):
            _, n = struct.unpack(">ii", data[pos:pos + 8])
            pos += 8
            if n == -1:
                lines.append("")
            else:
                lines.append(data[pos:pos + n].decode("utf-8", "replace"))
                pos += n
        vectors.append(lines)
    return vectors


def fetch_corpus(work: Path) -> dict[str, list[str]]:
    """The novels' lines, from the installed package or a downloaded .deb (no install needed)."""
    installed = Path("/") / RDB_IN_PACKAGE
    if installed.exists():
        rdb = installed.read_bytes()
    else:
        subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=work, check=True)
        deb = next(work.glob(f"{DEBIAN_PACKAGE}_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(work / "x")], check=True)
        rdb = (work / "x" / RDB_IN_PACKAGE).read_bytes()
    vectors = read_r_string_vectors(rdb)
    if len(vectors) != len(BOOKS):
        raise ValueError(f"expected {len(BOOKS)} books, found {len(vectors)}")
    return dict(zip(BOOKS, vectors))


def to_paragraphs(lines: list[str]) -> str:
    """Undo the hard line wrapping and italics underscores, one paragraph per line."""
    paragraphs, current = [], []
    for line in lines + [""]:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    text = "\n".join(paragraphs)
    return re.sub(r"_([^_]+)_", r"\1", text)


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
         "model_max_length": 1024}, indent=2) + "\n")
    return tok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("jaxpd/assets/default_model"))
    ap.add_argument("--minutes", type=float, default=22.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from tqdm import tqdm

    from jaxpd.model import forward
    from jaxpd.model.hf_export import save_hf_checkpoint
    from jaxpd.model.presets import get_preset

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        books = fetch_corpus(Path(tmp))
    texts = [to_paragraphs(lines) for lines in books.values()]
    print(f"corpus: {sum(map(len, texts)):,} characters from {len(texts)} novels", file=sys.stderr)

    base = get_preset("default")
    tok = train_tokenizer(texts, base.vocab_size, args.out)
    cfg = base.replace(bos_token_id=tok.token_to_id("<|bos|>"),
                       eos_token_ids=(tok.token_to_id("<|eos|>"),))
    eos = cfg.eos_token_ids[0]
    ids = []
    for text in texts:
        ids += tok.encode(text).ids + [eos]
    ids = np.asarray(ids, np.int32)
    split = int(len(ids) * 0.98)
    train_ids, val_ids = ids[:split], ids[split:]
    print(f"tokens: {len(train_ids):,} train, {len(val_ids):,} validation", file=sys.stderr)

    params = forward.init_params(cfg, jax.random.key(args.seed))
    # The learning rate follows the wall clock (warm-up, then cosine to 5% at the deadline), so the
    # schedule completes whatever the machine's speed and the time budget holds by construction.
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=0.1))
    opt_state = opt.init(params)
    lengths = jnp.full((args.batch,), args.seq, jnp.int32)

    def loss_fn(p, batch):
        out = forward.prefill(p, batch[:, :-1], lengths, config=cfg, all_logits=True)
        logp = jax.nn.log_softmax(out.logits, axis=-1)
        return -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1).mean()

    @jax.jit
    def step(p, s, batch, lr):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        s[1].hyperparams["learning_rate"] = lr
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    eval_loss = jax.jit(loss_fn)
    rng = np.random.default_rng(args.seed)

    def batch_from(source):
        starts = rng.integers(0, len(source) - args.seq - 1, args.batch)
        return jnp.asarray(np.stack([source[s:s + args.seq + 1] for s in starts]))

    budget = args.minutes * 60
    start = time.monotonic()

    def learning_rate(step_index: int) -> float:
        frac = min((time.monotonic() - start) / budget, 1.0)
        warm = min(1.0, (step_index + 1) / 30)
        return args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * frac)))

    bar = tqdm(total=args.max_steps, desc="train", unit="step")
    loss = float("nan")
    for i in range(args.max_steps):
        if time.monotonic() - start > budget:
            break
        params, opt_state, loss = step(params, opt_state, batch_from(train_ids), learning_rate(i))
        bar.update()
        if i % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    bar.close()
    val = np.mean([float(eval_loss(params, batch_from(val_ids))) for _ in range(8)])
    print(f"steps: {bar.n}, train loss {float(loss):.3f}, validation loss {val:.3f}", file=sys.stderr)

    save_hf_checkpoint(args.out, params, cfg)
    (args.out / "TRAINING.json").write_text(json.dumps(
        {"corpus": f"Debian {DEBIAN_PACKAGE} (Jane Austen, public domain)", "steps": bar.n,
         "batch": args.batch, "seq": args.seq, "lr": args.lr, "seed": args.seed,
         "train_loss": round(float(loss), 4), "validation_loss": round(float(val), 4),
         "minutes": args.minutes}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
