"""Dictionaries by name: a local folder or file, a circuit-tracer config (its `hf://` paths included), a Hugging Face
repo id, or a SAELens release and SAE id, fetched through `huggingface_hub`.

What `--transcoders` and `--dict` accept:

- a folder: modelrecon's (`config.json`), circuit-tracer's (`config.yaml` + `layer_{i}.safetensors`), SAELens's
  (`cfg.json` + `sae_weights.safetensors`) or one GemmaScope `params.npz` file;
- a circuit-tracer `config.yaml` file, whose `transcoders` list may name `hf://org/repo/path` files;
- `org/repo`, `org/repo/subfolder`, either with `@revision`: the repo's `config.yaml` (circuit-tracer, e.g.
  `mntss/transcoder-Llama-3.2-1B`, `mwhanna/gemma-scope-transcoders`), else `cfg.json` (SAELens), else `params.npz`
  (GemmaScope), else `config.json` (modelrecon), in that subfolder;
- `hf://org/repo/path`: the same, for one path;
- any other URL (`s3://bucket/folder`, `gs://...`, `file:///...`; storage.py): a folder as above on that storage,
  refused when its config (written last) is missing, then read from a temporary copy;
- `saelens:RELEASE/SAE_ID` (e.g. `saelens:gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82`): SAELens's
  directory when sae_lens is installed, else the GemmaScope releases below, whose SAE ids are paths in their repos.

Files come from the hub when online and from its cache otherwise (`HF_HUB_CACHE`, `HF_HUB_OFFLINE=1` to never try
the network). Naming a repo is asking for the network; nothing else here touches it. Everything read is untrusted
input: safetensors, YAML (safe loader), JSON and pickle-free `.npz` only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from modelrecon import storage
from modelrecon.dictionaries.model import Dictionary
from modelrecon.errors import BadInputError

# GemmaScope releases as SAELens names them: release -> (repo, what each SAE reads and writes)
GEMMA_SCOPE_RELEASES = {
    "gemma-scope-2b-pt-res": ("google/gemma-scope-2b-pt-res", "resid_post"),
    "gemma-scope-2b-pt-mlp": ("google/gemma-scope-2b-pt-mlp", "mlp.out"),
    "gemma-scope-2b-pt-transcoders": ("google/gemma-scope-2b-pt-transcoders", "transcoder"),
    "gemma-scope-9b-pt-res": ("google/gemma-scope-9b-pt-res", "resid_post"),
    "gemma-scope-9b-pt-mlp": ("google/gemma-scope-9b-pt-mlp", "mlp.out"),
}
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./=-]+)?(@[\w./-]+)?$")


def looks_like_hub_name(name: str) -> bool:
    return name.startswith(("hf://", "saelens:")) or bool(_REPO.match(name))


def open_dictionaries(name: str | os.PathLike) -> list[Dictionary]:
    """The dictionaries `name` names (see the module docstring); one-line BadInputErrors for what cannot be read."""
    from modelrecon.dictionaries.formats import load_dictionaries

    text = str(name)
    if storage.is_url(text) and not text.startswith("hf://"):  # hf:// names a hub path, read through the cache
        return load_dictionaries(text)
    path = storage.local_path(text).expanduser()
    if path.is_dir():
        return load_dictionaries(path)
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):
            return _circuit_tracer_config(path)
        if path.suffix == ".npz":
            raise BadInputError(f"'{path}': a GemmaScope params.npz needs its site; name it by its SAELens release "
                                f"(saelens:RELEASE/SAE_ID) or its hub path")  # fmt: skip
        raise BadInputError(f"'{path}' is a file; give a dictionary folder, a circuit-tracer config.yaml or a name")
    if text.startswith("saelens:"):
        return _saelens(text.removeprefix("saelens:"))
    if looks_like_hub_name(text):
        repo, sub, revision = _parse_repo(text)
        return _from_repo(repo, sub, revision)
    raise BadInputError(f"{text!r} is neither a folder nor a dictionary name (org/repo[/path][@revision], "
                        f"hf://org/repo/path, saelens:RELEASE/SAE_ID) nor a URL (s3://bucket/folder)")  # fmt: skip


def _parse_repo(text: str) -> tuple[str, str, str | None]:
    """(repo id, subfolder or "", revision) from `hf://org/repo/path?revision=R` or `org/repo/path@R`."""
    revision = None
    if text.startswith("hf://"):
        text = text.removeprefix("hf://")
        if "?revision=" in text:
            text, revision = text.split("?revision=", 1)
    elif "@" in text:
        text, revision = text.rsplit("@", 1)
    parts = text.strip("/").split("/")
    if len(parts) < 2:
        raise BadInputError(f"{text!r} names no repo; write org/repo[/path][@revision]")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision


class NotCachedError(BadInputError):
    """A hub file that is neither in the cache nor reachable."""


def _download(repo: str, filename: str, revision: str | None = None, required: bool = True) -> Path | None:
    """A file of a hub repo, from the cache or the network; None when the repo has no such file (not `required`;
    offline, a file missing from a cached repo counts as absent). A repo neither cached nor reachable, or a
    `required` file missing from the cache offline, is a NotCachedError."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache, local_files_only=offline))
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: first)
        if not required and (Path(cache) / f"models--{repo.replace('/', '--')}").is_dir():
            return None
        raise NotCachedError(
            f"{repo}/{filename} is not in {cache} and the hub cannot be reached"
            f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: fetch it once online"
        ) from None
    except EntryNotFoundError:
        if required:
            raise BadInputError(f"hub repo {repo} has no {filename}") from None
        return None
    except RepositoryNotFoundError:
        raise BadInputError(f"no hub repo {repo!r} (or it is private: log in with `hf auth login`)") from None
    except OSError as exc:
        raise BadInputError(f"cannot fetch {repo}/{filename}: {exc}") from None


def _from_repo(repo: str, sub: str, revision: str | None) -> list[Dictionary]:
    """The formats tried in order; a file that is absent moves on, one that cannot be fetched stops."""
    from modelrecon.dictionaries import formats

    prefix = f"{sub}/" if sub else ""
    if sub.endswith(".yaml"):
        folder = sub.rpartition("/")[0]
        return _circuit_tracer_config(_download(repo, sub, revision), repo, f"{folder}/" if folder else "", revision)
    if sub.endswith(".npz"):
        return [formats.import_gemma_scope(_download(repo, sub, revision), _gemma_scope_site(repo, sub))]
    config = _download(repo, prefix + formats.CIRCUIT_TRACER_CONFIG, revision, required=False)
    if config is not None:
        return _circuit_tracer_config(config, repo, prefix, revision)
    cfg = _download(repo, prefix + formats.SAELENS_CONFIG, revision, required=False)
    if cfg is not None:
        _download(repo, prefix + formats.SAELENS_WEIGHTS, revision)
        return [formats.import_saelens(cfg.parent)]
    params = _download(repo, prefix + "params.npz", revision, required=False)
    if params is not None:
        return [formats.import_gemma_scope(params, _gemma_scope_site(repo, sub))]
    own = _download(repo, prefix + "config.json", revision, required=False)
    if own is not None:
        return _own_set(repo, prefix, revision, own)
    raise BadInputError(f"{repo}{'/' + sub if sub else ''} holds no dictionary this reads (config.yaml, cfg.json, "
                        f"params.npz or config.json)")  # fmt: skip


def _own_set(repo: str, prefix: str, revision: str | None, config: Path) -> list[Dictionary]:
    """A modelrecon dictionary (or set) in a repo: the index, then each member's files."""
    import json

    from modelrecon.dictionaries.formats import load_dictionaries

    try:
        index = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"'{config}' is not JSON ({exc})") from None
    listed = index.get("dictionaries") if isinstance(index, dict) else None  # save_dictionaries' index of members
    members = [f"dictionary_{i}/" for i in range(len(listed) if isinstance(listed, list) else 0)] if isinstance(
        index, dict) and index.get("format") == "modelrecon-dictionary-set" else [""]  # fmt: skip
    for member in members:
        for name in ("config.json", "dictionary.safetensors"):
            _download(repo, prefix + member + name, revision)
    return load_dictionaries(config.parent)


def _circuit_tracer_config(config: Path, repo: str | None = None, prefix: str = "",
                           revision: str | None = None) -> list[Dictionary]:  # fmt: skip
    """A circuit-tracer config: its `transcoders` list (hf:// paths fetched, others relative to the config), or the
    per-layer files beside it (fetched from `repo`, under `prefix`, when it came from one)."""
    from modelrecon.dictionaries import formats

    cfg = formats._read_yaml(config, "circuit-tracer config")
    listed = cfg.get("transcoders")
    if listed is not None:
        if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            raise BadInputError(f"'{config}': 'transcoders' must be a list of paths")
        files = []
        for entry in listed:
            if entry.startswith("hf://"):
                r, sub, rev = _parse_repo(entry)
                files.append(_download(r, sub, rev))
            else:
                files.append((config.parent / entry).resolve())
        return formats.import_circuit_tracer(config.parent, layer_files=files)
    if repo is not None:  # a transcoder set's layer_{i}, or a CLT's W_enc_{i} and W_dec_{i}
        first = "layer_{}" if cfg.get("model_kind") == "transcoder_set" else "W_enc_{}"
        layer = 0
        while _download(repo, f"{prefix}{first.format(layer)}.safetensors", revision, required=False) is not None:
            if first.startswith("W_enc"):
                _download(repo, f"{prefix}W_dec_{layer}.safetensors", revision)
            layer += 1
    return formats.import_circuit_tracer(config.parent)


def _gemma_scope_site(repo: str, sub: str) -> str | tuple[str, str]:
    """GemmaScope's paths start with `layer_L/`; the repo says what its SAEs read (res, mlp) or that they are
    transcoders."""
    match = re.match(r"layer_(\d+)/", sub)
    kind = next((k for r, k in GEMMA_SCOPE_RELEASES.values() if r == repo), None)
    if kind is None:
        kind = "transcoder" if "transcoder" in repo else "mlp.out" if "-mlp" in repo else "resid_post"
    if match is None:
        raise BadInputError(f"{repo}/{sub}: GemmaScope paths start with layer_L/; give the full path to params.npz")
    layer = int(match.group(1))
    if kind == "transcoder":
        return f"layers.{layer}.mlp.in", f"layers.{layer}.mlp.out"
    return f"layers.{layer}.{kind}"


def _saelens(spec: str) -> list[Dictionary]:
    """`RELEASE/SAE_ID`: SAELens's own directory when sae_lens is installed, else the GemmaScope releases."""
    release, _, sae_id = spec.partition("/")
    if not sae_id:
        raise BadInputError(f"saelens:{spec} names no SAE; write saelens:RELEASE/SAE_ID")
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        get_pretrained_saes_directory = None
    if get_pretrained_saes_directory is not None:
        entry = get_pretrained_saes_directory().get(release)
        if entry is not None and sae_id in entry.saes_map:
            return _from_repo(entry.repo_id, entry.saes_map[sae_id], None)
    if release in GEMMA_SCOPE_RELEASES:
        repo, _ = GEMMA_SCOPE_RELEASES[release]
        if sae_id.endswith("canonical"):
            raise BadInputError(f"saelens:{spec}: canonical ids need SAELens's directory (pip install sae-lens); "
                                f"give the id with its L0 (e.g. layer_12/width_16k/average_l0_82)")  # fmt: skip
        return [_gemma_scope(repo, sae_id.strip("/"))]
    known = ", ".join(GEMMA_SCOPE_RELEASES)
    raise BadInputError(f"unknown SAELens release {release!r} (known without sae-lens installed: {known}); install "
                        f"sae-lens, or name the hub path: org/repo/path")  # fmt: skip


def _gemma_scope(repo: str, sub: str) -> Dictionary:
    from modelrecon.dictionaries.formats import import_gemma_scope

    return import_gemma_scope(_download(repo, f"{sub}/params.npz"), _gemma_scope_site(repo, sub + "/"))
