"""Shard I/O: img2dataset layout, every kind of damaged input counted, atomic writes, fsspec URLs, image checks."""

import hashlib
import io
import os
import random
import subprocess
import sys
import tarfile
import textwrap
import threading
from collections import Counter

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataset_builders.images import BadImage, decode_rgb, inspect_image, normalize_for_corpus, to_rgb
from dataset_builders.shards import (
    Dropped,
    Sample,
    ShardProblem,
    ShardWriter,
    is_unsafe_member,
    iter_samples,
    list_shards,
    split_member_name,
)
from dataset_builders.synthetic import (
    clean_sample,
    damaged_shard_members,
    decompression_bomb_png,
    encode,
    odd_mode_images,
    sample_members,
    shape_image,
    write_clean_shards,
    write_shard,
)
from dataset_builders.uids import derive_uid


def _outcomes(folder, shard):
    """key -> "ok" or the drop reason (first occurrence), reason counts, shard problems."""
    outcome, reasons, problems = {}, Counter(), []
    for item in iter_samples(folder, shard):
        if isinstance(item, ShardProblem):
            problems.append(item)
        elif isinstance(item, Dropped):
            reasons[item.reason] += 1
            outcome.setdefault(item.key, item.reason)
        else:
            try:
                decode_rgb(item.image)
                outcome.setdefault(item.key, "ok")
            except BadImage as error:
                reasons[error.reason] += 1
                outcome.setdefault(item.key, error.reason)
    return outcome, reasons, problems


def test_clean_shards_round_trip_with_img2dataset_parquet(tmp_path):
    rows = write_clean_shards(str(tmp_path), num_shards=2, per_shard=5, seed=3)
    assert list_shards(str(tmp_path)) == ["00000.tar", "00001.tar"]
    samples = [s for shard in list_shards(str(tmp_path)) for s in iter_samples(str(tmp_path), shard)]
    assert all(isinstance(s, Sample) for s in samples)
    assert [(s.key, s.uid, s.caption, s.url) for s in samples] == [
        (r["key"], r["uid"], r["caption"], r["url"]) for r in rows
    ]
    assert [Image.open(io.BytesIO(s.image)).size for s in samples] == [(r["width"], r["height"]) for r in rows]


def test_every_damaged_input_is_dropped_with_its_reason_or_repaired(tmp_path):
    members, expected = damaged_shard_members(random.Random(0))
    write_shard(str(tmp_path / "00000.tar"), members)
    outcome, reasons, problems = _outcomes(str(tmp_path), "00000.tar")
    assert problems == []
    assert outcome == expected
    expected_counts = Counter(r for r in expected.values() if r != "ok")
    expected_counts["duplicate_key"] += 1  # the second "bad_dup" group; its first occurrence is kept
    assert reasons == expected_counts


def surrogate_members(rng):
    """One good sample and three whose key, json caption or json url hold a lone surrogate (a non-UTF-8 member name,
    a valid json escape). Returns (members, good sample's metadata)."""
    members, good = clean_sample(rng, "good")
    image = encode(shape_image(rng, 40, 40))
    # tarfile writes the surrogate-escaped name as the raw latin-1 byte 0xE9
    members += sample_members("caf\udce9", image, "a latin-1 file name", {"uid": "b" * 32, "url": "u"})
    members += sample_members("bad_caption", image, None, {"uid": "c" * 32, "url": "u", "caption": "cat \udc80"})
    members += sample_members("bad_url", image, "a caption", {"url": "http://x/\ud800"})  # no uid: derived from url
    return members, good


def test_lone_surrogates_in_key_caption_or_url_are_counted_drops(tmp_path):
    members, good = surrogate_members(random.Random(4))
    data = write_shard(str(tmp_path / "00000.tar"), members)
    assert b"caf\xe9.jpg" in data and b'\\udc80' in data and b'\\ud800' in data
    items = list(iter_samples(str(tmp_path), "00000.tar"))
    assert [(type(i).__name__, i.key, getattr(i, "reason", None)) for i in items] == [
        ("Sample", "good", None),
        ("Dropped", "caf\\udce9", "bad_key"),  # printable: the sample is named in logs and the selection
        ("Dropped", "bad_caption", "caption_not_utf8"),
        ("Dropped", "bad_url", "bad_json"),
    ]
    assert items[0].uid == good["uid"] and items[0].caption == good["caption"]
    for item in items[1:]:
        (item.key + item.detail).encode("utf-8")  # writable as it is
    assert "http://x/\\ud800" in items[3].detail
    # derive_uid itself no longer raises on such text (and still hashes valid text as UTF-8)
    assert derive_uid("http://x/\ud800", "c") != derive_uid("http://x/", "c")
    assert derive_uid("u", "caption") == hashlib.md5(b"u\x1fcaption\x1f").hexdigest()


def test_member_name_rules():
    assert split_member_name("dir/000123.jpg") == ("dir/000123", "jpg")
    assert split_member_name("000123.seg.PNG") == ("000123", "seg.png")
    assert split_member_name("README") is None
    assert [is_unsafe_member(n) for n in ("a/b.jpg", "../a.jpg", "a/../../b.jpg", "/etc/x.jpg", "C:x.jpg",
                                          "a\\b.jpg", "a..b.jpg")] == [False, True, True, True, True, True, False]


@pytest.mark.parametrize("cut", ["mid_member", "mid_header", "empty_file"])
def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path, cut):
    rng = random.Random(1)
    members = []
    for i in range(4):
        members += [(f"{i:04d}.jpg", encode(shape_image(rng), "JPEG")), (f"{i:04d}.txt", f"caption {i}".encode())]
    full = write_shard(str(tmp_path / "full.tar"), members)
    # offsets of each member's header in the uncut tar
    offsets = [m.offset for m in tarfile.open(fileobj=io.BytesIO(full))]
    cut_at = {"mid_member": offsets[5] + 512 + 10, "mid_header": offsets[4] + 100, "empty_file": 0}[cut]
    write_shard(str(tmp_path / "00000.tar"), members, truncate_at=cut_at)
    items = list(iter_samples(str(tmp_path), "00000.tar"))
    kept = [i.key for i in items if isinstance(i, Sample)]
    dropped = [(i.key, i.reason) for i in items if isinstance(i, Dropped)]
    problems = [i for i in items if isinstance(i, ShardProblem)]
    assert len(problems) == 1 and problems[0].shard == "00000.tar"
    # The sample being read when the damage shows is counted as corrupt_shard, never silently lost: mid-member,
    # 0002 had its jpg read when its txt turned out cut; mid-header, 0001 may be missing members (the cut header
    # could be its json), so it is not trusted either.
    expected = {
        "mid_member": (["0000", "0001"], [("0002", "corrupt_shard")]),
        "mid_header": (["0000"], [("0001", "corrupt_shard")]),
        "empty_file": ([], []),
    }[cut]
    assert (kept, dropped) == expected


def test_shard_writer_is_atomic_when_the_process_dies(tmp_path):
    script = textwrap.dedent(f"""
        import os
        from dataset_builders.shards import ShardWriter
        writer = ShardWriter({str(tmp_path)!r}, "00000")
        for i in range(50):
            writer.write(f"{{i:04d}}", b"x" * 1000, "caption", {{"uid": "0" * 32}})
        os._exit(9)  # killed before commit
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith(".")) == []
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")
    with ShardWriter(str(tmp_path), "00000") as writer:  # the next writer of the same shard cleans up
        writer.write("0000", encode(Image.new("RGB", (4, 4)), "JPEG"), "ok", {"uid": "1" * 32})
    assert sorted(os.listdir(tmp_path)) == ["00000.parquet", "00000.tar"]


def test_shard_writer_aborts_on_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(str(tmp_path), "00007") as writer:
            writer.write("0000", b"x", "c", {})
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_written_shard_is_byte_identical_on_rewrite_and_parquet_matches_json(tmp_path):
    image = encode(shape_image(random.Random(2)), "JPEG")
    outputs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        with ShardWriter(str(tmp_path / name), "00000") as writer:
            for i in range(3):
                writer.write(f"{i:04d}", image, f"cap {i}", {"uid": f"{i:032x}", "url": f"u{i}", "width": 7})
        outputs.append((tmp_path / name / "00000.tar").read_bytes())
    assert outputs[0] == outputs[1]
    table = pq.read_table(tmp_path / "a" / "00000.parquet").to_pylist()
    assert [(r["key"], r["uid"], r["caption"], r["width"], r["status"]) for r in table] == [
        (f"{i:04d}", f"{i:032x}", f"cap {i}", 7, "success") for i in range(3)
    ]


def test_fsspec_urls_read_and_write(tmp_path):
    fs = fsspec.filesystem("memory")
    image = encode(shape_image(random.Random(4)), "JPEG")
    with ShardWriter("memory://corpus/shards", "00000") as writer:
        writer.write("0000", image, "in memory", {"uid": "a" * 32, "url": "u"})
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/corpus/shards", detail=False)) == [
        "00000.parquet", "00000.tar"]
    assert list_shards("memory://corpus/shards") == ["00000.tar"]
    (sample,) = list(iter_samples("memory://corpus/shards", "00000.tar"))
    assert (sample.key, sample.uid, sample.caption, sample.image) == ("0000", "a" * 32, "in memory", image)
    fs.rm("/corpus", recursive=True)


# -- images ---------------------------------------------------------------------------------------------------


def test_inspect_image_does_not_decode_complete_images(monkeypatch):
    data = encode(shape_image(random.Random(5), 50, 40), "JPEG")
    monkeypatch.setattr(Image.Image, "load", lambda self: (_ for _ in ()).throw(AssertionError("decoded")))
    info = inspect_image(data)
    assert (info.format, info.mode, info.width, info.height) == ("JPEG", "RGB", 50, 40)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_images_are_detected(fmt):
    data = encode(shape_image(random.Random(6), 64, 64), fmt)
    with pytest.raises(BadImage) as error:
        inspect_image(data[: len(data) * 2 // 3])
    assert error.value.reason in ("image_truncated", "image_undecodable")


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(BadImage) as error:
        inspect_image(decompression_bomb_png())
    assert error.value.reason == "image_too_large"
    with pytest.raises(BadImage, match="image_too_large: 40x30 > 1000 pixels"):
        inspect_image(encode(Image.new("RGB", (40, 30)), "PNG"), max_pixels=1000)


def test_to_rgb_scales_16_bit_and_composites_alpha_on_white():
    values = np.array([[0, 257, 65535], [1000, 30000, 60000]], dtype=np.uint16)
    got = np.asarray(to_rgb(Image.fromarray(values, "I;16")))
    assert got.shape == (2, 3, 3)
    np.testing.assert_array_equal(got[..., 0], np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))
    half = Image.new("LA", (2, 2), (0, 128))  # black at 50% opacity over white -> mid grey
    np.testing.assert_allclose(np.asarray(to_rgb(half), dtype=float), 127, atol=1.5)
    palette = Image.open(io.BytesIO(odd_mode_images()["palette"]))
    assert palette.mode == "P"
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)  # transparent index -> white, not its red entry
    assert to_rgb(palette).getpixel((15, 0)) == (0, 0, 255)
    cmyk = Image.open(io.BytesIO(odd_mode_images()["cmyk"]))
    r, g, b = to_rgb(cmyk).getpixel((5, 5))
    assert r > 200 and g < 60 and b < 60  # (C=0, M=255, Y=255, K=0) is red


def test_normalize_keeps_plain_jpeg_bytes_and_reencodes_the_rest():
    jpeg = encode(shape_image(random.Random(7)), "JPEG")
    assert normalize_for_corpus(jpeg, inspect_image(jpeg)) == (jpeg, False)
    for name, data in odd_mode_images().items():
        out, reencoded = normalize_for_corpus(data, inspect_image(data))
        image = Image.open(io.BytesIO(out))
        assert (image.format, image.mode) == ("JPEG", "RGB") or (image.format, image.mode) == ("JPEG", "L"), name
        assert reencoded == (name not in ("one_pixel",)), name


def test_fast_jpeg_header_agrees_with_pil():
    from dataset_builders.images import _plain_jpeg_info

    rng = random.Random(8)
    base = shape_image(rng, 70, 45)
    exif = Image.Exif()
    exif[0x010E] = "a description long enough to push the frame header further" * 20
    variants = {
        "baseline": encode(base, "JPEG"),
        "progressive": encode(base, "JPEG", progressive=True),
        "grey": encode(base.convert("L"), "JPEG"),
        "exif": encode(base, "JPEG", exif=exif.tobytes()),
        "subsampled": encode(base, "JPEG", subsampling=2, quality=50),
        "cmyk": odd_mode_images()["cmyk"],
        "png": encode(base, "PNG"),
    }
    for name, data in variants.items():
        pil = Image.open(io.BytesIO(data))
        fast = _plain_jpeg_info(data)
        if pil.format == "JPEG" and pil.mode in ("RGB", "L"):
            assert (fast.format, fast.mode, fast.width, fast.height) == ("JPEG", pil.mode, *pil.size), name
        else:
            assert fast is None, name  # anything else goes to PIL
        assert inspect_image(data) == inspect_image(data, full_decode=True), name


def test_parquet_from_an_open_file_is_parsed_from_memory_not_through_the_file_object(tmp_path):
    """pyarrow reading a Python file object does so on its IO threads; one such read released during interpreter
    shutdown aborted `select` at exit (status 134). The file object must only ever be read whole, once."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataset_builders.shards import open_parquet, read_parquet

    buffer = io.BytesIO()
    pq.write_table(pa.table({"uid": ["a", "b"], "keep": [True, False]}), buffer)

    class Recording(io.BytesIO):
        calls: list = []

        def read(self, *args):
            self.calls.append(("read", args))
            return super().read(*args)

        def seek(self, *args):
            self.calls.append(("seek", args))
            return super().seek(*args)

    handle = Recording(buffer.getvalue())
    assert read_parquet(handle, ["keep"]).to_pydict() == {"keep": [True, False]}
    assert handle.calls == [("read", ())]
    assert open_parquet(Recording(buffer.getvalue())).metadata.num_rows == 2


class ThreadRecordingFile(io.BytesIO):
    """An in-memory file that records, for every read, the thread it ran on and the byte range it read."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.reads: list[tuple[int, int, int]] = []  # (thread id, start, end)
        self.threads: set[int] = set()

    def _record(self, start: int, size: int) -> None:
        self.reads.append((threading.get_ident(), start, start + size))

    def seek(self, *args):
        self.threads.add(threading.get_ident())
        return super().seek(*args)

    def tell(self):
        self.threads.add(threading.get_ident())
        return super().tell()

    def read(self, *args):
        start, data = super().tell(), super().read(*args)
        self._record(start, len(data))
        return data

    def readinto(self, buffer):
        start, size = super().tell(), super().readinto(buffer)
        self._record(start, size)
        return size


def test_parquet_on_this_thread_reads_the_footer_and_row_groups_on_the_calling_thread_then_closes():
    """pyarrow's ParquetFile pre-buffers by default, reading a Python file on its IO threads (a release of such a
    read during interpreter shutdown aborts the process, status 134); this reader must touch the file only from the
    calling thread, and close it on exit."""
    import pyarrow as pa

    from dataset_builders.shards import parquet_on_this_thread

    rng = random.Random(4)
    table = pa.table({"n": list(range(4000)), "text": ["%032x" % rng.getrandbits(128) for _ in range(4000)]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=1000)
    handle = ThreadRecordingFile(buffer.getvalue())
    with parquet_on_this_thread(handle) as parquet:
        assert parquet.metadata.num_rows == 4000 and parquet.metadata.num_row_groups == 4
        assert parquet.read_row_group(2, use_threads=False).equals(table.slice(2000, 1000))
        assert parquet.read_row_group(0, columns=["text"], use_threads=False).column("text").to_pylist() == (
            table.column("text").to_pylist()[:1000])
    assert handle.reads and {thread for thread, _, _ in handle.reads} | handle.threads == {threading.get_ident()}
    assert parquet.closed and handle.closed
