"""A model server deployed on a GPU instance, tested from here with the official client.

The server is the example's own stand-in (openai_server.py); a real one is a line away:
gpu_service("vllm serve Qwen/Qwen3-0.6B --port 8000", port=8000, spec="L4").
"""

import pytest

pytest.importorskip("openai")


@pytest.fixture(scope="session")
def chat(gpu_service):
    server = gpu_service("python3 openai_server.py --port 8000 --loading-s 1", port=8000, spec="L4")
    return server.openai_client()


def ask(chat, prompt):
    answer = chat.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": prompt}]
    )
    return answer.choices[0].message.content


def test_the_model_is_served(chat):
    assert [model.id for model in chat.models.list()] == ["tiny-chat"]


def test_same_prompt_same_reply(chat):
    assert ask(chat, "What is a GPU?") == ask(chat, "What is a GPU?")


def test_reply_depends_on_prompt(chat):
    assert ask(chat, "What is a GPU?") != ask(chat, "What is a TPU?")
