"""Generate text with a quantized export or a base model, streamed to stdout.

    python -m eval.interactive_gen --hf_path smollm2-135m --chat --prompt "What is a prime?"
    python -m eval.interactive_gen --hf_path DIR --chat     # prompts read from stdin

With --prompt, one generation. Without it, every line read from stdin is a
prompt, until end of input or an empty line. Only the new tokens are printed,
as they are produced. --chat formats the prompts with the tokenizer's chat
template (user turns; in the interactive loop the conversation keeps the
earlier turns); tokenizers without one get the plain prompt. Decoding is
greedy at --temperature 0 (default) and samples at a positive temperature.
"""
import argparse
import sys

import glog
import torch
from transformers import TextStreamer

from eval.cli_common import add_device_arguments, resolve_device, resolve_dtype
from lib.utils.errors import UserInputError, run_cli
from lib.utils.model_loading import DEFAULT_MODEL, load_model_for_eval


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.interactive_gen", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf_path", default=DEFAULT_MODEL,
                        help="quantized export directory, or a base model: alias, "
                             ".gguf file, HF directory or hub id (default %(default)s)")
    parser.add_argument("--prompt", default=None,
                        help="generate once from this prompt (default: read prompts from stdin)")
    parser.add_argument("--max_new_tokens", type=int, default=128,
                        help="most tokens generated per prompt (default %(default)s)")
    parser.add_argument("--chat", action="store_true",
                        help="apply the tokenizer's chat template (instruct models)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (default); > 0: sampling temperature")
    parser.add_argument("--seed", type=int, default=0,
                        help="torch.manual_seed for sampling (default %(default)s)")
    add_device_arguments(parser)
    return parser


def _check_args(args):
    if args.max_new_tokens < 1:
        raise UserInputError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserInputError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if args.prompt is not None and not args.prompt.strip():
        raise UserInputError("--prompt is empty; pass some text, or leave it out to "
                             "read prompts from stdin")


def read_prompts(stream):
    """Prompts from `stream`, one a line, until end of input or an empty line."""
    while True:
        if stream.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line.strip():
            return
        yield line.rstrip("\r\n")


def encode(tokenizer, messages: list[dict], chat: bool) -> dict:
    """Model inputs: the chat-formatted conversation, or the last message as plain text."""
    if chat:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return tokenizer(messages[-1]["content"], return_tensors="pt")


@torch.inference_mode()
def generate(model, tokenizer, inputs: dict, args) -> str:
    """Generate from `inputs`, streaming the new text to stdout; returns that text."""
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    sampling = {"do_sample": False}
    if args.temperature > 0:
        sampling = {"do_sample": True, "temperature": args.temperature}
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, streamer=streamer,
                            pad_token_id=pad_id, **sampling)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    _check_args(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load_model_for_eval(args.hf_path, device, dtype)
    chat = args.chat and tokenizer.chat_template is not None
    if args.chat and not chat:
        glog.warning(f"the tokenizer of {args.hf_path} has no chat template; "
                     f"using the plain prompts")
    torch.manual_seed(args.seed)
    prompts = [args.prompt] if args.prompt is not None else read_prompts(sys.stdin)
    messages, replies = [], []
    for prompt in prompts:
        if not chat:
            messages = []
        messages.append({"role": "user", "content": prompt})
        replies.append(generate(model, tokenizer, encode(tokenizer, messages, chat), args))
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


if __name__ == "__main__":
    run_cli(main)
