"""Hostile and odd uploads against a running server: valid images get verdicts, the rest 4xx, never a
5xx, and the server is healthy afterwards."""

from __future__ import annotations

import io
import random
import select
import socket
import struct
import zlib

import httpx
import pytest
from api_fixtures import LiveServer, image_bytes, server_env
from PIL import Image

pytestmark = pytest.mark.slow


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def decompression_bomb(side: int = 12000) -> bytes:
    """A real, complete PNG of side x side black pixels that compresses to a few hundred KB."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    chunks = [compressor.compress(row * 500) for _ in range(side // 500)]
    return png_declaring(side, side, b"".join(chunks) + compressor.flush())


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def exif_rotated() -> bytes:
    image = Image.new("RGB", (64, 32), (250, 250, 250))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    return encode(image, "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("P", (40, 40), i * 60) for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def large_photo() -> bytes:
    gradient = Image.linear_gradient("L").resize((6000, 4000))
    return encode(Image.merge("RGB", (gradient, gradient, gradient)), "JPEG", quality=80)


VALID = {
    "cmyk.jpg": lambda: encode(Image.new("CMYK", (50, 40), (0, 0, 0, 0)), "JPEG"),
    "sixteen-bit.png": lambda: encode(Image.new("I;16", (40, 40), 40000), "PNG"),
    "sixteen-bit.tif": lambda: encode(Image.new("I;16", (40, 40), 1000), "TIFF"),
    "animated.gif": animated_gif,
    "exif-rotated.jpg": exif_rotated,
    "one-pixel.png": lambda: image_bytes(255, size=(1, 1)),
    "6000x4000.jpg": large_photo,
    "rgba.png": lambda: encode(Image.new("RGBA", (30, 30), (0, 0, 0, 0)), "PNG"),
    "photo.webp": lambda: encode(Image.new("RGB", (30, 30), (9, 9, 9)), "WEBP"),
    "grey.bmp": lambda: encode(Image.new("L", (30, 30), 3), "BMP"),
}

INVALID = {
    "empty.jpg": lambda: b"",
    "truncated.jpg": lambda: encode(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG")[:3000],
    "text.jpg": lambda: b"Invoice 2026-11-29: 400 handbags, declared value 12 USD\n" * 20,
    "image.svg": lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>',
    "page.html": lambda: b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
    "bomb.png": decompression_bomb,
    "huge-declared.png": lambda: png_declaring(100_000, 100_000),
    "huge-declared.gif": lambda: b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00;",
    "zero-size.png": lambda: png_declaring(0, 0),
    "random.bin": lambda: random.Random(7).randbytes(50_000),
    "jpeg-header-only.jpg": lambda: b"\xff\xd8\xff\xe0" + b"\x00" * 100,
    "corrupt-pixels.png": lambda: png_declaring(40, 40, b"not zlib data at all"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    live = LiveServer(server_env(root, VERITY_MAX_UPLOAD_BYTES=str(20 * 1024 * 1024))).start()
    yield live
    live.stop()


def post(server: LiveServer, name: str, data: bytes, modality: str = "photo") -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/predict",
        files={"file": (name, data, "image/jpeg")},
        data={"modality": modality},
        timeout=60,
    )


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_images_get_verdicts(server: LiveServer, name: str) -> None:
    for modality in ("photo", "xray"):
        response = post(server, name, VALID[name](), modality)
        assert response.status_code == 200, (name, modality, response.text)
        assert response.json()["verdict"] in ("genuine", "counterfeit", "uncertain")


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_uploads_get_4xx(server: LiveServer, name: str) -> None:
    response = post(server, name, INVALID[name]())
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
    body = response.json()["error"]
    assert body["code"] and body["message"] and "Traceback" not in response.text


def test_exif_rotation_is_applied(server: LiveServer) -> None:
    # 64x32 stored, rotated to 32x64: the same bytes without the tag hash differently but both decode.
    assert post(server, "r.jpg", exif_rotated()).status_code == 200


def test_oversized_body_is_cut_off_while_streaming(server: LiveServer) -> None:
    """A chunked upload with no Content-Length is refused soon after it passes the limit."""
    limit = 20 * 1024 * 1024
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        part = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
                b"Content-Type: image/jpeg\r\n\r\n")
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        chunk = b"x" * 65536
        try:
            while sent < 8 * limit:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                if select.select([sock], [], [], 0)[0]:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            answer = sock.recv(4096)
        except ConnectionResetError:
            answer = b""
    print(f"cut off after {sent:,} bytes: {answer[:12]!r}")
    assert sent < 2 * limit, f"the server kept reading: {sent:,} bytes"
    assert answer.startswith(b"HTTP/1.1 413") or answer == b"", answer[:200]


def test_declared_oversized_body_is_refused(server: LiveServer) -> None:
    """A Content-Length over the limit is answered 413 before any of the body is sent."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000000\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):  # the server closes the connection after its answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"request_too_large"' in answer


def test_server_healthy_after(server: LiveServer) -> None:
    for name in sorted(INVALID):
        post(server, name, INVALID[name]())
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    assert post(server, "ok.png", image_bytes(0)).json()["verdict"] == "genuine"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'status="500"' not in metrics and server.process.poll() is None
