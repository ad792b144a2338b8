"""`load(name_or_path)`: embedded default, local HF folder, `.gguf` file, or hub id (when online).

GGUF weights are de-quantized once through transformers and cached as a safetensors model folder under
`cache_root()/models/<sha256 of the GGUF>`; later loads read that folder. The folder appears by an atomic rename,
so an interrupted conversion never leaves a cache entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import torch

from modelrecon.errors import (
    BadInputError,
    BadModelFileError,
    ModelNotInstalledError,
    OfflineError,
    UnknownModelError,
    reason,
)
from modelrecon.files import atomic_folder
from modelrecon.models.embedded import EMBEDDED
from modelrecon.models.model import Model
from modelrecon.progress import step

_CACHE_MARKER = "modelrecon-cache.json"


def cache_root() -> Path:
    if os.environ.get("MODELRECON_CACHE"):
        return Path(os.environ["MODELRECON_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "modelrecon"


def sha256_of(paths: list[Path]) -> str:
    """SHA-256 of the files laid end to end (a split GGUF hashes like the whole file)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(device: str | torch.device) -> torch.device:
    """`cpu`, `cuda`, `cuda:N`, `mps` or `auto` (CUDA, else MPS, else the CPU), checked against what this machine
    has: a device that is not here is a one-line error, never a crash deep inside a forward pass."""
    if isinstance(device, torch.device):
        device = str(device)
    name = str(device).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise BadInputError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BadInputError(f"--device {device}: no CUDA device on this machine (torch {torch.__version__}, "
                                f"{torch.version.cuda or 'a CPU-only build'}); use --device cpu or auto")  # fmt: skip
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise BadInputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")  # fmt: skip
    elif resolved.type == "mps":
        if not mps_available():
            raise BadInputError(f"--device {device}: no Apple MPS device here; use --device cpu or auto")
    elif resolved.type != "cpu":
        raise BadInputError(f"unsupported device {device!r}; use cpu, cuda, cuda:N, mps or auto")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise BadInputError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise BadInputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> Model:
    """Load a model by embedded name (`smollm2-135m`, `gemma3-270m`), local folder, `.gguf` file or hub id, in
    `dtype` (float32, bfloat16, float16) on `device` (cpu, cuda, cuda:N, mps, auto)."""
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    key = str(name_or_path)
    if key in EMBEDDED:
        embedded = EMBEDDED[key]
        parts = embedded.gguf_parts()
        if parts is None:
            raise ModelNotInstalledError(
                f"embedded model '{key}' is not installed; install it with: {embedded.install_command}"
            )
        folder, sha = gguf_to_folder(parts, label=key)
        source = {"kind": "embedded", "name": key, "gguf_sha256": sha, "license": embedded.license}
        return _load_folder(folder, key, source, dtype, device, trust_remote_code=False)
    path = Path(key).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        folder, sha = gguf_to_folder([path], label=path.name)
        return _load_folder(
            folder,
            path.name,
            {"kind": "gguf", "path": str(path.resolve()), "gguf_sha256": sha},
            dtype,
            device,
            trust_remote_code=False,
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadModelFileError(
                f"folder '{path}' has no config.json; give a Hugging Face model folder or a .gguf file"
            )
        return _load_folder(
            path, path.name, {"kind": "folder", "path": str(path.resolve())}, dtype, device, trust_remote_code
        )
    if path.exists():
        raise BadModelFileError(f"'{path}' is neither a model folder nor a .gguf file")
    if _looks_like_hub_id(key):
        return _load_hub(key, dtype, device, trust_remote_code)
    raise UnknownModelError(
        f"unknown model '{key}': use an embedded name ({', '.join(EMBEDDED)}), a local folder, a .gguf file "
        "or a hub id like org/name; `modelrecon models` lists the embedded ones"
    )


def gguf_to_folder(parts: list[Path], label: str) -> tuple[Path, str]:
    """The cached safetensors folder for this GGUF (creating it once), and the GGUF's SHA-256."""
    sha = sha256_of(parts)
    target = cache_root() / "models" / sha[:32]
    if (target / _CACHE_MARKER).is_file():
        return target, sha
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=target.parent, prefix=".partial-") as tmp,
        atomic_folder(target, shared=_CACHE_MARKER) as staged,  # another process may convert the same GGUF at once
    ):
        gguf = parts[0]
        if len(parts) > 1:
            gguf = Path(tmp) / "model.gguf"
            with open(gguf, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 22)
        _check_gguf(gguf)  # fail on a bad file before announcing a long step
        with step(f"De-quantizing {label} once (later loads use the cache in {target.parent})"):
            hf_model, tokenizer = _read_gguf(gguf)
            hf_model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
        (staged / _CACHE_MARKER).write_text(json.dumps({"gguf_sha256": sha, "label": label}, indent=2))
    return target, sha


def _bad_gguf(gguf: Path, exc: Exception) -> BadModelFileError:
    return BadModelFileError(
        f"cannot read GGUF file '{gguf}' ({reason(exc)}); the file is corrupt or not a supported GGUF model, "
        "re-download or reinstall it"
    )


def _check_gguf(gguf: Path) -> None:
    """Parse the GGUF header and tensor table (memory-mapped, fast) so a bad file fails before the long step."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf)
        if not reader.tensors:
            raise ValueError("no tensors")
    except Exception as exc:  # the reader raises many kinds for a bad file; all mean the same to the user
        raise _bad_gguf(gguf, exc) from exc


def _read_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many kinds for a bad file; all mean the same to the user
        raise _bad_gguf(gguf, exc) from exc
    if getattr(hf_model, "hf_quantizer", None) is not None:
        # Weights are already de-quantized to fp32; drop the marker that forbids saving them.
        hf_model.hf_quantizer.remove_quantization_config(hf_model)
    return hf_model, tokenizer


def _load_folder(folder: Path, name: str, source: dict, dtype, device, trust_remote_code: bool) -> Model:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # loading a local folder takes a second; its bar is noise
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise BadModelFileError(f"cannot load model folder '{folder}': {reason(exc)}") from exc
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    check_finite_weights(hf_model, f"model '{name}' ({folder})")
    return Model(
        hf_model.to(device), tokenizer, name=name, source={**source, "dtype": str(dtype).removeprefix("torch.")}
    )


def check_finite_weights(hf_model, what: str) -> None:
    """A one-line BadModelFileError naming the first weight holding NaN or an infinity: such weights give NaN
    outputs, logits and graphs. One float32 sum per tensor (NaN and infinities survive a sum) keeps it to a fraction
    of a second on a 135M model; a non-finite sum is confirmed element-wise, since huge finite values may overflow."""
    for name, tensor in hf_model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor.sum(dtype=torch.float32)):
            if not torch.isfinite(tensor).all():
                raise BadModelFileError(f"{what}: weight '{name}' contains NaN or infinite values; the weights are "
                                        "corrupt: re-download or re-convert them")  # fmt: skip


def _looks_like_hub_id(key: str) -> bool:
    parts = key.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts)


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """True if a TCP connection to the hub opens within `timeout` seconds (DNS included, so it cannot hang)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _load_hub(hub_id: str, dtype, device, trust_remote_code: bool) -> Model:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(hub_id, local_files_only=True)
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or not _hub_reachable():
            raise OfflineError(
                f"'{hub_id}' is not in the local Hugging Face cache and the hub cannot be reached; "
                "download it where there is network, or pass a local folder or .gguf file"
            ) from None
        try:
            folder = snapshot_download(hub_id)
        except Exception as exc:
            raise UnknownModelError(f"cannot download '{hub_id}' from the hub: {reason(exc)}") from exc
    return _load_folder(Path(folder), hub_id, {"kind": "hub", "id": hub_id}, dtype, device, trust_remote_code)
