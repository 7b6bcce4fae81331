"""``models fetch`` against a local HTTP server: resume after a dropped connection, hash rejection,
zip extraction, offline errors. The server runs on 127.0.0.1 in a thread; nothing leaves the machine."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from likeness.cli import fetch as fetch_module
from likeness.cli import manifest as mf
from likeness.cli.main import main

PAYLOAD = bytes(range(256)) * 1200  # 300 kB
OTHER = b"not the published file" * 1000


class FileServer:
    """Serves ``files`` (path -> bytes) with Range support; can cut the connection once per path."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.drop_once: dict[str, int] = {}  # path -> bytes to send before dropping the connection
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                state.requests.append((self.path, self.headers.get("Range")))
                data = state.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
                if match and not state.ignore_range:
                    start, status = int(match.group(1)), 206
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"v1"')
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut = state.drop_once.pop(self.path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def range_requests(self, path: str) -> list[str]:
        return [r for p, r in self.requests if p == path and r]


@pytest.fixture
def server():
    srv = FileServer()
    srv.thread.start()
    yield srv
    srv.server.shutdown()
    srv.server.server_close()


@pytest.fixture(autouse=True)
def _no_models_env(monkeypatch):
    monkeypatch.delenv(mf.MODELS_DIR_ENV, raising=False)


def entry_for(url: str, data: bytes | None, **overrides) -> dict:
    entry = {"id": "tiny-adapter", "filename": "tiny.safetensors", "folder": "likeness/faceid", "url": url,
             "sha256": hashlib.sha256(data).hexdigest() if data is not None else "",
             "size": len(data) if data is not None else None, "license": "MIT", "techniques": ["faceid"],
             "required": True, "notes": ""}
    if data is None:
        entry["approx_size_mb"] = 0.3
    entry.update(overrides)
    return entry


def fetch(tmp_path, entries, *ids, extra=()) -> int:
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"models": entries}))
    return main(["models", "fetch", *ids, "--manifest", str(manifest), "--models-dir", str(tmp_path / "models"),
                 "--timeout", "10", *extra])


def target(tmp_path, name="tiny.safetensors", folder="likeness/faceid"):
    return tmp_path.joinpath("models", *folder.split("/"), name)


# --------------------------------------------------------------------------------------------------


def test_interrupted_download_resumes_with_range_and_verifies(tmp_path, server, capsys):
    server.files["/tiny.safetensors"] = PAYLOAD
    server.drop_once["/tiny.safetensors"] = 100_000
    entry = entry_for(server.url("/tiny.safetensors"), PAYLOAD)
    final, part = target(tmp_path), target(tmp_path, "tiny.safetensors.part")

    assert fetch(tmp_path, [entry], "tiny-adapter") == 1
    err = capsys.readouterr().err
    assert "interrupted" in err and "resume" in err and "Traceback" not in err
    assert not final.exists()
    assert part.stat().st_size == 100_000

    assert fetch(tmp_path, [entry], "tiny-adapter") == 0
    assert server.range_requests("/tiny.safetensors") == ["bytes=100000-"]
    assert final.read_bytes() == PAYLOAD
    assert hashlib.sha256(final.read_bytes()).hexdigest() == entry["sha256"]
    assert not part.exists() and not os.path.exists(str(part) + ".meta")
    assert "installed" in capsys.readouterr().out


def test_wrong_hash_is_rejected_and_nothing_is_left(tmp_path, server, capsys):
    server.files["/tiny.safetensors"] = OTHER
    entry = entry_for(server.url("/tiny.safetensors"), PAYLOAD, size=len(OTHER))  # right size, wrong bytes
    assert fetch(tmp_path, [entry], "tiny-adapter") == 1
    err = capsys.readouterr().err
    assert "hash mismatch" in err and "nothing was installed" in err
    assert not target(tmp_path).exists()
    assert not target(tmp_path, "tiny.safetensors.part").exists()
    assert not os.path.exists(str(target(tmp_path, "tiny.safetensors.part")) + ".meta")


def test_wrong_hash_never_replaces_an_existing_file(tmp_path, server, capsys):
    server.files["/tiny.safetensors"] = OTHER
    entry = entry_for(server.url("/tiny.safetensors"), PAYLOAD, size=len(OTHER))
    existing = target(tmp_path)
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"old corrupt copy")
    assert fetch(tmp_path, [entry], "tiny-adapter") == 1
    assert existing.read_bytes() == b"old corrupt copy"


def test_too_many_bytes_are_rejected(tmp_path, server, capsys):
    server.files["/tiny.safetensors"] = PAYLOAD + b"extra"
    entry = entry_for(server.url("/tiny.safetensors"), PAYLOAD)
    assert fetch(tmp_path, [entry], "tiny-adapter") == 1
    assert not target(tmp_path).exists() and not target(tmp_path, "tiny.safetensors.part").exists()


def test_present_verified_file_is_skipped_and_corrupt_one_replaced(tmp_path, server, capsys):
    server.files["/tiny.safetensors"] = PAYLOAD
    entry = entry_for(server.url("/tiny.safetensors"), PAYLOAD)
    assert fetch(tmp_path, [entry], "tiny-adapter") == 0
    assert fetch(tmp_path, [entry], "tiny-adapter") == 0
    assert "already present and verified" in capsys.readouterr().out
    assert len(server.requests) == 1
    corrupted = bytearray(PAYLOAD)
    corrupted[5] ^= 1
    target(tmp_path).write_bytes(bytes(corrupted))
    assert fetch(tmp_path, [entry], "tiny-adapter") == 0
    assert "bad (hash mismatch)" in capsys.readouterr().err
    assert target(tmp_path).read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_cleanly(tmp_path, server, capsys):
    server.files["/tiny.safetensors"] = PAYLOAD
    server.drop_once["/tiny.safetensors"] = 50_000
    entry = entry_for(server.url("/tiny.safetensors"), PAYLOAD)
    assert fetch(tmp_path, [entry], "tiny-adapter") == 1
    server.ignore_range = True
    assert fetch(tmp_path, [entry], "tiny-adapter") == 0
    assert target(tmp_path).read_bytes() == PAYLOAD


def test_file_without_published_hash_is_installed_and_said_unverified(tmp_path, server, capsys):
    server.files["/tiny.safetensors"] = PAYLOAD
    entry = entry_for(server.url("/tiny.safetensors"), None)
    assert fetch(tmp_path, [entry], "tiny-adapter") == 0
    assert "no published sha256" in capsys.readouterr().err
    assert target(tmp_path).read_bytes() == PAYLOAD


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def archive_entry(url: str, data: bytes | None, members=("det.onnx", "rec.onnx")) -> dict:
    entry = entry_for(url, data, id="face-pack", filename="face-pack.zip", folder="insightface/models/face-pack",
                      license="Non-commercial research only", techniques=["face_analysis"])
    entry["archive"] = {"format": "zip", "members": list(members)}
    return entry


def test_zip_archive_is_verified_then_extracted_flat(tmp_path, server, capsys):
    # Like antelopev2.zip: members inside a folder of the same name, plus macOS junk.
    payload = _zip_bytes({"face-pack/det.onnx": b"detector" * 100, "face-pack/rec.onnx": b"recognizer" * 100,
                          "__MACOSX/face-pack/._det.onnx": b"junk", "face-pack/readme.txt": b"hi"})
    server.files["/face-pack.zip"] = payload
    entry = archive_entry(server.url("/face-pack.zip"), payload)
    assert fetch(tmp_path, [entry], "face-pack") == 0
    folder = tmp_path / "models" / "insightface" / "models" / "face-pack"
    assert sorted(os.listdir(folder)) == ["det.onnx", "rec.onnx"]
    assert (folder / "det.onnx").read_bytes() == b"detector" * 100
    out = capsys.readouterr().out
    assert "installed 2 files" in out and "licensed 'Non-commercial research only'" in out
    assert main(["models", "verify", "--manifest", str(tmp_path / "m.json"),
                 "--models-dir", str(tmp_path / "models")]) == 0


def test_zip_without_published_hash_still_gets_crc_and_member_checks(tmp_path, server, capsys):
    server.files["/face-pack.zip"] = _zip_bytes({"det.onnx": b"d"})
    entry = archive_entry(server.url("/face-pack.zip"), None)
    assert fetch(tmp_path, [entry], "face-pack") == 1
    assert "lacks rec.onnx" in capsys.readouterr().err
    folder = tmp_path / "models" / "insightface" / "models" / "face-pack"
    assert os.listdir(folder) == []

    server.files["/face-pack.zip"] = b"this is not a zip file at all" * 10
    assert fetch(tmp_path, [entry], "face-pack") == 1
    assert "not a valid zip" in capsys.readouterr().err
    assert os.listdir(folder) == []


def test_corrupt_zip_member_fails_its_crc(tmp_path):
    data = bytearray(_zip_bytes({"det.onnx": os.urandom(5000), "rec.onnx": b"r" * 5000}))
    # Flip a byte inside the first member's compressed data (after its 30-byte local header and name).
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo("det.onnx")
    data[info.header_offset + 30 + len(info.filename) + 2] ^= 0x55
    path = tmp_path / "pack.zip"
    path.write_bytes(bytes(data))
    with pytest.raises(fetch_module.FetchError):
        fetch_module.install_zip(str(path), ("det.onnx", "rec.onnx"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "det.onnx").exists()


def test_offline_gives_a_clean_error(tmp_path, capsys):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    entry = entry_for(f"http://127.0.0.1:{port}/tiny.safetensors", PAYLOAD)
    assert fetch(tmp_path, [entry], "tiny-adapter") == 1
    err = capsys.readouterr().err
    assert "Cannot reach 127.0.0.1" in err and "offline" in err and "Traceback" not in err
    assert not target(tmp_path).exists()


def test_http_404_is_explained(tmp_path, server, capsys):
    entry = entry_for(server.url("/gone.bin"), PAYLOAD)
    assert fetch(tmp_path, [entry], "tiny-adapter") == 1
    assert "HTTP 404" in capsys.readouterr().err


def test_plain_http_to_other_hosts_is_refused(tmp_path):
    with pytest.raises(fetch_module.FetchError, match="https"):
        fetch_module.download("http://example.org/x.bin", str(tmp_path / "x.part"))
    assert not (tmp_path / "x.part").exists()


def test_fetch_required_downloads_only_required_entries(tmp_path, server, capsys):
    server.files["/a.bin"] = PAYLOAD
    server.files["/b.bin"] = OTHER
    entries = [entry_for(server.url("/a.bin"), PAYLOAD, id="needed", filename="a.bin"),
               entry_for(server.url("/b.bin"), OTHER, id="extra", filename="b.bin", required=False)]
    assert fetch(tmp_path, entries, extra=("--required",)) == 0
    assert target(tmp_path, "a.bin").exists() and not target(tmp_path, "b.bin").exists()
    assert main(["models", "fetch", "--manifest", str(tmp_path / "m.json"), "--models-dir", "x"]) == 2
