import io
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from eval import interactive_gen
from fixtures_real_model import smollm2, tiny_llama_dir  # noqa: F401
from lib.utils.errors import UserInputError

BACKEND = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cli_prompt_prints_generation_and_exits_0(tiny_llama_dir):  # noqa: F811
    result = subprocess.run(
        [sys.executable, "-m", "eval.interactive_gen", "--hf_path", str(tiny_llama_dir),
         "--prompt", "The weather today is", "--max_new_tokens", "6"],
        cwd=BACKEND, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "The weather today is" not in result.stdout


@pytest.mark.slow
def test_prompts_from_stdin_until_empty_line(tiny_llama_dir, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nHow are you?\n\nnever read\n"))
    replies = interactive_gen.main(["--hf_path", str(tiny_llama_dir), "--max_new_tokens", "4"])
    assert len(replies) == 2 and all(replies)
    assert capsys.readouterr().out == "".join(f"{reply}\n" for reply in replies)


@pytest.mark.slow
def test_chat_keeps_the_conversation(tiny_llama_dir, monkeypatch):  # noqa: F811
    conversations = []
    encode = interactive_gen.encode

    def spy(tokenizer, messages, chat):
        conversations.append((chat, [message["content"] for message in messages]))
        return encode(tokenizer, messages, chat)

    monkeypatch.setattr(interactive_gen, "encode", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAnd then?\n"))
    replies = interactive_gen.main(["--hf_path", str(tiny_llama_dir), "--chat",
                                    "--max_new_tokens", "3", "--temperature", "0.8"])
    assert conversations == [(True, ["Hi"]), (True, ["Hi", replies[0], "And then?"])]


@pytest.mark.slow
def test_chat_template_formats_user_turns(tiny_llama_dir):  # noqa: F811
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    chat_text = tokenizer.decode(interactive_gen.encode(tokenizer, messages, True)["input_ids"][0])
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in chat_text
    assert chat_text.rstrip().endswith("<|im_start|>assistant")
    plain_ids = interactive_gen.encode(tokenizer, messages, False)["input_ids"][0]
    assert tokenizer.decode(plain_ids) == "What is 2+2?"


def test_bad_arguments():
    with pytest.raises(UserInputError, match="--max_new_tokens"):
        interactive_gen.main(["--max_new_tokens", "0"])
    with pytest.raises(UserInputError, match="--temperature"):
        interactive_gen.main(["--temperature", "-1"])
    with pytest.raises(UserInputError, match="--prompt is empty"):
        interactive_gen.main(["--prompt", "  "])
