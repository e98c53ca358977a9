"""Train a small Llama from scratch in float32 on tinyshakespeare (no GGUF in its history), for the quantization
benchmark. A byte-level BPE tokenizer is trained on the training part; the last 10% of the text is held out.

    python benchmarks/train_small.py --out benchmarks/.cache/shakespeare-llama [--steps 150] [--device cpu]
        [--data PATH]
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import torch

log = logging.getLogger("train_small")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
HELD_OUT = 0.1


def split_text(text: str) -> tuple[str, str]:
    """(training part, held-out part): the last 10% of the characters, cut at a line break, is held out."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - HELD_OUT))) + 1
    return text[:cut], text[cut:]


def train_tokenizer(text: str, folder: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(text.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def build_model(vocab_size: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config)


def train(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    train_text, _ = split_text(Path(args.data).read_text(encoding="utf-8"))
    tokenizer = train_tokenizer(train_text, out, args.vocab)
    ids = torch.tensor(tokenizer(train_text, add_special_tokens=False)["input_ids"])
    model = build_model(len(tokenizer), args.hidden, args.layers).to(args.device).train()
    log.info("%d training tokens, %.1fM parameters", ids.numel(), sum(p.numel() for p in model.parameters()) / 1e6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(args.steps // 20, 1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(args.steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, ids.numel() - args.seq_len - 1, (args.batch,), generator=generator)
        batch = torch.stack([ids[s : s + args.seq_len] for s in starts.tolist()]).to(args.device)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 25 == 0 or step == args.steps - 1:
            log.info("step %d/%d loss %.3f (%.0f s)", step, args.steps, loss.item(), time.perf_counter() - started)
    model.eval().save_pretrained(out, safe_serialization=True)
    (out / "TRAINING.txt").write_text(
        f"steps={args.steps} batch={args.batch} seq_len={args.seq_len} lr={args.lr} hidden={args.hidden} "
        f"layers={args.layers} vocab={len(tokenizer)} final_loss={loss.item():.3f} "
        f"seconds={time.perf_counter() - started:.0f}\n"
    )
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).parent / ".cache" / "shakespeare-llama"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default=str(DATA), help="the tinyshakespeare text")
    return p


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train(parser().parse_args())
