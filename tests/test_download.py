"""Tests for adbench.download against a local HTTP server (no internet needed)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from adbench.download import (
    MARKER,
    MTD_COMMIT,
    MVTEC_CATEGORIES,
    NAMES,
    SOURCES,
    Source,
    dataset_present,
    download_dataset,
    get_source,
    manifest_sha256,
)
from adbench.errors import AdbenchError, DownloadError

REPO = Path(__file__).resolve().parents[1]
MTD_PINNED = "d2601c3c228c0b4d340c8dae4216c25798bf4ff6339d1fe13fbfb23ad1667a25"


# --------------------------------------------------------------------------------------------------------------------
# a tiny HTTP server with Range support and a one-shot "drop the connection after N bytes"


class _Server:
    """State shared with the handler: served folder, request log and fault injection."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ranges: list[str | None] = []
        self.drop_after: int | None = None
        self.ignore_range = False
        self.url = ""


def _make_handler(state: _Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence the default stderr log
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            path = state.directory / self.path.lstrip("/")
            rng = self.headers.get("Range")
            state.ranges.append(rng)
            if not path.is_file():
                self.send_error(404, "Not Found")
                return
            data = path.read_bytes()
            start = 0
            if rng and not state.ignore_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if state.drop_after is not None:
                body, state.drop_after = body[: state.drop_after], None
                self.close_connection = True
            self.wfile.write(body)
            self.wfile.flush()

    return Handler


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_Server]:
    """Serve ``tmp_path/www`` on 127.0.0.1 with a random port."""
    state = _Server(tmp_path / "www")
    state.directory.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------------------------
# fake archives


def _payload(name: str, size: int = 64) -> bytes:
    """Deterministic, poorly compressible bytes so archives have a useful size for the interruption test."""
    out = b""
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{name}-{counter}".encode()).digest()
        counter += 1
    return out[:size]


def _mvtec_tree() -> dict[str, bytes]:
    files = {"license.txt": b"CC BY-NC-SA 4.0\n", "readme.txt": b"MVTec AD\n"}
    for cat in MVTEC_CATEGORIES:
        files[f"{cat}/train/good/000.png"] = _payload(f"{cat}-train", 2048)
        files[f"{cat}/test/good/000.png"] = _payload(f"{cat}-test-good")
        files[f"{cat}/test/crack/000.png"] = _payload(f"{cat}-test-crack")
        files[f"{cat}/ground_truth/crack/000_mask.png"] = _payload(f"{cat}-mask")
    return files


def _btad_tree() -> dict[str, bytes]:
    files = {}
    for product in ("01", "02", "03"):
        ext = ".bmp" if product == "03" else ".png"
        files[f"BTech_Dataset_transformed/{product}/train/ok/0000.bmp"] = _payload(f"{product}-train")
        files[f"BTech_Dataset_transformed/{product}/test/ok/0000.bmp"] = _payload(f"{product}-ok")
        files[f"BTech_Dataset_transformed/{product}/test/ko/0000.bmp"] = _payload(f"{product}-ko")
        files[f"BTech_Dataset_transformed/{product}/ground_truth/ko/0000{ext}"] = _payload(f"{product}-gt")
    return files


def _mtd_tree() -> dict[str, bytes]:
    top = f"Magnetic-tile-defect-datasets.-{MTD_COMMIT}"
    files = {f"{top}/README.md": b"# Magnetic tile\n", f"{top}/dataset.jpg": _payload("readme-image")}
    for folder in ("MT_Free", "MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven"):
        for i in range(2):
            files[f"{top}/{folder}/Imgs/exp1_num_{i}.jpg"] = _payload(f"{folder}-{i}-jpg")
            files[f"{top}/{folder}/Imgs/exp1_num_{i}.png"] = _payload(f"{folder}-{i}-png")
    return files


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_xz_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _shell_manifest(files: dict[str, str | bytes], prefix: str = "") -> str:
    """Reference for ``find MT_* -type f | sort | xargs sha256sum | sha256sum`` over an in-memory tree."""
    rows = sorted((name.removeprefix(prefix), data) for name, data in files.items() if name.startswith(prefix))
    lines = "".join(f"{hashlib.sha256(data).hexdigest()}  {rel}\n" for rel, data in rows if rel.startswith("MT_"))
    return hashlib.sha256(lines.encode()).hexdigest()


def _serve(server: _Server, name: str, data: bytes, base: Source, **changes: object) -> Source:
    """Put ``data`` on the server and return ``base`` pointed at it, with the archive's real sha256 if it has one."""
    (server.directory / name).write_bytes(data)
    sha = hashlib.sha256(data).hexdigest() if base.sha256 else None
    fields: dict[str, object] = {"url": f"{server.url}/{name}", "sha256": sha}
    fields.update(changes)
    return dataclasses.replace(base, **fields)


def _leftovers(root: Path) -> list[str]:
    """Everything under ``root`` other than an (allowed) empty downloads folder."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.name != ".downloads")


# --------------------------------------------------------------------------------------------------------------------
# the source table


def test_source_table() -> None:
    assert NAMES == ("mvtec", "btad", "mtd")
    assert SOURCES["mvtec"].sha256 == "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
    assert SOURCES["btad"].sha256 == "461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a"
    assert SOURCES["mtd"].sha256 is None and SOURCES["mtd"].manifest_sha256 == MTD_PINNED
    assert "Magnetic-tile-defect-datasets./archive/cc4eb530b57b9cb7225bf76023873043ffd50655.zip" in SOURCES["mtd"].url
    for src in SOURCES.values():
        assert src.url.startswith("https://") and src.licence and src.homepage and src.expected


def test_unknown_name_lists_valid_ones(root: Path) -> None:
    with pytest.raises(DownloadError, match="mvtec, btad, mtd") as info:
        download_dataset("visa", root)
    assert isinstance(info.value, AdbenchError)
    with pytest.raises(DownloadError):
        get_source("nope")
    with pytest.raises(DownloadError):
        dataset_present("nope", root)


# --------------------------------------------------------------------------------------------------------------------
# happy paths


def test_mvtec_tar_xz_download_verify_extract(server: _Server, root: Path) -> None:
    files = _mvtec_tree()
    src = _serve(server, "mvtec.tar.xz", _tar_xz_bytes(files), SOURCES["mvtec"])
    calls: list[tuple[int, int | None]] = []

    out = download_dataset("mvtec", root, source=src, progress=lambda done, total: calls.append((done, total)))

    assert out == root / "mvtec"
    for name, data in files.items():
        assert (out / name).read_bytes() == data
    assert (out / MARKER).is_file()
    assert dataset_present("mvtec", root)
    size = (server.directory / "mvtec.tar.xz").stat().st_size
    assert calls[0] == (0, size) and calls[-1] == (size, size)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert server.ranges == [None]
    assert {rel.split("/")[0] for rel in _leftovers(root)} == {"mvtec"}  # no staging folder left beside it
    assert not (root / ".downloads").exists()  # archive removed after install, empty folder too


def test_btad_zip_strips_top_folder(server: _Server, root: Path) -> None:
    files = _btad_tree()
    src = _serve(server, "btad.zip", _zip_bytes(files), SOURCES["btad"])

    out = download_dataset("btad", root, source=src, keep_archive=True)

    assert sorted(p.name for p in out.iterdir()) == [MARKER, "01", "02", "03"]
    assert (out / "01/train/ok/0000.bmp").read_bytes() == files["BTech_Dataset_transformed/01/train/ok/0000.bmp"]
    assert (out / "03/ground_truth/ko/0000.bmp").is_file()
    assert (root / ".downloads" / "btad.zip").is_file()  # kept on request
    assert not list((root / ".downloads").glob("*.part"))


def test_mtd_zip_keeps_only_mt_folders_and_checks_manifest(server: _Server, root: Path) -> None:
    files = _mtd_tree()
    prefix = f"Magnetic-tile-defect-datasets.-{MTD_COMMIT}/"
    expected = _shell_manifest(files, prefix)
    src = _serve(server, "mtd.zip", _zip_bytes(files), SOURCES["mtd"], manifest_sha256=expected)

    out = download_dataset("mtd", root, source=src)

    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, *(f"MT_{n}" for n in (
        "Free", "Blowhole", "Break", "Crack", "Fray", "Uneven"))])  # fmt: skip
    assert (out / "MT_Free/Imgs/exp1_num_0.jpg").read_bytes() == files[f"{prefix}MT_Free/Imgs/exp1_num_0.jpg"]
    assert manifest_sha256(out) == expected
    assert dataset_present("mtd", root)


def test_mtd_manifest_mismatch_leaves_nothing(server: _Server, root: Path) -> None:
    src = _serve(server, "mtd.zip", _zip_bytes(_mtd_tree()), SOURCES["mtd"])  # real pin, fake content

    with pytest.raises(DownloadError, match=r"d2601c3c228c") as info:
        download_dataset("mtd", root, source=src)

    assert "\n" not in str(info.value)
    assert not (root / "mtd").exists()
    assert _leftovers(root) == []


# --------------------------------------------------------------------------------------------------------------------
# resuming


def test_interrupted_download_resumes_with_range(server: _Server, root: Path) -> None:
    files = _btad_tree()
    data = _zip_bytes(files)
    src = _serve(server, "btad.zip", data, SOURCES["btad"])
    server.drop_after = len(data) // 3

    with pytest.raises(DownloadError, match="resume") as info:
        download_dataset("btad", root, source=src)
    assert "\n" not in str(info.value)
    part = root / ".downloads" / "btad.zip.part"
    assert part.stat().st_size == len(data) // 3
    assert not dataset_present("btad", root)

    calls: list[tuple[int, int | None]] = []
    download_dataset("btad", root, source=src, progress=lambda done, total: calls.append((done, total)))

    assert server.ranges == [None, f"bytes={len(data) // 3}-"]
    assert calls[0] == (len(data) // 3, len(data)) and calls[-1] == (len(data), len(data))
    assert (root / "btad/02/test/ko/0000.bmp").read_bytes() == files["BTech_Dataset_transformed/02/test/ko/0000.bmp"]
    assert (root / "btad" / MARKER).is_file()
    assert not part.exists()


def test_server_ignoring_range_restarts_from_zero(server: _Server, root: Path) -> None:
    data = _zip_bytes(_btad_tree())
    src = _serve(server, "btad.zip", data, SOURCES["btad"])
    (root / ".downloads").mkdir()
    (root / ".downloads" / "btad.zip.part").write_bytes(b"garbage that is not a prefix")
    server.ignore_range = True

    download_dataset("btad", root, source=src)

    assert server.ranges == ["bytes=28-"]
    assert dataset_present("btad", root)


def test_part_longer_than_file_restarts(server: _Server, root: Path) -> None:
    data = _zip_bytes(_btad_tree())
    src = _serve(server, "btad.zip", data, SOURCES["btad"])
    (root / ".downloads").mkdir()
    (root / ".downloads" / "btad.zip.part").write_bytes(b"x" * (len(data) + 10))

    download_dataset("btad", root, source=src)

    assert server.ranges == [f"bytes={len(data) + 10}-", None]
    assert dataset_present("btad", root)


# --------------------------------------------------------------------------------------------------------------------
# failures


def test_checksum_mismatch_raises_and_leaves_nothing(server: _Server, root: Path) -> None:
    data = _tar_xz_bytes(_mvtec_tree())
    src = _serve(server, "mvtec.tar.xz", data, SOURCES["mvtec"], sha256="ab" * 32)

    with pytest.raises(DownloadError) as info:
        download_dataset("mvtec", root, source=src)

    message = str(info.value)
    assert "abababababab" in message and hashlib.sha256(data).hexdigest()[:12] in message
    assert "\n" not in message
    assert not (root / "mvtec").exists()
    assert not dataset_present("mvtec", root)
    assert _leftovers(root) == []  # archive deleted, no staging folder


@pytest.mark.parametrize("name", ["mvtec", "btad", "mtd"])
def test_unreachable_url_gives_one_line_manual_instructions(root: Path, name: str) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/x.zip"
    src = dataclasses.replace(SOURCES[name], url=url)

    with pytest.raises(DownloadError) as info:
        download_dataset(name, root, source=src, timeout=5)

    message = str(info.value)
    assert "\n" not in message
    assert "by hand" in message and url in message
    hint = {"mvtec": "mvtec/bottle/train/good", "btad": "btad/01/train/ok", "mtd": "mtd/MT_Free/Imgs"}[name]
    assert str(root / hint) in message
    assert SOURCES[name].homepage in message


def test_http_404_is_a_download_error(server: _Server, root: Path) -> None:
    src = dataclasses.replace(SOURCES["btad"], url=f"{server.url}/missing.zip")

    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_dataset("btad", root, source=src)

    assert "by hand" in str(info.value) and "\n" not in str(info.value)
    assert not (root / "btad").exists()


@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/adbench-evil.txt", "01/../../evil.txt"])
@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_path_traversal_is_rejected(server: _Server, root: Path, kind: str, evil: str) -> None:
    files = _btad_tree()
    files[f"BTech_Dataset_transformed/{evil}" if not evil.startswith("/") else evil] = b"pwned"
    if kind == "zip":
        src = _serve(server, "btad.zip", _zip_bytes(files), SOURCES["btad"])
    else:
        src = _serve(server, "btad.tar.xz", _tar_xz_bytes(files), SOURCES["btad"], archive="tar")

    with pytest.raises(DownloadError, match="unsafe"):
        download_dataset("btad", root, source=src)

    assert not (root / "evil.txt").exists() and not (root.parent / "evil.txt").exists()
    assert not Path("/tmp/adbench-evil.txt").exists()
    assert not (root / "btad").exists()
    assert _leftovers(root) == []


def test_tar_symlink_out_of_tree_is_rejected(server: _Server, root: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name, data in _mvtec_tree().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("bottle/escape")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    src = _serve(server, "mvtec.tar.xz", buf.getvalue(), SOURCES["mvtec"])

    with pytest.raises(DownloadError):
        download_dataset("mvtec", root, source=src)

    assert not (root / "mvtec").exists()


def test_garbage_archive_is_a_download_error(server: _Server, root: Path) -> None:
    src = _serve(server, "btad.zip", b"this is not a zip file", SOURCES["btad"])

    with pytest.raises(DownloadError, match="cannot extract"):
        download_dataset("btad", root, source=src)

    assert _leftovers(root) == []


def test_archive_without_expected_layout_is_rejected(server: _Server, root: Path) -> None:
    files = {k: v for k, v in _btad_tree().items() if "/03/" not in k}
    src = _serve(server, "btad.zip", _zip_bytes(files), SOURCES["btad"])

    with pytest.raises(DownloadError, match="03/train/ok"):
        download_dataset("btad", root, source=src)

    assert not (root / "btad").exists()


# --------------------------------------------------------------------------------------------------------------------
# already installed


def test_complete_marker_means_no_network(root: Path) -> None:
    (root / "mvtec").mkdir()
    (root / "mvtec" / MARKER).write_text("{}\n")
    offline = dataclasses.replace(SOURCES["mvtec"], url=f"http://127.0.0.1:{_closed_port()}/x.tar.xz")

    assert download_dataset("mvtec", root, source=offline) == root / "mvtec"
    assert download_dataset("mvtec", root) == root / "mvtec"  # the real URL is never contacted either
    with pytest.raises(DownloadError, match="by hand"):
        download_dataset("mvtec", root, source=offline, force=True, timeout=5)


def test_complete_layout_without_marker_means_no_network(root: Path) -> None:
    for folder in ("MT_Free", "MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven"):
        (root / "mtd" / folder / "Imgs").mkdir(parents=True)

    assert dataset_present("mtd", root)
    assert download_dataset("mtd", root) == root / "mtd"


def test_partial_layout_is_not_present(root: Path) -> None:
    (root / "btad" / "01" / "train" / "ok").mkdir(parents=True)
    assert not dataset_present("btad", root)
    assert not dataset_present("mvtec", root)


def test_force_reinstalls_over_existing(server: _Server, root: Path) -> None:
    files = _btad_tree()
    src = _serve(server, "btad.zip", _zip_bytes(files), SOURCES["btad"])
    download_dataset("btad", root, source=src)
    (root / "btad/01/train/ok/0000.bmp").write_bytes(b"tampered")

    download_dataset("btad", root, source=src)  # complete: nothing happens
    assert (root / "btad/01/train/ok/0000.bmp").read_bytes() == b"tampered"
    download_dataset("btad", root, source=src, force=True)

    assert (root / "btad/01/train/ok/0000.bmp").read_bytes() == files["BTech_Dataset_transformed/01/train/ok/0000.bmp"]
    assert len(server.ranges) == 2


# --------------------------------------------------------------------------------------------------------------------
# the manifest hash


def test_manifest_matches_shell_pipeline_on_small_tree(tmp_path: Path) -> None:
    files = {"MT_B/Imgs/a.jpg": b"1", "MT_A/Imgs/b.png": b"22", "MT_A/Imgs/B.png": b"3", "other/x": b"4"}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    assert manifest_sha256(tmp_path) == _shell_manifest(files)
    assert manifest_sha256(tmp_path, "MT_A") != manifest_sha256(tmp_path)


def test_manifest_of_real_mtd_matches_pin() -> None:
    data_root = Path(os.environ.get("ADBENCH_DATA", REPO.parent / "shared" / "datasets"))
    mtd = data_root / "mtd"
    if not mtd.is_dir():
        pytest.skip(f"no MTD copy at {mtd}")
    assert manifest_sha256(mtd) == MTD_PINNED
    assert dataset_present("mtd", data_root)
