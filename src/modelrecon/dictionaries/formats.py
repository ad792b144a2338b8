"""Dictionary files: modelrecon's own folder, SAELens folders and circuit-tracer transcoder folders.

- modelrecon (`save_dictionary` / `load_dictionary`, `save_dictionaries` / `load_dictionaries`): `config.json` (the
  DictionaryConfig with its provenance, `format`, `format_version`, `dtype`, the weights' sha256) and
  `dictionary.safetensors` (the parameters with the normalisation folded in). A set of dictionaries is a folder with
  an index `config.json` (`format: modelrecon-dictionary-set`) and one such folder per dictionary, `dictionary_{i}`.
- SAELens 6 (`export_saelens` / `import_saelens`): `cfg.json` + `sae_weights.safetensors` (SAEs and per-layer
  transcoders).
- circuit-tracer (`export_circuit_tracer` / `import_circuit_tracer`): `config.yaml` + `layer_{i}.safetensors` for a
  set of per-layer transcoders, `config.yaml` + `W_enc_{i}.safetensors` / `W_dec_{i}.safetensors` for a CLT.

Every writer builds the folder beside the target and renames it into place, so a failure never leaves a half-written
folder. Any folder may also be an fsspec URL (s3://, gs://, ...; storage.py): a writer then builds the folder locally
and uploads it file by file, its config (the file whose presence means "complete") last, and a reader refuses a URL
without that config before it downloads the rest to a temporary folder. Every reader treats the folder as
untrusted: safetensors and JSON / YAML (safe_load) only, every tensor's name, shape and dtype checked against the
config, and a one-line BadInputError saying what is wrong and what to do.
docs/dictionary-formats.md has the tables.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modelrecon import storage
from modelrecon.dictionaries.model import Dictionary, DictionaryConfig
from modelrecon.errors import BadInputError, reason
from modelrecon.files import atomic_folder, json_safe

FORMAT = "modelrecon-dictionary"
SET_FORMAT = "modelrecon-dictionary-set"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "dictionary.safetensors"
SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
CIRCUIT_TRACER_CONFIG = "config.yaml"
# The SAELens config layout written here is that of SAELens 6; without a 6.x version SAELens would run its pre-6.0
# config conversion on it.
SAELENS_LAYOUT_VERSION = "6.0.0"

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# modelrecon site (without `layers.{L}.`) -> TransformerLens hook (without `blocks.{L}.`), for SAELens' hook_name.
# `mlp.hook_in` is TransformerLens' bridge name for the MLP's (normalised) input, the one circuit-tracer also uses.
SAELENS_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn.out": "hook_attn_out",
    "mlp.in": "mlp.hook_in",
    "mlp.out": "hook_mlp_out",
}
SAELENS_HOOKS_READ = {
    **{v: k for k, v in SAELENS_HOOKS.items()},
    "mlp.hook_out": "mlp.out",
    "ln2.hook_normalized": "mlp.in",
}
# circuit-tracer's feature_input_hook / feature_output_hook (it adds the layer itself).
CIRCUIT_TRACER_HOOKS = {
    "mlp.in": "mlp.hook_in",
    "mlp.out": "mlp.hook_out",
    "resid_mid": "hook_resid_mid",
    "resid_pre": "hook_resid_pre",
}
CIRCUIT_TRACER_HOOKS_READ = {
    **{v: k for k, v in CIRCUIT_TRACER_HOOKS.items()},
    "hook_mlp_out": "mlp.out",
    "ln2.hook_normalized": "mlp.in",
}
LAYER_SITE = re.compile(r"^layers\.(\d+)\.(.+)$")


# --- writing folders atomically ----------------------------------------------------------------------------------
@contextmanager
def _atomic_folder(
    folder: str | Path, is_ours: Callable[[str | Path], bool], what: str, marker: str = CONFIG_FILE
) -> Iterator[Path]:
    """Yield an empty temporary folder beside `folder`; on success it replaces `folder`, on failure it is removed.

    An existing `folder` is replaced only when it is empty or `is_ours` says it holds the same kind of files: nothing
    else is ever deleted. A URL: the folder is built in a local temporary folder, then published with `marker` (the
    format's config) written last (storage.publish_folder)."""
    if storage.is_url(folder):
        with _remote_folder(str(folder).rstrip("/"), is_ours, what, marker) as temp:
            yield temp
        return
    folder = storage.local_path(folder)
    if folder.exists() and not folder.is_dir():
        raise BadInputError(f"'{folder}' is a file; choose a folder path for the {what}")
    if folder.is_dir() and any(folder.iterdir()) and not is_ours(folder):
        raise BadInputError(f"'{folder}' exists and does not hold a {what}; remove it or choose another folder")
    with atomic_folder(folder) as temp:
        try:
            yield temp
        except OSError as exc:
            raise BadInputError(f"cannot write '{folder}': {reason(exc)}; check the disk and the path") from None


@contextmanager
def _remote_folder(url: str, is_ours: Callable[[str | Path], bool], what: str, marker: str) -> Iterator[Path]:
    if storage.is_file(url):
        raise BadInputError(f"'{url}' is a file; choose a folder URL for the {what}")
    if storage.list_files(url) and not is_ours(url):
        raise BadInputError(f"'{url}' exists and does not hold a {what}; remove it or choose another URL")
    with tempfile.TemporaryDirectory(prefix="modelrecon-") as temp:
        try:
            yield Path(temp)
        except OSError as exc:
            raise BadInputError(f"cannot write '{url}': {reason(exc)}; check the disk and the path") from None
        try:
            storage.publish_folder(Path(temp), url, (marker,))
        except OSError as exc:
            raise BadInputError(f"cannot write '{url}': {reason(exc)}; check the URL and your credentials") from None


def _names(folder: str | Path) -> set[str]:
    """The names in a folder (a URL: the paths of every file under it, relative to it)."""
    if storage.is_url(folder):
        return set(storage.list_files(folder))
    return {p.name for p in Path(folder).iterdir()}


def _loading(folder: str | Path, marker: str, what: str):
    """The local folder to read: `folder` itself, or a temporary copy of a URL that holds a complete `what`."""
    if storage.is_url(folder):
        storage.check_complete(str(folder), (marker,), what)
    return storage.local_copy(folder)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(json_safe(data), indent=2, default=str) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


# --- reading untrusted files -------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict:
    return _read_mapping(path, what, "JSON", json.loads, (json.JSONDecodeError,), "a JSON object")


def _read_yaml(path: Path, what: str) -> dict:
    import yaml  # PyYAML (a dependency of transformers); safe_load only

    return _read_mapping(path, what, "YAML", yaml.safe_load, (yaml.YAMLError,), "a YAML mapping")


def _read_mapping(path: Path, what: str, fmt: str, parse, errors: tuple, mapping: str) -> dict:
    """A config file's top-level mapping, or a one-line BadInputError naming the file and the fix."""
    if not path.is_file():
        raise BadInputError(f"'{path}' is missing; is '{path.parent}' a {what}?")
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, *errors) as exc:
        raise BadInputError(f"'{path}' is not valid {fmt} ({reason(exc)}); re-export the {what}") from None
    if not isinstance(data, dict):
        raise BadInputError(f"'{path}' must hold {mapping}; re-export the {what}")
    return data


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BadInputError(f"'{path}' is missing; is '{path.parent}' a complete {what}?")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for a corrupt header or truncated data
        raise BadInputError(f"'{path}' is not a readable safetensors file ({reason(exc)}); re-export it") from None


def _check_tensors(
    tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], path: Path, optional: Sequence[str] = ()
) -> None:
    """Every expected tensor present with its shape, a floating dtype and no NaN; nothing unexpected."""
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise BadInputError(f"'{path}' holds unexpected tensors {unknown}; it does not match its config")
    for name, shape in expected.items():
        if name not in tensors:
            if name in optional:
                continue
            raise BadInputError(f"'{path}' lacks the tensor '{name}'; the file is incomplete, re-export it")
        tensor = tensors[name]
        if tuple(tensor.shape) != tuple(shape):
            raise BadInputError(
                f"'{path}': tensor '{name}' has shape {list(tensor.shape)}, its config says {list(shape)}; "
                "the weights and the config do not belong together"
            )
        if not tensor.is_floating_point():
            raise BadInputError(f"'{path}': tensor '{name}' is {tensor.dtype}, not floating point; re-export it")
        if not torch.isfinite(tensor).all():
            raise BadInputError(f"'{path}': tensor '{name}' contains NaN or infinite values; the dictionary is broken, "
                                "retrain or re-download it")  # fmt: skip


def _check_config_fields(data: dict, path: Path) -> None:
    """Types of the DictionaryConfig fields in an untrusted JSON object (DictionaryConfig.check does the rest)."""

    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    checks = {
        "kind": (lambda v: isinstance(v, str), "a string"),
        "d_in": (positive_int, "a positive integer"),
        "d_out": (positive_int, "a positive integer"),
        "width": (positive_int, "a positive integer"),
        "activation": (lambda v: isinstance(v, str), "a string"),
        "k": (lambda v: v is None or positive_int(v), "a positive integer or null"),
        "input_sites": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of strings"),
        "output_sites": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a list of strings"),
        "jumprelu_bandwidth": (
            lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
            "a positive number",
        ),
        "provenance": (lambda v: isinstance(v, dict), "an object"),
    }
    for name in ("kind", "d_in", "d_out", "width", "input_sites", "output_sites"):
        if name not in data:
            raise BadInputError(f"'{path}' lacks the field '{name}'; re-export the dictionary")
    for name, (ok, what) in checks.items():
        if name in data and not ok(data[name]):
            raise BadInputError(f"'{path}': field '{name}' must be {what}, got {data[name]!r}; fix or re-export it")


def _config_from_dict(data: dict, path: Path) -> DictionaryConfig:
    _check_config_fields(data, path)
    try:
        return DictionaryConfig.from_dict(data)
    except BadInputError as exc:
        raise BadInputError(f"'{path}': {exc}") from None


# --- modelrecon's own folder ---------------------------------------------------------------------------------------
def _expected_shapes(config: DictionaryConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of a saved dictionary (its state dict without the normalisation scales, which are folded)."""
    n, c = config.n_layers, config
    shapes: dict[str, tuple[int, ...]] = {"W_enc": (n, c.d_in, c.width), "b_enc": (n, c.width)}
    shapes.update({f"W_dec.{i}": (c.width, n - i, c.d_out) for i in range(n)})
    shapes["b_dec"] = (n, c.d_out)
    if c.kind == "skip-transcoder":
        shapes["W_skip"] = (n, c.d_in, c.d_out)
    if c.activation == "jumprelu":
        shapes["log_threshold"] = (n, c.width)
    shapes["threshold"] = (n, c.width)
    return shapes


def _assemble(config: DictionaryConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> Dictionary:
    """A Dictionary with these (already checked) tensors, scales 1."""
    dictionary = Dictionary(config, dtype)
    state = dictionary.state_dict()
    state.update({k: v.to(dtype) for k, v in tensors.items()})
    dictionary.load_state_dict(state)
    return dictionary.eval()


def _state_to_save(dictionary: Dictionary) -> dict[str, torch.Tensor]:
    folded = dictionary.fold_normalisation()
    state = {k: v for k, v in folded.state_dict().items() if k not in ("input_scale", "output_scale")}
    return _contiguous(state)


_OWN_FILES = re.compile(rf"^((dictionary_\d+/)?({re.escape(CONFIG_FILE)}|{re.escape(WEIGHTS_FILE)}))$")


def _is_own_folder(folder: str | Path) -> bool:
    """A modelrecon dictionary (or set) is there; at a URL also the files an interrupted upload left (no config)."""
    try:
        config = storage.read_bytes(storage.join(folder, CONFIG_FILE))
    except FileNotFoundError:
        return storage.is_url(folder) and all(_OWN_FILES.match(n) for n in _names(folder))
    except OSError:
        return False
    try:
        return json.loads(config).get("format") in (FORMAT, SET_FORMAT)
    except (ValueError, AttributeError):
        return False


def _write_own(dictionary: Dictionary, folder: Path) -> None:
    if not isinstance(dictionary, Dictionary):
        raise BadInputError(f"expected a modelrecon Dictionary, got {type(dictionary).__name__}")
    state = _state_to_save(dictionary)
    dtype = dictionary.b_enc.dtype
    if dtype not in DTYPE_NAMES:
        raise BadInputError(f"cannot save a dictionary of dtype {dtype}; convert it to float32 first")
    save_file(state, str(folder / WEIGHTS_FILE))
    from modelrecon import __version__

    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": DTYPE_NAMES[dtype],
        "modelrecon_version": __version__,
        "weights_sha256": _sha256(folder / WEIGHTS_FILE),
        **dictionary.config.to_dict(),
    }
    _write_json(folder / CONFIG_FILE, config)


def save_dictionary(dictionary: Dictionary, folder: str | Path) -> Path | str:
    """Save one dictionary as modelrecon's folder (`config.json` + `dictionary.safetensors`), normalisation folded.

    The folder is written beside its target and renamed into place; an existing modelrecon dictionary folder there is
    replaced, any other non-empty folder is left alone (BadInputError). `folder` may be a URL (module docstring)."""
    folder = storage.location(folder)
    with _atomic_folder(folder, _is_own_folder, "modelrecon dictionary folder") as temp:
        _write_own(dictionary, temp)
    return folder


def save_dictionaries(dictionaries: Sequence[Dictionary], folder: str | Path) -> Path | str:
    """Save several dictionaries (e.g. a transcoder per layer) as one folder: an index `config.json` and a
    modelrecon dictionary folder `dictionary_{i}` for each, in the given order. `folder` may be a URL (module
    docstring): the index `config.json` is written last."""
    dictionaries = list(dictionaries)
    if not dictionaries:
        raise BadInputError("no dictionaries to save; pass at least one")
    folder = storage.location(folder)
    with _atomic_folder(folder, _is_own_folder, "modelrecon dictionary folder") as temp:
        entries = []
        for i, dictionary in enumerate(dictionaries):
            sub = temp / f"dictionary_{i}"
            sub.mkdir()
            _write_own(dictionary, sub)
            c = dictionary.config
            entries.append({"folder": sub.name, "kind": c.kind, "activation": c.activation, "width": c.width,
                            "input_sites": list(c.input_sites), "output_sites": list(c.output_sites)})  # fmt: skip
        _write_json(
            temp / CONFIG_FILE, {"format": SET_FORMAT, "format_version": FORMAT_VERSION, "dictionaries": entries}
        )
    return folder


def _check_format(data: dict, path: Path, expected: str) -> None:
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadInputError(f"'{path}' has no integer format_version; re-save the dictionary with modelrecon")
    if version > FORMAT_VERSION:
        raise BadInputError(
            f"'{path}' is format version {version}, this modelrecon reads up to {FORMAT_VERSION}; upgrade modelrecon"
        )
    if data.get("format") != expected:
        raise BadInputError(f"'{path}' is a {data.get('format')!r} file, not {expected!r}")


def _not_ours_hint(folder: Path) -> str:
    if (folder / SAELENS_CONFIG).is_file():
        return "; it looks like a SAELens folder: load it with load_dictionaries or import_saelens"
    if (folder / CIRCUIT_TRACER_CONFIG).is_file():
        return "; it looks like a circuit-tracer folder: load it with load_dictionaries or import_circuit_tracer"
    return ""


def load_dictionary(folder: str | Path) -> Dictionary:
    """Load one dictionary saved by `save_dictionary` (a folder of several: use `load_dictionaries`); a folder or a
    URL."""
    if storage.is_url(folder):
        with _loading(folder, CONFIG_FILE, "modelrecon dictionary folder") as local:
            return load_dictionary(local)
    folder = storage.local_path(folder)
    if not folder.is_dir():
        raise BadInputError(f"'{folder}' is not a folder; pass a dictionary folder written by save_dictionary")
    if not (folder / CONFIG_FILE).is_file():
        raise BadInputError(
            f"'{folder}' has no {CONFIG_FILE}; it is not a modelrecon dictionary{_not_ours_hint(folder)}"
        )
    path = folder / CONFIG_FILE
    data = _read_json(path, "modelrecon dictionary folder")
    if data.get("format") == SET_FORMAT:
        n = len(data.get("dictionaries") or [])
        raise BadInputError(f"'{folder}' holds a set of {n} dictionaries; load it with load_dictionaries")
    if data.get("format") != FORMAT:
        raise BadInputError(
            f"'{path}' is not a modelrecon dictionary config (format {data.get('format')!r}){_not_ours_hint(folder)}"
        )
    _check_format(data, path, FORMAT)
    dtype_name = data.get("dtype")
    if dtype_name not in DTYPES:
        raise BadInputError(f"'{path}': dtype {dtype_name!r} is not one of {sorted(DTYPES)}; re-save the dictionary")
    fields = {k: v for k, v in data.items() if k in DictionaryConfig.__dataclass_fields__}
    unknown = sorted(set(data) - set(fields) - {"format", "format_version", "dtype", "modelrecon_version",
                                                 "weights_sha256"})  # fmt: skip
    if unknown:
        raise BadInputError(f"'{path}' has unknown fields {unknown}; it was not written by this modelrecon")
    config = _config_from_dict(fields, path)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise BadInputError(f"'{weights}' is missing; the dictionary folder is incomplete, save it again")
    expected_sha = data.get("weights_sha256")
    if expected_sha is not None and _sha256(weights) != expected_sha:
        raise BadInputError(f"'{weights}' does not match the sha256 in its config; the file was changed or is corrupt")
    tensors = _read_safetensors(weights, "modelrecon dictionary folder")
    _check_tensors(tensors, _expected_shapes(config), weights)
    return _assemble(config, tensors, DTYPES[dtype_name])


def load_dictionaries(folder: str | Path) -> list[Dictionary]:
    """Every dictionary in a folder of any layout this reads: a set written by `save_dictionaries` (in its order), a
    single dictionary's folder (a list of one), a circuit-tracer folder or a SAELens folder; a folder or a URL. The one
    folder loader: `--dict` and `--transcoders` reach it through `hub.open_dictionaries`."""
    if storage.is_url(folder):
        markers = (CIRCUIT_TRACER_CONFIG, SAELENS_CONFIG, CONFIG_FILE)
        storage.check_complete(str(folder), markers, "dictionary folder")
        with storage.local_copy(folder) as local:
            return load_dictionaries(local)
    folder = storage.local_path(folder)
    if (folder / CIRCUIT_TRACER_CONFIG).is_file():
        return import_circuit_tracer(folder)
    if (folder / SAELENS_CONFIG).is_file():
        return [import_saelens(folder)]
    path = folder / CONFIG_FILE
    if not path.is_file():
        return [load_dictionary(folder)]  # its error says what the folder is
    data = _read_json(path, "modelrecon dictionary folder")
    if data.get("format") != SET_FORMAT:
        return [load_dictionary(folder)]
    _check_format(data, path, SET_FORMAT)
    entries = data.get("dictionaries")
    if not isinstance(entries, list) or not entries:
        raise BadInputError(f"'{path}' lists no dictionaries; save the set again")
    out = []
    for i, entry in enumerate(entries):
        name = entry.get("folder") if isinstance(entry, dict) else None
        if name != f"dictionary_{i}":  # only the names save_dictionaries writes: no path leaves the folder
            raise BadInputError(f"'{path}': entry {i} must name the folder 'dictionary_{i}', got {name!r}")
        out.append(load_dictionary(folder / name))
    return out


# --- helpers shared by the foreign formats ---------------------------------------------------------------------------
def _split_site(site: str) -> tuple[int, str] | None:
    match = LAYER_SITE.match(site)
    return (int(match.group(1)), match.group(2)) if match else None


def _thresholds(dictionary: Dictionary, fmt: str) -> torch.Tensor | None:
    """`[layer, width]` JumpReLU thresholds for a format whose JumpReLU is `pre * (pre > t)`, or None for ReLU.

    JumpReLU: exp(log_threshold). BatchTopK at inference is exactly a JumpReLU with its estimated threshold."""
    c = dictionary.config
    if c.activation == "relu":
        return None
    if c.activation == "jumprelu":
        return dictionary.log_threshold.detach().exp()
    if c.activation == "batchtopk":
        t = dictionary.threshold.detach()
        if (t < 0).any():
            raise BadInputError(f"this BatchTopK dictionary has negative thresholds, which {fmt} cannot represent")
        return t
    raise BadInputError(f"{fmt} has no {c.activation} {c.kind}; export a relu, jumprelu or batchtopk one")


def _threshold_tensors(config: DictionaryConfig, threshold: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """modelrecon tensors for a foreign `[layer, width]` JumpReLU threshold (t <= 0 where the format applies ReLU)."""
    if threshold is None:
        return {}
    if config.activation == "batchtopk":
        return {"threshold": threshold}
    return {"log_threshold": threshold.clamp_min(0).log()}


# --- SAELens ---------------------------------------------------------------------------------------------------------
def _saelens_hook(site: str) -> str:
    split = _split_site(site)
    if split and split[1] in SAELENS_HOOKS:
        return f"blocks.{split[0]}.{SAELENS_HOOKS[split[1]]}"
    return site  # no TransformerLens name: the modelrecon site itself (SAELens takes any string)


def _site_from_saelens_hook(hook: object) -> str | None:
    if not isinstance(hook, str):
        return None
    match = re.match(r"^blocks\.(\d+)\.(.+)$", hook)
    if match and match.group(2) in SAELENS_HOOKS_READ:
        return f"layers.{match.group(1)}.{SAELENS_HOOKS_READ[match.group(2)]}"
    return hook if _split_site(hook) else None


def _saelens_architecture(config: DictionaryConfig) -> str:
    jump = config.activation in ("jumprelu", "batchtopk")
    if config.kind == "sae":
        return {"relu": "standard", "topk": "topk"}.get(config.activation, "jumprelu")
    if config.kind in ("transcoder", "skip-transcoder"):
        if config.activation == "topk":
            raise BadInputError(
                f"SAELens has no TopK {config.kind}; export a relu, jumprelu or batchtopk one, or use save_dictionary"
            )
        base = "transcoder" if config.kind == "transcoder" else "skip_transcoder"
        return f"jumprelu_{base}" if jump else base
    raise BadInputError(
        "SAELens has no cross-layer transcoders; use export_circuit_tracer or save_dictionary for a CLT"
    )


def export_saelens(
    dictionary: Dictionary, folder: str | Path, *, model_name: str | None = None, hook_name: str | None = None
) -> Path | str:
    """Write a SAELens 6 folder (`cfg.json` + `sae_weights.safetensors`) loadable with `SAE.load_from_disk(folder)`.

    SAEs (relu -> `standard`, topk -> `topk`, jumprelu and batchtopk -> `jumprelu`) and per-layer transcoders
    (`transcoder`, `skip_transcoder`, `jumprelu_transcoder`, `jumprelu_skip_transcoder`). The normalisation is
    folded. `metadata.hook_name` is the TransformerLens name of the input site (see the docs' table) unless
    `hook_name` is given; `metadata.modelrecon` keeps the whole modelrecon config for a lossless `import_saelens`."""
    c = dictionary.config
    architecture = _saelens_architecture(c)
    folded = dictionary.fold_normalisation()
    tensors = {
        "W_enc": folded.W_enc[0],  # [d_in, d_sae]
        "b_enc": folded.b_enc[0],
        "W_dec": folded.W_dec[0][:, 0],  # [d_sae, d_out]
        "b_dec": folded.b_dec[0],
    }
    threshold = _thresholds(folded, "SAELens") if c.activation != "topk" else None
    if threshold is not None:
        tensors["threshold"] = threshold[0]
    if c.kind == "skip-transcoder":
        tensors["W_skip"] = folded.W_skip[0].T  # SAELens: x @ W_skip.T, W_skip [d_out, d_in]
    dtype = folded.b_enc.dtype
    if dtype not in DTYPE_NAMES:
        raise BadInputError(f"cannot export a dictionary of dtype {dtype}; convert it to float32 first")
    metadata = {
        "sae_lens_version": SAELENS_LAYOUT_VERSION,
        "model_name": model_name if model_name is not None else c.provenance.get("model"),
        "hook_name": hook_name or _saelens_hook(c.input_sites[0]),
        "hook_head_index": None,
        "prepend_bos": True,
        "modelrecon": {"format": FORMAT, "format_version": FORMAT_VERSION, **c.to_dict()},
    }
    if c.kind != "sae":
        metadata["hook_name_out"] = _saelens_hook(c.output_sites[0])
    cfg = {
        "architecture": architecture,
        "d_in": c.d_in,
        "d_sae": c.width,
        "dtype": DTYPE_NAMES[dtype],
        "device": "cpu",
        "apply_b_dec_to_input": c.kind == "sae",
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if c.activation == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    if c.kind != "sae":
        cfg["d_out"] = c.d_out
    folder = storage.location(folder)

    def is_saelens(path: str | Path) -> bool:
        return _names(path) <= {SAELENS_CONFIG, SAELENS_WEIGHTS, "sparsity.safetensors"}

    with _atomic_folder(folder, is_saelens, "SAELens folder", SAELENS_CONFIG) as temp:
        save_file(_contiguous(tensors), str(temp / SAELENS_WEIGHTS))
        _write_json(temp / SAELENS_CONFIG, cfg)
    return folder


SAELENS_IMPORTS = {  # architecture -> (kind, activation)
    "standard": ("sae", "relu"),
    "topk": ("sae", "topk"),
    "jumprelu": ("sae", "jumprelu"),
    "transcoder": ("transcoder", "relu"),
    "skip_transcoder": ("skip-transcoder", "relu"),
    "jumprelu_transcoder": ("transcoder", "jumprelu"),
    "jumprelu_skip_transcoder": ("skip-transcoder", "jumprelu"),
}


def import_saelens(folder: str | Path, site: str | tuple[str, str] | None = None) -> Dictionary:
    """Read a SAELens folder (`cfg.json` + `sae_weights.safetensors`) as a Dictionary.

    Architectures: standard, topk, jumprelu, transcoder, skip_transcoder, jumprelu_transcoder,
    jumprelu_skip_transcoder. The sites come from `metadata.modelrecon` (folders written by `export_saelens`), else
    from `site` (a site, or (input site, output site) for a transcoder), else from the TransformerLens hook name.
    `folder` may be a URL."""
    if storage.is_url(folder):
        with _loading(folder, SAELENS_CONFIG, "SAELens folder") as local:
            return import_saelens(local, site)
    folder = storage.local_path(folder)
    cfg_path, weights = folder / SAELENS_CONFIG, folder / SAELENS_WEIGHTS
    cfg = _read_json(cfg_path, "SAELens folder")
    return _saelens_dictionary(cfg, cfg_path, lambda: _read_safetensors(weights, "SAELens folder"), weights, site)


def _saelens_dictionary(cfg: dict, cfg_path: Path, read_tensors: Callable[[], dict], weights: Path,
                        site: str | tuple[str, str] | None) -> Dictionary:  # fmt: skip
    """A Dictionary from a SAELens config and its tensors (read only once the config is checked)."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    architecture = cfg.get("architecture", "standard")
    if architecture not in SAELENS_IMPORTS:
        raise BadInputError(
            f"'{cfg_path}': SAELens architecture {architecture!r} is not supported; modelrecon reads "
            f"{', '.join(SAELENS_IMPORTS)}"
        )
    kind, activation = SAELENS_IMPORTS[architecture]
    for key, allowed in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(key, "none") not in (allowed, None):
            raise BadInputError(
                f"'{cfg_path}': {key}={cfg.get(key)!r} is not supported; fold it into the weights with SAELens "
                "(e.g. fold_activation_norm_scaling_factor) and save again"
            )
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise BadInputError(
            f"'{cfg_path}': rescale_acts_by_decoder_norm=true is not supported; fold it with SAELens "
            "(sae.fold_W_dec_norm()) and save again"
        )
    d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
    d_out = cfg.get("d_out", d_in) if kind != "sae" else d_in
    for name, value in (("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise BadInputError(f"'{cfg_path}': {name} must be a positive integer, got {value!r}")
    dtype_name = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if dtype_name not in DTYPES:
        raise BadInputError(f"'{cfg_path}': dtype {cfg.get('dtype')!r} is not one of {sorted(DTYPES)}")

    stored = metadata.get("modelrecon") if isinstance(metadata.get("modelrecon"), dict) else None
    fields: dict = {}
    if stored is not None:
        fields = {k: v for k, v in stored.items() if k in DictionaryConfig.__dataclass_fields__}
        same = (fields.get("kind"), fields.get("d_in"), fields.get("d_out"), fields.get("width")) == (
            kind, d_in, d_out, d_sae)  # fmt: skip
        if not same:
            fields = {}  # edited after export: trust the SAELens config
    if fields and fields.get("activation") == "batchtopk" and activation == "jumprelu":
        activation = "batchtopk"
    if site is not None:
        in_site, out_site = (site, site) if isinstance(site, str) else tuple(site)
    elif fields:
        in_site, out_site = fields["input_sites"][0], fields["output_sites"][0]
    else:
        in_site = _site_from_saelens_hook(metadata.get("hook_name", cfg.get("hook_name")))
        out_site = in_site if kind == "sae" else _site_from_saelens_hook(
            metadata.get("hook_name_out", cfg.get("hook_name_out")))  # fmt: skip
        if in_site is None or out_site is None:
            hooks = metadata.get("hook_name", cfg.get("hook_name")), metadata.get("hook_name_out")
            shown = repr(hooks[0]) if kind == "sae" else f"{hooks[0]!r} -> {hooks[1]!r}"
            raise BadInputError(
                f"'{cfg_path}': no modelrecon site for hook {shown}; "
                "pass site='layers.L.<site>' (or (input, output) for a transcoder)"
            )
    k = cfg.get("k") if activation == "topk" else fields.get("k") if activation == "batchtopk" else None
    provenance = fields.get("provenance") or {
        "imported_from": "saelens", "model": metadata.get("model_name", cfg.get("model_name")),
        "hook_name": metadata.get("hook_name", cfg.get("hook_name")),
        "sae_lens_version": metadata.get("sae_lens_version", cfg.get("sae_lens_version"))}  # fmt: skip
    data = {"kind": kind, "d_in": d_in, "d_out": d_out, "width": d_sae, "activation": activation, "k": k,
            "input_sites": [in_site], "output_sites": [out_site], "provenance": provenance}  # fmt: skip
    if "jumprelu_bandwidth" in fields:
        data["jumprelu_bandwidth"] = fields["jumprelu_bandwidth"]
    config = _config_from_dict(data, cfg_path)

    tensors = read_tensors()
    if "scaling_factor" in tensors and bool((tensors["scaling_factor"] == 1).all()):
        del tensors["scaling_factor"]  # SAELens itself drops an all-ones scaling factor
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if architecture.startswith("jumprelu"):
        expected["threshold"] = (d_sae,)
    if "skip" in architecture:
        expected["W_skip"] = (d_out, d_in)
    _check_tensors(tensors, expected, weights)
    dtype = DTYPES[dtype_name]
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    b_enc = tensors["b_enc"]
    if kind == "sae" and cfg.get("apply_b_dec_to_input") is False:
        b_enc = b_enc + tensors["b_dec"] @ tensors["W_enc"]  # modelrecon's SAE always reads x - b_dec
    out = {
        "W_enc": tensors["W_enc"][None],
        "b_enc": b_enc[None],
        "W_dec.0": tensors["W_dec"][:, None],
        "b_dec": tensors["b_dec"][None],
    }
    if "W_skip" in tensors:
        out["W_skip"] = tensors["W_skip"].T[None]
    out.update(_threshold_tensors(config, tensors["threshold"][None] if "threshold" in tensors else None))
    return _assemble(config, _contiguous(out), dtype)


# --- GemmaScope ----------------------------------------------------------------------------------------------------
GEMMA_SCOPE_KEYS = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}


def read_gemma_scope_params(path: str | Path) -> dict[str, torch.Tensor]:
    """GemmaScope's `params.npz` (JumpReLU: W_enc [d_in, width], W_dec [width, d_out], b_enc, b_dec, threshold),
    read without pickle (an .npz is a zip of .npy arrays; object arrays are refused)."""
    import numpy as np

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k].astype(np.float32) for k in npz.files}
    except Exception as exc:  # a damaged zip raises zipfile's, zlib's or numpy's errors; all mean the same here
        raise BadInputError(f"'{path}' is not a readable GemmaScope params.npz ({reason(exc)}); download it "
                            "again") from None  # fmt: skip
    if set(arrays) != GEMMA_SCOPE_KEYS:
        raise BadInputError(f"'{path}' holds {sorted(arrays)}, not GemmaScope's {sorted(GEMMA_SCOPE_KEYS)}")
    if arrays["W_enc"].ndim != 2 or arrays["W_dec"].ndim != 2:
        raise BadInputError(f"'{path}': W_enc and W_dec must be matrices; download it again")
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def import_gemma_scope(path: str | Path, site: str | tuple[str, str]) -> Dictionary:
    """A GemmaScope JumpReLU SAE (`site`: the site it reads and writes) or transcoder (`site`: (mlp.in, mlp.out)
    sites) from its `params.npz`. GemmaScope encodes x, not x - b_dec; that is folded into the encoder bias."""
    path = Path(path)
    tensors = read_gemma_scope_params(path)
    d_in, width = tensors["W_enc"].shape
    d_out = tensors["W_dec"].shape[1]
    transcoder = not isinstance(site, str)
    cfg = {"architecture": "jumprelu_transcoder" if transcoder else "jumprelu", "d_in": d_in, "d_sae": width,
           "d_out": d_out, "dtype": "float32", "apply_b_dec_to_input": False,
           "metadata": {"model_name": "gemma-2", "hook_name": None}}  # fmt: skip
    return _saelens_dictionary(cfg, path, lambda: tensors, path, site)


# --- circuit-tracer ------------------------------------------------------------------------------------------------
def _circuit_tracer_hooks(dictionaries: Sequence[Dictionary]) -> tuple[str, str]:
    """circuit-tracer's (feature_input_hook, feature_output_hook): the same site suffix at every layer."""
    ends = set()
    for d in dictionaries:
        for sites in (d.config.input_sites, d.config.output_sites):
            for site in sites:
                split = _split_site(site)
                if split is None or split[1] not in CIRCUIT_TRACER_HOOKS:
                    raise BadInputError(
                        f"circuit-tracer has no hook for site {site!r}; it reads and writes "
                        f"{', '.join(f'layers.L.{s}' for s in CIRCUIT_TRACER_HOOKS)}"
                    )
        ends.add((_split_site(d.config.input_sites[0])[1], _split_site(d.config.output_sites[0])[1]))
    if len(ends) != 1:
        raise BadInputError(f"circuit-tracer needs the same input and output site at every layer, got {sorted(ends)}")
    suffix_in, suffix_out = ends.pop()
    return CIRCUIT_TRACER_HOOKS[suffix_in], CIRCUIT_TRACER_HOOKS[suffix_out]


def _check_circuit_tracer_layers(d: Dictionary, first_layer: int) -> None:
    for offset, (i, o) in enumerate(zip(d.config.input_sites, d.config.output_sites, strict=True)):
        layer_in, layer_out = _split_site(i)[0], _split_site(o)[0]
        if layer_in != first_layer + offset or layer_out != first_layer + offset:
            raise BadInputError(
                f"circuit-tracer needs layer {first_layer + offset}'s dictionary there, got {i!r} -> {o!r}; "
                "pass one transcoder per layer from layer 0, in order"
            )


def export_circuit_tracer(
    dictionaries_or_clt: Dictionary | Sequence[Dictionary],
    folder: str | Path,
    *,
    model_name: str | None = None,
    scan: str | None = None,
) -> Path | str:
    """Write a circuit-tracer transcoder folder.

    - a list of per-layer transcoders (or skip transcoders), one per layer from 0, the same sites and width at every
      layer: `config.yaml` (`model_kind: transcoder_set`) + `layer_{i}.safetensors`, loadable with circuit-tracer's
      `load_transcoder_set({i: folder/layer_{i}.safetensors}, ...)`;
    - a CLT: `config.yaml` (`model_kind: cross_layer_transcoder`) + `W_enc_{i}.safetensors` and
      `W_dec_{i}.safetensors`, loadable with `load_clt(folder, ...)`.

    relu -> ReLU, jumprelu and batchtopk -> JumpReLU (`threshold`). `config.yaml` also keeps the modelrecon configs
    under `modelrecon` (circuit-tracer ignores it) for a lossless `import_circuit_tracer`."""
    import yaml

    dictionaries = [dictionaries_or_clt] if isinstance(dictionaries_or_clt, Dictionary) else list(dictionaries_or_clt)
    if not dictionaries or not all(isinstance(d, Dictionary) for d in dictionaries):
        raise BadInputError("export_circuit_tracer takes a CLT or a list of per-layer transcoders (Dictionary objects)")
    kinds = {d.config.kind for d in dictionaries}
    if "sae" in kinds:
        raise BadInputError("circuit-tracer reads transcoders, not SAEs; use export_saelens for an SAE")
    if "clt" in kinds and len(dictionaries) != 1:
        raise BadInputError("pass a CLT on its own: circuit-tracer loads one CLT, or one transcoder per layer")
    for d in dictionaries:
        if d.config.d_in != d.config.d_out:
            raise BadInputError(
                f"circuit-tracer's transcoders read and write d_model: d_in {d.config.d_in} != d_out {d.config.d_out}"
            )
        _thresholds(d, "circuit-tracer")  # rejects topk
    if len({d.config.width for d in dictionaries}) != 1 or len({d.config.d_in for d in dictionaries}) != 1:
        raise BadInputError("circuit-tracer needs the same width and d_model at every layer")
    if len({d.config.activation for d in dictionaries}) != 1:
        raise BadInputError("pass transcoders with one activation function at every layer")
    feature_input_hook, feature_output_hook = _circuit_tracer_hooks(dictionaries)
    if dictionaries[0].config.kind == "clt":
        _check_circuit_tracer_layers(dictionaries[0], 0)
    else:
        for layer, d in enumerate(dictionaries):
            _check_circuit_tracer_layers(d, layer)
    if len({d.config.kind for d in dictionaries}) != 1:
        raise BadInputError("pass transcoders of one kind: all with a skip connection or none")

    files: dict[str, dict[str, torch.Tensor]] = {}
    for layer, d in enumerate(dictionaries):
        folded = d.fold_normalisation()
        threshold = _thresholds(folded, "circuit-tracer")
        if d.config.kind == "clt":
            for i in range(d.config.n_layers):
                enc = {f"W_enc_{i}": folded.W_enc[i].T, f"b_enc_{i}": folded.b_enc[i], f"b_dec_{i}": folded.b_dec[i]}
                if threshold is not None:
                    enc[f"threshold_{i}"] = threshold[i]
                files[f"W_enc_{i}.safetensors"] = enc
                files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": folded.W_dec[i]}
            continue
        tensors = {
            "W_enc": folded.W_enc[0].T,  # [d_transcoder, d_model]
            "W_dec": folded.W_dec[0][:, 0],  # [d_transcoder, d_model]
            "b_enc": folded.b_enc[0],
            "b_dec": folded.b_dec[0],
        }
        if threshold is not None:
            tensors["activation_function.threshold"] = threshold[0]
        if folded.W_skip is not None:
            tensors["W_skip"] = folded.W_skip[0].T  # circuit-tracer: x @ W_skip.T
        files[f"layer_{layer}.safetensors"] = tensors

    c0 = dictionaries[0].config
    model = model_name if model_name is not None else c0.provenance.get("model")
    config = {
        "model_name": model,
        "model_kind": "cross_layer_transcoder" if c0.kind == "clt" else "transcoder_set",
        "feature_input_hook": feature_input_hook,
        "feature_output_hook": feature_output_hook,
        "scan": scan if scan is not None else f"modelrecon/{model or 'model'}/{c0.kind}",
        "modelrecon": {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dictionaries": [json_safe(d.config.to_dict()) for d in dictionaries],
        },
    }
    folder = storage.location(folder)
    pattern = re.compile(r"^(config\.yaml|layer_\d+\.safetensors|W_(enc|dec)_\d+\.safetensors)$")

    def is_circuit_tracer(path: str | Path) -> bool:
        names = _names(path)  # at a URL, an interrupted upload's files (without config.yaml) count as ours too
        return (CIRCUIT_TRACER_CONFIG in names or storage.is_url(path)) and all(pattern.match(n) for n in names)

    with _atomic_folder(folder, is_circuit_tracer, "circuit-tracer folder", CIRCUIT_TRACER_CONFIG) as temp:
        for name, tensors in files.items():
            save_file(_contiguous(tensors), str(temp / name))
        text = yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False)
        (temp / CIRCUIT_TRACER_CONFIG).write_text(text, encoding="utf-8")
    return folder


def _numbered(folder: Path, pattern: str) -> int:
    """How many files `pattern` (with one `{i}`) there are, numbered 0..n-1 without gaps."""
    regex = re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")
    numbers = sorted(int(m.group(1)) for p in folder.iterdir() if (m := regex.match(p.name)))
    if numbers != list(range(len(numbers))):
        raise BadInputError(f"'{folder}': the {pattern} files must be numbered 0..n-1, found {numbers}")
    return len(numbers)


def import_circuit_tracer(folder: str | Path, layer_files: Sequence[Path] | None = None) -> list[Dictionary]:
    """Read a circuit-tracer folder: `config.yaml` with `layer_{i}.safetensors` (a list of per-layer transcoders) or
    with `W_enc_{i}` / `W_dec_{i}.safetensors` (a list holding one CLT).

    Kinds, activations, sites and provenance come from the `modelrecon` entry of folders written by
    `export_circuit_tracer`; otherwise from the hooks (see the docs' table), with ReLU, or JumpReLU where there is a
    threshold. `layer_files`: the per-layer files where the config lists them elsewhere (its `transcoders`, which
    `dictionaries.hub` downloads); GemmaScope's `params.npz` files are read too. `folder` may be a URL (without
    `layer_files`)."""
    if storage.is_url(folder) and layer_files is None:
        with _loading(folder, CIRCUIT_TRACER_CONFIG, "circuit-tracer folder") as local:
            return import_circuit_tracer(local)
    folder = storage.local_path(folder)
    cfg_path = folder / CIRCUIT_TRACER_CONFIG
    cfg = _read_yaml(cfg_path, "circuit-tracer folder")
    model_kind = cfg.get("model_kind")
    if model_kind not in ("transcoder_set", "cross_layer_transcoder"):
        raise BadInputError(
            f"'{cfg_path}': model_kind {model_kind!r} is not supported; modelrecon reads transcoder_set and "
            "cross_layer_transcoder"
        )
    hooks = cfg.get("feature_input_hook"), cfg.get("feature_output_hook")
    stored = cfg.get("modelrecon") if isinstance(cfg.get("modelrecon"), dict) else {}
    stored_configs = stored.get("dictionaries") if isinstance(stored.get("dictionaries"), list) else None
    provenance = {"imported_from": "circuit-tracer", "model": cfg.get("model_name"), "scan": cfg.get("scan")}

    def site(hook: object, layer: int) -> str:
        if hook not in CIRCUIT_TRACER_HOOKS_READ:
            raise BadInputError(
                f"'{cfg_path}': hook {hook!r} has no modelrecon site; modelrecon reads "
                f"{', '.join(CIRCUIT_TRACER_HOOKS_READ)}"
            )
        return f"layers.{layer}.{CIRCUIT_TRACER_HOOKS_READ[hook]}"

    def make_config(index: int, base: dict) -> DictionaryConfig:
        if stored_configs is not None and index < len(stored_configs) and isinstance(stored_configs[index], dict):
            fields = {k: v for k, v in stored_configs[index].items() if k in DictionaryConfig.__dataclass_fields__}
            same = all(fields.get(k) == base[k] for k in ("kind", "d_in", "d_out", "width")) and len(
                fields.get("input_sites") or ()) == len(base["input_sites"])  # fmt: skip
            jump = base["activation"] == "jumprelu"
            if same and (
                fields.get("activation") == base["activation"] or (jump and fields.get("activation") == "batchtopk")
            ):
                return _config_from_dict(fields, cfg_path)
        return _config_from_dict(base, cfg_path)

    if model_kind == "transcoder_set":
        files = list(layer_files) if layer_files is not None else [
            folder / f"layer_{i}.safetensors" for i in range(_numbered(folder, "layer_{i}.safetensors"))]  # fmt: skip
        n = len(files)
        if n == 0:
            extra = " (its 'transcoders' list points elsewhere: download them as layer_{i}.safetensors)" if cfg.get(
                "transcoders") else ""  # fmt: skip
            raise BadInputError(f"'{folder}' has no layer_{{i}}.safetensors files{extra}")
        listed = stored_configs if stored_configs is not None else cfg.get("transcoders")
        if layer_files is None and isinstance(listed, list) and len(listed) != n:
            raise BadInputError(f"'{cfg_path}' lists {len(listed)} transcoders but the folder has {n} layer files; "
                                "a file is missing: copy or download the folder again")  # fmt: skip
        out = []
        for layer, path in enumerate(files):
            if Path(path).suffix == ".npz":  # GemmaScope, as circuit-tracer reads it
                params = read_gemma_scope_params(path)
                tensors = {"W_enc": params["W_enc"].T.contiguous(), "W_dec": params["W_dec"], "b_enc": params["b_enc"],
                           "b_dec": params["b_dec"], "activation_function.threshold": params["threshold"]}  # fmt: skip
            else:
                tensors = _read_safetensors(path, "circuit-tracer folder")
            if (
                "b_enc" not in tensors
                or "b_dec" not in tensors
                or tensors["b_enc"].dim() != 1
                or tensors["b_dec"].dim() != 1
            ):
                raise BadInputError(
                    f"'{path}' lacks 1-d tensors 'b_enc' and 'b_dec'; is it a circuit-tracer transcoder?"
                )
            width, d_model = tensors["b_enc"].shape[0], tensors["b_dec"].shape[0]
            expected = {"W_enc": (width, d_model), "W_dec": (width, d_model), "b_enc": (width,), "b_dec": (d_model,),
                        "activation_function.threshold": (width,), "W_skip": (d_model, d_model)}  # fmt: skip
            _check_tensors(tensors, expected, path, optional=("activation_function.threshold", "W_skip"))
            threshold = tensors.get("activation_function.threshold")
            if threshold is not None and (threshold < 0).any():
                raise BadInputError(f"'{path}': negative JumpReLU thresholds are not supported by modelrecon")
            base = {"kind": "skip-transcoder" if "W_skip" in tensors else "transcoder", "d_in": d_model,
                    "d_out": d_model, "width": width, "activation": "relu" if threshold is None else "jumprelu",
                    "k": None, "input_sites": [site(hooks[0], layer)], "output_sites": [site(hooks[1], layer)],
                    "provenance": provenance}  # fmt: skip
            config = make_config(layer, base)
            dtype = tensors["b_enc"].dtype
            mine = {"W_enc": tensors["W_enc"].T[None], "b_enc": tensors["b_enc"][None],
                    "W_dec.0": tensors["W_dec"][:, None], "b_dec": tensors["b_dec"][None]}  # fmt: skip
            if "W_skip" in tensors:
                mine["W_skip"] = tensors["W_skip"].T[None]
            mine.update(_threshold_tensors(config, threshold[None] if threshold is not None else None))
            out.append(_assemble(config, _contiguous(mine), dtype))
        return out

    n = _numbered(folder, "W_enc_{i}.safetensors")
    if n == 0 or _numbered(folder, "W_dec_{i}.safetensors") != n:
        raise BadInputError(f"'{folder}' needs W_enc_{{i}} and W_dec_{{i}}.safetensors for every layer of the CLT")
    encoders = [_read_safetensors(folder / f"W_enc_{i}.safetensors", "circuit-tracer CLT folder") for i in range(n)]
    first = encoders[0]
    if "b_enc_0" not in first or "b_dec_0" not in first or first["b_enc_0"].dim() != 1 or first["b_dec_0"].dim() != 1:
        raise BadInputError(f"'{folder / 'W_enc_0.safetensors'}' lacks 1-d 'b_enc_0' and 'b_dec_0'; is it a CLT?")
    width, d_model = first["b_enc_0"].shape[0], first["b_dec_0"].shape[0]
    jump = "threshold_0" in first
    W_enc, b_enc, b_dec, thresholds, W_dec = [], [], [], [], []
    for i, enc in enumerate(encoders):
        path = folder / f"W_enc_{i}.safetensors"
        expected = {f"W_enc_{i}": (width, d_model), f"b_enc_{i}": (width,), f"b_dec_{i}": (d_model,)}
        if jump:
            expected[f"threshold_{i}"] = (width,)
        _check_tensors(enc, expected, path)
        W_enc.append(enc[f"W_enc_{i}"].T)
        b_enc.append(enc[f"b_enc_{i}"])
        b_dec.append(enc[f"b_dec_{i}"])
        if jump:
            if (enc[f"threshold_{i}"] < 0).any():
                raise BadInputError(f"'{path}': negative JumpReLU thresholds are not supported by modelrecon")
            thresholds.append(enc[f"threshold_{i}"])
        dec_path = folder / f"W_dec_{i}.safetensors"
        dec = _read_safetensors(dec_path, "circuit-tracer CLT folder")
        _check_tensors(dec, {f"W_dec_{i}": (width, n - i, d_model)}, dec_path)
        W_dec.append(dec[f"W_dec_{i}"])
    base = {"kind": "clt", "d_in": d_model, "d_out": d_model, "width": width,
            "activation": "jumprelu" if jump else "relu", "k": None,
            "input_sites": [site(hooks[0], i) for i in range(n)], "output_sites": [site(hooks[1], i) for i in range(n)],
            "provenance": provenance}  # fmt: skip
    config = make_config(0, base)
    dtype = first["b_enc_0"].dtype
    mine = {"W_enc": torch.stack(W_enc), "b_enc": torch.stack(b_enc), "b_dec": torch.stack(b_dec)}
    mine.update({f"W_dec.{i}": w for i, w in enumerate(W_dec)})
    mine.update(_threshold_tensors(config, torch.stack(thresholds) if jump else None))
    return [_assemble(config, _contiguous(mine), dtype)]
