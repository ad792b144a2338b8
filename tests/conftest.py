import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import modelrecon  # noqa: E402
from modelrecon.cli import main  # noqa: E402

from tiny import FAMILIES, save_tiny_model, tiny_model  # noqa: E402

PROMPTS = ["Hello there, world!", "Hi", "The quick brown fox jumps"]


@pytest.fixture(scope="session", params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded default model; the Makefile installs its package."""
    return modelrecon.load("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """The second embedded model, Gemma 3 270M (converted from its GGUF on first use, about a minute)."""
    return modelrecon.load("gemma3-270m")


@pytest.fixture(scope="session")
def tiny_gpt2_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def cli(capsys, *argv):
    """Run the `modelrecon` entry point in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# XML namespace names (in the vendored d3): identifiers a browser never fetches
XML_NAMESPACES = {"http://www.w3.org/1999/xhtml", "http://www.w3.org/1999/xlink", "http://www.w3.org/2000/svg",
                  "http://www.w3.org/2000/xmlns/", "http://www.w3.org/XML/1998/namespace"}  # fmt: skip


def web_addresses(page_text: str) -> set[str]:
    """Every http(s) address in a page except the XML namespace names."""
    import re

    return set(re.findall(r"https?://[^\s\"'<>)]*", page_text)) - XML_NAMESPACES


def embedded_routes(page_text: str) -> dict:
    """The API answers a standalone viewer page carries (`modelrecon.web.notebook.page`), after checking it loads
    no script from anywhere and names no web address."""
    import json

    assert "<script src" not in page_text and not web_addresses(page_text)
    return json.loads(page_text.split("window.MR_EMBED = ")[1].split(";</script>")[0].replace("<\\/", "</"))["routes"]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for the scale-out tests (skipped where the `scale` extra is not installed)."""
    ray = pytest.importorskip("ray", reason="the scale extra (Ray) is not installed")
    from modelrecon.scale.cluster import connect

    connect("local", num_cpus=2)
    yield ray
    _shutdown_ray(ray)


def _shutdown_ray(ray, timeout: float = 60.0) -> None:
    """ray.shutdown(), bounded: it was seen to wait forever on a call to the cluster's GCS that has no deadline (once,
    at the end of a full run). Then the cluster's processes are stopped and Ray's own exit hook, which would wait on
    the same call, is removed."""
    import atexit
    import threading

    finished = threading.Event()
    threading.Thread(target=lambda: (ray.shutdown(), finished.set()), daemon=True).start()
    if not finished.wait(timeout):
        atexit.unregister(ray.shutdown)
        node = ray._private.worker._global_node
        if node is not None:
            node.kill_all_processes(check_alive=False, allow_graceful=False)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, with s3fs as the client; yields a bucket URL."""
    import logging
    import os

    pytest.importorskip("s3fs", reason="the scale extra (s3fs) is not installed")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) is not installed")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = dict(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
               AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("modelrecon-test")
    yield "s3://modelrecon-test"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
