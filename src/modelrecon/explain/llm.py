"""One chat-client interface for the LLMs that explain and score features, with two backends and a response cache.

Why: automatic explanation (as in EleutherAI's delphi) asks an LLM thousands of small questions. delphi runs them on
vLLM with GPUs; here the same questions go either to a small instruct model in-process (`LocalChat`, the embedded
SmolLM2-135M-Instruct by default: offline, on a laptop CPU) or to any OpenAI-compatible server (`OpenAIChat`: vLLM,
the llama.cpp server, ollama, hosted APIs), chosen by one spec string (`client_from_spec`). Every answer is cached on
disk by the exact question, so a rerun or a resumed run asks nothing twice.

    client = client_from_spec("openai:http://127.0.0.1:8000/v1#qwen")   # or "local", "local:MODEL"
    answers = client.chat_many([[{"role": "user", "content": "..."}], ...], progress=True)

`chat_many` never aborts a batch for one bad item: a failed request comes back as an `LLMError` in its slot.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelrecon.errors import BadInputError, reason
from modelrecon.files import write_text_atomic

if TYPE_CHECKING:
    from modelrecon.models.model import Model

DEFAULT_LOCAL_MODEL = "smollm2-135m"
TOP_LOGPROBS = 20  # the most OpenAI's API returns; local answers give as many
SPEC_FORMS = "'local', 'local:MODEL' or 'openai:URL#MODEL' (e.g. openai:http://127.0.0.1:8000/v1#qwen)"


class _DefaultCache:
    """Marker for 'the default cache folder', resolved only when a client is built (it needs the cache root)."""

    def __repr__(self) -> str:
        return "DEFAULT_CACHE"


DEFAULT_CACHE: Any = _DefaultCache()


@dataclass
class Completion:
    text: str
    # Top log-probabilities of the first generated token (token text -> logprob), when asked and the backend gives them.
    logprobs: dict[str, float] | None
    cached: bool = False


class LLMError(BadInputError):
    """A chat request that failed: unreachable or slow endpoint, malformed answer, a model that cannot chat."""


class ClientUnusable(LLMError):
    """The client cannot answer anything (unreachable, refused, a model that cannot chat): a run stops on it
    instead of recording the same failure for every item."""


# --- the response cache ------------------------------------------------------------------------------------------
class ResponseCache:
    """Answers on disk, one small JSON file per question, written atomically: concurrent threads and killed runs
    never leave a corrupt entry, and an unreadable entry is simply a miss."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()

    @staticmethod
    def key(identity: str, messages: list[dict[str, str]], max_tokens: int, temperature: float, logprobs: bool) -> str:
        blob = json.dumps([identity, messages, max_tokens, temperature, logprobs], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"  # two-level: a big cache stays listable

    def get(self, key: str) -> Completion | None:
        try:
            data = json.loads(self._path(key).read_text(encoding="utf-8"))
            text, logprobs = data["text"], data["logprobs"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(text, str) or not (logprobs is None or isinstance(logprobs, dict)):
            return None
        return Completion(text, logprobs, cached=True)

    def put(self, key: str, completion: Completion) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps({"text": completion.text, "logprobs": completion.logprobs}))
        except (OSError, BadInputError) as exc:
            raise LLMError(
                f"cannot write the LLM response cache in '{self.folder}' ({getattr(exc, 'strerror', None) or exc}); "
                "set MODELRECON_CACHE to a writable folder or disable the cache"
            ) from None


def _resolve_cache(cache) -> ResponseCache | None:
    if cache is None or isinstance(cache, ResponseCache):
        return cache
    if isinstance(cache, _DefaultCache):
        from modelrecon.models.loading import cache_root  # imports torch: only when a client is built

        return ResponseCache(cache_root() / "llm-responses")
    return ResponseCache(cache)


def _check_request(messages, max_tokens: int, temperature: float) -> None:
    if not isinstance(messages, list) or not messages:
        raise LLMError("a chat request needs a non-empty list of messages like [{'role': 'user', 'content': '...'}]")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise LLMError(f"bad chat message {m!r}: each message is a dict with string 'role' and 'content'")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise LLMError(f"max_tokens must be a positive integer, not {max_tokens!r}")
    if temperature < 0:
        raise LLMError(f"temperature must be >= 0, not {temperature!r}")


# --- the interface -----------------------------------------------------------------------------------------------
class ChatClient:
    """Base class: `chat` checks the cache and otherwise asks the backend's `_complete`."""

    name: str
    concurrency: int = 1  # requests `chat_many` runs at once

    def __init__(self, name: str, cache=DEFAULT_CACHE) -> None:
        self.name = name
        self.cache = _resolve_cache(cache)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def _identity(self) -> str:
        """What the cache key says about the answering model; a backend can add more than its name."""
        return self.name

    def _complete(self, messages: list[dict[str, str]], max_tokens: int, temperature: float, logprobs: bool):
        raise NotImplementedError

    def chat(
        self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0, logprobs: bool = False
    ) -> Completion:
        """One answer to a conversation (`[{'role': 'system'|'user'|'assistant', 'content': str}, ...]`)."""
        _check_request(messages, max_tokens, temperature)
        key = None
        if self.cache is not None:
            key = ResponseCache.key(self._identity(), messages, max_tokens, float(temperature), bool(logprobs))
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        completion = self._complete(messages, max_tokens, float(temperature), bool(logprobs))
        if key is not None:  # only well-formed answers get here: the backends raise on anything else
            self.cache.put(key, completion)
        return completion

    def chat_many(
        self, requests: list[list[dict[str, str]]], *, progress: bool = False, **kw
    ) -> list[Completion | LLMError]:
        """Answers to many conversations, in order; `concurrency` at a time. A failed request is an `LLMError` in
        its slot and never stops the others. `kw` goes to `chat` (max_tokens, temperature, logprobs)."""
        from modelrecon.progress import token_progress

        results: list[Completion | LLMError | None] = [None] * len(requests)
        counts = {"cached": 0, "failed": 0}
        lock = threading.Lock()

        with token_progress(
            len(requests), enabled=progress, label="asking the LLM", unit="requests", rate_unit="req"
        ) as advance:

            def one(i: int) -> None:
                try:
                    result: Completion | LLMError = self.chat(requests[i], **kw)
                except LLMError as exc:
                    result = exc
                with lock:
                    results[i] = result
                    if isinstance(result, LLMError):
                        counts["failed"] += 1
                    elif result.cached:
                        counts["cached"] += 1
                    advance(1, f"{counts['cached']} cached, {counts['failed']} failed")

            if self.concurrency <= 1 or len(requests) <= 1:
                for i in range(len(requests)):
                    one(i)
            else:
                with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
                    list(pool.map(one, range(len(requests))))  # list(): re-raises a bug in any worker
        return results  # type: ignore[return-value]


# --- in-process backend ------------------------------------------------------------------------------------------
class LocalChat(ChatClient):
    """A chat model run in-process through modelrecon's own loader (embedded name, local HF folder or .gguf), loaded
    on first use so that cached answers cost no load. Greedy at temperature 0, seeded sampling otherwise."""

    def __init__(
        self,
        model: str | os.PathLike | Model = DEFAULT_LOCAL_MODEL,
        *,
        device: str = "cpu",
        seed: int = 0,
        cache=DEFAULT_CACHE,
    ) -> None:
        self._model = None if isinstance(model, (str, os.PathLike)) else model
        self._spec = str(model) if self._model is None else None
        self.device, self.seed = device, seed
        self._lock = threading.Lock()  # one generation at a time: the model and its tokenizer are shared
        super().__init__(f"local:{self._spec if self._model is None else self._model.name}", cache)
        if self._model is not None:
            self._check_template(self._model)

    @property
    def model(self) -> Model:
        with self._lock:
            if self._model is None:
                from modelrecon.models.loading import load

                model = load(self._spec, device=self.device)
                self._check_template(model)
                self._model = model
        return self._model

    def _check_template(self, model: Model) -> None:
        if not getattr(model.tokenizer, "chat_template", None):
            raise ClientUnusable(
                f"model {model.name} cannot chat: its tokenizer has no chat template; "
                f"use an instruct model (e.g. {DEFAULT_LOCAL_MODEL}) or an endpoint"
            )

    def _identity(self) -> str:
        # A Model object's name says little (two tiny models can share one), so its weights name it; a folder or
        # file names itself by path, size and time, so re-trained weights do not get stale answers.
        if self._model is not None and self._spec is None:
            return f"{self.name}@{self._model.weights_sha256()}"
        path = Path(self._spec).expanduser()
        if path.exists():
            files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
            stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
            return f"{self.name}@{path.resolve()}@{hashlib.sha256(repr(stamp).encode()).hexdigest()}"
        return self.name

    def _complete(self, messages, max_tokens, temperature, logprobs) -> Completion:
        import torch

        model = self.model
        tok = model.tokenizer
        try:
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # a template that rejects these roles (e.g. no system role) is the user's to fix
            raise LLMError(f"model {model.name}'s chat template rejects these messages: {reason(exc)}") from None
        # The template writes the BOS token itself when the model wants one: add no special tokens twice.
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # Plain temperature sampling (no top-k/top-p from the model's generation config), or greedy.
        sample = (
            dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            if temperature > 0
            else {"do_sample": False}
        )
        with self._lock, torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # sampling is reproducible per question, as the cache assumes
            out = model.hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                **sample,
                eos_token_id=tok.eos_token_id,
                pad_token_id=pad,
                output_logits=logprobs,
                return_dict_in_generate=True,
            )
        new = out.sequences[0, ids.shape[1] :].tolist()
        if new and new[-1] == tok.eos_token_id:
            new = new[:-1]
        text = tok.decode(new, skip_special_tokens=True)
        top = None
        if logprobs:
            # The raw distribution of the first new token (before temperature), as OpenAI's API reports it.
            values, indices = torch.log_softmax(out.logits[0][0].float(), dim=-1).topk(TOP_LOGPROBS)
            top = {}
            for v, i in zip(values.tolist(), indices.tolist(), strict=True):
                top.setdefault(tok.decode([i]), v)  # two tokens that decode alike: keep the likelier
        return Completion(text, top)


# --- OpenAI-compatible HTTP backend ------------------------------------------------------------------------------
class OpenAIChat(ChatClient):
    """Any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, ollama, hosted APIs), `concurrency` requests at
    a time. Retries connection errors, timeouts, 429 and 5xx with exponential back-off; `retries` counts all tries."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 60,
        retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 4,
        cache=DEFAULT_CACHE,
    ) -> None:
        try:
            import openai
        except ImportError:
            raise LLMError("the openai client is not installed; pip install 'modelrecon[explain]'") from None
        if retries < 1 or concurrency < 1 or timeout <= 0:
            raise LLMError(
                f"retries and concurrency must be >= 1 and timeout > 0 (got {retries}, {concurrency}, {timeout})"
            )
        self.base_url, self.model_name = base_url.rstrip("/"), model
        self.timeout, self.retries, self.backoff, self.concurrency = float(timeout), retries, backoff, concurrency
        self._openai = openai
        # The SDK's own retries are off: ours know which errors are worth another try and say how many were made.
        self._client = openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
            timeout=self.timeout,
            max_retries=0,
        )
        super().__init__(f"openai:{self.base_url}#{model}", cache)

    def _complete(self, messages, max_tokens, temperature, logprobs) -> Completion:
        openai = self._openai
        extra = dict(logprobs=True, top_logprobs=TOP_LOGPROBS) if logprobs else {}
        for attempt in range(self.retries):
            last = attempt == self.retries - 1
            try:
                raw = self._client.chat.completions.with_raw_response.create(
                    model=self.model_name, messages=messages, max_tokens=max_tokens, temperature=temperature, **extra
                )
                return self._parse(raw.text, logprobs)
            except openai.APITimeoutError:
                if last:
                    raise LLMError(
                        f"request to {self.base_url} timed out after {self.timeout:g} s ({self.retries} tries); "
                        "raise --timeout or use a faster model"
                    ) from None
            except openai.APIConnectionError as exc:
                if last:
                    raise ClientUnusable(
                        f"cannot reach {self.base_url} ({_connection_cause(exc)}) after {self.retries} tries; "
                        "start the server or check --explainer openai:URL#MODEL"
                    ) from None
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status != 429 and status < 500:
                    raise ClientUnusable(_refusal(self.base_url, self.model_name, exc)) from None
                if last:
                    hint = "lower --concurrency or wait" if status == 429 else "check the server's log"
                    raise LLMError(
                        f"{self.base_url} answered HTTP {status} after {self.retries} tries "
                        f"({_status_text(exc)}); {hint}"
                    ) from None
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable: the last try returns or raises")

    def _parse(self, body: str, logprobs: bool) -> Completion:
        def malformed(what: str) -> LLMError:
            return LLMError(f"malformed answer from {self.base_url}: {what}")

        try:
            data = json.loads(body)
        except ValueError:
            raise malformed(f"not JSON ({body[:60]!r})") from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise malformed("no choices")
        choice = choices[0]
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str) or not content:
            # Reasoning models can spend all of max_tokens before answering: say so.
            raise malformed(f"empty content (finish_reason {choice.get('finish_reason')!r}); try a larger max_tokens")
        return Completion(content, _first_top_logprobs(choice) if logprobs else None)


def _first_top_logprobs(choice: dict) -> dict[str, float] | None:
    """choices[0].logprobs.content[0].top_logprobs as {token: logprob}; None when the server gives none."""
    try:
        entries = choice["logprobs"]["content"][0]["top_logprobs"]
        top = {str(e["token"]): float(e["logprob"]) for e in entries}
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return top or None


def _connection_cause(exc: BaseException) -> str:
    """The innermost cause of a connection error, short: 'connection refused', 'name or service not known', ..."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = reason(exc, 120)
    if text.startswith("[Errno") and "] " in text:
        text = text.split("] ", 1)[1]
    return text[:1].lower() + text[1:]


def _status_text(exc) -> str:
    body = exc.body
    if isinstance(body, dict):
        body = body.get("message") or body.get("error") or body
    return reason(Exception(str(body or exc.message)), 120)


def _refusal(url: str, model: str, exc) -> str:
    status = exc.status_code
    hint = {
        401: "check the API key (OPENAI_API_KEY)",
        403: "check the API key's permissions",
        404: f"check the URL (it usually ends in /v1) and that the server serves model '{model}'",
    }.get(status, f"check the model name '{model}' and the request")
    return f"{url} refused the request (HTTP {status}: {_status_text(exc)}); {hint}"


# --- choosing a client -------------------------------------------------------------------------------------------
def client_from_spec(
    spec: str, *, cache=DEFAULT_CACHE, timeout: float = 60.0, concurrency: int = 4, retries: int = 3
) -> ChatClient:
    """A client from a spec string: 'local' (the embedded SmolLM2), 'local:MODEL' (embedded name, folder or .gguf),
    or 'openai:URL#MODEL' (an OpenAI-compatible endpoint). timeout, concurrency and retries apply to endpoints."""
    spec = spec.strip()
    if spec == "local":
        return LocalChat(DEFAULT_LOCAL_MODEL, cache=cache)
    if spec.startswith("local:") and spec[len("local:") :]:
        return LocalChat(spec[len("local:") :], cache=cache)
    if spec.startswith("openai:"):
        url, sep, model = spec[len("openai:") :].rpartition("#")
        if sep and model and url.startswith(("http://", "https://")):
            return OpenAIChat(url, model, timeout=timeout, concurrency=concurrency, retries=retries, cache=cache)
    raise BadInputError(f"unknown LLM spec {spec!r}: use {SPEC_FORMS}")
