"""Sample text from a trained model: ``python generate.py CKPT --prompt TEXT [options]``.

Any checkpoint written by ``train.py`` (a SAFFU model or the GPT baseline) is rebuilt from its
own record (``saffu_lab.checkpoint.load_run``): its config, weights and tokenizer. Each sample is
a document that starts with ``<sod>`` and the prompt's tokens (encoded with the checkpoint's
tokenizer) and goes on until ``<eod>`` or ``--max-tokens`` new tokens; it is printed as the text
of the prompt and its continuation, decoded once from the whole id sequence
(``saffu_lab.tokenizer.decode_text``), special tokens skipped. The same seed gives the same samples.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from saffu_lab.errors import ConfigError, SaffuLabError

SEPARATOR = "-" * 40


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (value and fix) and exit code 2."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python generate.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt_path", help="a checkpoint written by train.py, e.g. logs/train/runs/<run>/checkpoints/last.ckpt")
    p.add_argument("--prompt", default="", help="text the samples start with (after <sod>); empty: whole documents")
    p.add_argument("--num-samples", type=int, default=3, help="samples to draw")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per sample at most (a sample stops at <eod>)")
    p.add_argument("--temperature", type=float, default=1.0, help="> 0; below 1 sharpens the distribution")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same samples")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Bad values, before the checkpoint is read."""
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ConfigError(f"--temperature {args.temperature} must be a number > 0, e.g. --temperature 0.8")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k} must be >= 1, e.g. --top-k 50 (or leave it out to sample from all tokens)")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples {args.num_samples} must be >= 1, e.g. --num-samples 3")
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens {args.max_tokens} must be >= 1, e.g. --max-tokens 64")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError(f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} asks for a CUDA GPU but torch sees none; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {args.device!r}: use cpu, cuda or cuda:N")


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids (no special tokens: samples start after ``<sod>`` and end at ``<eod>`` by themselves)."""
    from saffu_lab.tokenizer import SPECIAL_TOKENS

    encoding = tokenizer.encode(prompt, add_special_tokens=False)
    specials = {tokenizer.token_to_id(t): t for t in SPECIAL_TOKENS}
    found = [specials[i] for i in encoding.ids if i in specials]
    if found:
        raise ConfigError(f"--prompt holds the special token {found[0]}; remove it (samples start after <sod> and stop at "
                          "<eod> by themselves)")
    return encoding.ids


def sample_ids(net, special, prompt_ids: list[int], num_samples: int, max_tokens: int, temperature: float,
               top_k: int | None, seed: int, device: str = "cpu") -> list[list[int]]:
    """``num_samples`` id sequences: the prompt's ids, then the continuation up to (not including) ``<eod>``."""
    device = torch.device(device)
    net = net.to(device).eval()
    prompt = torch.tensor([[special.sod, *prompt_ids]] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = net.generate(prompt, max_tokens, stop_id=special.eod, temperature=temperature, top_k=top_k,
                       generator=generator, banned_ids=(special.pad, special.sod, special.frg))
    rows = []
    for row in out[:, 1:].tolist():
        continuation = row[len(prompt_ids):]
        if special.eod in continuation:
            continuation = continuation[: continuation.index(special.eod)]
        rows.append(row[: len(prompt_ids)] + continuation)
    return rows


def generate(args: argparse.Namespace) -> list[str]:
    """The samples' texts for parsed arguments."""
    from saffu_lab.checkpoint import load_run
    from saffu_lab.framing import special_ids_of
    from saffu_lab.tokenizer import decode_text

    check_args(args)
    net, _cfg, tokenizer = load_run(args.ckpt_path, module=False)
    special = special_ids_of(tokenizer)
    prompt_ids = encode_prompt(tokenizer, args.prompt)
    rows = sample_ids(net, special, prompt_ids, args.num_samples, args.max_tokens, args.temperature, args.top_k,
                      args.seed, args.device)
    return [decode_text(tokenizer, row) for row in rows]


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``generate.py``: samples on stdout, separated by a line of dashes; a user
    error is one line on stderr and exit code 2."""
    args = parser().parse_args(argv)
    try:
        texts = generate(args)
    except SaffuLabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for text in texts:
        print(text)
        print(SEPARATOR)
    return 0
